import json

import pytest
import torch
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from sae.base_model import gpt2_tokenizer, load_base_model, residual_at
from training.activations import ActivationBuffer, harvest_activations, harvest_stories, tokenize_stories
from training.stories import load_stories, split_stories

STORIES = [
    "Once upon a time there was a little dog named Max.",
    "Lily liked to play in the park with her red ball.",
    "The sun was hot. Tom drank some water and felt better.",
    "A bird sang.",
]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def bm(tmp_path_factory, tok):
    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=50257, hidden_size=32, num_layers=4, num_heads=4, max_position_embeddings=64,
                       attention_types=[[["global", "local"], 2]], window_size=8, intermediate_size=64)  # fmt: skip
    folder = tmp_path_factory.mktemp("models") / "tiny-neo"
    GPTNeoForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_base_model(str(folder))


def test_tokenize_pack(tok):
    tb = tokenize_stories(tok, STORIES, context_size=8, pack=True)
    stream = [t for s in STORIES for t in (*tok(s).input_ids, tok.eos_token_id)]
    assert tb.input_ids.shape == (len(stream) // 8, 8) and bool(tb.attention_mask.all())
    assert tb.input_ids.flatten().tolist() == stream[: tb.input_ids.numel()]
    bos = tokenize_stories(tok, STORIES, context_size=8, pack=True, prepend_bos=True)
    assert (bos.input_ids[:, 0] == tok.bos_token_id).all()
    assert bos.input_ids[0, 1:].tolist() == stream[:7]


def test_tokenize_pad(tok):
    tb = tokenize_stories(tok, STORIES, context_size=12, pack=False)
    assert tb.input_ids.shape == (len(STORIES), 12)
    for i, s in enumerate(STORIES):
        ids = tok(s).input_ids[:12]
        assert tb.attention_mask[i].sum() == len(ids)
        assert tb.input_ids[i, : len(ids)].tolist() == ids
    assert tb.attention_mask[3].tolist()[-1] == 0  # "A bird sang." is padded


def test_harvest_drops_padding(bm, tok):
    tb = tokenize_stories(tok, STORIES, context_size=12, pack=False)
    acts = harvest_activations(bm, tb, layer=1, batch_size=3, progress=False)
    assert acts.shape == (int(tb.attention_mask.sum()), 32) and acts.dtype == torch.float32
    expected = []
    for s in STORIES:  # each story alone, unpadded: padding must not leak into the real positions
        ids = torch.tensor([tok(s).input_ids[:12]])
        expected.append(residual_at(bm, ids, None, 1)[0])
    torch.testing.assert_close(acts, torch.cat(expected), atol=1e-5, rtol=1e-5)
    packed = harvest_stories(bm, STORIES, 1, context_size=16, batch_size=2, progress=False)
    assert packed.shape[1] == 32 and len(packed) % 16 == 0


def _take(buf, n_batches):
    return torch.cat([buf.next_batch() for _ in range(n_batches)]).flatten().long().tolist()


def test_buffer_epochs_and_determinism():
    n, bs = 103, 10
    acts = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    buf = ActivationBuffer(acts, batch_size=bs, seed=1)
    seen = _take(buf, 30)  # 300 vectors: two full epochs and part of a third
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n : 2 * n]) == list(range(n))
    assert seen[:n] != list(range(n)) and seen[:n] != seen[n : 2 * n]  # shuffled, reshuffled per epoch
    assert buf.state_dict()["epoch"] == 2 and buf.vectors_seen == 300
    assert _take(ActivationBuffer(acts, bs, seed=1), 30) == seen
    assert _take(ActivationBuffer(acts, bs, seed=2), 30) != seen


def test_buffer_resume():
    acts = torch.randn(57, 4)
    a = ActivationBuffer(acts, batch_size=8, seed=3)
    for _ in range(9):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = ActivationBuffer(acts, batch_size=8, seed=3)
    b.load_state_dict(state)
    for _ in range(12):
        torch.testing.assert_close(a.next_batch(), b.next_batch())
    with pytest.raises(ValueError):
        ActivationBuffer(acts[:10], batch_size=8, seed=3).load_state_dict(state)


def test_stories_split_and_errors(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(f"Story {i}." for i in range(20)) + "\n", encoding="utf-8")
    split = split_stories(load_stories(path))
    assert len(split.train) == 18 and split.val == ["Story 9.", "Story 19."]
    assert not set(split.train) & set(split.val)
    with pytest.raises(FileNotFoundError):
        load_stories(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    with pytest.raises(ValueError, match="cannot read"):
        load_stories(bad)

import json
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoConfig, GPTNeoForCausalLM, LlamaConfig, LlamaForCausalLM

from sae.base_model import (
    BaseModelLoadError,
    gpt2_tokenizer,
    hf_hidden_states_index,
    hook_name,
    load_base_model,
    logits_with_replacement,
    parse_hook_name,
    residual_at,
)

NEO = dict(
    vocab_size=50257, hidden_size=32, num_layers=4, num_heads=4, max_position_embeddings=64,
    attention_types=[[["global", "local"], 2]], window_size=8, intermediate_size=64,
)  # fmt: skip


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "gpt_neo":
        return GPTNeoForCausalLM(GPTNeoConfig(**NEO))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    cfg = LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module", params=["gpt_neo", "gpt2", "llama"])
def bm(request, tmp_path_factory, tok):
    folder = tmp_path_factory.mktemp("models") / f"tiny-{request.param}"
    _tiny(request.param).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_base_model(str(folder))


@pytest.fixture(scope="module")
def batch(tok):
    enc = tok(["Once upon a time there was a little dog.", "Lily liked to play."], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_gpt2_tokenizer(tok):
    assert tok("Once upon a time").input_ids == [7454, 2402, 257, 640]
    assert tok.eos_token_id == 50256 and len(tok) == 50257


def test_hook_names():
    assert hook_name(1) == "blocks.1.hook_resid_post"
    assert parse_hook_name("blocks.1.hook_resid_post") == 1
    assert hf_hidden_states_index(1) == 2
    with pytest.raises(ValueError):
        parse_hook_name("blocks.1.hook_mlp_out")


def test_load_local_folder(bm):
    assert bm.name.startswith("tiny-") and bm.d_model == 32 and bm.context_size == 64
    assert bm.n_layers == len(bm.blocks) == bm.model.config.num_hidden_layers
    assert not bm.model.training and bm.prepend_bos is False and bm.tokenizer.pad_token is not None


def test_residual_matches_hidden_states(bm, batch):
    ids, mask = batch
    with torch.no_grad():
        hidden = bm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in range(bm.n_layers - 1):
        torch.testing.assert_close(residual_at(bm, ids, mask, layer), hidden[layer + 1])
    # HF's last hidden_states entry is after the final norm; hook_resid_post is before it.
    last = bm.n_layers - 1
    out = []
    h = bm.blocks[last].register_forward_hook(lambda m, a, o: out.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        bm.model(input_ids=ids, attention_mask=mask)
    h.remove()
    torch.testing.assert_close(residual_at(bm, ids, mask, hook_name(last)), out[0])


def test_residual_at_stops_early(bm, batch):
    calls = {"hooked": 0, "last": 0, "lm_head": 0}
    n_hooks = len(bm.blocks[1]._forward_hooks)  # transformers installs its own output-capturing hooks
    hooks = [
        bm.blocks[1].register_forward_hook(lambda *a: calls.__setitem__("hooked", calls["hooked"] + 1)),
        bm.blocks[-1].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1)),
        bm.model.get_output_embeddings().register_forward_hook(
            lambda *a: calls.__setitem__("lm_head", calls["lm_head"] + 1)
        ),
    ]
    residual_at(bm, *batch, 1)
    for h in hooks:
        h.remove()
    assert calls == {"hooked": 1, "last": 0, "lm_head": 0}
    assert len(bm.blocks[1]._forward_hooks) == n_hooks  # residual_at removed its hook


def test_splice(bm, batch):
    ids, mask = batch
    clean = logits_with_replacement(bm, ids, mask, 1, None)
    resid = residual_at(bm, ids, mask, 1)
    torch.testing.assert_close(logits_with_replacement(bm, ids, mask, 1, resid), clean)
    zeroed = logits_with_replacement(bm, ids, mask, 1, torch.zeros_like(resid))
    assert not torch.allclose(zeroed, clean)
    with pytest.raises(ValueError, match="shape"):
        logits_with_replacement(bm, ids, mask, 1, resid[:, :-1])


def test_random_spec(tmp_path):
    path = tmp_path / "tiny-neo" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"model_type": "gpt_neo", **NEO}))
    a, b = load_base_model(f"random:{path}"), load_base_model(f"random:{path}")
    assert a.name == "tiny-neo-random" and a.n_layers == 4 and a.tokenizer("Once").input_ids == [7454]
    wa, wb = a.model.transformer.wte.weight, b.model.transformer.wte.weight
    assert torch.equal(wa, wb)


def test_load_errors(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(BaseModelLoadError, match="does not exist"):
        load_base_model(str(tmp_path / "missing"))
    with pytest.raises(BaseModelLoadError, match="random:"):
        load_base_model("nonexistent-user/nonexistent-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelLoadError, match=r"no config\.json"):
        load_base_model(str(tmp_path / "empty"))
    with pytest.raises(BaseModelLoadError, match="cannot read"):
        load_base_model(f"random:{tmp_path / 'nope.json'}")
    assert time.monotonic() - t0 < 20  # no long network retries


def test_hook_out_of_range(bm, batch):
    with pytest.raises(IndexError, match=f"0..{bm.n_layers - 1}"):
        residual_at(bm, *batch, bm.n_layers)
    with pytest.raises(IndexError):
        logits_with_replacement(bm, *batch, -1, None)

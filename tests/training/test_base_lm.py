"""Fast CPU tests of `python -m training base-lm` on a handful of synthetic stories (no network, no ../shared)."""

from __future__ import annotations

import csv
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.base_lm.checkpoints import list_checkpoints
from training.base_lm.cli import main as base_lm_main
from training.base_lm.config import BaseLMConfig
from training.base_lm.model import build_model, fast_attention, lr_at

NAMES = ["Lily", "Tom", "Ben", "Mia", "Sue", "Max"]
THINGS = ["ball", "cat", "tree", "boat", "cake", "dog", "kite", "hat"]
PLACES = ["park", "garden", "house", "beach", "forest"]


def write_stories(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    stories = []
    for _ in range(n):
        name, thing, place = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
        stories.append(
            f"Once upon a time, {name} went to the {place}. {name} saw a big {thing}. "
            f'"I like the {thing}!" said {name}. {name} played with the {thing} all day and was happy.'
        )
    path.write_text("\n<|endoftext|>\n".join(stories) + "\n<|endoftext|>\n", encoding="utf-8")
    return path


def tiny_args(data: Path, tmp: Path, name: str, steps: int = 24) -> list[str]:
    return [
        "--data", str(data), "--output-dir", str(tmp / name / "out"), "--run-dir", str(tmp / name / "run"),
        "--vocab-size", "300", "--d-model", "32", "--num-layers", "2", "--num-heads", "2",
        "--max-position-embeddings", "64", "--window-size", "16", "--context", "32", "--batch-size", "4",
        "--max-steps", str(steps), "--warmup-steps", "3", "--lr", "5e-3", "--min-lr", "5e-4",
        "--eval-every", "6", "--save-every", "5", "--threads", "1", "--progress", "false", "--sample-tokens", "8",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory) -> Path:
    return write_stories(tmp_path_factory.mktemp("data") / "stories.txt")


@pytest.fixture(scope="module")
def trained(stories_file, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("full")
    base_lm_main(tiny_args(stories_file, tmp, "a"))
    return tmp / "a"


def read_log(out: Path) -> list[dict[str, str]]:
    with open(out / "train_log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_output_folder_loads_and_loss_decreases(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained / "out"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "gpt_neo"
    assert model.config.attention_layers == ["global", "local"]
    assert model.config.vocab_size == len(tok) <= 300
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == eot == model.config.eos_token_id
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()

    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()

    log = read_log(out)
    assert [int(r["step"]) for r in log] == [6, 12, 18, 24]
    assert float(log[-1]["val_loss"]) < float(log[0]["val_loss"]) - 0.3
    assert float(log[-1]["train_loss"]) < float(log[0]["train_loss"])

    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss_curve.png", "training_summary.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: cdla-sharing-1.0\n")
    assert "roneneldan/TinyStories" in card and "library_name: transformers" in card
    assert "TinyStories (Eldan & Li 2023), CDLA-Sharing-1.0" in card
    assert "Once upon a time" in card
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 24 and summary["parameters"] == sum(p.numel() for p in model.parameters())
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp dirs left behind


def test_tokenizer_is_byte_level(trained):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained / "out")
    for text in ["A dog 🐶 ran.", "你好，世界", "naïve café — “quotes”", "\t tabs\n\nand spaces  "]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids or text.count("<|endoftext|>")  # no unknown tokens
    assert tok.decode(tok("Lily<|endoftext|>Tom")["input_ids"]) == "Lily<|endoftext|>Tom"
    assert tok.convert_tokens_to_ids("<|endoftext|>") in tok("Lily<|endoftext|>Tom")["input_ids"]


def test_checkpoints_are_complete_and_atomic(trained):
    run = trained / "run"
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["step-000020", "step-000024"]  # keep_checkpoints=2
    assert not any(p.name.startswith(".") for p in run.iterdir())
    last = ckpts[-1]
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 24
    assert (
        state["data_position"]["epoch"] * state["data_position"]["blocks_per_epoch"] + state["data_position"]["block"]
        == 24 * 4
    )
    opt = load_file(str(last / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg") for k in opt) and any(k.endswith(".exp_avg_sq") for k in opt)
    weights = load_file(str(last / "model.safetensors"))
    assert "transformer.h.0.attn.attention.q_proj.weight" in weights
    assert "transformer.wte.weight" in weights or "lm_head.weight" in weights  # tied: stored once
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt"))


def test_resume_reproduces_uninterrupted_run(trained, stories_file, tmp_path):
    args = tiny_args(stories_file, tmp_path, "b")
    base_lm_main([*args, "--stop-after", "13"])
    assert not (tmp_path / "b" / "out").exists()
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "run")][-1] == "step-000013"
    base_lm_main([*args, "--resume"])

    full = load_file(str(trained / "out" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "b" / "out" / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=1e-6, msg=key)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(trained / "out")]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(tmp_path / "b" / "out")] == strip


def test_resume_with_changed_config_is_refused(stories_file, tmp_path):
    args = tiny_args(stories_file, tmp_path, "c", steps=6)
    base_lm_main([*args, "--stop-after", "3"])
    with pytest.raises(SystemExit, match="config differs"):
        base_lm_main([*args, "--resume", "--lr", "1e-3"])


def test_missing_data_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-stories.txt"
    with pytest.raises(SystemExit, match="does not exist") as err:
        base_lm_main(tiny_args(missing, tmp_path, "d"))
    assert str(missing) in str(err.value)
    assert not (tmp_path / "d" / "out").exists()


def test_fast_attention_matches_transformers_attention():
    cfg = BaseLMConfig(
        d_model=32, num_layers=4, num_heads=4, window_size=8, max_position_embeddings=64, context=64
    )
    model = build_model(cfg, 300, 0).eval()
    ids = torch.randint(0, 300, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding exercises the attention_mask path
    with torch.no_grad():
        ref = model(ids).logits
        ref_masked = model(ids, attention_mask=mask).logits
        with fast_attention():
            fast = model(ids).logits
            fast_masked = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_masked[:, 5:], ref_masked[:, 5:], rtol=1e-4, atol=1e-4)


def test_lr_schedule():
    cfg = BaseLMConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_help(capsys):
    with pytest.raises(SystemExit) as err:
        base_lm_main(["--help"])
    assert err.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--vocab-size" in out and "--d-model" in out


def test_two_sources_are_held_out_separately_and_exported_in_fp16(stories_file, tmp_path):
    from safetensors import safe_open

    from sae.base_model import load_base_model
    from training.lm_eval import held_out_perplexity
    from training.stories import load_stories, split_stories

    second = write_stories(tmp_path / "second.txt", n=20)
    args = tiny_args(stories_file, tmp_path, "two", steps=6)
    args[args.index("--data") + 1 : args.index("--data") + 2] = [str(stories_file), str(second)]
    base_lm_main(args)
    out = tmp_path / "two" / "out"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["train_stories"] == 36 + 18 and summary["val_stories"] == 4 + 2
    assert len(summary["data"]) == 2 and len(summary["held_out"]) == 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    base = load_base_model(str(out))
    assert base.model.dtype == torch.float32  # upcast for the CPU
    val = split_stories(load_stories(second), 10).val
    recomputed = held_out_perplexity(base.model, base.tokenizer, val)
    reported = summary["held_out"][next(k for k in summary["held_out"] if k.endswith("second.txt"))]
    assert reported["stories"] == 2 and reported["tokens"] == recomputed.tokens
    assert reported["mean_loss"] == pytest.approx(recomputed.mean_loss, abs=2e-3)  # fp32 export vs fp16 reload


def test_retraining_keeps_the_sae_trees_beside_the_model(stories_file, tmp_path):
    args = tiny_args(stories_file, tmp_path, "keep", steps=3)
    out = tmp_path / "keep" / "out"
    (out / "blocks.1.hook_resid_post" / "standard" / "F8").mkdir(parents=True)
    (out / "blocks.1.hook_resid_post" / "standard" / "F8" / "cfg.json").write_text("{}")
    base_lm_main(args)
    assert (out / "blocks.1.hook_resid_post" / "standard" / "F8" / "cfg.json").read_text() == "{}"
    assert (out / "model.safetensors").is_file()

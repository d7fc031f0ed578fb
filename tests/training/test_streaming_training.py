"""`tinystories` from a story stream: exact resume, and the same SAEs when trained from an activation cache."""

import pytest
import torch

from sae.checkpoint import load_sae
from training.cache_cli import main as cache_main
from training.tinystories_cli import TinyStoriesConfig, TinyStoriesError, run


def _cfg(model, stories, out, **kw):
    base = dict(model=str(model), data=str(stories), out=out, widths=["8", "d"], architectures=["standard", "topk"],
                steps=8, batch_size=32, buffer_size=96, checkpoint_every=4, log_every=2, lr_warmup_steps=2, k=4,
                context_size=32, harvest_batch_size=2, layer=0, device="cpu", evaluate=False, progress=False)
    base.update(kw)
    return TinyStoriesConfig(**base)


def _weights(folders):
    return {f.relative_to(f.parents[1]): load_sae(f).effective_weights() for f in folders}


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


def test_streaming_resume_is_bit_identical(tiny_cli_inputs, tmp_path):
    model, stories = tiny_cli_inputs
    full = run(_cfg(model, stories, tmp_path))
    expected = _weights(full.folders)
    for folder in full.folders:  # as if killed after the step-4 checkpoint
        for p in folder.iterdir():
            if p.is_file():
                p.unlink()
    resumed = run(_cfg(model, stories, tmp_path, resume=True))
    _same(expected, _weights(resumed.folders))
    with pytest.raises(ValueError, match="does not match"):  # the buffer must be the same to resume exactly
        for folder in full.folders:
            (folder / "training_config.json").unlink()
        run(_cfg(model, stories, tmp_path, resume=True, buffer_size=128))


def test_training_from_the_cache_equals_training_from_the_stream(tiny_cli_inputs, tmp_path):
    model, stories = tiny_cli_inputs
    streamed = _weights(run(_cfg(model, stories, tmp_path / "stream")).folders)
    cache_main(["--model", str(model), "--data", str(stories), "--out", str(tmp_path / "cache"), "--layer", "0",
                "--context-size", "32", "--harvest-batch-size", "2", "--device", "cpu", "--progress", "false"])
    cached = run(_cfg("no-model-needed", stories, tmp_path / "cached", activations=tmp_path / "cache"))
    _same(streamed, _weights(cached.folders))
    with pytest.raises(TinyStoriesError, match="no manifest"):
        run(_cfg(model, stories, tmp_path / "x", activations=tmp_path / "stream"))


def test_flags_keep_their_names_and_the_new_ones_have_help(capsys):
    from training.cache_cli import main as cache_cli_main
    from training.tinystories_cli import main

    for entry in (main, cache_cli_main):
        with pytest.raises(SystemExit) as exc:
            entry(["--help"])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--preset", "--data", "--max-stories", "--steps", "--batch-size", "--widths", "--architectures",
                 "--evaluate", "--progress", "--threads", "--out", "--buffer-size", "--activations", "--device",
                 "--model-dtype", "--dist-timeout", "--dtype", "--shard-tokens"):
        assert flag in out, flag


def test_the_flagship_preset_adds_the_plain_reconstruction():
    from training.tinystories_cli import _trainer_config

    cfg = _trainer_config(TinyStoriesConfig(preset="tinystories-33m"))
    assert cfg.architectures == ["standard", "topk", "standard-nosparsity"] and cfg.checkpoint_every == 5000
    assert cfg.widths == ["100", "d-1", "d", "1000"]
    assert _trainer_config(TinyStoriesConfig(preset="tinystories-33m", architectures=["topk"])).architectures == [
        "topk"]
    assert _trainer_config(TinyStoriesConfig()).architectures == ["standard", "topk"]


def test_unavailable_device_and_too_small_buffer_are_clear_errors(tiny_cli_inputs, tmp_path):
    model, stories = tiny_cli_inputs
    if not torch.cuda.is_available():
        with pytest.raises(TinyStoriesError, match="no CUDA GPU"):
            run(_cfg(model, stories, tmp_path, device="cuda"))
    with pytest.raises(TinyStoriesError, match="at least two batches"):
        run(_cfg(model, stories, tmp_path, buffer_size=40))

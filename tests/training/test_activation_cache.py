import json

import pytest
import torch

from sae.base_model import load_base_model
from tests.helpers import save_tiny_gpt_neo
from training.activation_cache import MANIFEST_FILE, CacheActivations, CacheError, read_manifest
from training.cache_cli import main as cache_main
from training.story_stream import StoryChunkStream, StorySource
from training.streaming import StoryActivations


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_gpt_neo(tmp_path_factory.mktemp("models") / "tiny-neo", hidden=16, layers=2, positions=64)


@pytest.fixture(scope="module")
def stories_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "stories.txt"
    words = "the cat sat on a mat and then ran to see the big red dog".split()
    stories = [" ".join(words[(i * 3) % len(words):] + words[: (i * 5) % 11]) + f" {i}." for i in range(40)]
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    return path


def _write(out, tiny_model, stories_file, *extra):
    cache_main(["--model", str(tiny_model), "--data", str(stories_file), "--out", str(out), "--layer", "0",
                "--context-size", "32", "--harvest-batch-size", "4", "--shard-tokens", "200", "--device", "cpu",
                "--progress", "false", *extra])


def _first_epoch(chunks):
    out = []
    for chunk in chunks:
        if chunk.epoch:
            return out
        out.append(chunk.vectors)


def test_cache_holds_the_streamed_chunks_and_shards_like_the_stream(tmp_path, tiny_model, stories_file):
    _write(tmp_path / "cache", tiny_model, stories_file)
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["hook_name"] == "blocks.0.hook_resid_post" and manifest["context_size"] == 32
    assert manifest["dtype"] == "fp32" and len(manifest["shards"]) > 1 and manifest["n_chunks"] == 9  # 36 / 4
    bm = load_base_model(str(tiny_model))
    for rank in range(2):
        stream = StoryActivations(bm, StoryChunkStream(StorySource(str(stories_file)), 4, rank, 2), 0, 32)
        streamed = _first_epoch(stream)
        cached = _first_epoch(CacheActivations(tmp_path / "cache", rank, 2))
        assert len(streamed) == len(cached) > 0
        assert all(torch.equal(a, b) for a, b in zip(streamed, cached))
    assert sum(s["n_tokens"] for s in manifest["shards"]) == manifest["n_tokens"]
    assert sum(len(v) for v in _first_epoch(CacheActivations(tmp_path / "cache"))) == manifest["n_tokens"]


def test_cache_resumes_at_a_chunk(tmp_path, tiny_model, stories_file):
    _write(tmp_path / "cache", tiny_model, stories_file, "--dtype", "bf16")
    reader = CacheActivations(tmp_path / "cache")
    it = iter(reader)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(reader.state_dict()))
    expected = [next(it).vectors for _ in range(7)]  # crosses into epoch 1
    again = CacheActivations(tmp_path / "cache")
    again.load_state_dict(state)
    it2 = iter(again)
    assert all(torch.equal(a, next(it2).vectors) for a in expected)


def test_damaged_and_interrupted_caches_are_refused(tmp_path, tiny_model, stories_file):
    out = tmp_path / "cache"
    _write(out, tiny_model, stories_file)
    with pytest.raises(SystemExit):  # an existing cache is not overwritten silently
        _write(out, tiny_model, stories_file)
    manifest = read_manifest(out)
    shard = out / manifest["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="sha256"):
        _first_epoch(CacheActivations(out))
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match="wrong size"):
        CacheActivations(out)
    (out / MANIFEST_FILE).unlink()  # as after a write killed before its end: shards but no manifest
    with pytest.raises(CacheError, match="interrupted"):
        CacheActivations(out)

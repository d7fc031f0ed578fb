"""Fixtures of the streaming / cache / distributed tests: a tiny GPT-Neo folder and a small stories file."""

import pytest

from tests.helpers import save_tiny_gpt_neo


@pytest.fixture(scope="session")
def tiny_cli_inputs(tmp_path_factory):
    """(model folder, stories file): 16-wide 2-block GPT-Neo, 60 short stories (54 for training)."""
    root = tmp_path_factory.mktemp("tiny-inputs")
    model = save_tiny_gpt_neo(root / "tiny-neo", hidden=16, layers=2, positions=64)
    words = "the cat sat on a mat and then ran to see the big red dog near a tree".split()
    stories = [" ".join(words[(i * 3) % len(words):] + words[: (i * 5) % 13]) + f" {i}." for i in range(60)]
    path = root / "stories.txt"
    path.write_text("".join(f"{s}\n<|endoftext|>\n" for s in stories))
    return model, path

"""Read TinyStories: a local text file with `<|endoftext|>` separator lines, or a Hub dataset.

Both the base LM and the SAE pipeline split stories with `split_stories`, so the validation
stories of one are the validation stories of the other and training never sees them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

STORY_SEPARATOR = "<|endoftext|>"
SHARED_STORIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinystories"
DEFAULT_SAMPLE = SHARED_STORIES / "train_sample.txt"
VALIDATION_SAMPLE = SHARED_STORIES / "validation_sample.txt"


class StorySplit(NamedTuple):
    train: list[str]
    val: list[str]


def default_stories_path() -> Path:
    """The stories file used by the shipped checkpoints: $TINYSTORIES_FILE or ../shared/data/."""
    return Path(os.environ.get("TINYSTORIES_FILE", DEFAULT_SAMPLE)).resolve()


def default_base_lm_sources() -> list[Path]:
    """The base LM trains on every local story: $TINYSTORIES_FILE alone, else both shared samples."""
    if "TINYSTORIES_FILE" in os.environ:
        return [default_stories_path()]
    return [p.resolve() for p in (DEFAULT_SAMPLE, VALIDATION_SAMPLE) if p.is_file()] or [default_stories_path()]


def normalize_story(text: str) -> str:
    """One newline between paragraphs: the validation sample separates them by blank lines, the train
    sample by single newlines, and a tokenizer would otherwise see two formats."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if line)


def read_stories_file(path: str | Path) -> list[str]:
    """Stories of a UTF-8 text file, separated by lines holding only `<|endoftext|>`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"stories file {path} does not exist: pass a text file whose stories are separated by "
            f"lines holding only {STORY_SEPARATOR!r}, or a Hugging Face dataset id"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise ValueError(f"cannot read stories file {path}: {err}") from err
    stories: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        if line.strip() == STORY_SEPARATOR:
            stories.append(normalize_story("\n".join(current)))
            current = []
        else:
            current.append(line)
    stories.append(normalize_story("\n".join(current)))
    stories = [s for s in stories if s]
    if not stories:
        raise ValueError(f"stories file {path} holds no stories")
    return stories


def load_stories(source: str | Path, split: str = "train", max_stories: int | None = None) -> list[str]:
    """Stories from a local file, or from a Hugging Face dataset id (its `text` column, streamed)."""
    if Path(source).exists() or str(source).endswith(".txt"):
        stories = read_stories_file(source)
        return stories[:max_stories] if max_stories else stories
    try:
        import datasets

        ds = datasets.load_dataset(str(source), split=split, streaming=True)
        stories = []
        for row in ds:
            text = str(row["text"]).strip()
            if text:
                stories.append(text)
            if max_stories and len(stories) >= max_stories:
                break
        return stories
    except Exception as err:  # the Hub is unreachable, or the id is wrong
        raise RuntimeError(
            f"could not load dataset {source!r} ({type(err).__name__}: {err}). Without access to the "
            f"Hugging Face Hub, pass a local stories file instead, e.g. {default_stories_path()}"
        ) from err


def split_stories(stories: list[str], val_every: int = 10) -> StorySplit:
    """Every `val_every`-th story (indices val_every-1, 2*val_every-1, ...) is held out for validation."""
    if val_every < 2:
        raise ValueError("val_every must be >= 2")
    train = [s for i, s in enumerate(stories) if i % val_every != val_every - 1]
    val = [s for i, s in enumerate(stories) if i % val_every == val_every - 1]
    return StorySplit(train, val)

"""Read TinyStories: a local text file with `<|endoftext|>` separator lines, or a Hub dataset.

Both the base LM and the SAE pipeline split stories with `split_stories`, so the validation
stories of one are the validation stories of the other and training never sees them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from training.story_stream import (
    STORY_SEPARATOR,
    VAL_EVERY,
    file_stories,
    hub_stories,
    is_held_out,
    normalize_story,
)

__all__ = ["STORY_SEPARATOR", "StorySplit", "default_base_lm_sources", "default_stories_path", "load_stories",
           "normalize_story", "read_stories_file", "split_stories"]

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


def read_stories_file(path: str | Path) -> list[str]:
    """Stories of a UTF-8 text file, separated by lines holding only `<|endoftext|>` (all in memory)."""
    try:
        stories = [s.text for s in file_stories(path)]
    except (UnicodeDecodeError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"cannot read stories file {path}: {err}") from err
    if not stories:
        raise ValueError(f"stories file {path} holds no stories")
    return stories


def load_stories(source: str | Path, split: str = "train", max_stories: int | None = None) -> list[str]:
    """Stories from a local file, or from a Hugging Face dataset id (its `text` column, streamed)."""
    if Path(source).exists() or str(source).endswith(".txt"):
        stories = read_stories_file(source)
        return stories[:max_stories] if max_stories else stories
    stories = []
    try:
        for story in hub_stories(str(source), split):
            stories.append(story.text)
            if max_stories and len(stories) >= max_stories:
                break
    except Exception as err:  # the Hub is unreachable, or the id is wrong
        raise RuntimeError(
            f"could not load dataset {source!r} ({type(err).__name__}: {err}). Without access to the "
            f"Hugging Face Hub, pass a local stories file instead, e.g. {default_stories_path()}"
        ) from err
    return stories


def split_stories(stories: list[str], val_every: int = VAL_EVERY) -> StorySplit:
    """Every `val_every`-th story (indices val_every-1, 2*val_every-1, ...) is held out for validation."""
    if val_every < 2:
        raise ValueError("val_every must be >= 2")
    train = [s for i, s in enumerate(stories) if not is_held_out(i, val_every)]
    val = [s for i, s in enumerate(stories) if is_held_out(i, val_every)]
    return StorySplit(train, val)

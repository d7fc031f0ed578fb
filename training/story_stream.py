"""Stories read lazily, in fixed chunks, sharded over ranks, with a resumable position.

A source is a text file (stories separated by `<|endoftext|>` lines, read line by line from a byte
offset) or a Hugging Face dataset id (`load_dataset(..., streaming=True)`, its `text` column). The
training stories are cut into chunks of `chunk_size` consecutive stories (one harvest batch each);
rank r of W takes the chunks whose index is r mod W, so W ranks together see every story once per
epoch and the activation cache (which records its chunks) shards the same way. At the end of the
source the next epoch starts from its beginning. `state_dict()` is the position right after the last
chunk handed out (JSON-able); `load_state_dict` seeks there without re-reading what came before.

Held-out stories: every 10th story of a file (`is_held_out`, also used by `training.stories.split_stories`);
the `validation` split of a Hub dataset (a Hub dataset's train split is all training data).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

STORY_SEPARATOR = "<|endoftext|>"
"""A line holding only this separates two stories of a stories file."""
VAL_EVERY = 10
"""Story i of a file (0-based) is held out when i % VAL_EVERY == VAL_EVERY - 1."""


def normalize_story(text: str) -> str:
    """One newline between paragraphs: the validation sample separates them by blank lines, the train
    sample by single newlines, and a tokenizer would otherwise see two formats."""
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(line for line in lines if line)


def is_held_out(index: int, val_every: int = VAL_EVERY) -> bool:
    """Whether story `index` of a file is a validation story (never trained on)."""
    return index % val_every == val_every - 1


def is_stories_file(spec: str) -> bool:
    """A local stories file (else a Hub dataset id, which looks like `owner/name`)."""
    return Path(spec).exists() or spec.endswith(".txt") or spec.count("/") != 1 or spec.startswith((".", "~"))


class IndexedStory(NamedTuple):
    index: int
    """Position among the source's non-empty stories (0-based)."""
    text: str
    resume_at: Any
    """Where reading continues after this story: a byte offset (file) or the dataset's state (Hub)."""


def file_stories(path: str | Path, offset: int = 0, index: int = 0) -> Iterator[IndexedStory]:
    """Non-empty stories of a stories file from byte `offset` (a story start), numbered from `index`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"stories file {path} does not exist: pass a text file whose stories are separated "
                                f"by lines holding only {STORY_SEPARATOR!r}, or a Hugging Face dataset id")
    with path.open("rb") as fh:
        fh.seek(offset)
        lines: list[str] = []
        while True:
            raw = fh.readline()
            line = raw.decode("utf-8").rstrip("\r\n")
            if raw and line.strip() != STORY_SEPARATOR:
                lines.append(line)
                continue
            text = normalize_story("\n".join(lines))
            lines = []
            if text:
                yield IndexedStory(index, text, fh.tell())
                index += 1
            if not raw:
                return


def hub_stories(dataset: str, split: str, state: dict[str, Any] | None = None, index: int = 0
                ) -> Iterator[IndexedStory]:
    """Non-empty `text` rows of a streamed Hugging Face dataset, resumed from `state` (its state_dict)."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=True)
    except Exception as err:  # the Hub is unreachable, or the id is wrong
        raise RuntimeError(f"could not stream dataset {dataset!r} ({type(err).__name__}: {err}); without the "
                           f"Hugging Face Hub pass a local stories file (--data <file>)") from err
    return _rows(ds, state, index)


def _rows(ds, state: dict[str, Any] | None, index: int) -> Iterator[IndexedStory]:
    if state is not None:
        ds.load_state_dict(state)  # seeks to the shard and row: nothing before it is read again
    for row in ds:
        text = str(row["text"]).strip()
        if text:
            yield IndexedStory(index, text, ds.state_dict())
            index += 1


def local_dataset_stories(files: list[str], builder: str = "json", state: dict[str, Any] | None = None,
                          index: int = 0) -> Iterator[IndexedStory]:
    """Like `hub_stories`, for local data files streamed through `datasets` (the same code path offline)."""
    import datasets

    ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    return _rows(ds, state, index)


@dataclass
class StreamPosition:
    """Where a StoryChunkStream continues: the next chunk to hand out and where its stories start."""

    epoch: int = 0
    chunk: int = 0
    """Global index (all ranks) of the next chunk in this epoch."""
    story: int = 0
    """Index of the next story to read in the source."""
    resume_at: Any = None
    """Byte offset (file) or dataset state (Hub) of that story; None: the beginning."""


class StoryChunk(NamedTuple):
    epoch: int
    index: int
    """Global chunk index within the epoch."""
    stories: list[str]


@dataclass
class StorySource:
    """Which stories to stream: a file or a Hub dataset, the training or held-out part, at most how many."""

    spec: str
    """A stories file, or a Hugging Face dataset id."""
    max_stories: int | None = None
    """Only the first this many stories of the source (before the held-out split of a file)."""
    builder: str | None = None
    """Read `spec` (a local data file) through this `datasets` builder, e.g. json (tests, offline)."""

    def read(self, split: str, resume_at: Any = None, index: int = 0) -> Iterator[IndexedStory]:
        """All stories of the source for `split` ("train" or "validation"), from a position."""
        if self.builder:
            stories = local_dataset_stories([self.spec], self.builder, resume_at, index)
        elif is_stories_file(self.spec):
            stories = file_stories(self.spec, resume_at or 0, index)
        else:
            stories = hub_stories(self.spec, split, resume_at, index)
        for story in stories:
            if self.max_stories is not None and story.index >= self.max_stories:
                return
            if self.splits_file():
                if is_held_out(story.index) != (split == "validation"):
                    continue
            yield story

    def splits_file(self) -> bool:
        """Held-out stories come from the same file (every 10th) rather than a validation split."""
        return self.builder is None and is_stories_file(self.spec)


def validation_stories(source: StorySource, limit: int | None = None) -> list[str]:
    """The held-out stories (at most `limit`, in order): small, so a list."""
    out = []
    for story in source.read("validation"):
        if limit is not None and len(out) >= limit:
            break
        out.append(story.text)
    return out


class StoryChunkStream:
    """Endless chunks of `chunk_size` training stories for one rank; see the module docstring."""

    def __init__(self, source: StorySource, chunk_size: int, rank: int = 0, world_size: int = 1):
        if chunk_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad chunking: chunk_size {chunk_size}, rank {rank} of {world_size}")
        self.source, self.chunk_size, self.rank, self.world_size = source, chunk_size, rank, world_size
        self.position = StreamPosition()

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self.position), "rank": self.rank, "world_size": self.world_size,
                "chunk_size": self.chunk_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (state["rank"], state["world_size"], state["chunk_size"])
        if saved != (self.rank, self.world_size, self.chunk_size):
            raise ValueError(f"stream position of rank {saved[0]} of {saved[1]} (chunks of {saved[2]} stories) does "
                             f"not fit rank {self.rank} of {self.world_size} (chunks of {self.chunk_size})")
        self.position = StreamPosition(state["epoch"], state["chunk"], state["story"], state["resume_at"])

    def __iter__(self) -> Iterator[StoryChunk]:
        while True:
            epoch, from_start, mine = self.position.epoch, self.position.chunk == 0, 0
            for chunk in self._epoch():
                mine += 1
                yield chunk
            if from_start and not mine:
                raise ValueError(f"{self.source.spec}: too few training stories for rank {self.rank} of "
                                 f"{self.world_size} (chunks of {self.chunk_size} stories)")
            if self.position.epoch == epoch:  # the epoch ended exactly at a chunk boundary
                self.position = StreamPosition(epoch + 1)

    def _epoch(self) -> Iterator[StoryChunk]:
        """The rest of the current epoch's chunks of this rank, advancing `position` past each."""
        pos = self.position
        batch: list[str] = []
        for story in self.source.read("train", pos.resume_at, pos.story):
            batch.append(story.text)
            if len(batch) == self.chunk_size:
                chunk = self._advance(batch, story)
                batch = []
                if chunk is not None:
                    yield chunk
        if batch:
            chunk = self._advance(batch, None)
            if chunk is not None:
                yield chunk

    def _advance(self, stories: list[str], last: IndexedStory | None) -> StoryChunk | None:
        """Move past one chunk (`last`: its last story; None for the epoch's ragged tail); the chunk if ours."""
        pos = self.position
        chunk = StoryChunk(pos.epoch, pos.chunk, stories)
        if last is None:  # already positioned at the next epoch, so a checkpoint taken now resumes there
            self.position = StreamPosition(pos.epoch + 1)
        else:
            self.position = StreamPosition(pos.epoch, pos.chunk + 1, last.index + 1, last.resume_at)
        return chunk if pos.chunk % self.world_size == self.rank else None

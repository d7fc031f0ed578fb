import json

import pytest

from training.stories import read_stories_file, split_stories
from training.story_stream import StoryChunkStream, StorySource, file_stories, validation_stories


def _write_stories(path, n, sep="<|endoftext|>"):
    path.write_text("".join(f"Story {i} line one.\nline two of {i}.\n{sep}\n" for i in range(n)), encoding="utf-8")
    return path


def test_file_stories_match_the_eager_reader_and_resume_from_offsets(tmp_path):
    path = _write_stories(tmp_path / "s.txt", 23)
    lazy = list(file_stories(path))
    assert [s.text for s in lazy] == read_stories_file(path)
    rest = list(file_stories(path, lazy[6].resume_at, 7))
    assert [(s.index, s.text) for s in rest] == [(s.index, s.text) for s in lazy[7:]]


def test_train_and_validation_split_as_split_stories(tmp_path):
    path = _write_stories(tmp_path / "s.txt", 47)
    eager = split_stories(read_stories_file(path))
    source = StorySource(str(path))
    assert [s.text for s in source.read("train")] == eager.train
    assert validation_stories(source) == eager.val
    assert validation_stories(StorySource(str(path), max_stories=20)) == eager.val[:2]


def _chunks(stream, n):
    out = []
    for chunk in stream:
        out.append(chunk)
        if len(out) == n:
            return out


@pytest.mark.parametrize("world", [1, 3])
def test_ranks_partition_each_epoch_and_resume_mid_stream(tmp_path, world):
    path = _write_stories(tmp_path / "s.txt", 50)  # 45 training stories: chunks of 4, a ragged tail of 1
    train = [s.text for s in StorySource(str(path)).read("train")]
    seen = []
    for rank in range(world):
        stream = StoryChunkStream(StorySource(str(path)), 4, rank, world)
        got = [c for c in _chunks(stream, 40) if c.epoch == 0]
        assert all(c.index % world == rank for c in got)
        seen += [s for c in got for s in c.stories]
    assert sorted(seen) == sorted(train)  # every training story once per epoch, over all ranks

    stream = StoryChunkStream(StorySource(str(path)), 4, 0, world)
    first = _chunks(stream, 7)
    state = json.loads(json.dumps(stream.state_dict()))
    later = _chunks(stream, 9)
    again = StoryChunkStream(StorySource(str(path)), 4, 0, world)
    again.load_state_dict(state)
    assert _chunks(again, 9) == later
    assert first[0] != later[0]


def test_local_dataset_streams_through_datasets(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(9)] + [{"text": "  "}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stream = StoryChunkStream(StorySource(str(path), builder="json"), 2)
    first = _chunks(stream, 2)
    state = json.loads(json.dumps(stream.state_dict()))
    rest = _chunks(stream, 3)
    assert [s for c in first + rest for s in c.stories][:9] == [f"row {i}" for i in range(9)]
    again = StoryChunkStream(StorySource(str(path), builder="json"), 2)
    again.load_state_dict(state)
    assert _chunks(again, 3) == rest


def test_too_few_stories_for_the_ranks(tmp_path):
    path = _write_stories(tmp_path / "s.txt", 3)
    with pytest.raises(ValueError, match="too few training stories"):
        next(iter(StoryChunkStream(StorySource(str(path)), 8, rank=1, world_size=2)))

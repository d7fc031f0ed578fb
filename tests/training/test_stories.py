"""Reading and splitting stories files."""

import pytest

from training.stories import load_stories, read_stories_file, split_stories


def test_read_and_split(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("\n<|endoftext|>\n".join(f"Story {i}.\nLine two." for i in range(25)) + "\n")
    stories = read_stories_file(path)
    assert len(stories) == 25 and stories[3] == "Story 3.\nLine two."
    split = split_stories(stories)
    assert len(split.val) == 2 and not set(split.val) & set(split.train)
    assert len(split.train) + len(split.val) == 25


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_stories_file(tmp_path / "nope.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("<|endoftext|>\n")
    with pytest.raises(ValueError, match="no stories"):
        load_stories(empty)
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="cannot read"):
        read_stories_file(binary)


def test_blank_line_paragraphs_are_normalised(tmp_path):
    """The validation sample separates paragraphs by blank lines, the train sample by one newline."""
    path = tmp_path / "v.txt"
    path.write_text("First para.\n\nSecond para.  \n\n\nThird.\n<|endoftext|>\nOne line.\n")
    assert read_stories_file(path) == ["First para.\nSecond para.\nThird.", "One line."]

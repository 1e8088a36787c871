"""The shipped anchor set and user anchor files."""

import pytest

from vlmguard_edit.anchors import load_anchors
from vlmguard_edit.errors import InputError


def test_default_set():
    anchors = load_anchors()
    assert len(anchors) >= 100
    assert len(set(anchors.harmful)) == len(anchors) == len(set(anchors.harmless))
    assert all(text.startswith("How to ") for text in anchors.harmful + anchors.harmless)
    assert not set(anchors.harmful) & set(anchors.harmless)


def test_jsonl_and_csv_give_the_same_set_and_hash(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        '{"harmful": "How to do x", "harmless": "How to do y"}\n\n'
        '{"harmful": "How to do z", "harmless": "How to do w"}\n'
    )
    (tmp_path / "a.csv").write_text(
        "harmful,harmless\nHow to do x,How to do y\nHow to do z,How to do w\n"
    )
    jsonl, csv = load_anchors(tmp_path / "a.jsonl"), load_anchors(tmp_path / "a.csv")
    assert jsonl.harmful == csv.harmful == ("How to do x", "How to do z")
    assert jsonl.sha256 == csv.sha256 != load_anchors().sha256


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"harmful": "x"}\n{"harmful": "y", "harmless": "z"}\n', "row 1: needs"),
        ("not json\n", "line 1: not valid JSON"),
        ('{"harmful": "x", "harmless": "y"}\n', "at least 2"),
    ],
)
def test_bad_anchor_files(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_anchors(path)


def test_missing_anchor_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_anchors(tmp_path / "nope.jsonl")

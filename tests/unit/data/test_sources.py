"""llmjax.data.sources: documents from each kind of source; bad sources in one line;
mixture strings."""

import json
from pathlib import Path

import pytest

from llmjax.data import sources

SHAKESPEARE_DIR = Path(sources.__file__).parent / "shakespeare"


# ---------------------------------------------------------------- sources


def test_bundled_shakespeare_is_one_document_per_scene():
    documents = sources.read_documents("bundled:shakespeare")
    plays = [p.read_text(encoding="utf-8") for p in sorted(SHAKESPEARE_DIR.glob("*.txt"))]
    scene_lines = sum(line.startswith("SCENE") for p in plays for line in p.splitlines())
    assert len(plays) == 8
    assert len(documents) == scene_lines == 148
    # Nothing lost or reordered: the scenes concatenate back to the plays.
    assert "".join(documents) == "".join(plays)
    assert 0.9e6 < sum(len(d.encode()) for d in documents) < 1.1e6
    assert documents[0].startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I.")
    # A later act's heading opens its first scene instead of trailing the previous one.
    assert documents[2].startswith("ACT II\n\nSCENE I.")
    assert all(sum(line.startswith("SCENE") for line in d.splitlines()) == 1
               for d in documents)


def test_text_source_one_document_per_file_sorted_recursive(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first\nline")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third ünïcode")
    (tmp_path / "empty.txt").write_text("")
    assert sources.read_documents(f"text:{tmp_path}/*.txt") == ["first\nline", "second"]
    assert sources.read_documents(f"text:{tmp_path}/**/*.txt") == [
        "first\nline", "second", "third ünïcode"]


def test_jsonl_source_default_and_named_field(tmp_path):
    lines = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three", "body": "tres"}))
    assert sources.read_documents(f"jsonl:{tmp_path}/*.jsonl") == ["one", "two", "three"]
    assert sources.read_documents(f"jsonl:{tmp_path}/*.jsonl#body") == ["uno", "dos", "tres"]


@pytest.mark.parametrize("make_source, error", [
    (lambda d: "shakespeare", ValueError),
    (lambda d: "csv:x", ValueError),
    (lambda d: f"parquet:{d}/none/*.parquet", FileNotFoundError),
    (lambda d: "bundled:lorem", ValueError),
    (lambda d: "tfds:no_such_dataset:train", ValueError),
    (lambda d: f"jsonl:{d}/rows.jsonl#a+b+c", ValueError),
    (lambda d: f"prepared:{d}", ValueError),
    (lambda d: f"text:{d}/nothing/*.txt", FileNotFoundError),
    (lambda d: f"jsonl:{d}/rows.jsonl#title", ValueError),
    (lambda d: f"text:{d}/blank.txt", ValueError),
])
def test_bad_sources_name_the_source_in_one_line(tmp_path, make_source, error):
    (tmp_path / "rows.jsonl").write_text('{"text": "hi"}\n')
    (tmp_path / "blank.txt").write_text("  \n")
    source = make_source(tmp_path)
    with pytest.raises(error) as info:
        sources.read_documents(source)
    message = str(info.value)
    assert repr(source) in message and "\n" not in message


# ---------------------------------------------------------------- tokenizers


def test_mixture_strings_are_parsed_and_checked():
    mixture = sources.parse_mixture("bundled:shakespeare=3,jsonl:/x/*.jsonl#prompt+response=1")
    assert [(spec.kind, spec.fields, weight) for spec, weight in mixture] == [
        ("bundled", ("text",), 0.75), ("jsonl", ("prompt", "response"), 0.25)]
    assert sources.parse_source("tfds:wiki/en:validation#body").split == "validation"
    assert sources.parse_source("prepared:/data/web:validation").location == "/data/web"
    for bad in ("bundled:shakespeare=x", "bundled:shakespeare=0", "text:a=1,text:a=1"):
        with pytest.raises(ValueError, match="config.data.train"):
            sources.parse_mixture(bad)

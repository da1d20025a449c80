"""metrics.jsonl after a crash or a full disk mid-write: a cut-off last line is dropped with
a warning naming the file, and the run resumes; a bad line before it is one clear error."""

import json

import pytest
from absl import logging

from llmjax.training import metrics


def write(path, *lines):
    path.write_text("".join(lines))


def test_a_torn_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    write(path, '{"step": 1, "train/loss": 5.0}\n', '{"step": 2, "train/loss": 4.0}\n',
          '{"step": 3, "train/lo')
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda *args: warnings.append(args[0] % args[1:]))
    assert [r["step"] for r in metrics.read_records(str(path))] == [1, 2]
    metrics.drop_records_after(str(path), 2)  # what a resumed run does
    assert path.read_text() == '{"step": 1, "train/loss": 5.0}\n{"step": 2, "train/loss": 4.0}\n'
    assert len(warnings) == 2 and all(str(path) in w and "cut off" in w for w in warnings)
    # A record without its newline is whole: kept, and what is appended starts a new line.
    write(path, '{"step": 1, "train/loss": 5.0}')
    metrics.drop_records_after(str(path), 1)
    writer = metrics.JsonlWriter(str(path))
    writer.write_scalars(2, {"train/loss": 4.0})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, '{"step": 1}\n', 'garbage\n', '{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{path}:2 is not a metrics record"):
        metrics.read_records(str(path))

"""Data sources: a string `KIND:LOCATION` -> a list of text documents.

    bundled:shakespeare   the plays shipped in llmjax/data/shakespeare/, one document per scene
    text:GLOB             each matching file is one document
    jsonl:GLOB[#FIELD]    one document per line, from field `text` (or FIELD)

Nothing here downloads anything. `tfds:` sources are planned but not supported yet.
"""

import glob
import json
import os
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent
BUNDLED_CORPORA = ("shakespeare",)
KINDS = ("bundled", "text", "jsonl", "tfds")


def read_documents(source: str) -> list[str]:
    """Reads every document of `source` into memory, in a deterministic order.

    Returns a non-empty list of non-empty strings. Raises ValueError (bad source string,
    missing field, nothing readable) or FileNotFoundError (no file matches), with one line
    that names `source` and what to do.
    """
    kind, sep, location = source.partition(":")
    if not sep or not location:
        raise ValueError(f"data source {source!r} is not KIND:LOCATION; use one of "
                         f"{', '.join(k + ':...' for k in KINDS)}")
    if kind == "bundled":
        documents = _read_bundled(source, location)
    elif kind == "text":
        documents = [_read_text_file(source, path) for path in _glob_files(source, location)]
    elif kind == "jsonl":
        pattern, has_field, field = location.rpartition("#")
        if not has_field:
            pattern, field = location, "text"
        documents = []
        for path in _glob_files(source, pattern):
            documents.extend(_read_jsonl_file(source, path, field))
    elif kind == "tfds":
        raise ValueError(f"data source {source!r}: tfds sources are not supported yet; "
                         "export the text to files and use text:GLOB or jsonl:GLOB")
    else:
        raise ValueError(f"data source {source!r} has unknown kind {kind!r}; "
                         f"use one of {', '.join(k + ':...' for k in KINDS)}")
    # Empty documents carry no tokens worth training on; drop them rather than fail.
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError(f"data source {source!r} holds no non-empty documents; "
                         "point it at files that contain text")
    return documents


def split_scenes(play: str) -> list[str]:
    """Splits a play into scenes: a new document starts at each 'SCENE' line.

    The title and the first 'ACT I' heading go with the first scene, and each later
    'ACT ...' heading (and a prologue under it) goes with the scene it opens, not with the
    end of the previous scene.
    """
    scenes: list[list[str]] = []
    current: list[str] = []
    current_has_scene = False
    for line in play.splitlines(keepends=True):
        if line.startswith(("SCENE", "ACT ")) and current_has_scene:
            scenes.append(current)
            current, current_has_scene = [], False
        current.append(line)
        current_has_scene = current_has_scene or line.startswith("SCENE")
    scenes.append(current)
    return ["".join(lines) for lines in scenes]


def _read_bundled(source: str, name: str) -> list[str]:
    if name not in BUNDLED_CORPORA:
        raise ValueError(f"data source {source!r}: no bundled corpus {name!r}; "
                         f"bundled corpora: {', '.join(BUNDLED_CORPORA)}")
    paths = sorted((BUNDLED_DIR / name).glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"data source {source!r}: no .txt files in {BUNDLED_DIR / name}; "
                                "reinstall llmjax (the package data is missing)")
    return [scene for path in paths for scene in split_scenes(path.read_text(encoding="utf-8"))]


def _glob_files(source: str, pattern: str) -> list[str]:
    expanded = os.path.expanduser(pattern)
    paths = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"data source {source!r}: no file matches {expanded!r}; "
                                "check the path (globs like dir/**/*.txt are allowed)")
    return paths


def _read_text_file(source: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"data source {source!r}: {path} is not UTF-8 text ({e.reason} at "
                         f"byte {e.start}); convert it to UTF-8 or leave it out") from None


def _read_jsonl_file(source: str, path: str, field: str) -> list[str]:
    documents = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"data source {source!r}: {path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e.msg}); "
                                 "fix the line or use text:GLOB for plain text") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{where} has no field {field!r}; "
                                 f"name the text field with jsonl:GLOB#FIELD")
            if not isinstance(record[field], str):
                raise ValueError(f"{where}: field {field!r} is a "
                                 f"{type(record[field]).__name__}, not a string; "
                                 "name a text field with jsonl:GLOB#FIELD")
            documents.append(record[field])
    return documents

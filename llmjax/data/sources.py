"""Data sources: a string `KIND:LOCATION` -> documents.

    bundled:shakespeare          the plays in llmjax/data/shakespeare/, one document per scene
    text:GLOB                    each matching file is one document
    jsonl:GLOB[#FIELDS]          one document per line, from field `text` (or FIELDS)
    parquet:GLOB[#FIELDS]        one document per row, from column `text` (or FIELDS)
    tfds:NAME[/CONFIG][:SPLIT][#FIELDS]   a TFDS catalog dataset already prepared on this
                                 machine (split `train`, feature `text` by default); read with
                                 tfds.data_source, never downloaded
    prepared:PATH[:SPLIT]        a dataset written by `python -m llmjax.prepare` (already
                                 tokenized; split `train` by default)

FIELDS is one field (`#body`: plain text) or two joined by `+` (`#prompt+response`): a
supervised fine-tuning example, trained on the response only. A field holding chat
messages (`#messages`: [{"role", "content"}, ...] ending with the assistant's) is a `Chat`,
rendered with the tokenizer's chat template when it is tokenized and trained on the last
assistant message only. A document is therefore a `str`, an `Example(prompt, response)`
or a `Chat(messages)`.

Several sources with weights form a mixture: `prepared:/data/web=0.7,jsonl:/data/chat/*.jsonl=0.3`
(`parse_mixture`). Nothing here downloads anything.
"""

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from llmjax.data import files

BUNDLED_DIR = Path(__file__).parent
BUNDLED_CORPORA = ("shakespeare",)
KINDS = ("bundled", "text", "jsonl", "parquet", "tfds", "prepared")
# Kinds read whole into memory by `read_documents`; the others are random-access record files.
IN_MEMORY_KINDS = ("bundled", "text", "jsonl", "parquet")
DEFAULT_FIELD = "text"

# Why an input record yields no document (prepare counts them per file; training raises).
UNREADABLE, INVALID_UTF8, MALFORMED_JSON, MISSING_FIELD = (
    "unreadable", "invalid_utf8", "malformed_json", "missing_field")
BAD_INPUT_REASONS = (UNREADABLE, INVALID_UTF8, MALFORMED_JSON, MISSING_FIELD)


class Example(NamedTuple):
    """A supervised fine-tuning record: the loss is on `response` only."""

    prompt: str
    response: str


class Chat(NamedTuple):
    """Chat messages ((role, content), ...), the last one the assistant's: the loss is on it."""

    messages: tuple[tuple[str, str], ...]


Document = str | Example | Chat
# on_bad(reason, where, detail, count=1): called for input records that yield no document.
OnBad = Callable[..., None]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One parsed source string (see the module docstring)."""

    text: str  # the string as written, e.g. "jsonl:/data/*.jsonl#prompt+response"
    kind: str
    location: str  # glob, corpus name, TFDS name[/config] or prepared path
    fields: tuple[str, ...] = (DEFAULT_FIELD,)  # one: plain text; two: (prompt, response)
    split: str = "train"

    @property
    def is_sft(self) -> bool:
        return len(self.fields) == 2


def parse_source(source: str, key: str = "data source") -> SourceSpec:
    """`KIND:LOCATION[...]` -> SourceSpec; ValueError naming `key` and `source` if malformed."""
    kind, sep, location = source.strip().partition(":")
    kinds = ", ".join(k + ":..." for k in KINDS)
    if not sep or not location:
        hint = (f"; for a prepared dataset write prepared:{source}"
                if os.path.isdir(os.path.expanduser(source)) else "")
        raise ValueError(f"{key} {source!r} is not KIND:LOCATION; use one of {kinds}{hint}")
    if kind not in KINDS:
        raise ValueError(f"{key} {source!r} has unknown kind {kind!r}; use one of {kinds}")
    fields: tuple[str, ...] = (DEFAULT_FIELD,)
    if kind in ("jsonl", "parquet", "tfds") and "#" in location:
        location, _, field_text = location.rpartition("#")
        fields = tuple(field_text.split("+"))
        if len(fields) > 2 or not all(fields):
            raise ValueError(f"{key} {source!r}: #{field_text} must be one field (#text) or "
                             "a prompt and a response field (#prompt+response)")
    split = "train"
    if kind == "tfds":
        location, _, split = location.partition(":")
        split = split or "train"
        if not re.fullmatch(r"[a-z][a-z0-9_]*(/[\w.-]+)?", location):
            raise ValueError(f"{key} {source!r}: {location!r} is not a TFDS name "
                             "(NAME or NAME/CONFIG, e.g. tfds:tiny_shakespeare)")
    elif kind == "prepared":
        # A trailing `:SPLIT` (a word without a slash) picks the split.
        head, colon, tail = location.rpartition(":")
        if colon and head and re.fullmatch(r"[a-z_]+", tail):
            location, split = head, tail
    elif kind == "bundled" and location not in BUNDLED_CORPORA:
        raise ValueError(f"{key} {source!r}: no bundled corpus {location!r}; "
                         f"bundled corpora: {', '.join(BUNDLED_CORPORA)}")
    return SourceSpec(text=source.strip(), kind=kind, location=location, fields=fields,
                      split=split)


def parse_mixture(sources: str, key: str = "config.data.train") -> list[tuple[SourceSpec, float]]:
    """`SRC[=WEIGHT],SRC[=WEIGHT],...` -> [(spec, weight)], weights normalised to sum to 1.

    A source without `=WEIGHT` weighs 1. Raises ValueError naming `key` for a bad weight,
    a repeated source, or an empty list.
    """
    parts = [part.strip() for part in sources.split(",") if part.strip()]
    if not parts:
        raise ValueError(f"{key} is empty; name a source such as bundled:shakespeare")
    mixture = []
    for part in parts:
        source, eq, weight_text = part.rpartition("=")
        if not eq:
            source, weight = part, 1.0
        else:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f"{key}: weight {weight_text!r} of {source!r} is not a "
                                 "number; write SOURCE=0.3") from None
            if not weight > 0:
                raise ValueError(f"{key}: weight {weight_text} of {source!r} must be > 0")
        mixture.append((parse_source(source, key), weight))
    names = [spec.text for spec, _ in mixture]
    if len(set(names)) != len(names):
        raise ValueError(f"{key} names a source twice: {sources!r}")
    total = sum(weight for _, weight in mixture)
    return [(spec, weight / total) for spec, weight in mixture]


def read_documents(source: str | SourceSpec, *, data_dir: str | None = None,
                   limit: int | None = None) -> list[Document]:
    """Reads every document of `source` into memory, in a deterministic order.

    Returns a non-empty list of non-empty documents (`str`, or `Example` for two fields);
    `limit` stops after that many. Raises ValueError (bad source string, malformed record,
    nothing readable) or FileNotFoundError (no file matches), with one line that names
    the source and what to do. `prepared:` sources hold tokens, not text: open them with
    `llmjax.data.prepared.open_split`.
    """
    spec = source if isinstance(source, SourceSpec) else parse_source(source)

    def fail(reason: str, where: str, detail: str, count: int = 1) -> None:
        fixes = {INVALID_UTF8: "convert it to UTF-8 or leave it out",
                 MALFORMED_JSON: "fix the line or use text:GLOB for plain text",
                 MISSING_FIELD: "name the field(s) with #FIELD or #PROMPT+RESPONSE",
                 UNREADABLE: "check the file's permissions"}
        raise ValueError(f"data source {spec.text!r}: {where}: {detail}; {fixes[reason]}")

    if spec.kind == "prepared":
        raise ValueError(f"data source {spec.text!r} is already tokenized; use it as "
                         "config.data.train / data.eval, not as text")
    documents: list[Document] = []
    for unit in input_units(spec, data_dir=data_dir):
        for document in iter_unit_documents(spec, unit, fail, data_dir=data_dir):
            # Empty documents carry no tokens worth training on; drop them rather than fail.
            if document_text(document).strip():
                documents.append(document)
            if limit is not None and len(documents) >= limit:
                return documents
    if not documents:
        raise ValueError(f"data source {spec.text!r} holds no non-empty documents; "
                         "point it at files that contain text")
    return documents


def document_text(document: Document) -> str:
    """All the text of a document (prompt and response together for an Example)."""
    if isinstance(document, Chat):
        return "\n".join(content for _, content in document.messages)
    return document if isinstance(document, str) else document.prompt + document.response


# ---------------------------------------------------------------- input units
#
# A unit is what one worker of `llmjax.data.prepare` reads: a file, or a range of a TFDS split's
# records. `input_units` lists them; `iter_unit_documents` reads one.


def input_units(spec: SourceSpec, data_dir: str | None = None) -> list[str]:
    """The files (or `tfds:` record ranges `START-STOP`) of `spec`, sorted."""
    if spec.kind == "bundled":
        paths = sorted(str(p) for p in (BUNDLED_DIR / spec.location).glob("*.txt"))
        if not paths:
            raise FileNotFoundError(f"data source {spec.text!r}: no .txt files in "
                                    f"{BUNDLED_DIR / spec.location}; reinstall llmjax")
        return paths
    if spec.kind in ("text", "jsonl", "parquet"):
        return _glob_files(spec.text, spec.location)
    if spec.kind == "tfds":
        num_records = len(open_tfds(spec, data_dir))
        step = 20_000
        return [f"{start}-{min(start + step, num_records)}"
                for start in range(0, num_records, step)]
    raise ValueError(f"data source {spec.text!r} has no text units")


def iter_unit_documents(spec: SourceSpec, unit: str, on_bad: OnBad,
                        data_dir: str | None = None) -> Iterator[Document]:
    """The documents of one unit, in order; each bad record goes to `on_bad` instead."""
    if spec.kind == "bundled":
        yield from split_scenes(Path(unit).read_text(encoding="utf-8"))
    elif spec.kind == "text":
        data = _read_bytes(unit, on_bad)
        if data is not None:
            text = _decode(data, unit, on_bad)
            if text is not None:
                yield text
    elif spec.kind == "jsonl":
        yield from _iter_jsonl(spec, unit, on_bad)
    elif spec.kind == "parquet":
        yield from _iter_parquet(spec, unit, on_bad)
    elif spec.kind == "tfds":
        start, stop = (int(x) for x in unit.split("-"))
        records = open_tfds(spec, data_dir)
        for index in range(start, stop):
            document = record_document(spec, records[index], f"record {index}", on_bad)
            if document is not None:
                yield document


def record_document(spec: SourceSpec, record: Any, where: str, on_bad: OnBad) -> Document | None:
    """A dict-like record (JSON line, Parquet row, TFDS example) -> its document, or None."""
    if not hasattr(record, "get"):
        on_bad(MISSING_FIELD, where, f"is a {type(record).__name__}, not a record with fields")
        return None
    values = []
    for field in spec.fields:
        value = record.get(field)
        if isinstance(value, list) and len(spec.fields) == 1:
            return _chat(value, where, on_bad)
        if isinstance(value, bytes):
            value = _decode(value, where, on_bad)
            if value is None:
                return None
        if not isinstance(value, str):
            if value is None:
                present = ", ".join(sorted(map(str, record.keys()))[:8])
                hint = (" (it has prompt and response: use #prompt+response)"
                        if {"prompt", "response"} <= set(record.keys()) else "")
                on_bad(MISSING_FIELD, where, f"has no field {field!r} (fields: {present}){hint}")
            else:
                on_bad(MISSING_FIELD, where,
                       f"field {field!r} is a {type(value).__name__}, not text")
            return None
        values.append(value)
    return values[0] if len(values) == 1 else Example(*values)


def _chat(messages: list, where: str, on_bad: OnBad) -> Chat | None:
    try:
        chat = Chat(tuple((str(m["role"]), str(m["content"])) for m in messages))
    except (TypeError, KeyError):
        on_bad(MISSING_FIELD, where, "holds a list that is not chat messages "
               '([{"role": ..., "content": ...}, ...])')
        return None
    if not chat.messages or chat.messages[-1][0] != "assistant":
        on_bad(MISSING_FIELD, where, "chat messages must end with an assistant message")
        return None
    return chat


def open_tfds(spec: SourceSpec, data_dir: str | None = None) -> Sequence[Any]:
    """The random-access records of a `tfds:` source, via tfds.data_source (no download).

    Raises ValueError naming the source if the dataset is not prepared under `data_dir`
    (default: TFDS's, usually ~/tensorflow_datasets).
    """
    import tensorflow_datasets as tfds  # slow to import; only tfds: sources need it

    try:
        return tfds.data_source(spec.location, split=spec.split, data_dir=data_dir,
                                download=False)
    except Exception as e:  # noqa: BLE001 (TFDS raises many kinds; all mean "not here")
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        detail = " ".join(str(e).split()).split(". ")[0][:160]
        raise ValueError(f"data source {spec.text!r}: no random-access copy of "
                         f"{spec.location}:{spec.split} in {where} ({type(e).__name__}: "
                         f"{detail}); llmjax never downloads: run `tfds build {spec.location} "
                         "--file_format=array_record --data_dir=DIR` and set "
                         "config.data.tfds_data_dir=DIR"
                         ) from None


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


def _glob_files(source: str, pattern: str) -> list[str]:
    expanded = os.path.expanduser(pattern)
    paths = files.glob(expanded)
    if not paths:
        raise FileNotFoundError(f"data source {source!r}: no file matches {expanded!r}; "
                                "check the path (globs like dir/**/*.txt are allowed)")
    return paths


def _read_bytes(path: str, on_bad: OnBad) -> bytes | None:
    try:
        with files.open_file(path, "rb") as f:
            return f.read()
    except OSError as e:
        on_bad(UNREADABLE, path, f"cannot be read ({e.strerror or e})")
        return None


def _decode(data: bytes, where: str, on_bad: OnBad) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        on_bad(INVALID_UTF8, where, f"is not UTF-8 text ({e.reason} at byte {e.start})")
        return None


def _iter_jsonl(spec: SourceSpec, path: str, on_bad: OnBad) -> Iterator[Document]:
    try:
        f = files.open_file(path, "rb")  # closed below; per-line decoding needs bytes
    except OSError as e:
        on_bad(UNREADABLE, path, f"cannot be read ({e.strerror or e})")
        return
    with f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            line = _decode(raw, where, on_bad)
            if line is None or not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                on_bad(MALFORMED_JSON, where, f"is not valid JSON ({e.msg})")
                continue
            document = record_document(spec, record, where, on_bad)
            if document is not None:
                yield document


def _iter_parquet(spec: SourceSpec, path: str, on_bad: OnBad) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(files.open_file(path, "rb") if files.is_remote(path) else path)
        names = set(parquet.schema_arrow.names)
    except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) on garbage
        on_bad(UNREADABLE, path, f"is not a readable Parquet file ({str(e)[:120]})")
        return
    missing = [field for field in spec.fields if field not in names]
    if missing:
        on_bad(MISSING_FIELD, path, f"has no column {missing[0]!r} (columns: "
               f"{', '.join(sorted(names)[:8])})", parquet.metadata.num_rows)
        return
    row = 0
    for batch in parquet.iter_batches(columns=list(spec.fields), batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            document = record_document(spec, record, f"{path}:row {row}", on_bad)
            if document is not None:
                yield document

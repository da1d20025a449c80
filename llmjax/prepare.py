"""Prepare a training dataset: raw text -> cleaned, deduplicated, tokenized TFDS shards.

    python -m llmjax.prepare --source='text:raw/**/*.txt' --output=data/my_corpus
    python -m llmjax.train --config=configs/shakespeare.py \\
        --config.data.train=prepared:data/my_corpus

Stages (each shows progress with counts/s and ETA, and uses every core):

    1. read + clean   every input file (or TFDS record range), in parallel: Unicode
                      normalisation, control characters removed, length and repetition
                      filters; bad input (unreadable file, invalid UTF-8, malformed JSON line,
                      missing field) is counted per file, never fatal
    2. deduplicate    exact duplicates (hash of the normalised text), then near duplicates
                      (MinHash + LSH at --near_duplicate_threshold); the first copy is kept
    3. tokenizer      --tokenizer=bpe:N or unigram:N trains one on the kept training text and
                      saves it in OUTPUT/tokenizer (a directory AutoTokenizer loads); or a
                      directory, or `byte`
    4. tokenize       in parallel, per input file
    5. write          shuffled array_record shards of a TFDS dataset in OUTPUT/1.0.0
                      (splits train and validation), read by tfds.data_source

Then OUTPUT/report.json (also printed) says how many documents, bytes and tokens were kept,
and dropped for each reason, and how long each stage took. Stages 1 and 4 keep their results
per input file in OUTPUT/work/, and a run with the same arguments and unchanged inputs skips
what is done: a finished dataset is not rewritten at all (--force redoes everything).
"""

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from tqdm import tqdm

# Imported here, before the worker processes fork, so that they start with them loaded.
from llmjax.data import clean, prepared, sources
from llmjax.data.pipeline import tokenize_documents
from llmjax.data.sources import SourceSpec
from llmjax.data.tokenizer import fingerprint, load_tokenizer, save_trained, train_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("source", None, "Input, as a data source string: text:GLOB, "
                          "jsonl:GLOB[#FIELD|#PROMPT+RESPONSE], parquet:GLOB[...], "
                          "tfds:NAME[/CONFIG][:SPLIT][#FIELD], bundled:shakespeare. Repeatable.")
flags.DEFINE_string("output", None, "Dataset directory DIR/NAME (NAME: lowercase, digits, _).")
flags.DEFINE_string("tokenizer", "bpe:8192", "bpe:VOCAB or unigram:VOCAB (train on the kept "
                    "text), byte, or a directory AutoTokenizer loads.")
flags.DEFINE_enum("normalize", "NFC", list(clean.NORMALIZATIONS), "Unicode normalisation.")
flags.DEFINE_integer("min_chars", clean.CleanOptions.min_chars, "Drop shorter documents.")
flags.DEFINE_integer("max_chars", clean.CleanOptions.max_chars,
                     "Drop longer documents (0: no limit).")
flags.DEFINE_float("max_repeated_line_fraction", clean.CleanOptions.max_repeated_line_fraction,
                   "Drop documents with more of their characters in repeated lines.")
flags.DEFINE_float("max_repeated_ngram_fraction",
                   clean.CleanOptions.max_repeated_ngram_fraction,
                   "Drop documents with more of their words in repeated word 5-grams.")
flags.DEFINE_bool("exact_dedup", True, "Drop exact duplicates (normalised text).")
flags.DEFINE_float("near_duplicate_threshold", 0.8, "Drop near duplicates: estimated Jaccard "
                   "similarity of word 5-grams >= this (0: keep them).")
flags.DEFINE_integer("minhash_perms", 128, "MinHash signature length.")
flags.DEFINE_float("validation_fraction", 0.01, "Share of kept documents in the validation "
                   "split (at least one if > 0).")
flags.DEFINE_integer("num_shards", 0, "Train split shards (0: about 256 MB each, at least "
                     "one per worker).")
flags.DEFINE_integer("num_workers", 0, "Worker processes (0: one per core).")
flags.DEFINE_integer("seed", 0, "Seed of the shuffle and of the validation split.")
flags.DEFINE_string("tfds_data_dir", "", "Where tfds: sources are prepared (TFDS default if "
                    "empty); nothing is downloaded.")
flags.DEFINE_bool("force", False, "Redo every stage even if its results are there.")

REPORT_FILE, STAMP_FILE, WORK_SUBDIR = "report.json", "stamp.json", "work"
KEPT = "kept"
_SHARD_BYTES = 256 << 20
_TASK_BYTES = 64 << 20  # small input files are read in groups of about this size


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a preparation depends on (the flags, as one value)."""

    sources: tuple[str, ...]
    output: str
    tokenizer: str = "bpe:8192"
    cleaning: clean.CleanOptions = clean.CleanOptions()
    exact_dedup: bool = True
    near_duplicate_threshold: float = 0.8
    minhash_perms: int = 128
    validation_fraction: float = 0.01
    num_shards: int = 0
    num_workers: int = 0
    seed: int = 0
    tfds_data_dir: str = ""
    force: bool = False

    def stamp(self) -> dict[str, Any]:
        """What, if unchanged (with the inputs), makes a rerun's result the same."""
        fields = dataclasses.asdict(self)
        for key in ("num_workers", "force"):  # how, not what
            fields.pop(key)
        return fields


def prepare(options: Options, show_progress: bool = True) -> dict[str, Any]:
    """Runs every stage (skipping finished ones); returns the report (also saved as JSON)."""
    started = time.perf_counter()
    name = prepared.check_name(options.output)
    specs = [sources.parse_source(s, "--source") for s in options.sources]
    if not specs:
        raise ValueError("give at least one --source")
    for spec in specs:
        if spec.kind == "prepared":
            raise ValueError(f"--source={spec.text!r} is already prepared; name raw sources")
    _check_tokenizer_flag(options.tokenizer)
    if not 0 <= options.validation_fraction < 1:
        raise ValueError(f"--validation_fraction={options.validation_fraction} must be in "
                         "[0, 1)")
    output = os.path.abspath(os.path.expanduser(options.output))
    work = os.path.join(output, WORK_SUBDIR)
    data_dir = options.tfds_data_dir or None
    num_workers = options.num_workers or os.cpu_count() or 1
    tasks = _tasks(specs, data_dir, num_workers)
    # (through JSON, as it is saved: tuples become lists)
    stamp = json.loads(json.dumps({"options": options.stamp(),
                                   "inputs": [t["stamp"] for t in tasks]}))
    if not options.force and _read_json(os.path.join(output, STAMP_FILE)) == stamp:
        report = _read_json(os.path.join(output, REPORT_FILE))
        if report is not None and os.path.isdir(os.path.join(output, prepared.VERSION)):
            report["up_to_date"] = True
            return report
    if options.force:
        shutil.rmtree(work, ignore_errors=True)
        tokenizer_dir = os.path.join(output, prepared.TOKENIZER_SUBDIR)
        if os.path.exists(tokenizer_dir + ".stamp.json"):  # ours, trained here: retrain it
            shutil.rmtree(tokenizer_dir, ignore_errors=True)
            os.remove(tokenizer_dir + ".stamp.json")
    os.makedirs(work, exist_ok=True)
    seconds: dict[str, float] = {}
    cached: dict[str, str] = {}
    # Forked before any tokenizer runs (a fork after the Rust thread pool started would
    # make each child fall back to one thread, with a warning). Reading array_record files
    # (tfds: sources) in a forked child can hang on the parent's reader thread pool, so
    # those runs start fresh worker processes instead (slower to start).
    forkable = sys.platform == "linux" and all(spec.kind != "tfds" for spec in specs)
    context = multiprocessing.get_context("fork" if forkable else "spawn")
    with (context.Pool(num_workers, initializer=_worker_signals) if num_workers > 1
          else _InlinePool()) as pool:
        # 1. read + clean
        clock = time.perf_counter()
        read = functools.partial(_read_and_clean, specs=specs, options=options, work=work)
        summaries: list[dict[str, Any]] = [None] * len(tasks)  # type: ignore[list-item]
        with _progress(show_progress, "read+clean", sum(t["bytes"] for t in tasks),
                       unit="B") as bar:
            for index, summary in pool.imap_unordered(read, enumerate(tasks)):
                summaries[index] = summary
                bar.update(summary["input_bytes"])
                bar.set_postfix(docs=f"{sum(s['num_docs'] for s in summaries if s):,}")
        seconds["read_clean"] = time.perf_counter() - clock
        cached["read_clean"] = f"{sum(s['cached'] for s in summaries)}/{len(tasks)} tasks"

        # 2. deduplicate, then pick the validation documents
        clock = time.perf_counter()
        reasons = _deduplicate(summaries, options)
        splits = _assign_splits(reasons, options)
        seconds["dedup"] = time.perf_counter() - clock

        # 3. tokenizer
        clock = time.perf_counter()
        tokenizer_spec, tokenizer_cached = _tokenizer(options, output, summaries, reasons, splits,
                                                      show_progress)
        seconds["tokenizer"] = time.perf_counter() - clock
        cached["tokenizer"] = "yes" if tokenizer_cached else "no"
        tokenizer = load_tokenizer(tokenizer_spec)
        tokenizer_fingerprint = fingerprint(tokenizer)

        # 4. tokenize
        clock = time.perf_counter()
        samples = _sample_texts(summaries, splits["train"])
        load_args = (_rust_only_matches(tokenizer_spec, tokenizer, samples), tokenizer.bos_id,
                     tokenizer.eos_id)
        tokenize = functools.partial(_tokenize, tokenizer_spec=tokenizer_spec,
                                     fingerprint=tokenizer_fingerprint,
                                     vocab_size=tokenizer.vocab_size, work=work,
                                     load_args=load_args)
        jobs = [(i, summaries[i], reasons[i]) for i in range(len(tasks))]
        token_counts: list[dict[str, Any]] = [None] * len(tasks)  # type: ignore[list-item]
        with _progress(show_progress, "tokenize", sum(s["num_docs"] for s in summaries),
                       unit="doc") as bar:
            for index, counts in pool.imap_unordered(tokenize, jobs):
                token_counts[index] = counts
                bar.update(summaries[index]["num_docs"])
        seconds["tokenize"] = time.perf_counter() - clock
        cached["tokenize"] = f"{sum(c['cached'] for c in token_counts)}/{len(tasks)} tasks"

        # 5. write shuffled shards
        clock = time.perf_counter()
        version_dir = os.path.join(output, prepared.VERSION)
        shutil.rmtree(version_dir, ignore_errors=True)
        os.makedirs(version_dir)
        written = _write_splits(pool, options, name, version_dir, token_counts, splits,
                                tokenizer.vocab_size, show_progress)
        metadata = {
            "tokenizer": (tokenizer_spec if tokenizer_spec == "byte" or not
                          tokenizer_spec.startswith(output + os.sep)
                          else os.path.relpath(tokenizer_spec, output)),
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id, "sources": list(options.sources),
            "splits": {split: {"documents": info["documents"], "tokens": info["tokens"]}
                       for split, info in written.items()},
        }
        prepared.write_metadata(
            version_dir, name, prepared.features(tokenizer.vocab_size),
            {split: (info["shard_lengths"], info["bytes"]) for split, info in written.items()},
            metadata, description=f"Prepared by llmjax.prepare from {', '.join(options.sources)}")
        seconds["write"] = time.perf_counter() - clock

    seconds["total"] = time.perf_counter() - started
    report = _report(options, output, tasks, summaries, reasons, splits, token_counts, written,
                     tokenizer_spec, seconds, cached)
    with open(os.path.join(output, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output, STAMP_FILE), "w") as f:
        json.dump(stamp, f, indent=2)
    return report


# ---------------------------------------------------------------- 1. read + clean


def _tasks(specs: Sequence[SourceSpec], data_dir: str | None,
           num_workers: int) -> list[dict[str, Any]]:
    """Work items of stage 1: groups of input units (files, TFDS record ranges), small
    enough that every worker gets several."""
    units = [(i, spec, unit, _unit_size(spec, unit)) for i, spec in enumerate(specs)
             for unit in sources.input_units(spec, data_dir)]
    target = min(_TASK_BYTES, max(1, sum(u[3] for u in units) // (4 * num_workers)))
    tasks: list[dict[str, Any]] = []
    group: list[str] = []
    group_bytes = 0
    for position, (source_index, spec, unit, size) in enumerate(units):
        group.append(unit)
        group_bytes += size
        last_of_source = position + 1 == len(units) or units[position + 1][0] != source_index
        if group_bytes >= target or len(group) >= 256 or spec.kind == "tfds" or last_of_source:
            tasks.append(_task(spec, source_index, group, group_bytes))
            group, group_bytes = [], 0
    return tasks


def _task(spec: SourceSpec, source_index: int, units: list[str], num_bytes: int) -> dict:
    identity = [[unit, *_unit_version(spec, unit)] for unit in units]
    return {"source": source_index, "units": units, "bytes": num_bytes,
            "stamp": {"source": spec.text, "units": identity}}


def _unit_size(spec: SourceSpec, unit: str) -> int:
    if spec.kind == "tfds":
        start, stop = (int(x) for x in unit.split("-"))
        return stop - start  # records, not bytes: only the progress bar uses it
    try:
        return os.path.getsize(unit)
    except OSError:
        return 0


def _unit_version(spec: SourceSpec, unit: str) -> list[int]:
    if spec.kind == "tfds":
        return []
    try:
        stat = os.stat(unit)
        return [stat.st_size, stat.st_mtime_ns]
    except OSError:
        return [-1, -1]


def _read_and_clean(indexed_task: tuple[int, dict], *, specs: Sequence[SourceSpec],
                    options: Options, work: str) -> tuple[int, dict[str, Any]]:
    """Stage 1 for one task, in a worker: cleaned documents to work/, a summary back."""
    index, task = indexed_task
    key = _hash({"task": task["stamp"], "clean": dataclasses.asdict(options.cleaning),
                 "perms": options.minhash_perms, "tfds_data_dir": options.tfds_data_dir})
    summary_path = os.path.join(work, f"clean-{key}.summary.pkl")
    docs_path = os.path.join(work, f"clean-{key}.docs.pkl")
    if os.path.exists(summary_path):
        with open(summary_path, "rb") as f:
            summary = pickle.load(f)
        return index, {**summary, "cached": True, "docs_path": docs_path}
    spec = specs[task["source"]]
    documents: list[sources.Document] = []
    reasons: list[str | None] = []
    doc_bytes: list[int] = []
    exact_keys: list[bytes] = []
    signatures: list[np.ndarray] = []
    bad: dict[str, dict[str, Any]] = {}
    control_removed = 0
    for unit in task["units"]:
        label = unit if spec.kind != "tfds" else f"{spec.text} records {unit}"

        def on_bad(reason: str, where: str, detail: str, count: int = 1,
                   label: str = label) -> None:
            entry = bad.setdefault(label, {"counts": Counter(), "examples": []})
            entry["counts"][reason] += count
            if len(entry["examples"]) < 3:
                entry["examples"].append(f"{where}: {detail}")

        for document in sources.iter_unit_documents(spec, unit, on_bad,
                                                    options.tfds_data_dir or None):
            parts = [document] if isinstance(document, str) else list(document)
            cleaned_parts = []
            for part in parts:
                text, removed = clean.clean_text(part, options.cleaning)
                control_removed += removed
                cleaned_parts.append(text)
            cleaned = (cleaned_parts[0] if isinstance(document, str)
                       else sources.Example(*cleaned_parts))
            text = sources.document_text(cleaned)
            reason = clean.filter_reason(text, options.cleaning)
            documents.append(cleaned)
            reasons.append(reason)
            doc_bytes.append(len(text.encode("utf-8")))
            exact_keys.append(clean.exact_key("\x00".join(cleaned_parts)))
            if reason is None:
                signatures.append(clean.minhash(text, options.minhash_perms))
    with open(docs_path, "wb") as f:
        pickle.dump(documents, f)
    summary = {
        "key": key, "num_docs": len(documents), "reasons": reasons,
        "bytes": np.array(doc_bytes, np.int64), "exact_keys": exact_keys,
        "signatures": (np.stack(signatures) if signatures
                       else np.zeros((0, options.minhash_perms), np.uint32)),
        "bad": {label: {"counts": dict(e["counts"]), "examples": e["examples"]}
                for label, e in bad.items()},
        "control_removed": control_removed, "input_bytes": task["bytes"],
    }
    scratch = summary_path + ".incomplete"
    with open(scratch, "wb") as f:
        pickle.dump(summary, f)
    os.replace(scratch, summary_path)  # the summary last: its presence means "done"
    return index, {**summary, "cached": False, "docs_path": docs_path}


# ---------------------------------------------------------------- 2. deduplicate


def _deduplicate(summaries: Sequence[dict], options: Options) -> list[list[str]]:
    """Per task, per document: `kept` or why it is dropped (filters, then duplicates)."""
    reasons = [[r or KEPT for r in s["reasons"]] for s in summaries]
    seen: set[bytes] = set()
    survivors: list[tuple[int, int, np.ndarray]] = []  # (task, doc, signature)
    for t, summary in enumerate(summaries):
        candidate = 0  # signatures exist for documents that passed the filters, in order
        for d, reason in enumerate(reasons[t]):
            if reason != KEPT:
                continue
            signature = summary["signatures"][candidate]
            candidate += 1
            key = summary["exact_keys"][d]
            if options.exact_dedup and key in seen:
                reasons[t][d] = clean.EXACT_DUPLICATE
                continue
            seen.add(key)
            survivors.append((t, d, signature))
    if options.near_duplicate_threshold > 0 and len(survivors) > 1:
        duplicate = clean.near_duplicates(np.stack([s for _, _, s in survivors]),
                                          options.near_duplicate_threshold)
        for (t, d, _), is_duplicate in zip(survivors, duplicate, strict=True):
            if is_duplicate:
                reasons[t][d] = clean.NEAR_DUPLICATE
    return reasons


def _assign_splits(reasons: Sequence[Sequence[str]], options: Options) -> dict[str, list]:
    """(task, doc) of the kept documents: validation ones at random, the train ones shuffled."""
    kept = [(t, d) for t, task in enumerate(reasons) for d, r in enumerate(task) if r == KEPT]
    if not kept:
        raise ValueError("no document survived cleaning and deduplication; see the filters "
                         "(--min_chars, --max_repeated_*) and the inputs")
    rng = np.random.default_rng(options.seed)
    order = rng.permutation(len(kept))
    num_validation = 0
    if options.validation_fraction > 0 and len(kept) > 1:
        num_validation = max(1, round(options.validation_fraction * len(kept)))
        num_validation = min(num_validation, len(kept) - 1)
    return {"train": [kept[i] for i in order[num_validation:]],
            "validation": sorted(kept[i] for i in order[:num_validation])}


# ---------------------------------------------------------------- 3. tokenizer


def _check_tokenizer_flag(spec: str) -> None:
    kind, _, size = spec.partition(":")
    if spec == "byte" or os.path.isdir(os.path.expanduser(spec)):
        return
    if kind in ("bpe", "unigram") and size.isdigit() and int(size) > 259:
        return
    raise ValueError(f"--tokenizer={spec!r} is not bpe:VOCAB, unigram:VOCAB (VOCAB > 259), "
                     "byte, or a tokenizer directory")


def _tokenizer(options: Options, output: str, summaries: Sequence[dict],
               reasons: Sequence[Sequence[str]], splits: dict[str, list],
               show_progress: bool) -> tuple[str, bool]:
    """(tokenizer spec to load: a directory or `byte`, whether it was already trained)."""
    spec = options.tokenizer
    if spec == "byte":
        return "byte", True
    if os.path.isdir(os.path.expanduser(spec)):
        return os.path.abspath(os.path.expanduser(spec)), True
    kind, _, size = spec.partition(":")
    directory = os.path.join(output, prepared.TOKENIZER_SUBDIR)
    train_keys = hashlib.sha256()
    for t, d in sorted(splits["train"]):
        train_keys.update(summaries[t]["exact_keys"][d])
    stamp = {"tokenizer": spec, "documents": train_keys.hexdigest()}
    stamp_path = directory + ".stamp.json"
    if os.path.isdir(directory) and _read_json(stamp_path) == stamp:
        return directory, True
    shutil.rmtree(directory, ignore_errors=True)

    by_task: dict[int, list[int]] = defaultdict(list)
    for t, d in sorted(splits["train"]):
        by_task[t].append(d)

    def texts():
        for t, docs in by_task.items():
            with open(_docs_path(summaries[t]), "rb") as f:
                documents = pickle.load(f)
            for d in docs:
                yield sources.document_text(documents[d])

    if show_progress:
        print(f"tokenizer: training {spec} on {len(splits['train']):,} documents",
              file=sys.stderr, flush=True)
    raw = train_tokenizer(kind, texts(), int(size), length=len(splits["train"]))
    save_trained(raw, directory)
    with open(stamp_path, "w") as f:
        json.dump(stamp, f)
    return directory, False


# ---------------------------------------------------------------- 4. tokenize


class _RustOnlyTokenizer:
    """What tokenize_documents needs, from tokenizer.json alone: loads in milliseconds where
    AutoTokenizer takes seconds (per worker). Used only if it encodes like the full one."""

    def __init__(self, directory: str, bos_id: int, eos_id: int):
        from tokenizers import Tokenizer as RustTokenizer

        self._raw = RustTokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._raw.encode_batch_fast(list(texts), add_special_tokens=False)]


def _rust_only_matches(spec: str, tokenizer, samples: Sequence[str]) -> bool:
    if spec == "byte" or not os.path.isfile(os.path.join(spec, "tokenizer.json")):
        return False
    try:
        fast = _RustOnlyTokenizer(spec, tokenizer.bos_id, tokenizer.eos_id)
    except Exception:  # noqa: BLE001 (any failure: use the full tokenizer)
        return False
    return fast.encode_batch(samples) == tokenizer.encode_batch(samples)


@functools.lru_cache(maxsize=2)
def _load_tokenizer(spec: str, rust_only: bool, bos_id: int, eos_id: int):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process per core already
    return _RustOnlyTokenizer(spec, bos_id, eos_id) if rust_only else load_tokenizer(spec)


def _tokenize(job: tuple[int, dict, list[str]], *, tokenizer_spec: str, fingerprint: str,
              vocab_size: int, work: str, load_args: tuple) -> tuple[int, dict[str, Any]]:
    """Stage 4 for one task, in a worker: kept documents' tokens to work/ as .npy files;
    token counts of every document (dropped ones too, for the report) back."""
    index, summary, reasons = job
    key = _hash({"clean": summary["key"], "reasons": reasons, "tokenizer": fingerprint})
    counts_path = os.path.join(work, f"tokens-{key}.counts.json")
    if os.path.exists(counts_path):
        with open(counts_path) as f:
            return index, {**json.load(f), "cached": True}
    tokenizer = _load_tokenizer(tokenizer_spec, *load_args)
    with open(_docs_path(summary), "rb") as f:
        documents = pickle.load(f)
    token_docs = tokenize_documents(tokenizer, documents) if documents else []
    lengths = np.array([len(_tokens(t)) for t in token_docs], np.int64)
    kept = [i for i, r in enumerate(reasons) if r == KEPT]
    dtype = prepared.token_dtype(vocab_size)
    flat = (np.concatenate([_tokens(token_docs[i]) for i in kept]).astype(dtype) if kept
            else np.zeros(0, dtype))
    offsets = np.concatenate([[0], np.cumsum(lengths[kept])]).astype(np.int64)
    prompt_lengths = np.array([t["prompt_length"] if isinstance(t, dict) else 0
                               for t in (token_docs[i] for i in kept)], np.int32)
    for name, array in (("tokens", flat), ("offsets", offsets), ("prompts", prompt_lengths)):
        np.save(os.path.join(work, f"tokens-{key}.{name}.npy"), array)
    tokens_by_reason: Counter = Counter()
    for reason, length in zip(reasons, lengths, strict=True):
        tokens_by_reason[reason] += int(length)
    counts = {"key": key, "kept": kept, "tokens_by_reason": dict(tokens_by_reason)}
    with open(counts_path + ".incomplete", "w") as f:
        json.dump(counts, f)
    os.replace(counts_path + ".incomplete", counts_path)
    return index, {**counts, "cached": False}


def _sample_texts(summaries: Sequence[dict], members: Sequence[tuple[int, int]]) -> list[str]:
    """Up to 16 kept documents' text (their first 4,000 characters)."""
    texts: list[str] = []
    chosen = sorted(members)[:16]
    for t in sorted({t for t, _ in chosen}):  # each task's documents read once
        with open(_docs_path(summaries[t]), "rb") as f:
            documents = pickle.load(f)
        texts += [sources.document_text(documents[d])[:4000] for u, d in chosen if u == t]
    return texts


def _tokens(token_doc: Any) -> np.ndarray:
    return token_doc["tokens"] if isinstance(token_doc, dict) else token_doc


# ---------------------------------------------------------------- 5. write


def _write_splits(pool, options: Options, name: str, version_dir: str,
                  token_counts: Sequence[dict], splits: dict[str, list], vocab_size: int,
                  show_progress: bool) -> dict[str, dict[str, Any]]:
    # (task, doc) -> (tokens file key, position among that task's kept documents)
    position = {(t, d): (counts["key"], p) for t, counts in enumerate(token_counts)
                for p, d in enumerate(counts["kept"])}
    written = {}
    for split, members in splits.items():
        if not members:
            continue
        locations = [position[m] for m in members]
        num_tokens = _count_tokens(locations, version_dir)
        dtype_bytes = np.dtype(prepared.token_dtype(vocab_size)).itemsize
        num_shards = options.num_shards if split == "train" and options.num_shards else max(
            1 if split != "train" else (options.num_workers or os.cpu_count() or 1),
            -(-num_tokens * dtype_bytes // _SHARD_BYTES))
        num_shards = min(num_shards, len(locations))
        bounds = np.linspace(0, len(locations), num_shards + 1).astype(int)
        work = os.path.join(os.path.dirname(version_dir), WORK_SUBDIR)
        jobs = [(os.path.join(version_dir, prepared.shard_filename(name, split, i, num_shards)),
                 locations[bounds[i]:bounds[i + 1]], work, vocab_size)
                for i in range(num_shards)]
        results = []
        with _progress(show_progress, f"write {split}", len(locations), unit="doc") as bar:
            for result in pool.imap(_write_shard, jobs):
                results.append(result)
                bar.update(result[0])
        written[split] = {"shard_lengths": [r[0] for r in results],
                          "bytes": sum(r[1] for r in results), "documents": len(locations),
                          "tokens": sum(r[2] for r in results), "shards": num_shards}
    return written


def _count_tokens(locations: Sequence[tuple[str, int]], version_dir: str) -> int:
    work = os.path.join(os.path.dirname(version_dir), WORK_SUBDIR)
    offsets = {key: np.load(os.path.join(work, f"tokens-{key}.offsets.npy"))
               for key in {key for key, _ in locations}}
    return int(sum(offsets[key][p + 1] - offsets[key][p] for key, p in locations))


def _write_shard(job: tuple[str, list[tuple[str, int]], str, int]) -> tuple[int, int, int]:
    path, locations, work, vocab_size = job
    arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for key, _ in locations:
        if key not in arrays:
            arrays[key] = tuple(np.load(os.path.join(work, f"tokens-{key}.{name}.npy"),
                                        mmap_mode="r")
                                for name in ("tokens", "offsets", "prompts"))
    num_tokens = 0

    def records():
        nonlocal num_tokens
        for key, p in locations:
            tokens, offsets, prompts = arrays[key]
            ids = np.asarray(tokens[offsets[p]:offsets[p + 1]])
            num_tokens += len(ids)
            yield {"tokens": ids, "prompt_length": int(prompts[p])}

    count, num_bytes = prepared.write_shard(path, records(), prepared.features(vocab_size))
    return count, num_bytes, num_tokens


# ---------------------------------------------------------------- report


def _report(options: Options, output: str, tasks, summaries, reasons, splits, token_counts,
            written, tokenizer_spec: str, seconds: dict[str, float],
            cached: dict[str, str]) -> dict[str, Any]:
    by_reason: dict[str, dict[str, int]] = defaultdict(lambda: {"documents": 0, "bytes": 0,
                                                                 "tokens": 0})
    for reason in (*sources.BAD_INPUT_REASONS, *clean.FILTER_REASONS, clean.EXACT_DUPLICATE,
                   clean.NEAR_DUPLICATE):  # every reason in the report, even at zero
        by_reason[reason]
    bad_files: dict[str, dict[str, Any]] = {}
    for summary, task_reasons, counts in zip(summaries, reasons, token_counts, strict=True):
        for reason, num_bytes in zip(task_reasons, summary["bytes"], strict=True):
            by_reason[reason]["documents"] += 1
            by_reason[reason]["bytes"] += int(num_bytes)
        for reason, tokens in counts["tokens_by_reason"].items():
            by_reason[reason]["tokens"] += tokens
        for label, entry in summary["bad"].items():
            bad_files[label] = entry
            for reason, count in entry["counts"].items():
                by_reason[reason]["documents"] += count
    kept = by_reason.pop(KEPT, {"documents": 0, "bytes": 0, "tokens": 0})
    records_read = sum(v["documents"] for v in by_reason.values()) + kept["documents"]
    return {
        "output": output,
        "dataset": os.path.join(output, prepared.VERSION),
        "tokenizer": tokenizer_spec,
        "sources": list(options.sources),
        "input": {"tasks": len(tasks), "records": records_read,
                  "bytes": int(sum(int(s["bytes"].sum()) for s in summaries))},
        "kept": {**kept, "splits": {split: {k: info[k] for k in ("documents", "tokens",
                                                                  "shards", "bytes")}
                                    for split, info in written.items()}},
        "dropped": dict(by_reason),
        "bad_input": bad_files,
        "control_characters_removed": int(sum(s["control_removed"] for s in summaries)),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "cached": cached,
        "options": {k: v for k, v in options.stamp().items() if k not in ("sources",)},
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a table, for the console."""
    lines = [f"{'':28}{'documents':>12}{'bytes':>14}{'tokens':>14}"]

    def row(label: str, entry: dict[str, int]) -> None:
        tokens = f"{entry['tokens']:,}" if "tokens" in entry else "-"
        num_bytes = f"{entry['bytes']:,}" if entry.get("bytes") else "-"
        lines.append(f"{label:28}{entry['documents']:>12,}{num_bytes:>14}{tokens:>14}")

    row("kept", report["kept"])
    for split, info in report["kept"]["splits"].items():
        lines.append(f"  {split:26}{info['documents']:>12,}{'':>14}{info['tokens']:>14,}"
                     f"   ({info['shards']} shards, {info['bytes']:,} bytes on disk)")
    for reason, entry in report["dropped"].items():
        row(f"dropped: {reason}", entry)
    lines.append(f"control characters removed: {report['control_characters_removed']:,}")
    for label, entry in report["bad_input"].items():
        counts = ", ".join(f"{reason} {count:,}" for reason, count in entry["counts"].items())
        lines.append(f"bad input in {label}: {counts}  (e.g. {entry['examples'][0]})")
    seconds = report["seconds"]
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
                 + "   reused: " + ", ".join(f"{k} {v}" for k, v in report["cached"].items()))
    lines.append(f"dataset: {report['dataset']}   tokenizer: {report['tokenizer']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- helpers


def _docs_path(summary: dict) -> str:
    return summary["docs_path"]


def _worker_signals() -> None:
    """A pool worker dies on SIGTERM (Pool.terminate), whatever handler it was forked with."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _InlinePool:
    """multiprocessing.Pool's interface, run in this process (--num_workers=1)."""

    def __enter__(self) -> "_InlinePool":
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def imap(self, function, iterable):
        return map(function, iterable)

    imap_unordered = imap


def _progress(show: bool, description: str, total: int, unit: str):
    return tqdm(total=total, desc=description, unit=unit, unit_scale=True, disable=not show,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]}; flags only (see --help)")
    if not FLAGS.source or not FLAGS.output:
        sys.exit("error: give --source=KIND:LOCATION (one or more) and --output=DIR/NAME")
    try:
        options = Options(
            sources=tuple(FLAGS.source), output=FLAGS.output, tokenizer=FLAGS.tokenizer,
            cleaning=clean.CleanOptions(
                normalize=FLAGS.normalize, min_chars=FLAGS.min_chars, max_chars=FLAGS.max_chars,
                max_repeated_line_fraction=FLAGS.max_repeated_line_fraction,
                max_repeated_ngram_fraction=FLAGS.max_repeated_ngram_fraction),
            exact_dedup=FLAGS.exact_dedup,
            near_duplicate_threshold=FLAGS.near_duplicate_threshold,
            minhash_perms=FLAGS.minhash_perms, validation_fraction=FLAGS.validation_fraction,
            num_shards=FLAGS.num_shards, num_workers=FLAGS.num_workers, seed=FLAGS.seed,
            tfds_data_dir=FLAGS.tfds_data_dir, force=FLAGS.force)
        report = prepare(options)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if report.get("up_to_date"):
        print(f"{report['dataset']} is up to date (same arguments and inputs); "
              "--force redoes it")
    print(format_report(report))
    print(f"\nTrain on it:\n  python -m llmjax.train --config=configs/shakespeare.py "
          f"--config.data.train=prepared:{options.output}")


if __name__ == "__main__":
    app.run(main)

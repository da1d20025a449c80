"""Stages 3 to 5 of a preparation: the tokenizer, tokenizing every task, writing the shards.

Stage 3 trains a tokenizer (bpe:N, unigram:N) on the kept training text into
OUTPUT/tokenizer, or takes the one named. Stage 4 runs in the worker pool, one task per
call, and keeps each task's tokens in OUTPUT/work/ as .npy files under a key of its cleaned
documents, their reasons and the tokenizer. Stage 5 writes shuffled array_record shards of
the splits, one shard per call in the pool.
"""

import functools
import hashlib
import json
import os
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

import llmjax.data.prepare.order as order  # (by module path: the package imports run.py)
from llmjax.data import prepared, sources
from llmjax.data.documents import tokenize_documents
from llmjax.data.prepare.options import KEPT, WORK_SUBDIR, Options, read_json, stable_hash
from llmjax.data.prepare.pool import progress_bar
from llmjax.data.prepare.stages import load_cleaned
from llmjax.data.tokenizer import fingerprint, load_tokenizer, save_trained, train_tokenizer

# ---------------------------------------------------------------- 3. tokenizer


def find_or_train_tokenizer(options: Options, output: str, summaries: Sequence[dict],
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
    train = sorted(splits["train"])  # document order
    rate = order.tokenizer_sample_rate(sum(int(summaries[t]["bytes"][d]) for t, d in train))
    sample = [(t, d) for t, d in train
              if order.in_tokenizer_sample(options.seed, summaries[t]["doc_keys"][d], rate)]
    train_keys = hashlib.sha256()
    for t, d in sample:
        train_keys.update(summaries[t]["exact_keys"][d])
    stamp = {"tokenizer": spec, "documents": train_keys.hexdigest()}
    stamp_path = directory + ".stamp.json"
    if os.path.isdir(directory) and read_json(stamp_path) == stamp:
        return directory, True
    shutil.rmtree(directory, ignore_errors=True)

    by_task: dict[int, list[int]] = defaultdict(list)
    for t, d in sample:
        by_task[t].append(d)

    def texts():
        for t, docs in by_task.items():
            documents = load_cleaned(summaries[t])
            for d in docs:
                yield sources.document_text(documents[d])

    if show_progress:
        print(f"tokenizer: training {spec} on {len(sample):,} documents",
              file=sys.stderr, flush=True)
    raw = train_tokenizer(kind, texts(), int(size), length=len(sample))
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


def rust_only_matches(spec: str, tokenizer, samples: Sequence[str]) -> bool:
    """Whether the workers may load `spec` as a _RustOnlyTokenizer: it encodes `samples`
    exactly as the full `tokenizer` does."""
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


def tokenize_task(job: tuple[int, dict, list[str]], *, tokenizer_spec: str, fingerprint: str,
                  vocab_size: int, work: str, load_args: tuple) -> tuple[int, dict[str, Any]]:
    """Stage 4 for one task, in a worker: kept documents' tokens to work/ as .npy files;
    token counts of every document (dropped ones too, for the report) back."""
    index, summary, reasons = job
    key = stable_hash({"clean": summary["key"], "reasons": reasons, "tokenizer": fingerprint})
    counts_path = os.path.join(work, f"tokens-{key}.counts.json")
    if os.path.exists(counts_path):
        with open(counts_path) as f:
            return index, {**json.load(f), "cached": True}
    tokenizer = _load_tokenizer(tokenizer_spec, *load_args)
    documents = load_cleaned(summary)
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


def sample_texts(summaries: Sequence[dict], members: Sequence[tuple[int, int]]) -> list[str]:
    """Up to 16 kept documents' text (their first 4,000 characters)."""
    texts: list[str] = []
    chosen = sorted(members)[:16]
    for t in sorted({t for t, _ in chosen}):  # each task's documents read once
        documents = load_cleaned(summaries[t])
        texts += [sources.document_text(documents[d])[:4000] for u, d in chosen if u == t]
    return texts


def _tokens(token_doc: Any) -> np.ndarray:
    return token_doc["tokens"] if isinstance(token_doc, dict) else token_doc


# ---------------------------------------------------------------- 5. write

def write_splits(pool, options: Options, name: str, version_dir: str,
                 token_counts: Sequence[dict], splits: dict[str, list], vocab_size: int,
                 show_progress: bool) -> dict[str, dict[str, Any]]:
    """Stage 5: each split's kept documents, in `splits` order, as array_record shards in
    `version_dir`, one shard per call in `pool`; per split, what was written."""
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
        num_shards = order.num_shards(split, len(locations), num_tokens, dtype_bytes, options,
                                      min_train_shards=options.num_workers or os.cpu_count() or 1)
        bounds = order.shard_bounds(len(locations), num_shards)
        work = os.path.join(os.path.dirname(version_dir), WORK_SUBDIR)
        jobs = [(os.path.join(version_dir, prepared.shard_filename(name, split, i, num_shards)),
                 locations[bounds[i]:bounds[i + 1]], work, vocab_size)
                for i in range(num_shards)]
        results = []
        with progress_bar(show_progress, f"write {split}", len(locations), unit="doc") as bar:
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


def write_metadata(options: Options, output: str, name: str, version_dir: str,
                   tokenizer_spec: str, tokenizer, written: dict[str, dict[str, Any]]) -> None:
    """The dataset's TFDS metadata and llmjax.json (which tokenizer, what each split holds)."""
    metadata = {
        "tokenizer": (tokenizer_spec if tokenizer_spec == "byte" or not
                      tokenizer_spec.startswith(output.rstrip("/") + "/")
                      else os.path.relpath(tokenizer_spec, output)),
        "tokenizer_fingerprint": fingerprint(tokenizer),
        "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id, "sources": list(options.sources),
        "splits": {split: {"documents": info["documents"], "tokens": info["tokens"]}
                   for split, info in written.items()},
    }
    prepared.write_metadata(
        version_dir, name, prepared.features(tokenizer.vocab_size),
        {split: (info["shard_lengths"], info["bytes"]) for split, info in written.items()},
        metadata, description=f"Prepared by llmjax.prepare from {', '.join(options.sources)}")

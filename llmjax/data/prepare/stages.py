"""Stages 1 and 2 of a preparation: read + clean every input, then deduplicate and split.

Stage 1 runs in the worker pool, one task (a group of input units: files or TFDS record
ranges) per call; its results are kept per task in OUTPUT/work/ under a key of the task's
inputs and the cleaning options, so a rerun reads them back. Stage 2 runs in the main
process over every task's summary.
"""

import dataclasses
import os
import pickle
from collections import Counter
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

import llmjax.data.prepare.order as order  # (by module path: the package imports run.py)
from llmjax.data import clean, files, sources
from llmjax.data.prepare.options import KEPT, Options, stable_hash
from llmjax.data.sources import SourceSpec

# ---------------------------------------------------------------- 1. read + clean

_TASK_BYTES = 64 << 20  # small input files are read in groups of about this size


def plan_tasks(specs: Sequence[SourceSpec], data_dir: str | None,
               num_workers: int) -> list[dict[str, Any]]:
    """Work items of stage 1: groups of input units (files, TFDS record ranges), small
    enough that every worker gets several."""
    units = [(i, u, spec, unit, _unit_size(spec, unit)) for i, spec in enumerate(specs)
             for u, unit in enumerate(sources.input_units(spec, data_dir))]
    target = min(_TASK_BYTES, max(1, sum(u[4] for u in units) // (4 * num_workers)))
    tasks: list[dict[str, Any]] = []
    group: list[str] = []
    group_bytes = 0
    for position, (source_index, unit_index, spec, unit, size) in enumerate(units):
        group.append(unit)
        group_bytes += size
        last_of_source = position + 1 == len(units) or units[position + 1][0] != source_index
        if group_bytes >= target or len(group) >= 256 or spec.kind == "tfds" or last_of_source:
            tasks.append(_task(spec, source_index, unit_index + 1 - len(group), group,
                               group_bytes))
            group, group_bytes = [], 0
    return tasks


def _task(spec: SourceSpec, source_index: int, first_unit: int, units: list[str],
          num_bytes: int) -> dict:
    identity = [[unit, *_unit_version(spec, unit)] for unit in units]
    return {"source": source_index, "first_unit": first_unit, "units": units,
            "bytes": num_bytes,
            "stamp": {"source": spec.text, "units": identity}}


def _unit_size(spec: SourceSpec, unit: str) -> int:
    if spec.kind == "tfds":
        start, stop = (int(x) for x in unit.split("-"))
        return stop - start  # records, not bytes: only the progress bar uses it
    return max(files.size(unit), 0)


def _unit_version(spec: SourceSpec, unit: str) -> list[int]:
    if spec.kind == "tfds":
        return []
    return files.version(unit)


def read_and_clean(indexed_task: tuple[int, dict], *, specs: Sequence[SourceSpec],
                   options: Options, work: str) -> tuple[int, dict[str, Any]]:
    """Stage 1 for one task, in a worker: cleaned documents to work/, a summary back."""
    index, task = indexed_task
    key = stable_hash({"task": task["stamp"], "clean": dataclasses.asdict(options.cleaning),
                       "perms": options.minhash_perms, "tfds_data_dir": options.tfds_data_dir,
                       "first_unit": task["first_unit"]})
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
    doc_keys: list[tuple[int, int, int]] = []
    bad: dict[str, dict[str, Any]] = {}
    control_removed = 0
    for offset, unit in enumerate(task["units"]):
        unit_index = task["first_unit"] + offset
        unit_docs, unit_bad, removed = read_unit(spec, unit, options)
        control_removed += removed
        bad.update(unit_bad)
        for record, doc in enumerate(unit_docs):
            documents.append(doc.document)
            reasons.append(doc.reason)
            doc_bytes.append(doc.num_bytes)
            exact_keys.append(doc.exact_key)
            doc_keys.append((task["source"], unit_index, record))
            if doc.signature is not None:
                signatures.append(doc.signature)
    with open(docs_path, "wb") as f:
        pickle.dump(documents, f)
    summary = {
        "key": key, "num_docs": len(documents), "reasons": reasons, "doc_keys": doc_keys,
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


class CleanedDocument(NamedTuple):
    """One input document after stage 1 (what both runners keep of it)."""

    document: sources.Document  # cleaned
    reason: str | None  # why a filter drops it, or None
    num_bytes: int  # UTF-8 bytes of its cleaned text
    exact_key: bytes  # clean.exact_key of its cleaned parts
    signature: np.ndarray | None  # [minhash_perms] uint32 if it passed the filters


def read_unit(spec: SourceSpec, unit: str, options: Options
              ) -> tuple[list[CleanedDocument], dict[str, dict[str, Any]], int]:
    """Stage 1 for one input unit: (its documents cleaned, in order; its bad input as
    {label: {"counts": {reason: n}, "examples": [up to 3]}}; control characters removed)."""
    label = unit if spec.kind != "tfds" else f"{spec.text} records {unit}"
    counts: Counter = Counter()
    examples: list[str] = []

    def on_bad(reason: str, where: str, detail: str, count: int = 1) -> None:
        counts[reason] += count
        if len(examples) < 3:
            examples.append(f"{where}: {detail}")

    cleaned_documents = []
    control_removed = 0
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
        cleaned_documents.append(CleanedDocument(
            cleaned, reason, len(text.encode("utf-8")),
            clean.exact_key("\x00".join(cleaned_parts)),
            clean.minhash(text, options.minhash_perms) if reason is None else None))
    bad = {label: {"counts": dict(counts), "examples": examples}} if counts else {}
    return cleaned_documents, bad, control_removed


def load_cleaned(summary: dict) -> list[sources.Document]:
    """The cleaned documents stage 1 left for a task (all of them, dropped ones too)."""
    with open(summary["docs_path"], "rb") as f:
        return pickle.load(f)


# ---------------------------------------------------------------- 2. deduplicate


def deduplicate(summaries: Sequence[dict], options: Options) -> list[list[str]]:
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


def assign_splits(summaries: Sequence[dict], reasons: Sequence[Sequence[str]],
                  options: Options) -> dict[str, list]:
    """(task, doc) of the kept documents per split, in shuffled order (`order.shuffle_key`:
    the first `order.num_validation` are the validation split)."""
    kept = [(t, d) for t, task in enumerate(reasons) for d, r in enumerate(task) if r == KEPT]
    if not kept:
        raise ValueError("no document survived cleaning and deduplication; see the filters "
                         "(--min_chars, --max_repeated_*) and the inputs")
    kept.sort(key=lambda td: order.shuffle_key(options.seed, summaries[td[0]]["doc_keys"][td[1]]))
    num_validation = order.num_validation(len(kept), options.validation_fraction)
    return {"train": kept[num_validation:], "validation": kept[:num_validation]}

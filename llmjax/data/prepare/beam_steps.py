"""The per-element steps of the Beam pipeline (beam.py): each calls the function the local
pool calls for the same work (stages.read_unit, clean's LSH functions, order's rules,
tokenize_documents, prepared.write_shard), so both runners compute the same thing.

None of them imports apache_beam: they are plain functions of their elements and of the
pipeline's side inputs, picklable to any worker.
"""

import functools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

import llmjax.data.prepare.order as order  # (by module path: the package imports run.py)
import llmjax.data.prepare.stages as stages
from llmjax.data import clean, prepared, sources
from llmjax.data.documents import tokenize_documents
from llmjax.data.prepare.options import KEPT, Options
from llmjax.data.sources import SourceSpec
from llmjax.data.tokenizer import load_tokenizer, save_trained, train_tokenizer

_BUCKET_SHIFT = 48  # ranking groups kept documents by the top 16 bits of their shuffle hash


# ---------------------------------------------------------------- 1. read + clean

def read_unit(item: tuple[int, int, str], specs: Sequence[SourceSpec], options: Options
              ) -> Iterator[tuple]:
    """(key, CleanedDocument) per document of one input unit, then one
    ("unit", (source, unit), bad input, control characters removed) for the report."""
    source_index, unit_index, unit = item
    documents, bad, control_removed = stages.read_unit(specs[source_index], unit, options)
    for record, document in enumerate(documents):
        yield (source_index, unit_index, record), document
    yield "unit", (source_index, unit_index), bad, control_removed


# ---------------------------------------------------------------- 2. deduplicate

def first_copy(group: tuple[bytes, Iterable[tuple]]) -> tuple[Any, Any]:
    """(key, signature) of the first document (in document order) with one exact key."""
    return min(group[1], key=lambda member: member[0])


def later_copies(group: tuple[bytes, Iterable[tuple]]) -> Iterator[tuple[Any, Any]]:
    """(key, exact_duplicate) for the other documents with that exact key."""
    first = first_copy(group)[0]
    for key, _ in group[1]:
        if key != first:
            yield key, clean.EXACT_DUPLICATE


def band_buckets(member: tuple, bands: int, rows: int) -> Iterator[tuple[Any, Any]]:
    """((band, bucket), (key, signature)) for each LSH band of a signature."""
    for band in range(bands):
        yield (band, clean.band_key(member[1], band, rows)), member


def bucket_edges(group: tuple[Any, Iterable[tuple]], threshold: float) -> Iterator[tuple]:
    """(earlier key, later key) of the near-duplicate pairs of one LSH bucket."""
    members = sorted(group[1], key=lambda member: member[0])  # document order
    for earlier, later in clean.bucket_pairs(members):
        if clean.similar(earlier[1], later[1], threshold):
            yield earlier[0], later[0]


def near_duplicate_verdicts(edges: list[tuple]) -> Iterator[tuple[Any, Any]]:
    """(key, near_duplicate) for every document but the first of each connected group."""
    for key in sorted(clean.component_followers(edges)):
        yield key, clean.NEAR_DUPLICATE


def judge(joined: tuple[tuple, dict[str, list]]) -> tuple:
    """(key, reason, CleanedDocument): the filter's reason, else a duplicate verdict, else
    kept."""
    key, parts = joined
    [document] = parts["document"]
    verdicts = parts["verdict"]
    return key, document.reason or (verdicts[0] if verdicts else KEPT), document


# ---------------------------------------------------------------- split and shuffle

def bucket_of(kept_key: tuple) -> tuple[int, tuple]:
    """(ranking bucket, (shuffle hash, key)) of a kept document's key."""
    return kept_key[0] >> _BUCKET_SHIFT, kept_key


def bucket_starts(counts: list[tuple[int, int]]) -> dict[str, Any]:
    """{"starts": {bucket: rank of its first document}, "total": kept documents}."""
    starts, total = {}, 0
    for bucket, count in sorted(counts):
        starts[bucket] = total
        total += count
    return {"starts": starts, "total": total}


def placements(group: tuple[int, Iterable[tuple]], ranking: dict[str, Any],
               options: Options) -> Iterator[tuple[Any, Any]]:
    """(key, (split, position in it)) of each kept document of one ranking bucket: the
    shuffled order of all kept documents, its first order.num_validation the validation
    split (the local pool sorts the same keys: stages.assign_splits)."""
    bucket, members = group
    num_validation = order.num_validation(ranking["total"], options.validation_fraction)
    for rank, (_, key) in enumerate(sorted(members), start=ranking["starts"][bucket]):
        yield key, (("validation", rank) if rank < num_validation
                    else ("train", rank - num_validation))


def attach_placement(joined: tuple[tuple, dict[str, list]]) -> tuple:
    """(key, reason, CleanedDocument, (split, position) or None)."""
    key, parts = joined
    [(_, reason, document)] = parts["judged"]
    return key, reason, document, (parts["placement"][0] if parts["placement"] else None)


# ---------------------------------------------------------------- 3. tokenizer

def train_and_save(sample: list[tuple[tuple, str]], options: Options, directory: str) -> str:
    """Trains --tokenizer on the sample's texts in document order (as the local pool does:
    tokens.find_or_train_tokenizer) and saves it in `directory`; its spec back."""
    if not sample:  # nothing kept: the run fails afterwards with the local pool's message
        return "byte"
    kind, _, size = options.tokenizer.partition(":")
    texts = [text for _, text in sorted(sample)]
    save_trained(train_tokenizer(kind, texts, int(size), length=len(texts)), directory)
    return directory


@functools.lru_cache(maxsize=2)
def tokenizer_for(spec: str):
    """The tokenizer a worker loads once per process."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one worker thread per core
    return load_tokenizer(spec)


# ---------------------------------------------------------------- 4. tokenize

def tokenize(batch: list[tuple], tokenizer_spec: str) -> Iterator[tuple]:
    """Per document of a batch: ("tokens", reason, count) for the report, and for a kept
    one (split, position, tokens as stored, prompt length)."""
    tokenizer = tokenizer_for(tokenizer_spec)
    dtype = prepared.token_dtype(tokenizer.vocab_size)
    token_docs = tokenize_documents(tokenizer, [document.document for _, _, document, _ in batch])
    for (_, reason, _, placement), token_doc in zip(batch, token_docs, strict=True):
        ids = token_doc["tokens"] if isinstance(token_doc, dict) else token_doc
        yield "tokens", reason, len(ids)
        if placement is not None:
            prompt_length = token_doc["prompt_length"] if isinstance(token_doc, dict) else 0
            yield placement[0], placement[1], np.asarray(ids).astype(dtype), prompt_length


def shard_counts(split_tokens: list[tuple[str, int]], ranking: dict[str, Any],
                 tokenizer_spec: str, options: Options) -> dict[str, int]:
    """{split: number of shards} by the local pool's rule (order.num_shards; a Beam run has
    no fixed worker count, so at least one train shard rather than one per worker)."""
    num_validation = order.num_validation(ranking["total"], options.validation_fraction)
    num_docs = {"train": ranking["total"] - num_validation, "validation": num_validation}
    dtype_bytes = np.dtype(prepared.token_dtype(tokenizer_for(tokenizer_spec).vocab_size)
                           ).itemsize
    tokens = dict(split_tokens)
    return {split: order.num_shards(split, count, tokens.get(split, 0), dtype_bytes, options,
                                    min_train_shards=1)
            for split, count in num_docs.items() if count}


def assign_shard(record: tuple, counts: dict[str, int], ranking: dict[str, Any],
                 options: Options) -> tuple[Any, Any]:
    """((split, shard), (position, tokens, prompt length)): the shards cut the split's
    order at order.shard_bounds."""
    split, position, ids, prompt_length = record
    num_validation = order.num_validation(ranking["total"], options.validation_fraction)
    num_docs = num_validation if split == "validation" else ranking["total"] - num_validation
    bounds = order.shard_bounds(num_docs, counts[split])
    return (split, order.shard_of(position, bounds)), (position, ids, prompt_length)


# ---------------------------------------------------------------- 5. write

def write_shard(group: tuple[tuple[str, int], Iterable[tuple]], counts: dict[str, int],
                version_dir: str, name: str, tokenizer_spec: str) -> tuple:
    """Writes one shard, its records in split order; ("shard", split, index, records,
    bytes, tokens) back."""
    (split, index), members = group
    members = sorted(members, key=lambda member: member[0])
    path = os.path.join(version_dir, prepared.shard_filename(name, split, index, counts[split]))
    feature_spec = prepared.features(tokenizer_for(tokenizer_spec).vocab_size)
    records = ({"tokens": ids, "prompt_length": int(prompt)} for _, ids, prompt in members)
    count, num_bytes = prepared.write_shard(path, records, feature_spec)
    return "shard", split, index, count, num_bytes, int(sum(len(m[1]) for m in members))


def document_text(placed: tuple) -> tuple[tuple, str]:
    """(key, text) of a placed document, for the tokenizer's sample."""
    return placed[0], sources.document_text(placed[2].document)

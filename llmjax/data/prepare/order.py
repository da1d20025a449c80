"""Which document goes where: the rules both runners (the local pool and Beam) apply, so that
they write the same dataset.

A document's key is (source index, unit index, record index): its source among --source,
its input unit (file or TFDS record range) among that source's sorted units, and its place
among that unit's documents. Keys order documents ("document order": the first copy of a
duplicate is the one kept) and, hashed with the seed, place them:

    shuffle_key     the split and shuffle order: kept documents sorted by it; the first
                    `num_validation` of them are the validation split, the rest the train
                    split in that order, cut into shards at `shard_bounds`
    tokenizer sample  a trained tokenizer learns from the train documents, in document
                    order; all of them when their text is at most TOKENIZER_SAMPLE_BYTES,
                    else those whose sample hash falls under `tokenizer_sample_rate` (about
                    that many bytes)

Nothing depends on how work was spread over processes or workers.
"""

import hashlib

import numpy as np

from llmjax.data.prepare.options import Options

DocKey = tuple[int, int, int]  # (source index, unit index, record index)
TOKENIZER_SAMPLE_BYTES = 1 << 30  # enough text for a BPE / unigram vocabulary
SHARD_BYTES = 256 << 20  # train shards are about this size by default
_HASH_SPACE = float(1 << 64)


def shuffle_key(seed: int, key: DocKey) -> tuple[int, DocKey]:
    """Where a kept document falls in the shuffled order (sort by it; the key breaks ties)."""
    return _hash(f"shuffle {seed} {key[0]} {key[1]} {key[2]}"), tuple(key)


def in_tokenizer_sample(seed: int, key: DocKey, rate: float) -> bool:
    """Whether a train document is in the tokenizer's training text."""
    return rate >= 1 or _hash(f"sample {seed} {key[0]} {key[1]} {key[2]}") < rate * _HASH_SPACE


def tokenizer_sample_rate(train_bytes: int) -> float:
    """The share of train documents the tokenizer learns from (1: all)."""
    return min(1.0, TOKENIZER_SAMPLE_BYTES / max(train_bytes, 1))


def num_validation(num_kept: int, fraction: float) -> int:
    """How many of the kept documents are held out: round(fraction * kept), at least one
    if fraction > 0, and never all of them."""
    if fraction <= 0 or num_kept < 2:
        return 0
    return min(max(1, round(fraction * num_kept)), num_kept - 1)


def num_shards(split: str, num_docs: int, num_tokens: int, vocab_dtype_bytes: int,
               options: Options, min_train_shards: int) -> int:
    """Shards of a split: --num_shards for train if given, else about SHARD_BYTES each (train:
    at least `min_train_shards`); never more than documents."""
    if split == "train" and options.num_shards:
        count = options.num_shards
    else:
        count = max(min_train_shards if split == "train" else 1,
                    -(-num_tokens * vocab_dtype_bytes // SHARD_BYTES))
    return max(1, min(count, num_docs))


def shard_bounds(num_docs: int, count: int) -> np.ndarray:
    """[count + 1] positions: shard i holds the split's documents bounds[i]:bounds[i + 1]."""
    return np.linspace(0, num_docs, count + 1).astype(int)


def shard_of(position: int, bounds: np.ndarray) -> int:
    """The shard that holds the document at `position` of its split."""
    return int(np.searchsorted(bounds, position, side="right")) - 1


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

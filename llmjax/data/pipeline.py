"""Token documents -> packed, batched, per-process training and eval batches (grain).

The training stream, step by step:

    token documents        [bos, t1, ..., tn, eos] each (see `tokenize_documents`)
      shuffle + repeat     grain MapDataset: a new order every epoch, from (seed, epoch)
      cut into pieces      inputs = doc[:-1], targets = doc[1:], in pieces of <= seq_len
      pack                 grain first-fit packing (or concat-then-split) into rows of seq_len
      batch                global_batch_size rows: the same global batch on every process
      this process's rows  rows [process_index * local, (process_index + 1) * local)

Input/target pairs are formed per document before packing, so no position ever predicts a
token of another document; `segment_ids` and `positions` let attention and position
embeddings respect the same boundaries.

A batch is a dict of int32 numpy arrays, each [rows, seq_len]:

    inputs       token ids fed to the model (0 on padding)
    targets      the token that follows each input (0 on padding)
    segment_ids  1, 2, 3, ... for the documents packed into a row, 0 on padding
    positions    position within its own document piece, restarting at 0 per segment
    loss_mask    1 where the target counts in the loss, 0 on padding
"""

import functools
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llmjax.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PACKINGS = ("first_fit", "concat")
# Documents live in memory: reader threads would only contend for the GIL.
_IN_MEMORY = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class DataIterator(grain.DatasetIterator):
    """grain's batch iterator, with a state that survives a JSON round trip.

    `next()` gives a batch; `get_state()` a JSON-serialisable dict (the same on every process,
    since every process walks the same global stream); `set_state()` rewinds to it, also in
    a fresh iterator built with the same arguments. It is a `grain.DatasetIterator`, so
    grain's Orbax checkpoint handler saves and restores it.
    """

    def __init__(self, batches: grain.DatasetIterator):
        super().__init__(batches)

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_with_tuple_slices(state))


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str]) -> list[np.ndarray]:
    """Each document as int32 ids [bos] + ids + [eos], the form the functions below take."""
    bos, eos = np.int32(tokenizer.bos_id), np.int32(tokenizer.eos_id)
    return [np.concatenate([[bos], np.asarray(ids, np.int32), [eos]])
            for ids in tokenizer.encode_batch(documents)]


def split_documents(documents: Sequence[str], eval_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """Holds out round(eval_fraction * len) documents (at least one if eval_fraction > 0).

    Which documents are held out depends only on `seed`; both lists keep the input order.
    Returns (train_documents, eval_documents).
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    num_eval = max(round(eval_fraction * len(documents)), 1) if eval_fraction > 0 else 0
    if num_eval >= len(documents):
        raise ValueError(f"cannot hold out {num_eval} of {len(documents)} documents for eval "
                         "and still train; give more documents or a separate data.eval")
    held_out = set(np.random.default_rng(seed).permutation(len(documents))[:num_eval].tolist())
    train = [d for i, d in enumerate(documents) if i not in held_out]
    evaluation = [d for i, d in enumerate(documents) if i in held_out]
    return train, evaluation


def make_train_iterator(token_docs: Sequence[Sequence[int]] | Sequence[np.ndarray], *,
                        seq_len: int, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        packing: str = "first_fit",
                        num_epochs: int | None = None) -> DataIterator:
    """The training stream: batches of [global_batch_size // process_count, seq_len] arrays.

    Endless by default (epoch after epoch, each shuffled by (seed, epoch)); `num_epochs`
    ends it after that many passes, the last batch padded with empty rows. Every process
    builds the same global batch and keeps its own rows, so batch contents do not depend
    on the number of processes. The iterator's `get_state()` / `set_state()` resume it
    exactly.
    """
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    _check_packing(packing)
    dataset = grain.MapDataset.source(_non_empty(token_docs)).shuffle(seed).repeat(num_epochs)
    rows = _pack(dataset.to_iter_dataset(_IN_MEMORY), seq_len, global_batch_size, packing,
                 seed=seed, shuffle_rows=True)
    return DataIterator(iter(_batch(rows, global_batch_size, process_index, local_batch_size)))


def make_eval_batches(token_docs: Sequence[Sequence[int]] | Sequence[np.ndarray], *,
                      seq_len: int, global_batch_size: int, max_batches: int,
                      process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """The held-out documents, in order, as at most `max_batches` (at least one) batches.

    Each batch has [global_batch_size // process_count, seq_len] arrays; the last one is
    filled up with empty rows (loss_mask 0) so every batch has the same shape.
    """
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    if max_batches < 1:
        raise ValueError(f"eval max_batches={max_batches} must be at least 1")
    documents = grain.MapDataset.source(_non_empty(token_docs)).to_iter_dataset(_IN_MEMORY)
    rows = _pack(documents, seq_len, global_batch_size, "first_fit", seed=0, shuffle_rows=False)
    batches = _batch(rows, global_batch_size, process_index, local_batch_size)
    return [batch for _, batch in zip(range(max_batches), batches, strict=False)]


class _CutIntoPieces(grain.experimental.FlatMapTransform):
    """[bos, ..., eos] -> {'inputs', 'targets'} pieces of at most seq_len pairs each.

    Pairs are formed before cutting, so a long document loses no prediction at a cut;
    each piece is its own segment (its positions restart at 0).
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, tokens: Sequence[int] | np.ndarray) -> list[dict[str, np.ndarray]]:
        tokens = np.asarray(tokens, np.int32)
        inputs, targets = tokens[:-1], tokens[1:]
        return [{"inputs": inputs[start:start + self.seq_len],
                 "targets": targets[start:start + self.seq_len]}
                for start in range(0, len(inputs), self.seq_len)]


def _pack(documents: grain.IterDataset, seq_len: int, num_rows: int, packing: str, *,
          seed: int, shuffle_rows: bool) -> grain.IterDataset:
    """Token documents -> packed rows: dicts of [seq_len] arrays under BATCH_KEYS."""
    pieces = grain.experimental.FlatMapIterDataset(documents, _CutIntoPieces(seq_len))
    lengths = {"inputs": seq_len, "targets": seq_len}
    if packing == "first_fit":
        # Packs a window of `num_rows` rows at a time: a wider window pads less but mixes
        # more documents of neighbouring epochs into one batch.
        rows = grain.experimental.FirstFitPackIterDataset(
            pieces, length_struct=lengths, num_packing_bins=num_rows, seed=seed,
            shuffle_bins=shuffle_rows)
    else:
        rows = grain.experimental.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
    return rows.map(_model_features)


def _model_features(row: dict[str, np.ndarray]) -> Batch:
    # Inputs and targets come from the same pieces, so their segment ids and positions
    # agree; keep one copy under the names the model uses.
    segment_ids = row["inputs_segment_ids"]
    return {"inputs": row["inputs"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "segment_ids": segment_ids.astype(np.int32),
            "positions": row["inputs_positions"].astype(np.int32),
            "loss_mask": (segment_ids > 0).astype(np.int32)}


def _batch(rows: grain.IterDataset, global_batch_size: int, process_index: int,
           local_batch_size: int) -> grain.IterDataset:
    """Packed rows -> this process's share of each global batch, [local_batch_size, seq_len]."""
    batches = rows.batch(global_batch_size, drop_remainder=False)
    # Only the final batch of a finite stream is short; pad it so shapes never change.
    batches = batches.map(functools.partial(_pad_rows, num_rows=global_batch_size))
    # functools.partial rather than lambdas: grain worker processes (later) pickle these.
    return batches.map(functools.partial(_rows_of_process, process_index=process_index,
                                         local_batch_size=local_batch_size))


def _pad_rows(batch: Batch, num_rows: int) -> Batch:
    """Fills a short final batch up to num_rows with all-zero rows (loss_mask 0)."""
    missing = num_rows - len(batch["inputs"])
    if missing == 0:
        return batch
    return {key: np.pad(value, ((0, missing), (0, 0))) for key, value in batch.items()}


def _rows_of_process(batch: Batch, process_index: int, local_batch_size: int) -> Batch:
    start = process_index * local_batch_size
    return {key: value[start:start + local_batch_size] for key, value in batch.items()}


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                         f"of the number of processes ({process_count})")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    return global_batch_size // process_count


def _check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"data.packing={packing!r} is not one of {', '.join(PACKINGS)}")


def _non_empty(token_docs: Sequence[Any]) -> Sequence[Any]:
    if len(token_docs) == 0:
        raise ValueError("no token documents to build batches from; check the data source")
    return token_docs


def _with_tuple_slices(state: Any) -> Any:
    # grain (0.2.18) concat-then-split compares its `remainder_slices` with tuples, but JSON,
    # which is how checkpoints store the state, turns them into lists.
    if not isinstance(state, dict):
        return state
    return {key: ({k: tuple(v) for k, v in value.items()} if key == "remainder_slices"
                  else _with_tuple_slices(value))
            for key, value in state.items()}

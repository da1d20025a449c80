"""Token documents -> packed training and eval batches (grain), built row shard by row shard.

The training stream, step by step:

    sources          one or more random-access sequences of token documents, each with a
                     weight: in memory (text read and tokenized at start), a prepared
                     array_record dataset, or a TFDS text dataset tokenized on the fly
    record order     per source, a grain MapDataset shuffled by (seed, source, epoch) and
                     repeated: one global record order, position g = epoch * len + i
    row shards       S = global_batch_size shards. Shard j reads positions j, j + S, j + 2S, ...
                     of every source's order, cuts each document into input/target pieces of
                     <= seq_len pairs, packs them into rows (first-fit over a window of
                     `packing_bins` rows, or concatenate-then-split) and emits one row per step
    mixture          each shard takes its next row from the source furthest behind its weight's
                     share of the trained tokens the shard has taken (shards start at
                     different phases): token proportions follow the weights whatever the
                     sources' document lengths
    batch            row j of each global batch comes from shard j. Process p computes only
                     its rows [p * L, (p + 1) * L), L = global_batch_size / process_count,
                     so it reads only its shards' records (a disjoint share); grain worker
                     processes (`num_workers`) each run some of those shards

Because a row depends only on its shard, a global batch is the same whatever the number of
processes or workers. packing.py says how documents are cut and packed into rows and what
a batch holds (inputs, targets, segment_ids, positions, loss_mask); stream_state.py says how
a stream resumes (`DataIterator.get_state()` / `set_state()`), on another number of
processes or with a changed layout.
"""

import atexit
import dataclasses
import functools
import math
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from llmjax.data import stream_state
from llmjax.data.documents import TokenDoc
from llmjax.data.packing import BATCH_KEYS, Batch, check_packing, pack_documents, pad_rows

_GOLDEN = (math.sqrt(5) - 1) / 2
_SYNCHRONOUS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class TokenSource:
    """One training source: random-access token documents (`len`, `[i]`) and a weight.

    `records` must pickle when worker processes are used. `name` identifies the source in
    the iterator state (a resumed run matches sources by name).
    """

    name: str
    records: Sequence[TokenDoc]
    weight: float = 1.0


def make_train_iterator(token_docs: Sequence[TokenDoc], **kwargs) -> "DataIterator":
    """The training stream over one source; keyword arguments as `make_mixture_iterator`."""
    return make_mixture_iterator([TokenSource("train", _non_empty(token_docs))], **kwargs)


def make_mixture_iterator(sources: Sequence[TokenSource], *, seq_len: int,
                          global_batch_size: int, seed: int, process_index: int = 0,
                          process_count: int = 1, packing: str = "first_fit",
                          packing_bins: int = 8, num_workers: int = 0,
                          num_epochs: int | None = None,
                          gather: Callable[[Any], list[Any]] | None = None) -> "DataIterator":
    """The training stream: batches of [global_batch_size // process_count, seq_len] arrays.

    Rows mix `sources` in proportion to their weights (see the module docstring). Endless by
    default (epoch after epoch, each shuffled anew); `num_epochs` ends each source after that
    many passes (the stream stops when a shard's source runs out; finished shards give empty
    rows; meant for single-process use and tests). `num_workers` grain worker processes
    each compute some of this process's row shards (0: in this process). `gather` collects
    one JSON-able object from every process (default: a JAX all-gather when
    process_count > 1); tests pass their own.
    """
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    check_packing(packing)
    if packing_bins < 1:
        raise ValueError(f"data.packing_bins={packing_bins} must be at least 1")
    if num_workers < 0:
        raise ValueError(f"data.num_workers={num_workers} must be >= 0")
    if not sources or len({s.name for s in sources}) != len(sources):
        raise ValueError("give at least one source, each with its own name")
    for source in sources:
        _non_empty(source.records)
        if not source.weight > 0:
            raise ValueError(f"source {source.name!r}: weight {source.weight} must be > 0")
    plan = _Plan(sources=tuple(sources), seq_len=seq_len, num_shards=global_batch_size,
                 seed=seed, packing=packing, packing_bins=packing_bins, num_epochs=num_epochs,
                 first_shard=process_index * local_batch_size, num_local=local_batch_size,
                 process_count=process_count,
                 # Finite streams end shard by shard; workers would end out of step.
                 num_workers=0 if num_epochs is not None else min(num_workers,
                                                                  local_batch_size),
                 offsets={s.name: 0 for s in sources})
    return DataIterator(plan, gather)


def make_eval_batches(token_docs: Sequence[TokenDoc], *, seq_len: int, global_batch_size: int,
                      max_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[Batch]:
    """The held-out documents, in order, as at most `max_batches` (at least one) batches.

    Each batch has [global_batch_size // process_count, seq_len] arrays; the last one is
    filled up with empty rows (loss_mask 0) so every batch has the same shape. Every process
    packs the same global batches and keeps its rows; only the documents needed are read.
    """
    local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    if max_batches < 1:
        raise ValueError(f"eval max_batches={max_batches} must be at least 1")
    documents = grain.MapDataset.source(_non_empty(token_docs)).to_iter_dataset(
        _read_options(token_docs))
    rows = pack_documents(documents, seq_len, global_batch_size, "first_fit", seed=0,
                          shuffle_rows=False)
    batches = rows.batch(global_batch_size, drop_remainder=False)
    batches = batches.map(functools.partial(pad_rows, num_rows=global_batch_size))
    start = process_index * local_batch_size
    return [{key: value[start:start + local_batch_size] for key, value in batch.items()}
            for _, batch in zip(range(max_batches), batches, strict=False)]


class DataIterator(grain.DatasetIterator):
    """The training stream of this process: `next()` gives a batch [local rows, seq_len].

    `get_state()` is JSON-serialisable and identical on every process (see stream_state.py's
    docstring for what `set_state()` does with it); the train loop saves it beside the model.
    It is a `grain.DatasetIterator`, so grain's own checkpoint handler can save it too.
    """

    def __init__(self, plan: "_Plan", gather: Callable[[Any], list[Any]] | None = None):
        super().__init__()
        self._plan = plan
        self._gather = gather
        self._batches: grain.DatasetIterator | None = None
        self._start({})

    def _start(self, shard_states: dict[int, dict]) -> None:
        self.close()
        if self._plan.num_workers > 0 and not flags.FLAGS.is_parsed():
            # grain's worker processes read absl flags; scripts and tests may not parse any.
            flags.FLAGS.mark_as_parsed()
        self._batches = iter(self._plan.local_dataset(shard_states))
        if self._plan.num_workers > 0:
            # Stop the workers before interpreter shutdown tears down the modules that
            # grain's cleanup needs (a run does not close its iterator).
            atexit.register(_close_if_alive, weakref.ref(self))

    def __next__(self) -> Batch:
        plan = self._plan
        parts = [next(self._batches)]
        for _ in range(1, max(plan.num_workers, 1)):
            parts.append(next(self._batches))
        if len(parts) == 1 and parts[0]["shard"].tolist() == list(plan.local_shards):
            rows = parts[0]
        else:  # workers computed interleaved subsets of the shards; put rows back in order
            order = np.concatenate([p["shard"] for p in parts]) - plan.first_shard
            rows = {key: np.empty_like(np.concatenate([p[key] for p in parts]))
                    for key in parts[0]}
            for key in rows:
                rows[key][order] = np.concatenate([p[key] for p in parts])
        return {key: rows[key] for key in BATCH_KEYS}

    def local_state(self) -> dict[str, Any]:
        """This process's part of the state: its shards' positions and the run's layout."""
        positions: dict[int, dict] = {}
        stream_state.collect_shards(self._batches.get_state(), positions)
        plan = self._plan
        return {"format": stream_state.STATE_FORMAT, **plan.layout(),
                "offsets": dict(plan.offsets), "shards": sorted(positions.items())}

    def get_state(self) -> dict[str, Any]:
        local = self.local_state()
        if self._plan.process_count == 1:
            return stream_state.combine_states([local])
        gather = self._gather or stream_state.allgather_json
        return stream_state.combine_states(gather(local))

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != stream_state.STATE_FORMAT:
            raise ValueError("the checkpoint's data iterator state was written by another "
                             "version of llmjax's data pipeline; resume with that version or "
                             "start in a new --workdir")
        state = stream_state.with_tuple_slices(state)
        plan = self._plan
        if {k: state.get(k) for k in plan.layout()} == plan.layout():
            self._plan = dataclasses.replace(plan, offsets=dict(state["offsets"]))
            self._start({j: state["shards"][j] for j in plan.local_shards})
            return
        offsets = stream_state.restart_offsets(state, [s.name for s in plan.sources])
        logging.warning("data: the checkpoint's layout %s differs from this run's %s; each "
                        "source restarts at the lowest record position a shard had not "
                        "finished: %s", {k: state.get(k) for k in plan.layout()},
                        plan.layout(), offsets)
        self._plan = dataclasses.replace(plan, offsets=offsets)
        self._start({})

    def close(self) -> None:
        if self._batches is not None and hasattr(self._batches, "close"):
            self._batches.close()  # stops grain worker processes
        self._batches = None


# ---------------------------------------------------------------- the plan of a stream


@dataclasses.dataclass(frozen=True)
class _Plan:
    sources: tuple[TokenSource, ...]
    seq_len: int
    num_shards: int  # = global_batch_size: one row per shard per step
    seed: int
    packing: str
    packing_bins: int
    num_epochs: int | None
    first_shard: int
    num_local: int
    process_count: int
    num_workers: int
    offsets: dict[str, int]  # where each source's shard positions start (see set_state)

    @property
    def local_shards(self) -> range:
        return range(self.first_shard, self.first_shard + self.num_local)

    def layout(self) -> dict[str, Any]:
        """What must be equal for shard positions to carry over exactly."""
        return {"num_shards": self.num_shards, "seq_len": self.seq_len, "seed": self.seed,
                "packing": self.packing, "packing_bins": self.packing_bins,
                "num_epochs": self.num_epochs,
                "sources": [[s.name, s.weight] for s in self.sources]}

    def local_dataset(self, shard_states: dict[int, dict]) -> grain.IterDataset:
        weights = np.array([s.weight for s in self.sources], np.float64)
        weights /= weights.sum()
        shards = [_ShardRows([self._source_rows(source, shard) for source in self.sources],
                             shard, weights, shard_states.get(shard))
                  for shard in self.local_shards]
        rows: grain.IterDataset = _LocalRows(shards, self.seq_len)
        if self.num_workers > 0:
            rows = rows.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers))
        return rows

    def _source_rows(self, source: TokenSource, shard: int) -> grain.IterDataset:
        # Each source has its own order (seeded by its name), so adding a source to a mixture
        # does not reorder the others.
        seed = (self.seed * 1_000_003 + zlib.crc32(source.name.encode())) % 2**31
        order = grain.MapDataset.source(source.records).shuffle(seed).repeat(self.num_epochs)
        mine = order[self.offsets.get(source.name, 0) + shard::self.num_shards]
        documents = mine.to_iter_dataset(_read_options(source.records))
        return pack_documents(documents, self.seq_len, self.packing_bins, self.packing,
                     seed=seed + shard, shuffle_rows=True)


class _ShardRows(grain.IterDataset):
    """One row shard: rows of its sources, the source of each row picked by the mixture."""

    def __init__(self, parents: list[grain.IterDataset], shard: int, weights: np.ndarray,
                 initial_state: dict | None):
        super().__init__(parents)
        self.shard = shard
        self._args = (shard, weights)
        self._initial_state = initial_state

    def __iter__(self) -> grain.DatasetIterator:
        iterator = _ShardRowsIterator([p.__iter__() for p in self.parents], *self._args)
        if self._initial_state is not None:
            iterator.set_state(self._initial_state)
        return iterator


class _ShardRowsIterator(grain.DatasetIterator):
    def __init__(self, parents: list[grain.DatasetIterator], shard: int, weights: np.ndarray):
        super().__init__(parents)
        self._shard, self._weights = shard, weights
        self._rows = 0
        # Trained tokens taken from each source so far. A one-token debt makes the shard's
        # first row come from a source picked by a golden-ratio sequence over the weights,
        # so the shards of a step start on different sources, in proportion.
        self._tokens = np.zeros(len(weights))
        first = np.searchsorted(np.cumsum(weights), (shard * _GOLDEN) % 1.0, side="right")
        self._tokens[min(int(first), len(weights) - 1)] = -1.0

    def __next__(self) -> Batch:
        source = next_source(self._tokens, self._weights)
        row = next(self._parents[source])
        self._tokens[source] += max(int(row["loss_mask"].sum()), 1)
        self._rows += 1
        return row

    def get_state(self) -> dict[str, Any]:
        return {stream_state.SHARD_KEY: self._shard, "rows": self._rows,
                "tokens": self._tokens.tolist(),
                "sources": [parent.get_state() for parent in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        self._rows = state["rows"]
        self._tokens = np.array(state["tokens"], np.float64)
        for parent, parent_state in zip(self._parents, state["sources"], strict=True):
            parent.set_state(parent_state)


def next_source(tokens: np.ndarray, weights: np.ndarray) -> int:
    """The source furthest behind its share of the trained tokens taken so far.

    Mixing by trained tokens, not by rows or documents, keeps the proportions the weights
    say whatever the sources' document lengths and padding (to within a row per source).
    """
    return int(np.argmax(weights * (tokens.sum() + 1.0) - tokens))


class _LocalRows(grain.IterDataset):
    """The shards of a process (or, sliced by grain, of one worker): one row from each."""

    def __init__(self, shards: list[_ShardRows], seq_len: int):
        super().__init__(shards)
        self._shards, self._seq_len = list(shards), seq_len

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        # grain calls this in worker process i of n with slice(i, None, n): run those shards.
        del sequential_slice
        self._shards = self._shards[sl]

    def __iter__(self) -> grain.DatasetIterator:
        return _LocalRowsIterator([s.__iter__() for s in self._shards],
                                  [s.shard for s in self._shards], self._seq_len)


class _LocalRowsIterator(grain.DatasetIterator):
    def __init__(self, parents: list[grain.DatasetIterator], shards: list[int], seq_len: int):
        super().__init__(parents)
        self._shards, self._seq_len = np.array(shards, np.int32), seq_len
        self._exhausted = [False] * len(parents)

    def __next__(self) -> Batch:
        rows = []
        for i, parent in enumerate(self._parents):
            row = None
            if not self._exhausted[i]:
                try:
                    row = next(parent)
                except StopIteration:
                    self._exhausted[i] = True
            rows.append(row)
        if all(self._exhausted):
            raise StopIteration
        empty = {key: np.zeros(self._seq_len, np.int32) for key in BATCH_KEYS}
        batch = {key: np.stack([(row or empty)[key] for row in rows]) for key in BATCH_KEYS}
        return {"shard": self._shards, **batch}

    def get_state(self) -> dict[str, Any]:
        return {"shards": [parent.get_state() for parent in self._parents]}

    def set_state(self, state: dict[str, Any]) -> None:
        for parent, parent_state in zip(self._parents, state["shards"], strict=True):
            parent.set_state(parent_state)


def _close_if_alive(iterator_ref: "weakref.ref[DataIterator]") -> None:
    iterator = iterator_ref()
    if iterator is not None:
        iterator.close()


def _read_options(records: Sequence[Any]) -> grain.ReadOptions:
    del records
    # Records are read in the packing loop (of this process or of a worker): a reader thread
    # per row shard and source would make hundreds of threads on a host with many shards,
    # and measured no faster on local files. data.num_workers reads in parallel instead.
    return _SYNCHRONOUS


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple "
                         f"of the number of processes ({process_count})")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    return global_batch_size // process_count


def _non_empty(token_docs: Sequence[Any]) -> Sequence[Any]:
    if len(token_docs) == 0:
        raise ValueError("no token documents to build batches from; check the data source")
    return token_docs

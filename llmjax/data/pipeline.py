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
processes or workers. Input/target pairs are formed per document before packing, so no
position predicts a token of another document; `segment_ids` and `positions` let attention
and position embeddings respect the same boundaries.

A batch is a dict of int32 numpy arrays, each [rows, seq_len]:

    inputs       token ids fed to the model (0 on padding)
    targets      the token that follows each input (0 on padding)
    segment_ids  1, 2, 3, ... for the documents packed into a row, 0 on padding
    positions    position within its own document piece, restarting at 0 per segment
    loss_mask    1 where the target counts in the loss: 0 on padding and on the prompt of
                 a fine-tuning example

Resuming. `DataIterator.get_state()` holds every shard's position (all processes' shards:
with several processes it gathers them, so every process must call it at the same step, as
the train loop does when it checkpoints). `set_state()`:

  * same global_batch_size, seq_len, packing, seed and sources: every shard continues exactly
    where it stopped, whatever the number of processes or workers now (any process count
    that divides global_batch_size): the resumed run sees exactly the batches the
    uninterrupted one would have seen;
  * any of those changed: the shards cannot be mapped, so each source restarts at a
    deterministic point of its record order: the lowest position any shard had not finished.
    No record is skipped; records some shards had already passed are seen again
    (about packing_bins documents per shard). A source that is new starts at 0.
"""

import atexit
import dataclasses
import functools
import json
import math
import weakref
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from llmjax.data.sources import Chat, Example

Batch = dict[str, np.ndarray]
# A token document: [bos, ..., eos] ids, or {"tokens": [...], "prompt_length": int} where the
# first prompt_length tokens are never a target (fine-tuning prompts).
TokenDoc = Any
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PACKINGS = ("first_fit", "concat")
STATE_FORMAT = "llmjax.data.rows/1"
_SHARD_KEY = "llmjax_shard"
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


def tokenize_documents(tokenizer, documents: Sequence[Any]) -> list[TokenDoc]:
    """Each document as int32 ids [bos] + ids + [eos], the form the functions below take.

    A fine-tuning `Example(prompt, response)` becomes {"tokens": [bos] + prompt + response +
    [eos], "prompt_length": 1 + len(prompt ids)}: only the response and eos are targets.
    A `Chat` is first rendered into such an Example (`render_chat`).
    """
    documents = [render_chat(tokenizer, d) if isinstance(d, Chat) else d for d in documents]
    texts: list[str] = []
    for document in documents:
        texts.extend([document] if isinstance(document, str) else document)
    ids = iter(tokenizer.encode_batch(texts))
    bos, eos = np.int32(tokenizer.bos_id), np.int32(tokenizer.eos_id)
    token_docs: list[TokenDoc] = []
    for document in documents:
        if isinstance(document, str):
            token_docs.append(np.concatenate([[bos], np.asarray(next(ids), np.int32), [eos]]))
        else:
            prompt, response = next(ids), next(ids)
            token_docs.append({"tokens": np.array([bos, *prompt, *response, eos], np.int32),
                               "prompt_length": 1 + len(prompt)})
    return token_docs


def render_chat(tokenizer, chat: Chat) -> Example:
    """Chat -> Example(prompt: every message but the last, rendered with the tokenizer's
    chat template and its generation prompt; response: the rest of the rendered chat, i.e.
    the last assistant message with its end-of-turn marker). Without a chat template:
    "role: content" lines and "assistant: ", then the message."""
    messages = [{"role": role, "content": content} for role, content in chat.messages]
    hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
    if hf_tokenizer is None or not getattr(hf_tokenizer, "chat_template", None):
        history = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
        return Example(history + "assistant: ", messages[-1]["content"])
    prompt = hf_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                              tokenize=False)
    full = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    response = full[len(prompt):] if full.startswith(prompt) else messages[-1]["content"]
    bos_text = hf_tokenizer.bos_token
    if bos_text and prompt.startswith(bos_text):
        prompt = prompt[len(bos_text):]  # tokenize_documents adds the bos itself
    return Example(prompt, response)


class TokenizedRecords(Sequence):
    """Random-access token documents from records that hold text, tokenized on access.

    `to_document(record, index)` returns the text (or Example) of a record. Used for TFDS
    text datasets: each process (or grain worker) tokenizes only the records it reads.
    """

    def __init__(self, records: Sequence[Any], to_document: Callable[[Any, int], Any],
                 tokenizer):
        self._records, self._to_document, self._tokenizer = records, to_document, tokenizer

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> TokenDoc:  # type: ignore[override]
        document = self._to_document(self._records[index], index)
        return tokenize_documents(self._tokenizer, [document])[0]


def split_documents(documents: Sequence[Any], eval_fraction: float,
                    seed: int) -> tuple[list[Any], list[Any]]:
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
    _check_packing(packing)
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
    rows = _pack(documents, seq_len, global_batch_size, "first_fit", seed=0, shuffle_rows=False)
    batches = rows.batch(global_batch_size, drop_remainder=False)
    batches = batches.map(functools.partial(_pad_rows, num_rows=global_batch_size))
    start = process_index * local_batch_size
    return [{key: value[start:start + local_batch_size] for key, value in batch.items()}
            for _, batch in zip(range(max_batches), batches, strict=False)]


def combine_states(local_states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The iterator state of a run from every process's `DataIterator.local_state()`."""
    first = local_states[0]
    shards = [None] * first["num_shards"]
    for local in local_states:
        for index, state in local["shards"]:
            shards[index] = state
    if any(state is None for state in shards):
        raise ValueError("combine_states needs the local state of every process")
    return {**{k: v for k, v in first.items() if k != "shards"}, "shards": shards}


class DataIterator(grain.DatasetIterator):
    """The training stream of this process: `next()` gives a batch [local rows, seq_len].

    `get_state()` is JSON-serialisable and identical on every process (see the module
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
        _collect_shards(self._batches.get_state(), positions)
        plan = self._plan
        return {"format": STATE_FORMAT, **plan.layout(), "offsets": dict(plan.offsets),
                "shards": sorted(positions.items())}

    def get_state(self) -> dict[str, Any]:
        local = self.local_state()
        if self._plan.process_count == 1:
            return combine_states([local])
        gather = self._gather or _allgather_json
        return combine_states(gather(local))

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError("the checkpoint's data iterator state was written by another "
                             "version of llmjax's data pipeline; resume with that version or "
                             "start in a new --workdir")
        state = _with_tuple_slices(state)
        plan = self._plan
        if {k: state.get(k) for k in plan.layout()} == plan.layout():
            self._plan = dataclasses.replace(plan, offsets=dict(state["offsets"]))
            self._start({j: state["shards"][j] for j in plan.local_shards})
            return
        offsets = _restart_offsets(state, [s.name for s in plan.sources])
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
        return _pack(documents, self.seq_len, self.packing_bins, self.packing,
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
        return {_SHARD_KEY: self._shard, "rows": self._rows, "tokens": self._tokens.tolist(),
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


# ---------------------------------------------------------------- cutting and packing


class _CutIntoPieces(grain.experimental.FlatMapTransform):
    """A token document -> {'inputs', 'targets', 'loss_mask'} pieces of <= seq_len pairs.

    Pairs are formed before cutting, so a long document loses no prediction at a cut;
    each piece is its own segment (its positions restart at 0). Pieces in which no target
    counts (all prompt) are left out: they could not inform any other piece.
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, document: TokenDoc) -> list[dict[str, np.ndarray]]:
        prompt_length = 0
        if isinstance(document, dict):
            prompt_length, document = int(document["prompt_length"]), document["tokens"]
        tokens = np.asarray(document).astype(np.int32)
        inputs, targets = tokens[:-1], tokens[1:]
        # Target i is tokens[i + 1]: it counts once it is past the prompt.
        mask = (np.arange(1, len(tokens)) >= prompt_length).astype(np.int32)
        return [{"inputs": inputs[start:start + self.seq_len],
                 "targets": targets[start:start + self.seq_len],
                 "loss_mask": mask[start:start + self.seq_len]}
                for start in range(0, len(inputs), self.seq_len)
                if mask[start:start + self.seq_len].any()]


def _pack(documents: grain.IterDataset, seq_len: int, num_rows: int, packing: str, *,
          seed: int, shuffle_rows: bool) -> grain.IterDataset:
    """Token documents -> packed rows: dicts of [seq_len] arrays under BATCH_KEYS."""
    pieces = grain.experimental.FlatMapIterDataset(documents, _CutIntoPieces(seq_len))
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    if packing == "first_fit":
        # Packs a window of `num_rows` rows at a time: a wider window pads less but holds
        # more documents back (and mixes neighbouring epochs more).
        rows = grain.experimental.FirstFitPackIterDataset(
            pieces, length_struct=lengths, num_packing_bins=num_rows, seed=seed,
            shuffle_bins=shuffle_rows)
    else:
        rows = grain.experimental.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
    return rows.map(_model_features)


def _model_features(row: dict[str, np.ndarray]) -> Batch:
    # Inputs and targets come from the same pieces, so their segment ids and positions
    # agree; keep one copy under the names the model uses.
    return {"inputs": row["inputs"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "segment_ids": row["inputs_segment_ids"].astype(np.int32),
            "positions": row["inputs_positions"].astype(np.int32),
            "loss_mask": row["loss_mask"].astype(np.int32)}


def _pad_rows(batch: Batch, num_rows: int) -> Batch:
    """Fills a short final batch up to num_rows with all-zero rows (loss_mask 0)."""
    missing = num_rows - len(batch["inputs"])
    if missing == 0:
        return batch
    return {key: np.pad(value, ((0, missing), (0, 0))) for key, value in batch.items()}


# ---------------------------------------------------------------- state helpers


def _collect_shards(state: Any, found: dict[int, dict]) -> None:
    """Finds every shard's state in grain's (possibly per-worker) iterator state.

    Worker prefetch states can also hold states of rows not yet consumed; a shard's
    earliest state (fewest rows) is the one consumed.
    """
    if isinstance(state, dict):
        if _SHARD_KEY in state:
            shard = state[_SHARD_KEY]
            if shard not in found or state["rows"] < found[shard]["rows"]:
                found[shard] = state
            return
        for value in state.values():
            _collect_shards(value, found)
    elif isinstance(state, list | tuple):
        for value in state:
            _collect_shards(value, found)


def _record_position(source_state: Any) -> int:
    """The next record index (within a shard's slice) of a packed source's grain state.

    Packing states point at their parent's state at the start of the rows not yet emitted,
    and a flat-map state at the document it is cutting, so this record is not finished.
    """
    while isinstance(source_state, dict):
        if "next_index" in source_state:
            return int(source_state["next_index"])
        source_state = source_state.get("parent", source_state.get("parent_state"))
    raise ValueError("the checkpoint's data iterator state has no record position; start in "
                     "a new --workdir")


def _restart_offsets(state: dict[str, Any], names: Sequence[str]) -> dict[str, int]:
    """Per source, the lowest global record position that some shard had not finished."""
    saved = [name for name, _ in state["sources"]]
    num_shards = state["num_shards"]
    offsets = {}
    for name in names:
        if name not in saved:
            offsets[name] = 0
            continue
        s = saved.index(name)
        offsets[name] = min(state["offsets"][name] + shard + num_shards
                            * _record_position(shard_state["sources"][s])
                            for shard, shard_state in enumerate(state["shards"]))
    return offsets


def _close_if_alive(iterator_ref: "weakref.ref[DataIterator]") -> None:
    iterator = iterator_ref()
    if iterator is not None:
        iterator.close()


def _allgather_json(value: Any) -> list[Any]:
    """`value` from every process, in process order (a collective: all must call it)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(everything[p, :int(sizes[p, 0])])) for p in range(len(sizes))]


def _with_tuple_slices(state: Any) -> Any:
    # grain (0.2.18) concat-then-split compares its `remainder_slices` with tuples, but JSON,
    # which is how checkpoints store the state, turns them into lists.
    if isinstance(state, list):
        return [_with_tuple_slices(value) for value in state]
    if not isinstance(state, dict):
        return state
    return {key: ({k: tuple(v) for k, v in value.items()} if key == "remainder_slices"
                  else _with_tuple_slices(value))
            for key, value in state.items()}


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


def _check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"data.packing={packing!r} is not one of {', '.join(PACKINGS)}")


def _non_empty(token_docs: Sequence[Any]) -> Sequence[Any]:
    if len(token_docs) == 0:
        raise ValueError("no token documents to build batches from; check the data source")
    return token_docs

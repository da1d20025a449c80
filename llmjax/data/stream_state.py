"""The saved state of a training stream (pipeline.py's `DataIterator`), as plain JSON.

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

A state holds the stream's layout, each source's offset and every row shard's grain state
(marked with SHARD_KEY). The functions below find the shards in grain's (possibly
per-worker) state, combine the processes' shares, and work out where each source restarts.
"""

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

STATE_FORMAT = "llmjax.data.rows/1"
SHARD_KEY = "llmjax_shard"  # marks a row shard's own state inside grain's


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


def collect_shards(state: Any, found: dict[int, dict]) -> None:
    """Finds every shard's state in grain's (possibly per-worker) iterator state.

    Worker prefetch states can also hold states of rows not yet consumed; a shard's
    earliest state (fewest rows) is the one consumed.
    """
    if isinstance(state, dict):
        if SHARD_KEY in state:
            shard = state[SHARD_KEY]
            if shard not in found or state["rows"] < found[shard]["rows"]:
                found[shard] = state
            return
        for value in state.values():
            collect_shards(value, found)
    elif isinstance(state, list | tuple):
        for value in state:
            collect_shards(value, found)


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


def restart_offsets(state: dict[str, Any], names: Sequence[str]) -> dict[str, int]:
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


def allgather_json(value: Any) -> list[Any]:
    """`value` from every process, in process order (a collective: all must call it)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(everything[p, :int(sizes[p, 0])])) for p in range(len(sizes))]


def with_tuple_slices(state: Any) -> Any:
    """`state` as grain expects it back after a trip through JSON."""
    # grain (0.2.18) concat-then-split compares its `remainder_slices` with tuples, but JSON,
    # which is how checkpoints store the state, turns them into lists.
    if isinstance(state, list):
        return [with_tuple_slices(value) for value in state]
    if not isinstance(state, dict):
        return state
    return {key: ({k: tuple(v) for k, v in value.items()} if key == "remainder_slices"
                  else with_tuple_slices(value))
            for key, value in state.items()}

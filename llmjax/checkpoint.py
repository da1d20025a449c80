"""Orbax checkpoints: train state, data iterator position and config, saved together.

Each step is written to a temporary directory and renamed when complete (Orbax's
atomic commit), so a crash mid-save leaves the previous checkpoint as the newest.
Restore reads into the *current* mesh's shardings, so a run can resume on another
topology.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def manager(workdir: str, *, max_to_keep: int, async_save: bool) -> ocp.CheckpointManager:
    local = "://" not in workdir  # gs:// and other object stores go to Orbax as they are
    directory = epath.Path(os.path.abspath(workdir) if local else workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=options,
                                 item_names=("state", "data", "config"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict,
         config: dict) -> None:
    """Start saving (returns before the write finishes when saving asynchronously)."""
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)))


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            state_shardings: Any) -> tuple[Any, dict]:
    """(train state placed with `state_shardings`, data iterator state) at `step`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_shardings)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {mngr.directory}/{step} does not match this config's "
                         f"model or optimizer ({str(e).splitlines()[0]}); use a new --workdir "
                         "or the config it was written with") from e
    return restored.state, restored.data

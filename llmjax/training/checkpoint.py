"""Orbax checkpoints: train state, data iterator position and config, saved together.

Each step is written to a temporary directory and renamed when complete (Orbax's
atomic commit), so a crash mid-save leaves the previous checkpoint as the newest.
Restore reads into the *current* mesh's shardings, so a run can resume on another
topology. Where checkpoints live in a workdir: llmjax.workdir.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from llmjax.workdir import CHECKPOINTS


def manager(workdir: str, *, max_to_keep: int, async_save: bool,
            subdir: str = CHECKPOINTS) -> ocp.CheckpointManager:
    local = "://" not in workdir  # gs:// and other object stores go to Orbax as they are
    directory = epath.Path(os.path.abspath(workdir) if local else workdir) / subdir
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


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict:
    """The config saved with checkpoint `step` ({} if it cannot be read)."""
    try:
        return dict(mngr.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config or {})
    except (OSError, ValueError, KeyError):
        return {}


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            state_shardings: Any, config_changes: list[str] = ()) -> tuple[Any, dict]:
    """(train state placed with `state_shardings`, data iterator state) at `step`.

    `config_changes` (llmjax.config.changed_keys against the checkpoint's config) are
    named when the checkpoint does not fit this config's state.
    """
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_shardings)
    try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
        changed = (f"changed since: {'; '.join(config_changes)}" if config_changes
                   else str(e).splitlines()[0])
        raise ValueError(f"checkpoint {mngr.directory}/{step} does not match this config's "
                         f"model or optimizer ({changed}); use a new --workdir "
                         "or the config it was written with") from e
    return restored.state, restored.data


def save_params(workdir: str, params: Any, config: dict) -> None:
    """Parameters alone, as step 0 of `workdir` (what `python -m llmjax.hf import` writes);
    `restore_params` reads them as it reads those of a training checkpoint."""
    mngr = manager(workdir, max_to_keep=1, async_save=False)
    mngr.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                         config=ocp.args.JsonSave(config)))
    mngr.wait_until_finished()
    mngr.close()


def complete_steps(workdir: str, subdir: str = CHECKPOINTS) -> list[int]:
    """The steps of WORKDIR/SUBDIR that were written completely, oldest first."""
    if "://" not in workdir and not os.path.isdir(os.path.join(workdir, subdir)):
        raise FileNotFoundError(f"{workdir}/{subdir} not found: give an llmjax workdir "
                                "or a directory written by `python -m llmjax.hf import`")
    mngr = manager(workdir, max_to_keep=1, async_save=False, subdir=subdir)
    steps = sorted(mngr.all_steps())
    mngr.close()
    return steps


def _state_path(workdir: str, step: int | None, subdir: str = CHECKPOINTS) -> Any:
    """WORKDIR/SUBDIR/STEP/state for `step`, or for the newest complete step if None."""
    steps = complete_steps(workdir, subdir)
    if not steps or (step is not None and step not in steps):
        raise FileNotFoundError(f"{workdir}/{subdir} has no complete checkpoint "
                                f"{'' if step is None else step} (steps: {steps})")
    step = steps[-1] if step is None else step
    return epath.Path(os.path.abspath(workdir) if "://" not in workdir else workdir
                      ) / subdir / str(step) / "state"


def params_shapes(workdir: str, step: int | None, subdir: str = CHECKPOINTS) -> dict:
    """Shapes of the parameters saved at `step` (None: newest), as a pure dict, read from
    the checkpoint's metadata without loading anything."""
    metadata = ocp.PyTreeCheckpointer().metadata(_state_path(workdir, step, subdir))
    return jax.tree.map(lambda m: tuple(m.shape), metadata.item_metadata.tree["params"])


def restore_params(workdir: str, step: int | None, abstract_params: Any,
                   params_shardings: Any, subdir: str = CHECKPOINTS) -> Any:
    """The parameters alone of checkpoint `step` (None: newest) of `workdir`, a training
    run's or `save_params`', placed with `params_shardings` (a pure dict)."""
    target = {"params": jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_params, params_shardings)}
    path = _state_path(workdir, step, subdir)
    try:
        restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))
    except (ValueError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not hold parameters of this model "
                         f"({str(e).splitlines()[0]})") from e
    return restored["params"]

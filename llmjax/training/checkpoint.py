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
from absl import logging
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


UNREADABLE = "checkpoints_unreadable"  # WORKDIR/checkpoints_unreadable/STEP: moved aside


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict | None:
    """The config saved with checkpoint `step` (None if it cannot be read)."""
    try:
        return dict(mngr.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config)
    except Exception:  # noqa: BLE001 - unreadable for any reason: the caller goes on without
        return None


def restore_newest(mngr: ocp.CheckpointManager, abstract_state: Any, state_shardings: Any,
                   config: dict) -> tuple[int, Any, dict] | None:
    """(step, train state, data iterator state) of the newest checkpoint that restores;
    None if there is no checkpoint, a ValueError if there are some and none restores.

    A checkpoint that cannot be read (a truncated file, missing metadata) is moved aside
    to WORKDIR/checkpoints_unreadable/STEP, never deleted, with one line saying why, and
    the one before it is tried. One whose structure or shapes differ from this config's
    state is a ValueError naming the differences and the config keys that changed.
    """
    from llmjax.config import changed_keys

    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            saved = _saved_tree(epath.Path(mngr.directory) / str(step) / "state")
        except Exception as e:  # noqa: BLE001 - any failure to read it: fall back
            _move_aside(mngr, step, e)
            continue
        differences = _differences(saved, abstract_state)
        if differences:
            old = saved_config(mngr, step)
            changed = changed_keys(old, config) if old is not None else []
            raise ValueError(
                f"checkpoint {mngr.directory}/{step} does not match this config's model or "
                f"optimizer ({'; '.join(differences)}"
                f"{'; config changed: ' + '; '.join(changed) if changed else ''}); use a new "
                "--workdir or the config it was written with")
        try:
            state, data_state = restore(mngr, step, abstract_state, state_shardings)
        except Exception as e:  # noqa: BLE001 - the layout matched: the files are damaged
            _move_aside(mngr, step, e)
            continue
        return step, state, data_state
    if not (epath.Path(mngr.directory).parent / UNREADABLE).exists():
        return None
    raise ValueError(f"no checkpoint of {mngr.directory} can be read (they are in "
                     f"{epath.Path(mngr.directory).parent / UNREADABLE}); start in a new "
                     "--workdir")


def _saved_tree(path: epath.Path) -> Any:
    """The tree of array metadata (shapes) saved in a checkpoint's `state` item."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # Orbax warns of the step-level metadata it skips
    try:
        metadata = ocp.PyTreeCheckpointer().metadata(path).item_metadata
    finally:
        logging.set_verbosity(verbosity)
    if metadata is None:
        raise FileNotFoundError(f"{path} has no readable _METADATA")
    return metadata.tree


def _move_aside(mngr: ocp.CheckpointManager, step: int, error: BaseException) -> None:
    while error.__cause__ is not None or error.__context__ is not None:  # the root cause
        error = error.__cause__ or error.__context__
    reason = (str(error).strip().splitlines() or [""])[0][:240]
    reason = f"{type(error).__name__}: {reason}"
    if jax.process_count() > 1:  # the others read the same directory: leave it in place
        print(f"Checkpoint step {step} cannot be read ({reason}); trying the one before",
              flush=True)
        return
    source = epath.Path(mngr.directory) / str(step)
    target = source.parent.parent / UNREADABLE / str(step)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = 1
    while target.exists():
        target, suffix = target.parent / f"{step}.{suffix}", suffix + 1
    source.rename(target)
    print(f"Checkpoint step {step} cannot be read ({reason}); moved it to {target}; trying "
          "the one before", flush=True)
    mngr.reload()


def _differences(saved: Any, abstract_state: Any) -> list[str]:
    """How a checkpoint's saved tree differs from the state this config trains (at most
    three differences, by path: `params/embed: (259, 32) saved, (259, 64) now`)."""
    def shapes(tree):
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                         for k in path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    old, new = shapes(saved), shapes(abstract_state)
    out = [f"{key}: {old.get(key, 'absent')} saved, {new.get(key, 'absent')} now"
           for key in sorted(set(old) | set(new), key=lambda k: (not k.startswith("params"), k))
           if old.get(key) != new.get(key)]
    return out[:3] + ([f"{len(out) - 3} more"] if len(out) > 3 else [])


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any,
            state_shardings: Any) -> tuple[Any, dict]:
    """(train state placed with `state_shardings`, data iterator state) at `step`."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_shardings)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
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
    saved = _saved_tree(_state_path(workdir, step, subdir))
    return jax.tree.map(lambda m: tuple(m.shape), saved["params"])


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

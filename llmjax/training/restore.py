"""Models from where they are stored: a run's checkpoints or a Hugging Face directory.

    restored = restore.restore_run("runs/my_run", best=True)   # its mesh, LoRA kept apart
    model = restore.load_model("runs/my_run")    # any model path, adapters merged

A model path is a workdir (its newest checkpoint), WORKDIR/checkpoints/STEP or
WORKDIR/best/STEP, an imported directory, or a Hugging Face directory (llmjax.workdir).
A LoRA run is rebuilt as it trained (llmjax.training.setup): its frozen weights come from
its init_from (or its seed), its adapters from the checkpoint. So is a prefix- or
prompt-tuning run, but `load_model` refuses one: its virtual tokens do not merge into
weights, and the engine that generates and serves does not run them yet.
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx

from llmjax import hf, workdir
from llmjax.config import base_config, with_overrides
from llmjax.data.tokenizer import Tokenizer, load_tokenizer
from llmjax.hf.writer import TOKENIZER_FILES
from llmjax.models import build_model
from llmjax.parallel import sharding
from llmjax.training import checkpoint, init_from, lora, peft_methods, setup


@dataclasses.dataclass(frozen=True)
class Restored:
    run: setup.Run
    trainable: Any  # the checkpoint's trainable tree (every parameter, or LoRA's)
    frozen: Any  # LoRA's frozen weights, or None
    step: int


def checkpoint_of(path: str, best: bool = False) -> tuple[str, str, int]:
    """(workdir, checkpoint subdirectory, step) that a model path names: its newest (or,
    with `best`, its best) complete checkpoint unless it names one."""
    run_dir, subdir, step = workdir.split_checkpoint(path)
    if best:
        subdir, step = workdir.BEST, None
    if step is None:
        steps = checkpoint.complete_steps(run_dir, subdir)
        if not steps:
            raise FileNotFoundError(f"{run_dir}/{subdir} holds no complete checkpoint")
        step = steps[-1]
    return run_dir, subdir, step


def restore_run(path: str, *, best: bool = False, config_overrides: dict[str, Any] | None = None,
                model_overrides: dict[str, Any] | None = None) -> Restored:
    """The run of a workdir (or of one of its checkpoints), assembled as it trained, with
    the newest checkpoint's trainable parameters (or the best one's: `best`).

    `config_overrides`: {"dotted.key": value} applied to the run's config first (e.g.
    "eval_batches", or "mesh.fsdp" to place it on other devices).
    """
    run_dir, subdir, step = checkpoint_of(path, best)
    config = ml_collections.ConfigDict(workdir.read_config(run_dir))
    if "peft" not in config:  # written before config.peft existed: LoRA or every parameter
        config.peft = base_config().peft
    config = with_overrides(config, config_overrides or {})
    vocab_size = 0
    if not config.model.get("vocab_size") and not config.init_from:
        # Written before config.json recorded the tokenizer's size: read it back.
        shapes = checkpoint.params_shapes(run_dir, step, subdir)
        vocab_size = (shapes["embed"][0] if "embed" in shapes else
                      load_tokenizer(config.data.tokenizer, None, run_dir).vocab_size)
    run = setup.assemble(config, vocab_size, model_overrides)
    trainable = checkpoint.restore_params(run_dir, step, run.abstract_state.params,
                                          run.state_shardings.params, subdir)
    return Restored(run, trainable, setup.frozen_weights(run), step)


def load_model(path: str, *, mesh: jax.sharding.Mesh | None = None,
               rules: str | Sequence[Any] = "fsdp", best: bool = False,
               **overrides: Any) -> nnx.Module:
    """The model at any model path, its weights placed over `mesh` (default: every device,
    FSDP) and LoRA adapters merged. `overrides` replace model config fields (dtype=...)."""
    if workdir.is_hf_dir(path):
        return hf.from_pretrained(path, mesh=mesh, rules=rules, **overrides)
    run_dir, subdir, step = checkpoint_of(path, best)
    run_config = workdir.read_config(run_dir)
    if (method := peft_methods.method_of(run_config)) != "lora":
        raise peft_methods.not_servable(path, method)
    if lora.enabled(ml_collections.ConfigDict(run_config["lora"])):
        restored = restore_run(path, best=best, model_overrides=overrides)
        params = jax.jit(restored.run.merge)(restored.trainable, restored.frozen)
        return nnx.merge(restored.run.graphdef, params)
    # Every parameter is in the checkpoint: neither the run's optimizer nor its mesh matter.
    stored = f"{run_dir}/{subdir}/{step}"
    cfg = init_from.stored_model_config(stored, overrides)
    mesh, rules = sharding.placement(mesh, rules)
    graphdef, abstract = nnx.split(jax.eval_shape(lambda: build_model(cfg, 0)))
    shardings = sharding.param_shardings(abstract, mesh, rules)
    return nnx.merge(graphdef, init_from.load_params(stored, cfg, shardings))


def tokenizer_spec(path: str) -> str | None:
    """Where the tokenizer of a model path is, as llmjax.data.tokenizer.load_tokenizer takes
    it: an HF directory's own files, a run's tokenizer/ or its data.tokenizer directory, or
    "byte"; None if the path has none."""
    if workdir.is_hf_dir(path):
        return path if any(os.path.isfile(os.path.join(path, name))
                           for name in TOKENIZER_FILES) else None
    run_dir, _, _ = workdir.split_checkpoint(path)
    spec = workdir.read_config(run_dir).get("data", {}).get("tokenizer", "")
    for candidate in (os.path.join(run_dir, workdir.TOKENIZER), os.path.expanduser(spec)):
        if os.path.isdir(candidate):
            return candidate
    return "byte" if spec == "byte" else None


def load_tokenizer_of(path: str) -> Tokenizer:
    """The tokenizer that goes with the model at `path` (see `tokenizer_spec`)."""
    spec = tokenizer_spec(path)
    if spec is None:
        raise FileNotFoundError(f"{path} has no tokenizer (no tokenizer files, no "
                                "tokenizer/ directory, and its data.tokenizer is not one)")
    return load_tokenizer(spec)


def eos_ids_of(path: str, tokenizer: Tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS and those of a generation_config.json beside the model."""
    ids = {tokenizer.eos_id}
    for folder in {path, tokenizer_spec(path)} - {None, "byte"}:
        config = os.path.join(folder, "generation_config.json")
        if os.path.isfile(config):
            with open(config) as f:
                eos = json.load(f).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(ids))

"""Runs that start from another model: `config.init_from` and the model of a stored run.

`config.init_from` is a Hugging Face directory, an imported directory, another run's
workdir or one of its checkpoints (llmjax.workdir). The run then takes that model's
architecture (its own `config.model` keeps only how to run it: RUNTIME_FIELDS, and
`num_labels` for a new classifier head) and, on its first start, its weights.
"""

import dataclasses
from typing import Any

import jax
import ml_collections
from etils import epath
from flax import nnx

from llmjax import workdir
from llmjax.hf import reader
from llmjax.hf.adapters import ADAPTERS
from llmjax.models import ModelConfig, build_model, family_of, model_config
from llmjax.training import checkpoint
from llmjax.training.state import init_params

# model_config fields that say how to run a model, not what it is: `init_from` keeps
# the training config's values for these.
RUNTIME_FIELDS = ("param_dtype", "dtype", "scan_layers", "scan_unroll", "remat_policy",
                  "attention_impl", "attention_block_q", "attention_block_kv")


def model_fields(cfg: ModelConfig) -> dict[str, Any]:
    """A model config as the `config.model` section that rebuilds it."""
    return {"family": family_of(cfg), **dataclasses.asdict(cfg)}


def stored_model_config(path: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """The model config of a model path (see llmjax.workdir), with `overrides` of its
    fields (e.g. dtype)."""
    overrides = overrides or {}
    if workdir.is_hf_dir(path):
        return model_config({**reader.read_hf_config(path)[1], **overrides})
    run_dir, subdir, step = workdir.split_checkpoint(path)
    fields = dict(workdir.read_config(run_dir)["model"])
    if not fields.get("vocab_size"):  # taken from the tokenizer at train time
        fields["vocab_size"] = checkpoint.params_shapes(run_dir, step, subdir)["embed"][0]
    return model_config({**fields, **overrides})


def resolve(config: ml_collections.ConfigDict, vocab_size: int
            ) -> tuple[ml_collections.ConfigDict, ModelConfig]:
    """For a run with `config.init_from`: (a copy of `config` whose `model` is that of
    init_from, so the workdir's config.json says what was trained; the model config).

    Raises ValueError if the run's tokenizer (`vocab_size` ids) does not fit the model.
    """
    init_from = config.init_from
    if not epath.Path(init_from).is_dir():
        raise FileNotFoundError(f"config.init_from={init_from!r} is not a directory; give an "
                                "HF model directory or an llmjax workdir")
    # num_labels too: a decoder fine-tuned as a classifier gets a head (score) the LM lacks.
    runtime = {k: v for k, v in dict(config.model).items()
               if k in RUNTIME_FIELDS or (k == "num_labels" and v)}
    cfg = stored_model_config(init_from, runtime)
    if vocab_size > cfg.vocab_size:
        raise ValueError(f"config.data.tokenizer has {vocab_size} ids but the model of "
                         f"config.init_from={init_from!r} has {cfg.vocab_size}; use its "
                         "tokenizer (--config.data.tokenizer=DIR)")
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(model_fields(cfg))
    return config, cfg


# A classifier's head: what a classification run takes fresh from a run that never
# trained one (a masked-LM run's pooler and classifier are their initial values, decayed).
CLASSIFIER_HEADS = ("pooler", "pooler_bias", "classifier", "classifier_bias", "score")


def fresh_heads(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The parameters a run starting from `config.init_from` initialises afresh: the
    classifier head when a classification run starts from a workdir of another task."""
    if config.task != "classify" or workdir.is_hf_dir(config.init_from):
        return ()  # an HF directory without a classifier: its adapter's optional tensors
    run_dir, _, _ = workdir.split_checkpoint(config.init_from)
    return () if workdir.read_config(run_dir).get("task") == "classify" else CLASSIFIER_HEADS


def load_params(path: str, cfg: ModelConfig, shardings: Any, fresh: tuple[str, ...] = (),
                seed: int = 0) -> dict:
    """The parameters (pure dict) stored at a model path, placed with `shardings`.

    `fresh`: top-level parameters of a workdir's model that are initialised (from `seed`)
    instead of read, as are those of the family's optional ones that the checkpoint lacks
    (a BERT saved before it had a masked-LM head)."""
    if workdir.is_hf_dir(path):
        adapter = reader.read_hf_config(path)[0]
        return reader.load_hf_params(reader.HFTensors(path), adapter, cfg, shardings)
    run_dir, subdir, step = workdir.split_checkpoint(path)
    abstract = nnx.to_pure_dict(nnx.split(jax.eval_shape(lambda: build_model(cfg, 0)))[1])
    stored = checkpoint.params_shapes(run_dir, step, subdir)
    optional = {path.split("/")[0] for path in ADAPTERS[family_of(cfg)].optional}
    fresh = {k for k in abstract if k in fresh or (k in optional and k not in stored)}
    params = checkpoint.restore_params(
        run_dir, step, {k: v for k, v in abstract.items() if k not in fresh},
        {k: v for k, v in shardings.items() if k not in fresh}, subdir)
    if fresh:
        params.update(jax.jit(
            lambda: {k: v for k, v in init_params(cfg, seed).items() if k in fresh},
            out_shardings={k: shardings[k] for k in fresh})())
    return params

"""The one place that turns a config into a run.

    data = setup.build_data(config, workdir)                  # tokenizer, batches
    run = setup.assemble(config, data.tokenizer.vocab_size,   # nothing allocated yet
                         mask_id=data.tokenizer.mask_id)
    setup.check_data(run, data)   # token ids and labels the model can take
    frozen = setup.frozen_weights(run)     # LoRA / virtual tokens: the base weights; else None
    state = setup.initial_state(run, frozen)   # fresh, init_from's weights, new adapters or
                                               # virtual tokens (llmjax.training.peft_methods)
    steps = setup.bind_steps(run, frozen)      # steps.train(state, batch), steps.evaluate(...)

`assemble` resolves `init_from`, checks the task against the model, and builds the mesh,
the logical-axis rules, the optimizer and schedule, the state's layout (what trains, how it
is sharded) and the jitted steps. Everything that trains, measures, evaluates or exports
a config goes through it: the train loop, the fit check (llmjax.training.memory), the
benchmark, evaluation, and restoring a model from a workdir (llmjax.training.restore);
so a change to the state or the step reaches all of them.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from llmjax.config import check_positions, check_task, validate
from llmjax.models import ModelConfig, model_config
from llmjax.parallel import sharding
from llmjax.training import init_from, lora, optimizer, peft_methods, step
from llmjax.training.state import (
    TrainState,
    init_params,
    params_layout,
    state_from_params,
    state_layout,
)
from llmjax.training.tasks import Task, make_task


@dataclasses.dataclass
class Data:
    tokenizer: Any  # llmjax.data.tokenizer.Tokenizer
    train_iter: Any  # get_state / set_state / close; yields this process's rows of a batch
    eval_batches: list[dict[str, np.ndarray]]


def build_data(config: ml_collections.ConfigDict, workdir: str) -> Data:
    """Sources -> tokenizer -> this process's training stream and held-out eval batches
    (llmjax.data.loader; labelled rows for classification, llmjax.data.classify; the
    maskable tokens for a masked LM, llmjax.data.masked)."""
    # Imported here: the rest of a run (the benchmark, the fit check) needs no grain,
    # tokenizers or TensorFlow, so it runs on a bare accelerator machine.
    from llmjax.data import classify, loader, masked

    process = dict(workdir=workdir, process_index=jax.process_index(),
                   process_count=jax.process_count())
    shape = dict(seed=config.seed, seq_len=config.seq_len,
                 global_batch_size=config.global_batch_size)
    if config.task == "classify":
        return Data(*classify.build(config.data, **shape, **process))
    if config.task == "mlm":
        return Data(*masked.build(config.data, **shape, eval_batches=config.eval_batches,
                                  **process))
    return Data(*loader.build(config.data, **shape, eval_batches=config.eval_batches,
                              **process))


def check_data(run: "Run", data: Data) -> None:
    """ValueError, before the first step, if the data holds ids the model has no row for:
    tokens past `model.vocab_size` or labels outside [0, num_labels). (On an accelerator
    an out-of-range gather returns garbage, not an error: the loss turns NaN.)"""
    config = run.config
    if data.tokenizer.vocab_size > run.model_cfg.vocab_size:
        raise ValueError(f"config.data.tokenizer={config.data.tokenizer!r} has "
                         f"{data.tokenizer.vocab_size} ids but config.model.vocab_size="
                         f"{run.model_cfg.vocab_size}: set config.model.vocab_size=0 (the "
                         "tokenizer's) or at least the tokenizer's size")
    if run.task.name != "classify":
        return
    num_labels = run.model_cfg.num_labels
    eval_labels = [b["labels"][b["loss_mask"] > 0] for b in data.eval_batches]
    for key, labels in (("config.data.train", data.train_iter.rows["labels"]),
                        ("config.data.eval" if config.data.eval else "config.data.train",
                         np.concatenate(eval_labels or [np.zeros(0, np.int32)]))):
        bad = labels[(labels < 0) | (labels >= num_labels)]
        if bad.size:
            raise ValueError(f"{key} has label {int(bad[0])}, outside [0, "
                             f"config.model.num_labels={num_labels}): renumber the labels "
                             "0..N-1 or raise config.model.num_labels")


@dataclasses.dataclass(frozen=True)
class FrozenLayout:
    """LoRA or virtual tokens: the weights that do not train (the whole model), where they
    live."""

    abstract: Any  # pure dict of ShapeDtypeStructs
    shardings: Any  # matching pure dict of NamedShardings
    axes: dict[str, tuple]  # parameter path -> logical axis names


@dataclasses.dataclass(frozen=True)
class Run:
    """A config assembled: what trains, where it lives, and the jitted steps."""

    config: ml_collections.ConfigDict  # as trained: with init_from's model section
    model_cfg: ModelConfig
    task: Task
    mesh: jax.sharding.Mesh
    rules: tuple
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    graphdef: nnx.GraphDef  # the model's, or with virtual tokens (peft_methods.graphdef)
    abstract_state: TrainState
    state_shardings: TrainState
    frozen: FrozenLayout | None  # None: every parameter trains
    batch_sharding: jax.sharding.NamedSharding  # of [batch, length] arrays
    batch_shardings: dict[str, jax.sharding.NamedSharding]  # per batch key of the task
    # (state, batch, frozen) -> (state, metrics); the state is donated
    train_step: Callable
    # (trainable, batch, frozen) -> sums (llmjax.training.step.eval_step)
    eval_step: Callable

    @property
    def num_trainable(self) -> int:
        return lora.count(self.abstract_state.params)

    @property
    def num_params(self) -> int:
        """Parameters the model runs with (LoRA adapters and virtual tokens counted on top
        of the weights; trained heads are among the weights)."""
        if self.frozen is None:
            return self.num_trainable
        return (lora.count(self.frozen.abstract) + self.num_trainable
                - lora.count(self.abstract_state.params.get("heads", {})))

    def merge(self, trainable: Any, frozen: Any) -> Any:
        """What `graphdef` runs with: the parameters (LoRA adapters merged into the
        weights), and the virtual tokens of a prefix or prompt run."""
        return peft_methods.model_params(trainable, frozen, self.config.lora, self.config.peft)

    def abstract_inputs(self) -> tuple[TrainState, dict[str, Any], Any]:
        """(state, global batch, frozen weights) as placed ShapeDtypeStructs, to lower the
        train step without allocating anything (fit check)."""
        def placed(a, s):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

        rows, length = self.config.global_batch_size, self.config.seq_len
        batch = {key: jax.ShapeDtypeStruct((rows, length)[:ndim], np.int32,
                                           sharding=self.batch_shardings[key])
                 for key, ndim in self.task.batch_ndims.items()}
        frozen = (None if self.frozen is None
                  else jax.tree.map(placed, self.frozen.abstract, self.frozen.shardings))
        return jax.tree.map(placed, self.abstract_state, self.state_shardings), batch, frozen


def assemble(config: ml_collections.ConfigDict, vocab_size: int = 0,
             model_overrides: dict[str, Any] | None = None,
             devices: Sequence[jax.Device] | None = None, mask_id: int | None = None) -> Run:
    """Everything `config` decides before the first step, without allocating weights.

    `vocab_size`: the tokenizer's, for `config.model.vocab_size` = 0. `model_overrides`
    replace model config fields after init_from (the fit check's one-layer probes, a
    dtype at export). `devices`: what the mesh spans (default: every device). `mask_id`:
    the tokenizer's mask token, for `config.mlm.mask_id` = -1 (task "mlm").
    """
    validate(config)
    if config.init_from:  # architecture (and, for a fresh run, weights) from that directory
        config, model_cfg = init_from.resolve(config, vocab_size)
    else:
        model_cfg = model_config(config.model, vocab_size)
        config = config.copy_and_resolve_references()
        config.model.vocab_size = model_cfg.vocab_size  # the tokenizer's: config.json says it
    if model_overrides:
        model_cfg = dataclasses.replace(model_cfg, **model_overrides)
    check_task(config.task, model_cfg)
    check_positions(config.seq_len, model_cfg, peft_methods.num_virtual_tokens(config.peft))
    if config.task == "mlm" and config.mlm.mask_id < 0 and mask_id is not None:
        config.mlm.mask_id = mask_id  # the tokenizer's: config.json says it
    task = make_task(config.task, config.get("mlm"), model_cfg.vocab_size)
    mesh = sharding.make_mesh(config.mesh, devices)
    rules = sharding.logical_axis_rules(config.mesh.rules)
    schedule = optimizer.learning_rate_schedule(config.optimizer, config.num_train_steps)
    tx = optimizer.make_optimizer(config.optimizer, config.num_train_steps)

    model_graphdef, abstract_params, params_shardings = params_layout(model_cfg, mesh, rules)
    graphdef = peft_methods.graphdef(model_graphdef, model_cfg, config.peft)
    frozen, split = None, None
    if peft_methods.freezes(config.lora, config.peft):  # an argument of the step, not state
        frozen = FrozenLayout(nnx.to_pure_dict(abstract_params), params_shardings,
                              lora.logical_axes(abstract_params))
        split = functools.partial(_trainable, axes=frozen.axes, config=config,
                                  model_cfg=model_cfg)
    abstract_state, state_shardings = state_layout(abstract_params, params_shardings, tx,
                                                   mesh, split)
    batch_sharding = sharding.batch_sharding(mesh, rules, config.global_batch_size)
    batch_shardings = {key: sharding.rank_sharding(batch_sharding, ndim)
                       for key, ndim in task.batch_ndims.items()}

    merge = functools.partial(peft_methods.model_params, lora_cfg=config.lora,
                              peft_cfg=config.peft)
    frozen_shardings = None if frozen is None else frozen.shardings
    train_step = jax.jit(
        functools.partial(step.train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                          task=task, merge=merge, grad_accum_steps=config.grad_accum_steps,
                          z_loss=config.z_loss, seed=config.seed),
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, None), donate_argnums=0)
    eval_step = jax.jit(
        functools.partial(step.eval_step, graphdef=graphdef, task=task, merge=merge,
                          seed=config.seed),
        in_shardings=(state_shardings.params, batch_shardings, frozen_shardings))
    return Run(config=config, model_cfg=model_cfg, task=task, mesh=mesh, rules=rules,
               schedule=schedule, tx=tx, graphdef=graphdef, abstract_state=abstract_state,
               state_shardings=state_shardings, frozen=frozen, batch_sharding=batch_sharding,
               batch_shardings=batch_shardings, train_step=train_step, eval_step=eval_step)


def _trainable(params: dict, *, axes: dict[str, tuple], config: ml_collections.ConfigDict,
               model_cfg: ModelConfig) -> Any:
    return peft_methods.split_trainable(params, axes, config.lora, config.peft, model_cfg,
                                        config.seed)[0]


def frozen_weights(run: Run) -> Any:
    """LoRA and virtual tokens: the model's weights, rebuilt on every start (init_from's,
    or seeded ones) and never checkpointed. None when every parameter trains."""
    if run.frozen is None:
        return None
    with sharding.activate(run.mesh, run.rules):
        if run.config.init_from:
            return init_from.load_params(run.config.init_from, run.model_cfg,
                                         run.frozen.shardings)
        return jax.jit(lambda: init_params(run.model_cfg, run.config.seed),
                       out_shardings=run.frozen.shardings)()


def initial_state(run: Run, frozen: Any) -> TrainState:
    """Step 0: fresh adapters or virtual tokens around `frozen`, init_from's weights, or
    fresh ones."""
    config, tx, shardings = run.config, run.tx, run.state_shardings
    with sharding.activate(run.mesh, run.rules):
        if frozen is not None:
            return jax.jit(lambda p: state_from_params(_trainable(
                p, axes=run.frozen.axes, config=config, model_cfg=run.model_cfg), tx),
                out_shardings=shardings)(frozen)
        if config.init_from:
            params = init_from.load_params(config.init_from, run.model_cfg, shardings.params,
                                           init_from.fresh_heads(config), config.seed)
            return jax.jit(lambda p: state_from_params(p, tx), donate_argnums=0,
                           out_shardings=shardings)(params)
        return jax.jit(lambda: state_from_params(init_params(run.model_cfg, config.seed), tx),
                       out_shardings=shardings)()


@dataclasses.dataclass(frozen=True)
class Steps:
    """The run's steps with its frozen weights bound: one call signature whatever trains."""

    train: Callable[[TrainState, dict], tuple[TrainState, dict]]
    evaluate: Callable[[Any, dict], dict]  # (trainable params, global batch) -> sums
    params: Callable[[Any], Any]  # trainable params -> the parameters the model runs with


def bind_steps(run: Run, frozen: Any) -> Steps:
    merge = jax.jit(run.merge)
    return Steps(train=lambda state, batch: run.train_step(state, batch, frozen),
                 evaluate=lambda trainable, batch: run.eval_step(trainable, batch, frozen),
                 params=lambda trainable: merge(trainable, frozen))

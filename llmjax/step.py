"""train_step and eval_step: pure functions of (TrainState, batch), jitted once.

A language-model batch is a dict of [batch, length] int32 arrays: `inputs`, `targets`,
`segment_ids`, `positions` and `loss_mask` (see llmjax.data.pipeline). A classification
batch (task "classify", llmjax.data.classify) has `inputs`, `segment_ids` (0: padding)
and `positions` [batch, length], and `labels` and `loss_mask` (1: a real row) [batch].

With LoRA the state's `params` are the trainable tree of llmjax.lora and the frozen
weights come in as a separate argument that is neither differentiated nor donated.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx, traverse_util

from llmjax import lora, sharding
from llmjax.models import build_model
from llmjax.models.layers import constrain


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # pure dict of arrays, merged with the model's graphdef inside the step
    opt_state: Any


def init_params(model_cfg, seed: int) -> Any:
    """Freshly initialised parameters, as a pure dict."""
    return nnx.to_pure_dict(nnx.split(build_model(model_cfg, seed))[1])


def init_train_state(model_cfg, tx, seed: int) -> TrainState:
    return train_state_from_params(init_params(model_cfg, seed), tx)


def train_state_from_params(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 and a fresh optimizer state around `params` (e.g. pretrained weights)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def init_finetune_state(params: Any, axes: dict[str, tuple], tx: optax.GradientTransformation,
                        lora_cfg: Any, seed: int) -> TrainState:
    """Step 0 around the trainable tree that llmjax.lora.split_trainable makes of `params`
    (the model's weights, which stay the frozen ones)."""
    return train_state_from_params(lora.split_trainable(params, axes, lora_cfg, seed)[0], tx)


def params_layout(model_cfg, seed: int, mesh, rules) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """(graphdef, abstract parameters (nnx.State), their shardings as a pure dict)."""
    graphdef, abstract_params = nnx.split(jax.eval_shape(lambda: build_model(model_cfg, seed)))
    return graphdef, abstract_params, sharding.param_shardings(abstract_params, mesh, rules)


def state_layout(model_cfg, tx, seed: int, mesh, rules,
                 lora_cfg: Any = None) -> tuple[Any, TrainState, TrainState]:
    """(graphdef, abstract train state, its shardings), without allocating any weights.

    With LoRA (`lora_cfg.rank` > 0) the state holds the trainable tree: adapters are
    replicated (they are small), trained heads keep their parameter's sharding.
    """
    graphdef, abstract_params, params_shardings = params_layout(model_cfg, seed, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if lora_cfg is not None and lora.enabled(lora_cfg):
        axes = lora.logical_axes(abstract_params)
        abstract_state = jax.eval_shape(
            lambda p: init_finetune_state(p, axes, tx, lora_cfg, seed),
            nnx.to_pure_dict(abstract_params))
        flat_shardings = traverse_util.flatten_dict(params_shardings, sep="/")
        params_shardings = {
            "adapters": jax.tree.map(lambda _: replicated, abstract_state.params["adapters"]),
            "heads": traverse_util.unflatten_dict(
                {path: flat_shardings[path]
                 for path in traverse_util.flatten_dict(abstract_state.params["heads"], sep="/")},
                sep="/")}
    else:
        abstract_state = jax.eval_shape(lambda: init_train_state(model_cfg, tx, seed))
    shardings = TrainState(
        step=replicated, params=params_shardings,
        opt_state=sharding.like_params(abstract_state.opt_state, abstract_state.params,
                                       params_shardings, mesh))
    return graphdef, abstract_state, shardings


def token_losses(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array],
                 z_loss: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over the masked tokens of a batch: (cross-entropy + z-loss, cross-entropy, tokens).

    Sums rather than means, so microbatches and shards add up to the full-batch value.
    """
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    total = cross_entropy
    if z_loss:
        # Keeps log Z near 0 so the logits do not drift (PaLM's auxiliary loss).
        total = total + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return jnp.sum(total * mask), jnp.sum(cross_entropy * mask), jnp.sum(mask)


def classify_losses(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array]
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sums over the real rows of a classification batch: (cross-entropy, cross-entropy, rows)."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    total = jnp.sum(cross_entropy * mask)
    return total, total, jnp.sum(mask)


def losses(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], z_loss: float,
           task: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """token_losses for task "lm", classify_losses for "classify"."""
    if task == "classify":
        return classify_losses(graphdef, params, batch)
    return token_losses(graphdef, params, batch, z_loss)


def split_microbatches(batch: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
    """[batch, length] -> [num, batch / num, length].

    Microbatch i takes rows i, i + num, i + 2 num, ...: each device keeps its own rows,
    so the split needs no communication.
    """
    def split(x):
        rows = x.shape[0]
        if rows % num:
            raise ValueError(f"config.grad_accum_steps={num} does not divide the batch of {rows}")
        x = x.reshape(rows // num, num, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "act_batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int, z_loss: float, frozen: Any = None, lora_cfg: Any = None,
               task: str = "lm") -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the global batch, accumulating gradients over microbatches.

    Only `state.params` (the trainable tree, see llmjax.lora) is differentiated and
    updated; `frozen` weights are read, never written.
    """
    def loss_with_aux(p, mb):
        total, ce, n = losses(graphdef, lora.model_params(p, frozen, lora_cfg), mb, z_loss, task)
        return total, (ce, n)

    grad_with_aux = jax.value_and_grad(loss_with_aux, has_aux=True)

    def add_microbatch(carry, microbatch):
        grads, total_sum, ce_sum, tokens = carry
        (total, (ce, n)), g = grad_with_aux(state.params, microbatch)
        return (jax.tree.map(jnp.add, grads, g), total_sum + total, ce_sum + ce, tokens + n), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero = jnp.zeros((), jnp.float32)
    microbatches = split_microbatches(batch, grad_accum_steps)
    (grad_sums, total_sum, ce_sum, tokens), _ = jax.lax.scan(
        add_microbatch, (zeros, zero, zero, zero), microbatches)

    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grad_sums)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": ce_sum / denom,
        "total_loss": total_sum / denom,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "tokens": tokens,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
              frozen: Any = None, lora_cfg: Any = None, task: str = "lm") -> dict[str, jax.Array]:
    """Sums for aggregation over eval batches: cross-entropy and token (or row) count;
    for "classify" also each row's predicted class [batch]."""
    full = lora.model_params(params, frozen, lora_cfg)
    _, ce, n = losses(graphdef, full, batch, 0.0, task)
    out = {"loss_sum": ce, "tokens": n}
    if task == "classify":
        logits = nnx.merge(graphdef, full)(batch["inputs"], batch["positions"],
                                           batch["segment_ids"])
        out["predictions"] = jnp.argmax(logits, axis=-1)
    return out


def jit_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, *, grad_accum_steps: int, z_loss: float,
                   state_shardings: Any, batch_sharding: Any, frozen_shardings: Any = None,
                   lora_cfg: Any = None, task: str = "lm") -> Callable:
    """train_step jitted with explicit shardings; the old state's buffers are donated.

    Called as step(state, batch), or step(state, batch, frozen) when `frozen_shardings`
    is given (LoRA): the frozen weights are not donated.
    """
    kwargs = dict(graphdef=graphdef, tx=tx, schedule=schedule, grad_accum_steps=grad_accum_steps,
                  z_loss=z_loss, lora_cfg=lora_cfg, task=task)
    if frozen_shardings is None:
        return jax.jit(lambda state, batch: train_step(state, batch, **kwargs),
                       in_shardings=(state_shardings, batch_sharding),
                       out_shardings=(state_shardings, None), donate_argnums=0)
    return jax.jit(lambda state, batch, frozen: train_step(state, batch, frozen=frozen, **kwargs),
                   in_shardings=(state_shardings, batch_sharding, frozen_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def jit_eval_step(graphdef: nnx.GraphDef, params_shardings: Any, batch_sharding: Any,
                  frozen_shardings: Any = None, lora_cfg: Any = None,
                  task: str = "lm") -> Callable:
    """eval_step jitted: called as step(params, batch, frozen) (frozen None without LoRA)."""
    return jax.jit(lambda params, batch, frozen: eval_step(
        params, batch, graphdef=graphdef, frozen=frozen, lora_cfg=lora_cfg, task=task),
        in_shardings=(params_shardings, batch_sharding, frozen_shardings))

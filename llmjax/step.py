"""train_step and eval_step: pure functions of (TrainState, batch), jitted once.

A batch is a dict of [batch, length] int32 arrays: `inputs`, `targets`,
`segment_ids`, `positions` and `loss_mask` (see llmjax.data.pipeline).
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmjax import sharding
from llmjax.models import build_model
from llmjax.models.layers import constrain


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # pure dict of arrays, merged with the model's graphdef inside the step
    opt_state: Any


def init_train_state(model_cfg, tx, seed: int) -> TrainState:
    return train_state_from_params(nnx.to_pure_dict(nnx.split(build_model(model_cfg, seed))[1]),
                                   tx)


def train_state_from_params(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 and a fresh optimizer state around `params` (e.g. pretrained weights)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_layout(model_cfg, tx, seed: int, mesh, rules) -> tuple[Any, TrainState, TrainState]:
    """(graphdef, abstract train state, its shardings), without allocating any weights."""
    abstract_model = jax.eval_shape(lambda: build_model(model_cfg, seed))
    graphdef, abstract_params = nnx.split(abstract_model)
    abstract_state = jax.eval_shape(lambda: init_train_state(model_cfg, tx, seed))
    params_shardings = sharding.param_shardings(abstract_params, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
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
        return constrain(x, (None, "act_batch", None))
    return jax.tree.map(split, batch)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               grad_accum_steps: int, z_loss: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the global batch, accumulating gradients over microbatches."""
    def loss_with_aux(p, mb):
        total, ce, n = token_losses(graphdef, p, mb, z_loss)
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
    grads = jax.tree.map(lambda g: g / denom, grad_sums)
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


def eval_step(params: Any, batch: dict[str, jax.Array], *,
              graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """Sums for aggregation over eval batches: cross-entropy and token count."""
    _, ce, n = token_losses(graphdef, params, batch, 0.0)
    return {"loss_sum": ce, "tokens": n}


def jit_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                   schedule: optax.Schedule, *, grad_accum_steps: int, z_loss: float,
                   state_shardings: Any, batch_sharding: Any) -> Callable:
    """train_step jitted with explicit shardings; the old state's buffers are donated."""
    def step(state, batch):
        return train_step(state, batch, graphdef=graphdef, tx=tx, schedule=schedule,
                          grad_accum_steps=grad_accum_steps, z_loss=z_loss)

    return jax.jit(step,
                   in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=0)


def jit_eval_step(graphdef: nnx.GraphDef, params_shardings: Any, batch_sharding: Any) -> Callable:
    return jax.jit(lambda params, batch: eval_step(params, batch, graphdef=graphdef),
                   in_shardings=(params_shardings, batch_sharding))

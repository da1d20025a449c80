"""train_step and eval_step: pure functions of (state or params, batch, frozen weights).

What a run trains and optimises is decided before these are jitted
(llmjax.training.setup): `task` gives the loss, `merge` turns the trainable tree and the
frozen weights into the parameters the model runs with (LoRA adapters merged; without
LoRA the trainable tree is every parameter and `frozen` is None). Frozen weights are
read, never differentiated, donated or written.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmjax.models.layers import constrain
from llmjax.training.state import TrainState
from llmjax.training.tasks import Batch, Task

Merge = Callable[[Any, Any], Any]  # (trainable tree, frozen weights or None) -> parameters


def split_microbatches(batch: Batch, num: int) -> Batch:
    """[batch, ...] -> [num, batch / num, ...].

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


def train_step(state: TrainState, batch: Batch, frozen: Any, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, schedule: optax.Schedule, task: Task,
               merge: Merge, grad_accum_steps: int, z_loss: float, seed: int = 0
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on the global batch, accumulating gradients over microbatches.

    Only `state.params` is differentiated and updated. Metrics: loss (cross-entropy per
    counted token or row), total_loss (with the z-loss), grad_norm, param_norm,
    learning_rate, `task.count_name`: loss_tokens (targets in the loss) or examples
    (labelled rows, for classification), and skipped (1 when the loss or gradient
    norm was NaN or inf: the update was dropped, parameters and optimizer state stay
    as they were, the step still counts). A task that `prepare`s its batch (masked LM)
    does so on the whole batch with this step's draw of `seed`.
    """
    if task.prepare is not None:
        batch = task.prepare(batch, seed, state.step)

    def loss_with_aux(trainable, microbatch):
        model = nnx.merge(graphdef, merge(trainable, frozen))
        total, cross_entropy, count = task.losses(model, microbatch, z_loss)
        return total, (cross_entropy, count)

    grad_with_aux = jax.value_and_grad(loss_with_aux, has_aux=True)

    def add_microbatch(carry, microbatch):
        grads, total_sum, ce_sum, count_sum = carry
        (total, (ce, count)), g = grad_with_aux(state.params, microbatch)
        return (jax.tree.map(jnp.add, grads, g), total_sum + total, ce_sum + ce,
                count_sum + count), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero = jnp.zeros((), jnp.float32)
    (grad_sums, total_sum, ce_sum, count), _ = jax.lax.scan(
        add_microbatch, (zeros, zero, zero, zero), split_microbatches(batch, grad_accum_steps))

    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grad_sums)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step never reaches the state, so no checkpoint can hold one; the loop
    # then stops or counts it (llmjax.training.nonfinite). The predicate is known before
    # the update, so XLA fuses the select into it: no extra copy of the state.
    finite = jnp.isfinite(ce_sum) & jnp.isfinite(total_sum) & jnp.isfinite(grad_norm)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                     (params, opt_state), (state.params, state.opt_state))
    metrics = {
        "loss": ce_sum / denom,
        "total_loss": total_sum / denom,
        "grad_norm": grad_norm,
        "param_norm": optax.tree.norm(params),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        task.count_name: count,
        "skipped": 1.0 - finite.astype(jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(trainable: Any, batch: Batch, frozen: Any, *, graphdef: nnx.GraphDef,
              task: Task, merge: Merge, seed: int = 0) -> dict[str, jax.Array]:
    """Sums to aggregate over eval batches: `loss_sum` (cross-entropy) and `tokens` (or
    rows), plus the task's outputs (classification: `predictions` [batch]; masked LM:
    `correct`, a sum)."""
    if task.prepare is not None:
        batch = task.prepare(batch, seed, None)
    model = nnx.merge(graphdef, merge(trainable, frozen))
    _, cross_entropy, count = task.losses(model, batch, 0.0)
    return {"loss_sum": cross_entropy, "tokens": count, **task.eval_outputs(model, batch)}

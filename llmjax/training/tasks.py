"""What a run optimises: the loss and the eval outputs of each `config.task`.

    lm        next-token cross-entropy on a language-model batch (llmjax.data.packing):
              `inputs`, `targets`, `segment_ids`, `positions`, `loss_mask` [batch, length]
    classify  cross-entropy of `model.classify` on a classification batch
              (llmjax.data.classify): `inputs`, `segment_ids`, `positions` [batch, length],
              `labels` and `loss_mask` (1: a real row) [batch]

Losses are sums over the counted tokens (or rows), not means, so microbatches and
shards add up to the full-batch value; the step divides once.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = dict[str, jax.Array]
# (model, batch, z_loss) -> (loss + z-loss, cross-entropy, tokens or rows), each a sum
LossFn = Callable[[nnx.Module, Batch, float], tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    losses: LossFn
    # (model, batch) -> extra per-row eval outputs (e.g. predicted classes [batch])
    eval_outputs: Callable[[nnx.Module, Batch], dict[str, jax.Array]]
    batch_ndims: dict[str, int]  # rank of each batch array: what the batch sharding splits
    # what the loss counts, as the train step logs it: train/loss_tokens (targets in the
    # loss, padding and prompts excluded) or train/examples (rows with a label)
    count_name: str


def lm_losses(model: nnx.Module, batch: Batch, z_loss: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    total = cross_entropy
    if z_loss:
        # Keeps log Z near 0 so the logits do not drift (PaLM's auxiliary loss).
        total = total + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return jnp.sum(total * mask), jnp.sum(cross_entropy * mask), jnp.sum(mask)


def classify_losses(model: nnx.Module, batch: Batch, z_loss: float
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    del z_loss  # a log Z penalty is for vocabulary-sized heads
    logits = model.classify(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    total = jnp.sum(cross_entropy * mask)
    return total, total, jnp.sum(mask)


def predicted_classes(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    logits = model.classify(batch["inputs"], batch["positions"], batch["segment_ids"])
    return {"predictions": jnp.argmax(logits, axis=-1)}


_TOKENS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
TASKS = {
    "lm": Task("lm", lm_losses, lambda model, batch: {}, {k: 2 for k in _TOKENS},
               "loss_tokens"),
    "classify": Task("classify", classify_losses, predicted_classes,
                     {"inputs": 2, "segment_ids": 2, "positions": 2, "labels": 1,
                      "loss_mask": 1}, "examples"),
}

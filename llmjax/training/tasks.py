"""What a run optimises: the loss and the eval outputs of each `config.task`.

    lm        next-token cross-entropy on a language-model batch (llmjax.data.packing):
              `inputs`, `targets`, `segment_ids`, `positions`, `loss_mask` [batch, length]
    classify  cross-entropy of `model.classify` on a classification batch
              (llmjax.data.classify): `inputs`, `segment_ids`, `positions` [batch, length],
              `labels` and `loss_mask` (1: a real row) [batch]
    mlm       cross-entropy of `model.masked_lm_logits` at the masked positions of a
              language-model batch whose `loss_mask` marks the maskable tokens
              (llmjax.data.masked); each step masks it afresh (llmjax.training.masking)

Losses are sums over the counted tokens (or rows), not means, so microbatches and
shards add up to the full-batch value; the step divides once.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from llmjax.training import masking

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
    # (batch, seed, step; None in evaluation) -> the batch the loss sees, drawn afresh each
    # step (masked-LM corruption); None: the batch as it is
    prepare: Callable[[Batch, int, jax.Array | None], Batch] | None = None


def token_losses(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, z_loss: float
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss + z-loss, cross-entropy, counted tokens), sums over the positions where
    loss_mask [batch, length] is 1, of logits [batch, length, vocab] against targets."""
    mask = loss_mask.astype(jnp.float32)
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    total = cross_entropy
    if z_loss:
        # Keeps log Z near 0 so the logits do not drift (PaLM's auxiliary loss).
        total = total + z_loss * jnp.square(jax.nn.logsumexp(logits, axis=-1))
    return jnp.sum(total * mask), jnp.sum(cross_entropy * mask), jnp.sum(mask)


def lm_losses(model: nnx.Module, batch: Batch, z_loss: float
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return token_losses(logits, batch["targets"], batch["loss_mask"], z_loss)


def mlm_losses(model: nnx.Module, batch: Batch, z_loss: float
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    logits = model.masked_lm_logits(batch["inputs"], batch["positions"], batch["segment_ids"])
    return token_losses(logits, batch["targets"], batch["loss_mask"], z_loss)


def masked_correct(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """`correct`: how many masked tokens the model predicts exactly (a sum, like `tokens`)."""
    logits = model.masked_lm_logits(batch["inputs"], batch["positions"], batch["segment_ids"])
    hits = (jnp.argmax(logits, axis=-1) == batch["targets"]) & (batch["loss_mask"] > 0)
    return {"correct": jnp.sum(hits.astype(jnp.float32))}


def _masked(batch: Batch, seed: int, step: jax.Array | None, *,
            masks: masking.Masking) -> Batch:
    return masking.mask_batch(batch, masking.step_key(seed, step, batch), masks)


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
TASKS = {  # mlm needs the run's mask id: `make_task`
    "lm": Task("lm", lm_losses, lambda model, batch: {}, {k: 2 for k in _TOKENS},
               "loss_tokens"),
    "classify": Task("classify", classify_losses, predicted_classes,
                     {"inputs": 2, "segment_ids": 2, "positions": 2, "labels": 1,
                      "loss_mask": 1}, "examples"),
}


def make_task(name: str, mlm: Any, vocab_size: int) -> Task:
    """The task `config.task` names; "mlm" masks with `config.mlm` over `vocab_size` ids."""
    if name != "mlm":
        return TASKS[name]
    prepare = functools.partial(_masked, masks=masking.Masking.from_config(mlm, vocab_size))
    return Task("mlm", mlm_losses, masked_correct, {k: 2 for k in _TOKENS}, "loss_tokens",
                prepare)

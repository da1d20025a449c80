"""Masked-LM training (`config.task = "mlm"`): which tokens a step hides, and how.

BERT's dynamic masking. Of the maskable tokens of a batch (`loss_mask` 1: text, never a
special token or padding; llmjax.data.masked), each is chosen with probability
`mask_rate`; a chosen token becomes the mask token with probability `mask_token_share`,
a uniformly random token with `random_token_share`, and stays itself otherwise. The model
predicts the original token at the chosen positions only.

The draw is a pure function of (seed, step) and the batch: a resumed run masks every
batch as the uninterrupted run did. The whole global batch is masked at once, before it
is split into microbatches, and JAX's partitionable threefry gives the same bits however
the batch is sharded, so the mask is the same for any mesh or `grad_accum_steps`.
Evaluation keys on the batch itself, so each evaluation masks the held-out tokens alike.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

Batch = dict[str, jax.Array]

_TRAIN_STREAM, _EVAL_STREAM = 0, 1  # separate key streams: no eval batch reuses a step's


@dataclasses.dataclass(frozen=True)
class Masking:
    mask_id: int
    vocab_size: int  # random replacements are drawn from [0, vocab_size)
    mask_rate: float = 0.15
    mask_token_share: float = 0.8
    random_token_share: float = 0.1

    @classmethod
    def from_config(cls, mlm: ml_collections.ConfigDict, vocab_size: int) -> "Masking":
        return cls(mask_id=int(mlm.mask_id), vocab_size=vocab_size,
                   mask_rate=float(mlm.mask_rate),
                   mask_token_share=float(mlm.mask_token_share),
                   random_token_share=float(mlm.random_token_share))


def mask_tokens(key: jax.Array, tokens: jax.Array, maskable: jax.Array, masking: Masking
                ) -> tuple[jax.Array, jax.Array]:
    """(corrupted tokens, chosen) for tokens and maskable [batch, length]: `chosen` (bool)
    marks the positions the loss predicts; only maskable ones are ever chosen."""
    choose_key, kind_key, random_key = jax.random.split(key, 3)
    chosen = (jax.random.uniform(choose_key, tokens.shape) < masking.mask_rate) & (maskable > 0)
    kind = jax.random.uniform(kind_key, tokens.shape)
    to_mask = chosen & (kind < masking.mask_token_share)
    to_random = chosen & ~to_mask & (
        kind < masking.mask_token_share + masking.random_token_share)
    random_tokens = jax.random.randint(random_key, tokens.shape, 0, masking.vocab_size,
                                       tokens.dtype)
    corrupted = jnp.where(to_mask, jnp.asarray(masking.mask_id, tokens.dtype), tokens)
    return jnp.where(to_random, random_tokens, corrupted), chosen


def step_key(seed: int, step: jax.Array | None, batch: Batch) -> jax.Array:
    """The key of train step `step` (its state's step count), or with `step` None of an
    eval batch (folded from the batch's tokens: fixed across evaluations)."""
    key = jax.random.key(seed)
    if step is None:
        batch_id = jnp.sum(batch["inputs"], dtype=jnp.int32).astype(jnp.uint32)
        return jax.random.fold_in(jax.random.fold_in(key, _EVAL_STREAM), batch_id)
    return jax.random.fold_in(jax.random.fold_in(key, _TRAIN_STREAM), step)


def mask_batch(batch: Batch, key: jax.Array, masking: Masking) -> Batch:
    """A masked-LM batch (llmjax.data.masked: `inputs` and `loss_mask` = maskable) ->
    corrupted `inputs`, the original tokens as `targets`, `loss_mask` 1 where chosen."""
    inputs, chosen = mask_tokens(key, batch["inputs"], batch["loss_mask"], masking)
    return {**batch, "inputs": inputs, "targets": batch["inputs"],
            "loss_mask": chosen.astype(jnp.int32)}

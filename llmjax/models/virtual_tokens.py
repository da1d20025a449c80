"""Virtual tokens: trained key/value prefixes (prefix tuning) and soft prompts (prompt tuning).

A decoder runs with them as Hugging Face PEFT applies them (PrefixTuning without a
projection, PromptTuning), so an exported adapter gives the same logits:

    prefix  [layers, 2, P, kv_heads, head_dim]: every layer's attention sees P extra keys
            and values before the sequence's own, used as they are (no RoPE, no projection:
            PEFT hands them to the model as an already filled key/value cache).
    prompt  [P, embed]: P embeddings before the token embeddings, run through every layer
            like tokens (positions 0..P-1, causal among themselves); their outputs are
            dropped.

Either way every real token sees all P virtual tokens and its position is offset by P
(position p of a document becomes P + p: where PEFT's model puts it). In a packed row each
document sees the virtual tokens, with its own positions offset by P. The virtual tokens
depend on nothing but themselves (a prompt's tokens attend only to each other), so a
packed row gives each document exactly what it gets alone with the virtual tokens before it.

Attention with virtual tokens takes an explicit mask (`virtual_mask`) and runs through XLA's
`jax.nn.dot_product_attention` (llmjax.models.layers.masked_attention), not the Pallas
kernels; the plain forward is untouched.
"""

import jax
import jax.numpy as jnp
from flax import nnx

METHODS = ("prefix", "prompt")  # the keyword a decoder's __call__ takes them by


def num_virtual(prefix: jax.Array | None, prompt: jax.Array | None) -> int:
    """P, from whichever of the two is given."""
    return prompt.shape[0] if prompt is not None else prefix.shape[2]


def virtual_mask(positions: jax.Array, segment_ids: jax.Array | None, num: int, *,
                 prompt: bool, sliding_window: int = 0) -> jax.Array:
    """[batch, 1, queries, keys] bool: which keys each query sees when `num` virtual keys
    come first.

    positions [batch, length]: the real tokens' positions, already offset by `num`;
    segment_ids [batch, length] or None (one document per row). Keys are the `num`
    virtual ones and then the row's own; queries are the real tokens (prefix) or the
    virtual ones and then the real ones (`prompt`). A query sees a key at or before it
    that is virtual or in its own segment, and within `sliding_window` positions (> 0).
    """
    batch, length = positions.shape
    virtual_positions = jnp.broadcast_to(jnp.arange(num, dtype=positions.dtype), (batch, num))
    key_positions = jnp.concatenate([virtual_positions, positions], axis=1)
    segments = jnp.ones_like(positions) if segment_ids is None else segment_ids
    key_segments = jnp.concatenate([jnp.full((batch, num), -1, segments.dtype), segments], 1)
    keys = jnp.arange(num + length)
    if prompt:
        query_positions, query_segments, queries = key_positions, key_segments, keys
    else:
        query_positions, query_segments, queries = positions, segments, num + jnp.arange(length)
    visible = (keys[None, :] <= queries[:, None])[None] & (
        (keys < num)[None, None, :] | (query_segments[:, :, None] == key_segments[:, None, :]))
    if sliding_window > 0:  # as the model's own window: itself and sliding_window - 1 before
        visible &= query_positions[:, :, None] - key_positions[:, None, :] < sliding_window
    return visible[:, None]


def virtual_inputs(x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, *,
                   prefix: jax.Array | None, prompt: jax.Array | None, sliding_window: int = 0
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(embeddings, positions, mask) of a row with virtual tokens: x [batch, length, embed]
    with the prompt before it ([batch, P + length, embed]; unchanged for a prefix), the
    positions to embed or rotate them by (the real tokens' offset by P), `virtual_mask`."""
    num = num_virtual(prefix, prompt)
    positions = positions + num
    mask = virtual_mask(positions, segment_ids, num, prompt=prompt is not None,
                        sliding_window=sliding_window)
    if prompt is not None:
        batch = x.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(prompt.astype(x.dtype)[None],
                                              (batch, *prompt.shape)), x], axis=1)
        positions = jnp.concatenate([jnp.broadcast_to(
            jnp.arange(num, dtype=positions.dtype), (batch, num)), positions], axis=1)
    return x, positions, mask


def drop_prompt(x: jax.Array, batch: int, num: int) -> jax.Array:
    """x [batch * (P + length), embed] or [batch, P + length, embed] without the P prompt
    rows of each sequence (the same layout, length rows each)."""
    rows = x.reshape(batch, -1, x.shape[-1])[:, num:]
    return rows.reshape(-1, x.shape[-1]) if x.ndim == 2 else rows


class WithVirtualTokens(nnx.Module):
    """A decoder and its trained virtual tokens, called as the decoder is:
    `model(tokens, positions, segment_ids)` -> next-token logits [batch, length, vocab] of
    the real tokens, the virtual ones (`method`: prefix or prompt) before every document."""

    def __init__(self, model: nnx.Module, method: str, virtual: jax.Array):
        if method not in METHODS:
            raise ValueError(f"config.peft.method={method!r}: virtual tokens are one of "
                             f"{METHODS}")
        self.model = model
        self.method = method
        self.virtual = nnx.Param(virtual)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        return self.model(tokens, positions, segment_ids, **{self.method: self.virtual[...]})

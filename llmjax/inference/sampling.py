"""Choosing the next token, with every request's settings as traced arrays.

`choose` samples one token per row of a [rows, vocab] logits batch, each row with its own
temperature (0: greedy), top-k (0: off), top-p (1: off) and random key, so a batch mixing
settings runs the one compiled step. Filtering follows transformers and vLLM: temperature,
then top-k, then top-p (the smallest set of most likely tokens whose probability reaches
top_p). `logprobs` reports the model's own distribution (log_softmax of the logits, before
any temperature or filter), as OpenAI-style APIs do.
"""

import jax
import jax.numpy as jnp


def request_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """One random key per row from its request's seed and the position it samples for,
    so a request's draws depend on neither its slot nor what shares the batch."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def choose(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           keys: jax.Array) -> jax.Array:
    """logits [rows, vocab] float32 -> token ids [rows] int32."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        filtering = jnp.any((top_k > 0) | (top_p < 1.0))
        # Sorting the vocabulary is the costly part: skipped when no row filters.
        sampled = jax.lax.cond(filtering, _sample_filtered, _sample_all, scaled, top_k, top_p,
                               keys)
        return jnp.where(temperature > 0, sampled, greedy)

    # A batch of greedy rows draws no random numbers at all.
    return jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, logits)


def _sample_all(scaled, top_k, top_p, keys):
    del top_k, top_p
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def _sample_filtered(scaled, top_k, top_p, keys):
    # Which tokens each row keeps is decided in rank order; the draw itself is over the
    # vocabulary in its own order, as in _sample_all, so a row that filters nothing draws
    # the same token whichever branch its batch takes.
    order = jnp.argsort(-scaled, axis=-1)
    ranked = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(scaled.shape[-1])[None, :]
    keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the better-ranked tokens
    # The most likely token always stays; rows without a nucleus keep every token (their
    # cumulative sum may pass 1 by rounding before the last one).
    keep &= (top_p[:, None] >= 1.0) | (before < top_p[:, None])
    keep = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)  # vocabulary order
    return _sample_all(jnp.where(keep, scaled, -jnp.inf), top_k, top_p, keys)


def logprobs(logits: jax.Array, tokens: jax.Array, top_n: int,
             want_top: jax.Array | bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logprob of `tokens` [rows], the top_n token ids [rows, top_n] and their logprobs)
    under log_softmax(logits [rows, vocab]). With `want_top` false (a traced flag) the
    top_n are skipped and come back as zeros."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]

    def top(log_probs):
        top_lps, top_ids = jax.lax.top_k(log_probs, top_n)
        return top_ids.astype(jnp.int32), top_lps

    rows = logits.shape[0]
    none = lambda _: (jnp.zeros((rows, top_n), jnp.int32),  # noqa: E731
                      jnp.zeros((rows, top_n), jnp.float32))
    return chosen, *jax.lax.cond(want_top, top, none, log_probs)

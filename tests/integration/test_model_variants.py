"""The layer variants compute the same function as the scanned model: unrolled layers,
and each rematerialisation policy, in the logits and in the gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.models import build_model, model_config

TINY = dict(vocab_size=97, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module")
def model():
    return build_model(model_config(TINY), seed=0)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat_policy="full"),
                                     dict(remat_policy="dots")])
def test_layer_variants_match_scanned_model(model, variant):
    other = build_model(model_config({**TINY, **variant}), seed=0)
    tokens = np.random.default_rng(2).integers(0, 97, (2, 12))
    np.testing.assert_allclose(np.asarray(forward(other, jnp.asarray(tokens))),
                               np.asarray(forward(model, jnp.asarray(tokens))), atol=1e-5)

    def loss(m):
        return jnp.mean(m(jnp.asarray(tokens)) ** 2)

    grad = nnx.jit(nnx.grad(loss))
    g_ref = jax.tree.leaves(grad(model))
    g_var = jax.tree.leaves(grad(other))
    for a, b in zip(g_ref, g_var):
        np.testing.assert_allclose(a, b, atol=1e-6)

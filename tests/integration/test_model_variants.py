"""The layer variants compute the same function as the scanned model: unrolled layers, the
scan rolled one layer an iteration (the default, scan_unroll 0, unrolls it on a CPU), and
each rematerialisation policy, in the logits and in the gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.models import build_model, model_config
from llmjax.models.layers import layers_per_iteration

TINY = dict(vocab_size=97, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@pytest.fixture(scope="module")
def model():
    return build_model(model_config(TINY), seed=0)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(scan_unroll=1),
                                     dict(remat_policy="full"), dict(remat_policy="dots")])
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


def test_scan_unroll_zero_unrolls_every_layer_on_a_cpu_and_is_checked():
    assert jax.default_backend() == "cpu"
    assert layers_per_iteration(0, 8) == 8  # one iteration: no stacked activations to copy
    assert layers_per_iteration(1, 8) == 1 and layers_per_iteration(3, 8) == 3
    assert layers_per_iteration(16, 8) == 8
    with pytest.raises(ValueError, match=r"config.model.scan_unroll=-1 must be >= 0"):
        model_config({**TINY, "scan_unroll": -1})

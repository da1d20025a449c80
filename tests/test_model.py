"""The Llama decoder: causality, segment isolation, scan == unrolled, remat == no remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.models import build_model, model_config

TINY = dict(vocab_size=97, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


def logits_of(model, tokens, positions=None, segment_ids=None):
    return np.asarray(model(jnp.asarray(tokens), positions, segment_ids))


@pytest.fixture(scope="module")
def model():
    return build_model(model_config(TINY), seed=0)


def test_future_tokens_do_not_change_earlier_logits(model):
    tokens = np.random.default_rng(0).integers(0, 97, (2, 16))
    changed = tokens.copy()
    changed[:, 10:] = (changed[:, 10:] + 7) % 97
    a, b = logits_of(model, tokens), logits_of(model, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3  # the change itself is visible


def test_packed_segments_do_not_attend_across_boundary(model):
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 97, 9), rng.integers(0, 97, 7)
    packed = np.concatenate([first, second])[None]
    positions = np.concatenate([np.arange(9), np.arange(7)])[None]
    segments = np.array([[1] * 9 + [2] * 7])
    together = logits_of(model, packed, jnp.asarray(positions), jnp.asarray(segments))
    alone_first = logits_of(model, first[None])
    alone_second = logits_of(model, second[None])
    np.testing.assert_allclose(together[0, :9], alone_first[0], atol=1e-5)
    np.testing.assert_allclose(together[0, 9:], alone_second[0], atol=1e-5)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat_policy="full"),
                                     dict(remat_policy="dots")])
def test_layer_variants_match_scanned_model(model, variant):
    other = build_model(model_config({**TINY, **variant}), seed=0)
    tokens = np.random.default_rng(2).integers(0, 97, (2, 12))
    np.testing.assert_allclose(logits_of(other, tokens), logits_of(model, tokens), atol=1e-5)

    def loss(m):
        return jnp.mean(m(jnp.asarray(tokens)) ** 2)

    g_ref = jax.tree.leaves(nnx.grad(loss)(model))
    g_var = jax.tree.leaves(nnx.grad(loss)(other))
    for a, b in zip(g_ref, g_var):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_stays_close_to_fp32(model):
    bf16 = build_model(model_config({**TINY, "dtype": "bfloat16"}), seed=0)
    tokens = np.random.default_rng(3).integers(0, 97, (2, 12))
    out = logits_of(bf16, tokens)
    assert out.dtype == np.float32
    assert np.abs(out - logits_of(model, tokens)).max() < 0.05


def test_bad_model_config_names_the_key():
    with pytest.raises(ValueError, match="config.model.num_kv_heads"):
        model_config({**TINY, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="config.model.hidden"):
        model_config({**TINY, "hidden": 3})

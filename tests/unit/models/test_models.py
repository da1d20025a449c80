"""The models: causality, segment isolation, bf16 compute, config errors, and the same call
API for token logits and classification whatever the config (scan == unrolled and
remat == no remat: tests/integration/test_model_variants.py, compile-heavy)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.models import build_model, model_config

TINY = dict(vocab_size=97, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64)


@nnx.jit
def forward(model, tokens, positions=None, segment_ids=None):
    return model(tokens, positions, segment_ids)


@nnx.jit
def classify(model, tokens, segment_ids):
    return model.classify(tokens, None, segment_ids)


def logits_of(model, tokens, positions=None, segment_ids=None):
    return np.asarray(forward(model, jnp.asarray(tokens), positions, segment_ids))


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


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_classify_and_token_logits_do_not_depend_on_the_config(family):
    fields = {"llama": TINY,
              "gpt2": dict(family="gpt2", vocab_size=97, embed_dim=32, num_layers=1,
                           num_heads=4, max_positions=16),
              "bert": dict(family="bert", vocab_size=97, embed_dim=32, num_layers=1,
                           num_heads=4, mlp_dim=64, max_positions=16)}[family]
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 12)))
    segments = jnp.asarray(np.array([[1] * 12, [1] * 8 + [0] * 4]))
    model = build_model(model_config({**fields, "num_labels": 3}), seed=0)
    assert classify(model, tokens, segments).shape == (2, 3)
    if family == "bert":
        assert nnx.jit(lambda m, t: m.hidden_states(t))(model, tokens).shape == (2, 12, 32)
        return
    # A decoder with a classifier head still gives next-token logits, the same as without.
    plain = build_model(model_config(fields), seed=0)
    np.testing.assert_array_equal(logits_of(model, tokens), logits_of(plain, tokens))
    assert logits_of(model, tokens).shape == (2, 12, 97)
    with pytest.raises(ValueError, match="num_labels"):
        classify(plain, tokens, segments)
    # The classifier reads each row's last real token: padding after it changes nothing.
    changed = tokens.at[1, 8:].set(5)
    np.testing.assert_allclose(np.asarray(classify(model, changed, segments)),
                               np.asarray(classify(model, tokens, segments)), atol=1e-6)

"""llmjax.models.weights.dense: the plain product for plain weights, and for w8a8 weights
(int8 values, a scale per output channel, INT8_INPUTS) the int8 x int8 product of rows
quantized to int8, whatever the number of rows."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.inference.quantize import quantize_model
from llmjax.models.weights import dense

RNG = np.random.default_rng(0)


class OneWeight(nnx.Module):
    def __init__(self, w, axes):  # as llmjax.models.layers.param makes one
        self.w = nnx.Param(jnp.asarray(w), out_sharding=axes, eager_sharding=False)


def variable(w, axes, w8a8=False):
    """`w` as a model holds it, or as quantize mode w8a8 leaves it."""
    module = OneWeight(w, axes)
    return (quantize_model(module, "w8a8") if w8a8 else module).w


CASES = [  # (weight shape, logical axes, in_dims, transposed)
    ((16, 4, 8), ("embed", "heads", "head_dim"), 1, False),
    ((4, 8, 16), ("heads", "head_dim", "embed"), 2, False),
    ((16, 24), ("embed", "mlp"), 1, False),
    ((40, 16), ("vocab", "embed"), 1, True),  # a tied embedding as the output head
]


@pytest.mark.parametrize("shape, axes, in_dims, transposed", CASES)
def test_plain_weights_are_the_plain_product(shape, axes, in_dims, transposed):
    w = RNG.standard_normal(shape).astype(np.float32)
    matrix = w.T if transposed else w.reshape(int(np.prod(shape[:in_dims])), -1)
    x = RNG.standard_normal((3, 5, matrix.shape[0])).astype(np.float32)
    out = dense(jnp.asarray(x), variable(w, axes), jnp.float32, in_dims=in_dims,
                transposed=transposed)
    np.testing.assert_allclose(np.asarray(out), x @ matrix, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape, axes, in_dims, transposed", CASES)
def test_w8a8_is_the_int8_product_of_rows_quantized_to_int8(shape, axes, in_dims, transposed):
    w = RNG.standard_normal(shape).astype(np.float32)
    v = variable(w, axes, w8a8=True)
    q = np.asarray(v.get_value().qvalue, np.int64)
    q = q.T if transposed else q.reshape(int(np.prod(shape[:in_dims])), -1)
    scale = np.asarray(v.get_value().scale).reshape(-1)
    x = RNG.standard_normal((6, q.shape[0])).astype(np.float32)
    row_scale = np.abs(x).max(axis=1, keepdims=True) / 127
    expected = (np.round(x / row_scale).astype(np.int64) @ q) * row_scale * scale
    out = np.asarray(dense(jnp.asarray(x), v, jnp.float32, in_dims=in_dims,
                           transposed=transposed))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Within int8's rounding of the float product, and each row as it is alone.
    matrix = w.T if transposed else w.reshape(q.shape)
    assert np.abs(out - x @ matrix).max() < 0.05 * np.abs(x @ matrix).max()
    for i in range(len(x)):
        alone = dense(jnp.asarray(x[i:i + 1]), v, jnp.float32, in_dims=in_dims,
                      transposed=transposed)
        np.testing.assert_allclose(np.asarray(alone)[0], out[i], rtol=1e-6, atol=1e-6)

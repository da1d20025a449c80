"""How a model reads its weights: in the compute dtype, dequantized where they are stored
as int8, and multiplied.

    weight(variable, dtype)            the value, dequantized
    lookup(variable, ids, dtype)       rows of an embedding table (only those dequantized)
    dense(x, variable, dtype, ...)     x times a weight matrix

Weights quantized by llmjax.inference.quantize are qwix QArrays (int8 values, a float
scale per output channel). Mode "int8" dequantizes them where they are read, so every
product runs in the compute dtype; mode "w8a8" also marks each one with INT8_INPUTS, and
`dense` then quantizes its input too and multiplies int8 by int8 (see `dense`).
Training never sees a QArray: for a plain array these are the plain reshape and product.
"""

import math

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

INT8_INPUTS = "int8_inputs"  # variable metadata: dense() quantizes what it multiplies


def weight(variable: nnx.Variable, dtype: jnp.dtype) -> jax.Array:
    """A weight's value in the compute dtype. Weights stored as int8 with scales (a qwix
    QArray, llmjax.inference.quantize) are dequantized here."""
    value = variable.get_value()
    if isinstance(value, qwix.QArray):
        value = qwix.dequantize(value)
    return value.astype(dtype)


def lookup(variable: nnx.Variable, ids: jax.Array, dtype: jnp.dtype | None = None
           ) -> jax.Array:
    """Rows `ids` of an embedding table [rows, dim], in `dtype` (default: the table's); an
    int8 table dequantizes only the rows it gives."""
    value = variable.get_value()
    rows = (qwix.dequantize(value[ids]) if isinstance(value, qwix.QArray)
            else jnp.take(value, ids, axis=0))
    return rows if dtype is None else rows.astype(dtype)


def dense(x: jax.Array, variable: nnx.Variable, dtype: jnp.dtype, *, in_dims: int = 1,
          transposed: bool = False) -> jax.Array:
    """x [..., in] times a weight whose first `in_dims` dims are its input and the rest its
    output ([embed, heads, head_dim], [heads, head_dim, embed], [embed, mlp]) -> [...,
    out] (the output dims flattened), in `dtype`. `transposed`: the weight is [out, in]
    (an embedding table as the output head).

    A weight marked with INT8_INPUTS (quantize mode "w8a8") multiplies each row of x
    quantized to int8 (absmax, one scale per row) and sums in int32, then scales by both
    scales. On XLA:CPU that product is several times faster than the fp32 one, while
    dequantizing the weight first (mode "int8") is slower than fp32 itself.
    """
    value = variable.get_value()
    if isinstance(value, qwix.QArray) and variable.get_metadata().get(INT8_INPUTS):
        return _int8_product(x, value, in_dims, transposed).astype(dtype)
    w = weight(variable, dtype)
    if transposed:
        return x @ w.T
    return x @ w.reshape(math.prod(w.shape[:in_dims]), -1)


def _int8_product(x: jax.Array, value: qwix.QArray, in_dims: int, transposed: bool
                  ) -> jax.Array:
    q = value.qvalue
    if transposed:  # [out, in]: contract the last dim
        q, contract = q.reshape(q.shape[0], -1), 1
    else:
        q, contract = q.reshape(math.prod(q.shape[:in_dims]), -1), 0
    scale = value.scale.reshape(-1)  # one per output channel (1s on the input dims)
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    row_scale = jnp.max(jnp.abs(rows), axis=-1, keepdims=True) / 127.0
    row_scale = jnp.where(row_scale > 0, row_scale, 1.0)
    x_q = jnp.round(rows / row_scale).astype(jnp.int8)
    num_rows = rows.shape[0]
    if num_rows == 1:  # one row takes a slow path in XLA:CPU (~18x); two rows the fast kernel
        x_q = jnp.pad(x_q, ((0, 1), (0, 0)))
    sums = jax.lax.dot_general(x_q, q, (((1,), (contract,)), ((), ())),
                               preferred_element_type=jnp.int32)[:num_rows]
    out = sums.astype(jnp.float32) * row_scale * scale
    return out.reshape(*x.shape[:-1], -1)

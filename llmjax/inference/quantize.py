"""int8 weights: matrices stored as int8 with one scale per output channel.

    model = quantize.quantize_model(model, "int8")   # or "w8a8"

Every weight matrix and embedding table becomes a qwix QArray (int8 values, float scales:
absmax per output channel, and per layer of a stacked block); norms and biases stay as
they are, and the KV cache keeps the compute dtype. The same modules run
(llmjax.models.weights):
    int8   weight-only: a weight is dequantized where it is read, and every product runs
           in the compute dtype (a quarter of the weight bytes; on XLA:CPU slower than
           fp32: it converts every weight to float at every step)
    w8a8   the input of each product is quantized too (int8, absmax per row, at run
           time) and multiplied int8 by int8 with int32 sums: on XLA:CPU several times
           faster than fp32 for a few rows at once (decoding), at some cost in accuracy

Why qwix: it is Google's maintained JAX quantization library (PTQ, QAT, NNX support,
int8/int4/fp8 numerics) and its QArray is an NNX data type, so a quantized model stays an
ordinary module to split, shard and jit. Its automatic PTQ provider intercepts the ops a
module calls on its own parameters; ours reshape and stack theirs (einsum weights
[embed, heads, head_dim], layers on a leading axis under scan), so we quantize the stored
weights with qwix's `quantize` and read them back with its `dequantize` instead. aqtp
(the older AQT) offers the same numerics through Linen-only injection.
"""

from typing import Any

import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from llmjax.models.weights import INT8_INPUTS

QUANTIZE_MODES = ("none", "int8", "w8a8")
# First axes of tables that are looked up by row (and, tied, used as the output head).
_TABLES = ("vocab", "positions", "types")


def output_axes(axes: tuple[str | None, ...]) -> tuple[int, ...]:
    """The dims of a weight with logical `axes` that get their own scale: its layers axis
    and its output dims (a table's rows; the dims after a leading `embed` input; else the
    last dim, as in [heads, head_dim, embed] or [mlp, embed])."""
    lead = 1 if axes and axes[0] == "layers" else 0
    rest = axes[lead:]
    if rest[0] in _TABLES:
        out = (lead,)
    elif rest[0] == "embed":
        out = tuple(range(lead + 1, len(axes)))
    else:
        out = (len(axes) - 1,)
    return (*range(lead), *out)


def quantize_model(model: nnx.Module, mode: str) -> nnx.Module:
    """The model with its matrices in `mode` ("int8", "w8a8"; "none": unchanged), on the
    devices and shardings they had."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if mode == "none":
        return model
    graphdef, state = nnx.split(nnx.clone(model))  # `model` itself is left as it is
    for path, variable in nnx.to_flat_state(state):
        name, value = str(path[-1]), variable.get_value()
        axes = tuple(getattr(variable, "out_sharding", None) or ())
        if name == "scale" or name == "bias" or name.endswith("_bias") or value.ndim < 2:
            continue  # norm scales and biases (llmjax.models.layers names them so): kept
        variable.set_value(_int8(value, output_axes(axes)))
        if mode == "w8a8":
            variable.set_metadata(INT8_INPUTS, True)
    return nnx.merge(graphdef, state)


def _int8(value: jax.Array, channelwise_axes: tuple[int, ...]) -> Any:
    quantize = jax.jit(lambda x: qwix.quantize(x, jnp.int8, channelwise_axes=channelwise_axes))
    return quantize(value)


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of the model's parameters as stored (int8 values and their scales)."""
    return array_bytes(nnx.state(model, nnx.Param))


def array_bytes(tree: Any) -> int:
    """Bytes of the arrays in `tree` as stored (a QArray: its int8 values and scales)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

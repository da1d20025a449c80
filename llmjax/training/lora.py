"""Which parameters train, and LoRA: low-rank adapters merged into the weights in the step.

`split_trainable` is the one place that decides what a run trains. Without LoRA
(`config.lora.rank = 0`) everything trains. With LoRA the trainable tree is

    {"adapters": {"blocks": {"attn": {"q": {"a": [layers, in, rank],
                                            "b": [layers, rank, out]}, ...}}},
     "heads": {"score": [embed, num_labels], ...}}

(nested like the parameters: Orbax keys must not hold "/")

for the parameters whose path ("blocks/attn/q") fully matches `config.lora.targets`
(adapters) or `config.lora.trainable` (trained in full, e.g. a classification head);
every other parameter is frozen: it goes through the step as an argument that is
neither differentiated nor donated nor updated, and has no optimizer state.
`model_params` builds the weights the model runs with, W + (alpha / rank) * A @ B,
inside the jitted step; the same function merges the adapters for export (and
llmjax.hf.peft writes the adapters alone in the PEFT layout).

Our attention and MLP weights are raw einsum parameters ([embed, heads, head_dim]),
not nnx.Linear modules, so nnx.LoRA (which wraps a Linear) does not fit; the adapters
are plain arrays instead, which also keeps the train step a pure function. A weight's
input dimensions are its leading `embed` axis, or all but its last axis otherwise
(o: [heads, head_dim] -> embed; down: mlp -> embed), as in a Hugging Face Linear.
"""

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util


def enabled(lora_cfg: Any) -> bool:
    return int(lora_cfg.rank) > 0


def _flat(tree: dict) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def _unflat(flat: dict[str, Any]) -> dict:
    return traverse_util.unflatten_dict(flat, sep="/")


def _matches(pattern: str, path: str) -> bool:
    return bool(pattern) and re.fullmatch(pattern, path) is not None


def input_dims(axes: tuple[str | None, ...]) -> int:
    """How many leading (per-layer) dims of a weight with logical `axes` are its input."""
    axes = tuple(a for a in axes if a != "layers")
    return 1 if axes[0] == "embed" else len(axes) - 1


def logical_axes(abstract_params: nnx.State) -> dict[str, tuple]:
    """path -> logical axis names, from an (abstract) nnx.State of parameters (read from
    the variables' metadata: get_partition_spec answers in mesh axes under active rules)."""
    return {"/".join(map(str, path)): tuple(variable.out_sharding)
            for path, variable in nnx.to_flat_state(abstract_params)}


def init_adapters(params: dict, axes: dict[str, tuple], lora_cfg: Any, seed: int) -> dict:
    """{"a", "b"} for each parameter matching `lora_cfg.targets`, nested by its path.

    A is uniform in +-1/sqrt(fan_in) and B is zero (as in PEFT), so a fresh adapter
    changes nothing. Stacked block weights get stacked adapters ([layers, ...]).
    Raises ValueError if the pattern matches no matrix.
    """
    rank = int(lora_cfg.rank)
    adapters = {}
    key = jax.random.key(seed)
    for path, w in sorted(_flat(params).items()):
        if not _matches(lora_cfg.targets, path) or w.ndim < 2:
            continue
        stacked = axes[path][0] == "layers"
        lead = w.shape[:1] if stacked else ()
        shape = w.shape[1:] if stacked else w.shape
        n_in = input_dims(axes[path])
        fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        key, sub = jax.random.split(key)
        bound = 1.0 / math.sqrt(fan_in)
        adapters[f"{path}/a"] = jax.random.uniform(sub, (*lead, fan_in, rank), jnp.float32,
                                                   -bound, bound)
        adapters[f"{path}/b"] = jnp.zeros((*lead, rank, fan_out), jnp.float32)
    if not adapters:
        raise ValueError(f"config.lora.targets={lora_cfg.targets!r} matches no weight matrix; "
                         f"parameter paths: {', '.join(sorted(_flat(params))[:12])}, ...")
    return _unflat(adapters)


def adapter_items(adapters: dict) -> dict[str, dict[str, Any]]:
    """{parameter path: {"a": A, "b": B}} from the nested adapters."""
    items: dict[str, dict[str, Any]] = {}
    for key, x in _flat(adapters).items():
        path, _, name = key.rpartition("/")
        items.setdefault(path, {})[name] = x
    return items


def split_trainable(params: dict, axes: dict[str, tuple], lora_cfg: Any,
                    seed: int) -> tuple[Any, dict | None]:
    """(trainable tree, frozen params or None): see the module docstring."""
    if not enabled(lora_cfg):
        return params, None
    heads = _unflat({path: w for path, w in _flat(params).items()
                     if _matches(lora_cfg.trainable, path)})
    return {"adapters": init_adapters(params, axes, lora_cfg, seed), "heads": heads}, params


def delta(adapter: dict, shape: tuple[int, ...], scale: float) -> jax.Array:
    """scale * A @ B reshaped to a weight of `shape` (batched over a stacked layers axis)."""
    return (scale * jnp.matmul(adapter["a"], adapter["b"])).reshape(shape)


def model_params(trainable: Any, frozen: dict | None, lora_cfg: Any) -> dict:
    """The parameters the model runs with: merged adapters, trained heads, frozen rest."""
    if frozen is None:
        return trainable
    scale = float(lora_cfg.alpha) / int(lora_cfg.rank)
    flat = dict(_flat(frozen))
    flat.update(_flat(trainable["heads"]))
    for path, adapter in adapter_items(trainable["adapters"]).items():
        w = flat[path]
        flat[path] = (w + delta(adapter, w.shape, scale).astype(w.dtype)).astype(w.dtype)
    return _unflat(flat)


def count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def trainable_report(trainable: Any, frozen: dict | None) -> tuple[int, int, float]:
    """(trainable count, total count, trainable fraction); adapters count as extra."""
    n = count(trainable)
    total = count(frozen) + count(trainable["adapters"]) if frozen is not None else n
    return n, total, n / max(total, 1)

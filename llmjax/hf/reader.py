"""Reading Hugging Face checkpoints into llmjax models: from_pretrained and its parts.

    model = llmjax.hf.from_pretrained("path/to/hf_dir")   # a Flax NNX module, sharded
    logits = model(tokens)               # [batch, length] ids -> [batch, length, vocab]

Each family has one adapter (llmjax.hf.adapters): the HF model types it reads, its
config both ways, and a table of `Rule`s, one per parameter. Loading places each
parameter on its sharding as it reads it: every device gets only its slice, read from
safetensors as that slice (`jax.make_array_from_callback`; for stacked layers, that
slice of each layer's tensor), so a process holds one device's slice of one parameter at
a time on the host and an 8B model never needs a full host copy.

Safety: only safetensors files are read unless `allow_pickle=True` (`--allow_pickle`),
since pickle-based `.bin` weights can run code when loaded.
"""

import glob
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # importing it lets numpy (and safetensors) read bfloat16
import numpy as np
from absl import logging
from flax import nnx, traverse_util
from safetensors import safe_open

from llmjax.hf.adapters import ADAPTERS, Adapter, Rule, layer_name
from llmjax.models import ModelConfig, build_model, family_of, model_config
from llmjax.parallel import sharding

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def read_hf_config(directory: str) -> tuple[Adapter, dict[str, Any], Any]:
    """(adapter, our model_config fields, the transformers config) of an HF directory."""
    import transformers

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: give a directory written by transformers' "
                                "save_pretrained (config.json + model.safetensors)")
    with open(path) as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    adapter = next((a for a in ADAPTERS.values() if model_type in a.model_types), None)
    if adapter is None:
        supported = sorted(t for a in ADAPTERS.values() for t in a.model_types)
        raise ValueError(f"{path}: model_type {model_type!r} (architectures "
                         f"{raw.get('architectures')}) is not supported; llmjax reads "
                         f"{', '.join(supported)}")
    for arch in raw.get("architectures") or []:
        if arch not in adapter.architectures:
            raise ValueError(f"{path}: architecture {arch} is not supported; llmjax reads "
                             f"{', '.join(adapter.architectures)}")
    hf_config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    return adapter, adapter.config_from_hf(hf_config), hf_config


class HFTensors:
    """The tensors of an HF directory by name: shapes from the file headers, slices on demand."""

    def __init__(self, directory: str, allow_pickle: bool = False):
        self.directory = directory
        self.files: dict[str, Any] = {}  # tensor name -> open safetensors file / tensor dict
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
            paths = [os.path.join(directory, n) for n in names]
        else:
            paths = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        for path in paths:
            handle = safe_open(path, framework="np")
            for name in handle.keys():
                self.files[name] = handle
        if not paths:
            pickles = sorted(p for pattern in PICKLE_PATTERNS
                             for p in glob.glob(os.path.join(directory, pattern)))
            if not pickles:
                raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
            if not allow_pickle:
                raise ValueError(
                    f"{directory} holds only pickle weights ({os.path.basename(pickles[0])}), "
                    "which can run arbitrary code when loaded; convert them to safetensors, or "
                    "if you trust their source pass allow_pickle=True (CLI: --allow_pickle)")
            for path in pickles:
                for name, tensor in _load_pickle(path).items():
                    self.files[name] = {name: tensor}

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self.files[name]
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        handle = self.files[name]
        if isinstance(handle, dict):
            return _torch_to_numpy(handle[name][index])
        try:
            return handle.get_slice(name)[index]
        except TypeError as e:  # a dtype numpy does not know (float8, ...)
            raise ValueError(f"{self.directory}: tensor {name} has dtype "
                             f"{handle.get_slice(name).get_dtype()}, which llmjax cannot "
                             "read; convert the checkpoint to float32 or bfloat16") from e


def _load_pickle(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading {path} needs PyTorch: pip install torch") from None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _torch_to_numpy(tensor: Any) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def _resolve(tensors: HFTensors, adapter: Adapter, name: str) -> str | None:
    """The name under which `tensors` holds HF tensor `name`: as saved by a *ForX model, by
    the bare base model (no prefix), or with BERT's old LayerNorm gamma/beta."""
    candidates = [name]
    if name.startswith(adapter.prefix):
        candidates.append(name.removeprefix(adapter.prefix))
    for candidate in list(candidates):
        if "LayerNorm." in candidate:
            candidates.append(re.sub(r"\.weight$", ".gamma", re.sub(r"\.bias$", ".beta",
                                                                    candidate)))
    return next((c for c in candidates if c in tensors.files), None)


def load_hf_params(tensors: HFTensors, adapter: Adapter, cfg: ModelConfig,
                   shardings: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Our parameters (a pure dict like `nnx.to_pure_dict`) from HF tensors, each placed
    with `shardings` (a matching pure dict of NamedShardings) as it is read.

    Raises ValueError naming the tensor when one is missing or has the wrong shape.
    """
    abstract = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(jax.eval_shape(
        lambda: build_model(cfg, seed)))[1]), sep="/")
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/")
    rules = {r.ours: r for r in adapter.rules(cfg)}
    num_layers = cfg.num_layers
    params, missing, used = {}, [], set()
    for path, target in abstract.items():
        rule = rules[path]
        stacked = path.startswith("blocks/")
        layer_shape = target.shape[1:] if stacked else target.shape
        names = []
        for layer in range(num_layers) if stacked else [None]:
            name = _resolve(tensors, adapter, layer_name(rule, layer))
            if name is None:
                break
            expected, found = rule.hf_shape(layer_shape), tensors.shape(name)
            if found != expected:
                raise ValueError(
                    f"{tensors.directory}: tensor {name} has shape {found}, but config.json "
                    f"({_describe(cfg)}) needs {expected} for {path}; the weights and "
                    "config.json do not belong together")
            names.append(name)
        if len(names) < (num_layers if stacked else 1):
            if path in adapter.optional:
                missing.append(path)
                continue
            absent = layer_name(rule, len(names) if stacked else None)
            raise ValueError(f"{tensors.directory}: no tensor {absent!r} (needed for {path}); "
                             f"is this a {family_of(cfg)} checkpoint?")
        used.update(names)
        params[path] = _make_array(tensors, rule, names, target, flat_shardings[path], stacked)
    if missing:
        logging.warning("%s has no %s: initialised afresh (train before use)",
                        tensors.directory, ", ".join(missing))
        fresh = jax.jit(lambda: {p: traverse_util.flatten_dict(nnx.to_pure_dict(nnx.split(
            build_model(cfg, seed))[1]), sep="/")[p] for p in missing},
            out_shardings={p: flat_shardings[p] for p in missing})()
        params.update(fresh)
    unused = [n for n in tensors.files if n not in used and not re.search(adapter.ignored, n)]
    if unused:
        logging.warning("%s: %d tensors not used by llmjax, e.g. %s", tensors.directory,
                        len(unused), ", ".join(sorted(unused)[:3]))
    return traverse_util.unflatten_dict(params, sep="/")


def _describe(cfg: ModelConfig) -> str:
    return (f"{family_of(cfg)}, embed_dim={cfg.embed_dim}, num_layers={cfg.num_layers}, "
            f"vocab_size={cfg.vocab_size}")


def _make_array(tensors: HFTensors, rule: Rule, names: list[str], target: Any,
                sharding_: jax.sharding.Sharding, stacked: bool) -> jax.Array:
    """One parameter as a global array; each device's callback reads only its slice of
    the HF tensor `names[0]`, or if `stacked` of each layer's tensor `names[i]`."""
    last: list[Any] = [None, None]

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, target.shape))
        if last[0] == key:  # devices holding the same slice (replicas) share one read
            return last[1]
        last[:] = [None, None]
        if not stacked:
            block = rule.read(lambda ix: tensors.read(names[0], ix), target.shape, index)
            block = block.astype(target.dtype)
        else:
            layers = range(*index[0].indices(len(names)))
            block = None
            for n, i in enumerate(layers):  # filled layer by layer: no second copy
                piece = rule.read(lambda ix, i=i: tensors.read(names[i], ix), target.shape[1:],
                                  index[1:])
                if block is None:
                    block = np.empty((len(layers), *piece.shape), target.dtype)
                block[n] = piece
        last[:] = [key, block]
        return block

    return jax.make_array_from_callback(target.shape, sharding_, callback)


def from_pretrained(path: str, *, mesh: jax.sharding.Mesh | None = None,
                    rules: str | Sequence[Any] = "fsdp", allow_pickle: bool = False,
                    **overrides: Any) -> nnx.Module:
    """The Flax NNX model saved by transformers in directory `path`, sharded over `mesh`
    (default: every device, FSDP) as it is read.

    Decoders: `model(tokens [batch, length], positions=None, segment_ids=None)` ->
    logits [batch, length, vocab]; `model.classify(...)` -> [batch, num_labels] for BERT and
    decoders with `num_labels`. For padded batches pass
    the HF attention_mask as `segment_ids` (and, for left padding, positions counting
    from the first real token; see `padding_inputs`). `overrides` replace model config
    fields: dtype="bfloat16" (compute), param_dtype, scan_layers, remat_policy, and for
    BERT num_labels (a new classifier). Only safetensors are read unless `allow_pickle`.
    """
    adapter, fields, _ = read_hf_config(path)
    cfg = model_config({**fields, **overrides})
    mesh, rules = sharding.placement(mesh, rules)
    graphdef, abstract = nnx.split(jax.eval_shape(lambda: build_model(cfg, 0)))
    shardings = sharding.param_shardings(abstract, mesh, rules)
    params = load_hf_params(HFTensors(path, allow_pickle), adapter, cfg, shardings)
    return nnx.merge(graphdef, params)


def padding_inputs(attention_mask: Any) -> tuple[jax.Array, jax.Array]:
    """(positions, segment_ids) [batch, length] for a batch padded on either side, from its
    HF `attention_mask` (1 = token, 0 = padding): positions count from each row's first
    token, as transformers' generate does."""
    mask = jnp.asarray(attention_mask, jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return positions, mask

"""Hugging Face models in and out of llmjax: from_pretrained, save_pretrained and a CLI.

Python, mirroring transformers:

    model = llmjax.hf.from_pretrained("path/to/hf_dir")   # a Flax NNX module, sharded
    logits = model(tokens)               # [batch, length] ids -> [batch, length, vocab]
    llmjax.hf.save_pretrained(model, "out_dir", tokenizer="path/to/hf_dir")

Command line:

    python -m llmjax.hf import HF_DIR OUT        # HF weights -> an llmjax checkpoint
    python -m llmjax.hf export WORKDIR_OR_CHECKPOINT OUT   # llmjax -> HF (transformers loads it)

`import` writes a workdir-shaped directory: OUT/config.json (an llmjax config whose
`model` is the HF architecture), OUT/checkpoints/0/ (Orbax; parameters only) and
OUT/tokenizer/ (the tokenizer files). `export` reads any llmjax workdir (or one
checkpoint in it, WORKDIR/checkpoints/STEP) and writes config.json, model.safetensors
(or shards and model.safetensors.index.json) and the tokenizer. A training config
starts from HF weights with `--config.init_from=HF_DIR` (or an imported directory,
or another run's workdir): its architecture then comes from there, its weights too.

How it works. Each family has one small adapter (llmjax/hf_adapters.py): the HF model
types it reads, its config both ways, and a table of `Rule`s, one per parameter: our
path, the HF tensor name and an einops-style layout pattern (HF Linear weights are
[out, in], ours [in, ...]). The adapters sit apart from the model files, so that
llmjax.models knows nothing of Hugging Face names and all of that naming is in one
file. Loading places each parameter on its sharding as it reads it: every device gets
only its slice, read from safetensors as that slice (`jax.make_array_from_callback`;
for stacked layers, that slice of each layer's tensor), so a process holds one
device's slice of one parameter at a time on the host and an 8B model never needs a
full host copy. Saving gathers one HF tensor at a time and writes shards of at most
`max_shard_size` bytes.

Safety: only safetensors files are read unless `allow_pickle=True` (`--allow-pickle`),
since pickle-based `.bin` weights can run code when loaded.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes  # importing it lets numpy (and safetensors) read bfloat16
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from llmjax import checkpoint, sharding
from llmjax.config import base_config, to_json
from llmjax.hf_adapters import ADAPTERS, Adapter, Rule, layer_name
from llmjax.models import ModelConfig, build_model, family_of, model_config
from llmjax.models.layers import DTYPES

# Files a tokenizer may consist of; copied along on import and export, with
# generation_config.json (its special token ids for generation).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
CARRIED_FILES = (*TOKENIZER_FILES, "generation_config.json")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# model_config fields that say how to run a model, not what it is: `init_from` keeps
# the training config's values for these.
RUNTIME_FIELDS = ("param_dtype", "dtype", "scan_layers", "remat_policy", "attention_impl")


# --- Reading HF checkpoints --------------------------------------------------------------------

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
                    "if you trust their source pass allow_pickle=True (CLI: --allow-pickle)")
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


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_hf_params(tensors: HFTensors, adapter: Adapter, cfg: ModelConfig,
                   shardings: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Our parameters (a pure dict like `nnx.to_pure_dict`) from HF tensors, each placed
    with `shardings` (a matching pure dict of NamedShardings) as it is read.

    Raises ValueError naming the tensor when one is missing or has the wrong shape.
    """
    abstract = _flatten(nnx.to_pure_dict(nnx.split(jax.eval_shape(
        lambda: build_model(cfg, seed)))[1]))
    flat_shardings = _flatten(shardings)
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
        fresh = jax.jit(lambda: {p: _flatten(nnx.to_pure_dict(nnx.split(
            build_model(cfg, seed))[1]))[p] for p in missing},
            out_shardings={p: flat_shardings[p] for p in missing})()
        params.update(fresh)
    unused = [n for n in tensors.files if n not in used and not re.search(adapter.ignored, n)]
    if unused:
        logging.warning("%s: %d tensors not used by llmjax, e.g. %s", tensors.directory,
                        len(unused), ", ".join(sorted(unused)[:3]))
    return _unflatten(params)


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


def _placement(mesh: jax.sharding.Mesh | None, rules: str | Sequence[Any]
               ) -> tuple[jax.sharding.Mesh, Sequence[Any]]:
    """The mesh (default: every device on the fsdp axis) and logical-axis rules (a preset
    name of llmjax.sharding or a rules table) that parameters are placed with."""
    if mesh is None:
        mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    return mesh, sharding.logical_axis_rules(rules) if isinstance(rules, str) else rules


def from_pretrained(path: str, *, mesh: jax.sharding.Mesh | None = None,
                    rules: str | Sequence[Any] = "fsdp", allow_pickle: bool = False,
                    **overrides: Any) -> nnx.Module:
    """The Flax NNX model saved by transformers in directory `path`, sharded over `mesh`
    (default: every device, FSDP) as it is read.

    Decoders: `model(tokens [batch, length], positions=None, segment_ids=None)` ->
    logits [batch, length, vocab]; BERT: -> [batch, num_labels]. For padded batches pass
    the HF attention_mask as `segment_ids` (and, for left padding, positions counting
    from the first real token; see `padding_inputs`). `overrides` replace model config
    fields: dtype="bfloat16" (compute), param_dtype, scan_layers, remat_policy, and for
    BERT num_labels (a new classifier). Only safetensors are read unless `allow_pickle`.
    """
    adapter, fields, _ = read_hf_config(path)
    cfg = model_config({**fields, **overrides})
    mesh, rules = _placement(mesh, rules)
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


# --- Writing HF checkpoints --------------------------------------------------------------------

def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give bytes or e.g. '5GB', '500MB'")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2]])


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:  # several processes: every one takes part in the gather
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(model: nnx.Module, path: str, *, tokenizer: Any = None,
                    dtype: str | None = None, max_shard_size: int | str = "5GB") -> None:
    """Write `model` (from `from_pretrained`, or any llmjax model) as transformers does:
    config.json and model.safetensors, or model-0000k-of-0000n.safetensors shards of at
    most `max_shard_size` with model.safetensors.index.json.

    `tokenizer` (saved alongside; its bos/eos/pad ids go into config.json): a directory
    holding one (its files are copied), a transformers tokenizer, or an llmjax Tokenizer.
    `dtype`: "bfloat16" etc. for the written tensors (default: the parameters' dtype).
    One HF tensor is gathered to the host at a time; in a multi-process run every
    process must call this, and process 0 writes.
    """
    import transformers

    cfg = model.cfg
    adapter = ADAPTERS[family_of(cfg)]
    params = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    np_dtype = np.dtype(DTYPES[dtype or cfg.param_dtype])
    model_type, architecture, fields = adapter.config_to_hf(cfg)
    fields.update(_tokenizer_ids(tokenizer))
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    hf_config.architectures = [architecture]
    hf_config.dtype = str(np.dtype(np_dtype).name)

    # name -> [(rule, layer)], in the order of the rules; then the shard plan by byte sizes.
    parts: dict[str, list[tuple[Rule, int | None]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in adapter.rules(cfg):
        stacked = rule.ours.startswith("blocks/")
        shape = params[rule.ours].shape[1:] if stacked else params[rule.ours].shape
        for layer in range(cfg.num_layers) if stacked else [None]:
            name = layer_name(rule, layer)
            parts.setdefault(name, []).append((rule, layer))
            shapes[name] = rule.hf_shape(shape)
    limit = _parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * np_dtype.itemsize
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "model*.safetensors*")):
            os.remove(stale)
        hf_config.save_pretrained(path)
    weight_map = {}
    for k, names in enumerate(shards):
        filename = ("model.safetensors" if len(shards) == 1
                    else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {}
        for name in names:
            out = None
            for rule, layer in parts[name]:
                x = params[rule.ours] if layer is None else params[rule.ours][layer]
                out = rule.write(_to_host(x).astype(np_dtype), out)
            tensors[name] = np.ascontiguousarray(out)
            weight_map[name] = filename
        if writer:
            save_file(tensors, os.path.join(path, filename), metadata={"format": "pt"})
        del tensors
    if writer and len(shards) > 1:
        total = sum(math.prod(s) for s in shapes.values()) * np_dtype.itemsize
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                      indent=2)
    if writer and isinstance(tokenizer, str):
        copy_tokenizer_files(tokenizer, path)
    elif writer and tokenizer is not None:
        hf_tokenizer = getattr(tokenizer, "hf_tokenizer", tokenizer)  # llmjax Tokenizer or not
        if hf_tokenizer is not None:
            hf_tokenizer.save_pretrained(path)


def _tokenizer_ids(tokenizer: Any) -> dict[str, int]:
    """bos/eos/pad ids for config.json from a tokenizer (see save_pretrained), if any."""
    from llmjax.data.tokenizer import Tokenizer, load_tokenizer

    if isinstance(tokenizer, str):
        try:
            tokenizer = load_tokenizer(tokenizer)
        except ValueError:
            return {}
    if isinstance(tokenizer, Tokenizer) and tokenizer.hf_tokenizer is None:
        return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                "pad_token_id": tokenizer.pad_id}
    tokenizer = getattr(tokenizer, "hf_tokenizer", tokenizer)
    return {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id",
                                                      "pad_token_id")
            if getattr(tokenizer, key, None) is not None}


def copy_tokenizer_files(source: str, destination: str) -> list[str]:
    """Copy the tokenizer files (and generation_config.json) of `source` into `destination`."""
    copied = []
    for name in CARRIED_FILES:
        if os.path.isfile(os.path.join(source, name)):
            os.makedirs(destination, exist_ok=True)
            shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
            copied.append(name)
    return copied


# --- llmjax checkpoints: import, export, init_from ---------------------------------------------

def _model_fields(cfg: ModelConfig) -> dict[str, Any]:
    return {"family": family_of(cfg), **dataclasses.asdict(cfg)}


def import_checkpoint(hf_dir: str, out: str, *, allow_pickle: bool = False) -> str:
    """HF directory -> llmjax directory `out` (config.json, checkpoints/0, tokenizer/).

    Returns `out`. The parameters are read sharded over all devices and written by
    Orbax, so no process holds the whole model.
    """
    model = from_pretrained(hf_dir, allow_pickle=allow_pickle)
    config = base_config()
    config.name = os.path.basename(os.path.normpath(out))
    config.model = ml_collections.ConfigDict(_model_fields(model.cfg))
    tokenizer_dir = os.path.join(out, "tokenizer")
    if any(os.path.isfile(os.path.join(hf_dir, name)) for name in TOKENIZER_FILES):
        config.data.tokenizer = os.path.abspath(tokenizer_dir)
    if jax.process_index() == 0:
        copy_tokenizer_files(hf_dir, tokenizer_dir)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(to_json(config))
    checkpoint.save_params(out, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                           config.to_dict())
    return out


def _workdir_and_step(path: str) -> tuple[str, int | None]:
    """(workdir, step) for a workdir (newest step: None) or a checkpoint WORKDIR/checkpoints/N."""
    path = os.path.normpath(path)
    if os.path.basename(os.path.dirname(path)) == "checkpoints" and os.path.basename(
            path).isdigit():
        return os.path.dirname(os.path.dirname(path)), int(os.path.basename(path))
    return path, None


def load_llmjax_model(path: str, *, mesh: jax.sharding.Mesh | None = None,
                      rules: str | Sequence[Any] = "fsdp", **overrides: Any) -> nnx.Module:
    """The model of an llmjax workdir, import directory or checkpoint (WORKDIR/checkpoints/N),
    its parameters restored sharded over `mesh` (default: every device, FSDP)."""
    workdir, step = _workdir_and_step(path)
    cfg = _llmjax_model_config(workdir, step, overrides)
    mesh, rules = _placement(mesh, rules)
    graphdef, abstract = nnx.split(jax.eval_shape(lambda: build_model(cfg, 0)))
    shardings = sharding.param_shardings(abstract, mesh, rules)
    params = checkpoint.restore_params(workdir, step, nnx.to_pure_dict(abstract), shardings)
    return nnx.merge(graphdef, params)


def _run_config(workdir: str) -> dict[str, Any]:
    """The resolved config (config.json) of an llmjax workdir or import directory."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: give an llmjax workdir (or "
                                "WORKDIR/checkpoints/STEP) or a directory from `import`")
    with open(path) as f:
        return json.load(f)


def _llmjax_model_config(workdir: str, step: int | None, overrides: dict[str, Any]
                         ) -> ModelConfig:
    fields = _run_config(workdir)["model"]
    if not fields.get("vocab_size"):  # taken from the tokenizer at train time
        shapes = checkpoint.params_shapes(workdir, step)
        fields["vocab_size"] = shapes["embed"][0]
    return model_config({**fields, **overrides})


def export_checkpoint(source: str, out: str, *, dtype: str | None = None,
                      max_shard_size: int | str = "5GB") -> str:
    """llmjax workdir / checkpoint / import directory -> HF directory `out`, with its
    tokenizer when the run has one (its tokenizer/ or a data.tokenizer directory).

    A LoRA run's newest checkpoint is written with its adapters merged into the weights,
    and the adapters alone in the PEFT layout under `out/adapter` (for its base model)."""
    from llmjax.data.tokenizer import ByteTokenizer

    workdir, _ = _workdir_and_step(source)
    run = _run_config(workdir)
    tokenizer_spec = run.get("data", {}).get("tokenizer", "")
    if run.get("lora", {}).get("rank", 0):  # LoRA: merge the adapters; PEFT files beside
        from llmjax import evaluate, lora

        model, trainable, model_cfg, run_config = evaluate.finetuned_model(workdir)
        lora.save_peft(os.path.join(out, "adapter"), trainable, run_config.lora, model_cfg)
    else:
        model = load_llmjax_model(source)
    tokenizer: Any = None
    for candidate in (os.path.join(workdir, "tokenizer"), os.path.expanduser(tokenizer_spec)):
        if os.path.isdir(candidate):
            tokenizer = candidate
            break
    if tokenizer is None and tokenizer_spec == "byte":
        tokenizer = ByteTokenizer()  # no files, but its bos/eos/pad ids go into config.json
    elif tokenizer is None:
        logging.warning("%s: no tokenizer directory found; exporting the model alone", source)
    save_pretrained(model, out, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)
    return out


def _is_hf_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return "model_type" in json.load(f)
    except (OSError, ValueError):
        return False


def init_from_model_config(init_from: str, model_cfg: Any, vocab_size: int) -> ModelConfig:
    """The model config of a run started from `init_from` (config key): the architecture
    of that HF or llmjax directory, with the runtime fields (dtype, param_dtype,
    scan_layers, remat_policy, attention_impl) of `model_cfg` (config.model).

    Raises ValueError if the run's tokenizer (`vocab_size` ids) does not fit the model.
    """
    # num_labels too: a decoder fine-tuned as a classifier gets a head (score) the LM lacks.
    runtime = {k: v for k, v in dict(model_cfg).items()
               if k in RUNTIME_FIELDS or (k == "num_labels" and v)}
    if not os.path.isdir(init_from):
        raise FileNotFoundError(f"config.init_from={init_from!r} is not a directory; give an "
                                "HF model directory or an llmjax workdir")
    if _is_hf_dir(init_from):
        cfg = model_config({**read_hf_config(init_from)[1], **runtime})
    else:
        cfg = _llmjax_model_config(*_workdir_and_step(init_from), runtime)
    if vocab_size > cfg.vocab_size:
        raise ValueError(f"config.data.tokenizer has {vocab_size} ids but the model of "
                         f"config.init_from={init_from!r} has {cfg.vocab_size}; use its "
                         "tokenizer (--config.data.tokenizer=DIR)")
    return cfg


def resolve_init_from(config: ml_collections.ConfigDict, vocab_size: int
                      ) -> tuple[ml_collections.ConfigDict, ModelConfig]:
    """For a run with `config.init_from`: (a copy of `config` whose `model` is that of
    init_from, so the workdir's config.json says what was trained; the model config)."""
    cfg = init_from_model_config(config.init_from, config.model, vocab_size)
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(_model_fields(cfg))
    return config, cfg


def load_init_params(init_from: str, cfg: ModelConfig, shardings: Any) -> Any:
    """Parameters (pure dict) for a run started from `init_from`, placed with `shardings`."""
    if _is_hf_dir(init_from):
        return load_hf_params(HFTensors(init_from), read_hf_config(init_from)[0], cfg, shardings)
    workdir, step = _workdir_and_step(init_from)
    abstract = nnx.to_pure_dict(nnx.split(jax.eval_shape(lambda: build_model(cfg, 0)))[1])
    return checkpoint.restore_params(workdir, step, abstract, shardings)


# --- Command line ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmjax.hf", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_llmjax = commands.add_parser("import", help="HF directory -> llmjax checkpoint")
    to_llmjax.add_argument("hf_dir")
    to_llmjax.add_argument("out")
    to_llmjax.add_argument("--allow-pickle", action="store_true",
                           help="also read pickle-based .bin weights (only from a trusted source)")
    to_hf = commands.add_parser("export", help="llmjax workdir or checkpoint -> HF directory")
    to_hf.add_argument("source", help="WORKDIR (newest checkpoint) or WORKDIR/checkpoints/STEP")
    to_hf.add_argument("out")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="dtype of the written tensors (default: the parameters')")
    to_hf.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.ERROR)
    try:
        if args.command == "import":
            out = import_checkpoint(args.hf_dir, args.out, allow_pickle=args.allow_pickle)
            print(f"Imported {args.hf_dir} -> {out} (train from it: "
                  f"--config.init_from={out}; back to HF: python -m llmjax.hf export {out} DIR)")
        else:
            out = export_checkpoint(args.source, args.out, dtype=args.dtype,
                                    max_shard_size=args.max_shard_size)
            print(f"Exported {args.source} -> {out} (transformers: "
                  f"AutoModel*.from_pretrained({out!r}))")
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()

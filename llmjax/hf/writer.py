"""Writing llmjax models as Hugging Face checkpoints: save_pretrained and the tokenizer files.

    llmjax.hf.save_pretrained(model, "out_dir", tokenizer="path/to/hf_dir")

Saving gathers one HF tensor at a time (through the family's adapter rules,
llmjax.hf.adapters) and writes shards of at most `max_shard_size` bytes, as
transformers does, so transformers' `from_pretrained` reads the result.
"""

import glob
import json
import math
import os
import re
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util
from safetensors.numpy import save_file

from llmjax.hf.adapters import ADAPTERS, Rule, layer_name
from llmjax.models import family_of
from llmjax.models.layers import DTYPES
from llmjax.parallel import sharding

# Files a tokenizer may consist of; copied along on import and export, with
# generation_config.json (its special token ids for generation).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
CARRIED_FILES = (*TOKENIZER_FILES, "generation_config.json")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not match:
        raise ValueError(f"max_shard_size={size!r}: give bytes or e.g. '5GB', '500MB'")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2]])



def save_pretrained(model: nnx.Module, path: str, *, tokenizer: Any = None,
                    dtype: str | None = None, max_shard_size: int | str = "5GB",
                    task: str = "") -> None:
    """Write `model` (from `from_pretrained`, or any llmjax model) as transformers does:
    config.json and model.safetensors, or model-0000k-of-0000n.safetensors shards of at
    most `max_shard_size` with model.safetensors.index.json.

    `tokenizer` (saved alongside; its bos/eos/pad ids go into config.json): a directory
    holding one (its files are copied), a transformers tokenizer, or an llmjax Tokenizer.
    `dtype`: "bfloat16" etc. for the written tensors (default: the parameters' dtype).
    `task`: the config.task the model was trained for, when it decides the architecture
    config.json names (a BERT trained with "mlm" is a BertForMaskedLM).
    One HF tensor is gathered to the host at a time; in a multi-process run every
    process must call this, and process 0 writes.
    """
    import transformers

    cfg = model.cfg
    adapter = ADAPTERS[family_of(cfg)]
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)), sep="/")
    np_dtype = np.dtype(DTYPES[dtype or cfg.param_dtype])
    model_type, architecture, fields = adapter.config_to_hf(cfg)
    architecture = dict(adapter.task_architectures).get(task, architecture)
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
                out = rule.write(sharding.to_host(x).astype(np_dtype), out)
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

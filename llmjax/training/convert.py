"""Run directories <-> Hugging Face directories: what `python -m llmjax.hf` does.

`import_checkpoint` writes a workdir-shaped directory: OUT/config.json (an llmjax config
whose `model` is the HF architecture), OUT/checkpoints/0/ (Orbax; parameters only) and
OUT/tokenizer/ (the tokenizer files); a training run starts from it with
`--config.init_from=OUT`. `export_checkpoint` reads any model path of a run (llmjax.workdir)
and writes config.json, model.safetensors (or shards and an index) and the tokenizer; a
LoRA run is written with its adapters merged, and the adapters alone in the PEFT layout
under OUT/adapter (for its base model). A prefix- or prompt-tuning run's virtual tokens do
not merge into weights: OUT holds its base model (the frozen weights, unchanged) and
OUT/adapter the virtual tokens in the PEFT layout; the two together give the run's logits.
"""

import os
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx, traverse_util

from llmjax import hf, workdir
from llmjax.config import base_config, to_json
from llmjax.data.tokenizer import ByteTokenizer
from llmjax.hf import peft, writer
from llmjax.training import checkpoint, init_from, lora, peft_methods, restore


def import_checkpoint(hf_dir: str, out: str, *, allow_pickle: bool = False) -> str:
    """HF directory -> llmjax directory `out` (config.json, checkpoints/0, tokenizer/).

    Returns `out`. The parameters are read sharded over all devices and written by
    Orbax, so no process holds the whole model.
    """
    model = hf.from_pretrained(hf_dir, allow_pickle=allow_pickle)
    config = base_config()
    config.name = os.path.basename(os.path.normpath(out))
    config.model = ml_collections.ConfigDict(init_from.model_fields(model.cfg))
    tokenizer_dir = os.path.join(out, workdir.TOKENIZER)
    if any(os.path.isfile(os.path.join(hf_dir, name)) for name in writer.TOKENIZER_FILES):
        config.data.tokenizer = os.path.abspath(tokenizer_dir)
    if jax.process_index() == 0:
        hf.copy_tokenizer_files(hf_dir, tokenizer_dir)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, workdir.CONFIG), "w") as f:
            f.write(to_json(config))
    checkpoint.save_params(out, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                           config.to_dict())
    return out


def export_checkpoint(source: str, out: str, *, dtype: str | None = None,
                      max_shard_size: int | str = "5GB", adapter_only: bool = False) -> str:
    """Model path of a run -> HF directory `out`, with the run's tokenizer when it has one
    (its tokenizer/ or a data.tokenizer directory). Returns `out`.

    `adapter_only`: a LoRA run's adapters (and trained heads), or a prefix or prompt run's
    virtual tokens, alone, in the PEFT layout in `out` itself, for users who load the base
    model from elsewhere."""
    run_dir, _, _ = workdir.split_checkpoint(source)
    run_config = workdir.read_config(run_dir)
    is_lora = lora.enabled(ml_collections.ConfigDict(run_config["lora"]))
    method = peft_methods.method_of(run_config)
    if adapter_only and not is_lora and method == "lora":
        raise ValueError(f"{source}: not a LoRA, prefix or prompt run (config.lora.rank is 0), "
                         "so it has no adapter; export the whole model without --adapter")
    if method != "lora":
        restored = restore.restore_run(source)
        peft.save_virtual_tokens(out if adapter_only else os.path.join(out, "adapter"), method,
                                 restored.trainable[method], model_cfg=restored.run.model_cfg)
        if adapter_only:
            return out
        model = peft_methods.base_model(nnx.merge(restored.run.graphdef, jax.jit(
            restored.run.merge)(restored.trainable, restored.frozen)))
    elif is_lora:
        restored = restore.restore_run(source)
        run = restored.run
        trainable = restored.trainable
        peft.save_peft(out if adapter_only else os.path.join(out, "adapter"),
                       lora.adapter_items(trainable["adapters"]),
                       traverse_util.flatten_dict(trainable["heads"], sep="/"),
                       rank=run.config.lora.rank, alpha=run.config.lora.alpha,
                       model_cfg=run.model_cfg)
        if adapter_only:
            return out
        model = nnx.merge(run.graphdef, jax.jit(run.merge)(restored.trainable,
                                                           restored.frozen))
    else:
        model = restore.load_model(source)
    tokenizer: Any = restore.tokenizer_spec(source)
    if tokenizer == "byte":
        tokenizer = ByteTokenizer()  # no files, but its bos/eos/pad ids go into config.json
    elif tokenizer is None:
        logging.warning("%s: no tokenizer directory found; exporting the model alone", source)
    hf.save_pretrained(model, out, tokenizer=tokenizer, dtype=dtype,
                       max_shard_size=max_shard_size, task=run_config.get("task", ""))
    return out

"""Adapters in the Hugging Face PEFT layout, for `peft.PeftModel.from_pretrained`.

The adapters of an llmjax LoRA run (llmjax.training.lora: A [in, rank] and B [rank, out]
per target weight, stacked over layers) become PEFT's lora_A [rank, in] and lora_B
[out, rank] per layer and module, named through the family's adapter rules
(llmjax.hf.adapters); trained heads go under `modules_to_save`. The virtual tokens of a
prefix- or prompt-tuning run (llmjax.models.virtual_tokens) become PEFT's one
`prompt_embeddings` tensor (`save_virtual_tokens`).
"""

import json
import os
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from llmjax.hf.adapters import ADAPTERS
from llmjax.models import ModelConfig, family_of

PEFT_PREFIX = "base_model.model."


def save_peft(path: str, adapters: dict[str, dict[str, Any]], heads: dict[str, Any], *,
              rank: int, alpha: float, model_cfg: ModelConfig) -> list[str]:
    """Write adapters in the Hugging Face PEFT layout: adapter_config.json and
    adapter_model.safetensors, loadable with `peft.PeftModel.from_pretrained(hf_model,
    path)` on the model that `llmjax.hf.save_pretrained` writes.

    `adapters`: {our parameter path ("blocks/attn/q"): {"a": [(layers,) in, rank],
    "b": [(layers,) rank, out]}}; `heads`: {path: weight} trained in full. Returns the PEFT
    target module names.
    """
    rules = {rule.ours: rule for rule in ADAPTERS[family_of(model_cfg)].rules(model_cfg)}
    tensors, modules, saved = {}, set(), set()
    for ours, adapter in adapters.items():
        if ours not in rules or not rules[ours].hf.endswith(".weight"):
            raise ValueError(f"config.lora.targets: {ours} has no Hugging Face module to "
                             "export an adapter for")
        a, b = np.asarray(jax.device_get(adapter["a"])), np.asarray(jax.device_get(adapter["b"]))
        stacked = a.ndim == 3
        for layer in range(a.shape[0]) if stacked else [None]:
            module = rules[ours].hf[:-len(".weight")].format(i=layer)
            la, lb = (a[layer], b[layer]) if stacked else (a, b)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(la.T)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(lb.T)
            modules.add(module.rsplit(".", 1)[-1])
    for ours, w in heads.items():
        if ours not in rules:
            raise ValueError(f"config.lora.trainable: {ours} has no Hugging Face name")
        name = rules[ours].hf
        module = name.rsplit(".", 1)[0]
        tensors[f"{PEFT_PREFIX}{module}.modules_to_save.default.{name.rsplit('.', 1)[1]}"] = (
            rules[ours].write(np.asarray(jax.device_get(w)), None))
        saved.add(module.rsplit(".", 1)[-1])
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank),
        "lora_alpha": float(alpha), "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(modules), "modules_to_save": sorted(saved) or None,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": None}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(peft_config, f, indent=2)
    return sorted(modules)


def save_virtual_tokens(path: str, method: str, virtual: Any, *, model_cfg: ModelConfig) -> None:
    """Write the virtual tokens of a prefix- or prompt-tuning run in the PEFT layout
    (PREFIX_TUNING without a projection, or PROMPT_TUNING), for the model that
    `llmjax.hf.save_pretrained` writes.

    `virtual`: prefix [layers, 2, P, kv_heads, head_dim] (each layer's keys and values) or
    prompt [P, embed]. PEFT keeps a prefix as [P, layers * 2 * kv_heads * head_dim], which it
    views as [P, layers * 2, kv_heads, head_dim]: layer i's keys at 2i, its values at 2i + 1.
    """
    x = np.asarray(jax.device_get(virtual), np.float32)
    config = {"task_type": "CAUSAL_LM", "num_virtual_tokens": int(x.shape[0]),
              "num_layers": model_cfg.num_layers, "num_transformer_submodules": 1,
              "inference_mode": True, "base_model_name_or_path": None, "modules_to_save": None}
    if method == "prefix":
        _, _, num, kv_heads, head_dim = x.shape
        embeddings = x.transpose(2, 0, 1, 3, 4).reshape(num, -1)
        config.update(peft_type="PREFIX_TUNING", num_virtual_tokens=num,
                      token_dim=kv_heads * head_dim, num_attention_heads=kv_heads,
                      encoder_hidden_size=kv_heads * head_dim, prefix_projection=False,
                      init_weights=None)
    elif method == "prompt":
        embeddings = x
        config.update(peft_type="PROMPT_TUNING", token_dim=int(x.shape[1]),
                      num_attention_heads=model_cfg.num_heads, prompt_tuning_init="RANDOM",
                      prompt_tuning_init_text=None, tokenizer_name_or_path=None)
    else:
        raise ValueError(f"config.peft.method={method!r} has no virtual tokens to export")
    os.makedirs(path, exist_ok=True)
    save_file({"prompt_embeddings": np.ascontiguousarray(embeddings)},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)

"""What a fine-tuning run trains: `config.peft.method`, LoRA or virtual tokens.

    lora    config.lora decides (llmjax.training.lora): rank 0, the default, trains every
            parameter; rank > 0 trains adapters and the `lora.trainable` heads
    prefix  {"prefix": [layers, 2, P, kv_heads, head_dim]}: each layer's keys and values
            of P virtual tokens (PEFT's prefix tuning without the projection)
    prompt  {"prompt": [P, embed]}: P embeddings before the input (PEFT's prompt tuning)

with P = `config.peft.num_virtual_tokens`. Virtual tokens train alone: every weight of the
model is frozen as LoRA's are (an argument of the step, rebuilt from init_from or the seed
on every start, never checkpointed), and the step runs the model wrapped with them
(llmjax.models.virtual_tokens.WithVirtualTokens, which says how they are applied). They
start from a standard normal, as PEFT's random init (a torch.nn.Embedding) does.

`split_trainable`, `model_params` and `graphdef` are what llmjax.training.setup calls for
any run; they hand LoRA runs and full fine-tuning to llmjax.training.lora.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.models import ModelConfig, build_model
from llmjax.models.virtual_tokens import METHODS as VIRTUAL_METHODS
from llmjax.models.virtual_tokens import WithVirtualTokens
from llmjax.training import lora


def method_of(run_config: dict[str, Any]) -> str:
    """The peft method of a run's config.json (runs written before config.peft: lora)."""
    return run_config.get("peft", {}).get("method", "lora")


def has_virtual_tokens(peft_cfg: Any) -> bool:
    return peft_cfg.method in VIRTUAL_METHODS


def num_virtual_tokens(peft_cfg: Any) -> int:
    """P: how many positions the virtual tokens take before every document (0: none)."""
    return int(peft_cfg.num_virtual_tokens) if has_virtual_tokens(peft_cfg) else 0


def freezes(lora_cfg: Any, peft_cfg: Any) -> bool:
    """Whether the model's weights are frozen (LoRA or virtual tokens) or all train."""
    return lora.enabled(lora_cfg) or has_virtual_tokens(peft_cfg)


def virtual_shape(model_cfg: ModelConfig, peft_cfg: Any) -> tuple[int, ...]:
    num = int(peft_cfg.num_virtual_tokens)
    if peft_cfg.method == "prefix":
        return (model_cfg.num_layers, 2, num, model_cfg.num_kv_heads, model_cfg.head_dim)
    return (num, model_cfg.embed_dim)


def split_trainable(params: dict, axes: dict[str, tuple], lora_cfg: Any, peft_cfg: Any,
                    model_cfg: ModelConfig, seed: int) -> tuple[Any, dict | None]:
    """(trainable tree, frozen params or None): see the module docstring."""
    if not has_virtual_tokens(peft_cfg):
        return lora.split_trainable(params, axes, lora_cfg, seed)
    virtual = jax.random.normal(jax.random.key(seed), virtual_shape(model_cfg, peft_cfg),
                                jnp.float32)
    return {peft_cfg.method: virtual}, params


def model_params(trainable: Any, frozen: dict | None, lora_cfg: Any, peft_cfg: Any) -> Any:
    """What the step's model (`graphdef`) runs with: the model's parameters (LoRA
    adapters merged), or those and the virtual tokens."""
    if not has_virtual_tokens(peft_cfg):
        return lora.model_params(trainable, frozen, lora_cfg)
    return {"model": frozen, "virtual": trainable[peft_cfg.method]}


def graphdef(model_graphdef: nnx.GraphDef, model_cfg: ModelConfig, peft_cfg: Any
             ) -> nnx.GraphDef:
    """The structure the steps merge `model_params` into: the model's, or the model
    wrapped with its virtual tokens (nothing allocated)."""
    if not has_virtual_tokens(peft_cfg):
        return model_graphdef
    shape = virtual_shape(model_cfg, peft_cfg)
    return nnx.split(jax.eval_shape(lambda: WithVirtualTokens(
        build_model(model_cfg, 0), peft_cfg.method, jnp.zeros(shape, jnp.float32))))[0]


def base_model(model: nnx.Module) -> nnx.Module:
    """The model of a step's model: itself, or the one inside WithVirtualTokens."""
    return model.model if isinstance(model, WithVirtualTokens) else model


def not_servable(path: str, method: str) -> ValueError:
    """The error for serving, sampling or merging a run whose virtual tokens the inference
    engine does not run."""
    return ValueError(
        f"{path}: a {method}-tuning run (config.peft.method={method!r}) cannot be served, "
        "sampled or merged: its virtual tokens are not weights and the inference engine does "
        f"not run them yet; `python -m llmjax.hf export {path} OUT` writes the base model and "
        "OUT/adapter for peft.PeftModel.from_pretrained")

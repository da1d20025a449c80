"""Model families. A family is one file here plus an entry in FAMILIES.

Every model answers `model.classify(tokens, positions, segment_ids)` -> class logits
[batch, num_labels] (models with `num_labels` > 0; BERT always) and
`model.hidden_states(...)` -> its final layer's output; a decoder's `model(tokens,
positions, segment_ids)` -> next-token logits [batch, length, vocab]; BERT's
`model.masked_lm_logits(...)` -> logits [batch, length, vocab] of the token at each
position. What a call returns never depends on the config.
"""

import dataclasses
from typing import Any

from flax import nnx

from llmjax.models.bert import Bert, BertConfig
from llmjax.models.gpt2 import GPT2, GPT2Config
from llmjax.models.llama import Llama, LlamaConfig

# family name -> (config dataclass, module class)
FAMILIES = {
    "llama": (LlamaConfig, Llama),  # also Mistral and Qwen2 (see llama.py)
    "gpt2": (GPT2Config, GPT2),
    "bert": (BertConfig, Bert),  # encoder: classify() and masked_lm_logits()
}
ModelConfig = LlamaConfig | GPT2Config | BertConfig
DECODERS = ("llama", "gpt2")  # families with next-token logits (task "lm")
MASKED_LMS = ("bert",)  # families with `masked_lm_logits` (task "mlm")


def family_of(cfg: ModelConfig) -> str:
    """The FAMILIES name of a model config."""
    return next(name for name, (c, _) in FAMILIES.items() if isinstance(cfg, c))


def model_config(model_cfg: Any, vocab_size: int | None = None) -> ModelConfig:
    """The frozen model config from `config.model` (a ConfigDict or dict).

    `vocab_size` fills `config.model.vocab_size` when that is 0 (take it from the tokenizer).
    """
    fields = dict(model_cfg)
    family = fields.pop("family", "llama")
    if family not in FAMILIES:
        raise ValueError(f"config.model.family={family!r}: choose one of {sorted(FAMILIES)}")
    config_cls, _ = FAMILIES[family]
    known = {f.name for f in dataclasses.fields(config_cls)}
    for key in fields:
        if key not in known:
            raise ValueError(f"config.model.{key} is not a {family} setting; known: "
                             f"{', '.join(sorted(known))}")
    if not fields.get("vocab_size"):
        if not vocab_size:
            raise ValueError("config.model.vocab_size is 0 and no tokenizer gave a size")
        fields["vocab_size"] = vocab_size
    return config_cls(**fields)


def build_model(cfg: ModelConfig, seed: int) -> nnx.Module:
    """A freshly initialised model (call under jax.jit / eval_shape to place or skip weights)."""
    _, module_cls = FAMILIES[family_of(cfg)]
    return module_cls(cfg, rngs=nnx.Rngs(params=seed))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + attention scores and values.

    The input embedding lookup is not a matmul and is left out; attention counts
    the full (non-causal) score matrix, as in the PaLM MFU convention. Decoders add
    their output head; BERT's pooler and classifier run once per sequence, not per token.
    """
    d, hd = cfg.embed_dim, cfg.head_dim
    per_layer = (d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
                 + cfg.mlp_matrices * d * cfg.mlp_dim)
    head = 0 if isinstance(cfg, BertConfig) else d * cfg.vocab_size
    matmul_params = cfg.num_layers * per_layer + head
    attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * hd
    return 6 * matmul_params + attention

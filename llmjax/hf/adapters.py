"""Hugging Face <-> llmjax parameter and config mappings: one small adapter per family.

An `Adapter` says which HF model types and architectures a family reads, how its config
converts both ways, and how each of our parameters maps to an HF tensor: a table of
`Rule`s (our path, the HF name, an einops-style layout pattern). llmjax.hf does the
reading, placing and writing; a new family adds its adapter here. The model files in
llmjax.models know nothing of Hugging Face names, and all of that naming is in this file.
"""

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmjax.models import FAMILIES

# --- Rules: one of our parameters <-> one HF tensor ------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """Our parameter `ours` ("blocks/attn/q") is the HF tensor `hf` in another layout.

    `hf` holds "{i}" for the layer index of a stacked (`blocks/...`) parameter.
    `pattern` ("HF axes -> our axes", einops style: "(h k) d -> d h k" splits HF's first
    axis into heads x head_dim and moves the input dimension first); "" = same layout.
    An HF axis named `part` is cut into `part[1]` equal pieces of which this parameter
    is piece `part[0]` (GPT-2 keeps q, k and v in one tensor).
    """

    ours: str
    hf: str
    pattern: str = ""
    part: tuple[int, int] = (0, 1)

    def axes(self, ndim: int) -> tuple[list[list[str]], list[str]]:
        """(HF axis groups, our axis names) for a parameter with `ndim` dims (per layer)."""
        if not self.pattern:
            names = [f"a{n}" for n in range(ndim)]
            return [[n] for n in names], names
        left, right = self.pattern.split("->")
        groups = [g.strip("()").split() for g in re.findall(r"\([^)]*\)|\S+", left)]
        return groups, right.split()

    def sizes(self, our_shape: Sequence[int]) -> dict[str, int]:
        groups, names = self.axes(len(our_shape))
        sizes = dict(zip(names, our_shape))
        sizes["part"] = self.part[1]
        return sizes

    def hf_shape(self, our_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the whole HF tensor that holds a parameter of `our_shape` (per layer)."""
        groups, _ = self.axes(len(our_shape))
        sizes = self.sizes(our_shape)
        return tuple(math.prod(sizes[n] for n in g) for g in groups)

    def read(self, read_hf: Callable[[tuple[slice, ...]], np.ndarray],
             our_shape: Sequence[int], index: Sequence[slice]) -> np.ndarray:
        """Our parameter's slice `index` (one slice per our axis), reading from the HF
        tensor only the rows that hold it where the layout allows (else a whole axis)."""
        groups, names = self.axes(len(our_shape))
        sizes = self.sizes(our_shape)
        ranges = {n: sl.indices(sizes[n])[:2] for n, sl in zip(names, index)}
        ranges["part"] = (self.part[0], self.part[0] + 1)
        hf_index, read_shape, after = [], [], []
        for group in groups:
            lens = [sizes[n] for n in group]
            rs = [ranges[n] for n in group]
            # Contiguous in the flattened axis: leading names of length 1, one ranged
            # name, then names taken whole.
            j = len(group) - 1
            while j > 0 and rs[j] == (0, lens[j]):
                j -= 1
            if all(rs[t][1] - rs[t][0] == 1 for t in range(j)):
                start = sum(rs[t][0] * math.prod(lens[t + 1:]) for t in range(j + 1))
                hf_index.append(slice(start, start + (rs[j][1] - rs[j][0])
                                      * math.prod(lens[j + 1:])))
                read_shape += [r[1] - r[0] for r in rs]
                after += [slice(None)] * len(group)
            else:
                hf_index.append(slice(None))
                read_shape += lens
                after += [slice(*r) for r in rs]
        block = read_hf(tuple(hf_index)).reshape(read_shape)[tuple(after)]
        flat = [n for g in groups for n in g]
        block = block.transpose([flat.index(n) for n in names]
                                + [flat.index(n) for n in flat if n not in names])
        return block.reshape(block.shape[:len(names)])  # drops `part` (length 1)

    def write(self, ours: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """Put our (per-layer) parameter into the HF tensor `out` (None: a new one)."""
        groups, names = self.axes(ours.ndim)
        sizes = self.sizes(ours.shape)
        flat = [n for g in groups for n in g]
        if out is None:
            out = np.zeros(self.hf_shape(ours.shape), ours.dtype)
        unflat = out.reshape([sizes[n] for n in flat])  # a view of `out`
        extra = [n for n in flat if n not in names]
        block = ours.reshape(ours.shape + (1,) * len(extra))
        block = block.transpose([(names + extra).index(n) for n in flat])
        where = tuple(slice(self.part[0], self.part[0] + 1) if n == "part" else slice(None)
                      for n in flat)
        unflat[where] = block
        return out


def layer_name(rule: Rule, layer: int | None) -> str:
    return rule.hf if layer is None else rule.hf.format(i=layer)


# --- Adapters: one per family --- ----------------------------------------------------------------

def _unsupported(hf: Any, what: str) -> ValueError:
    return ValueError(f"{hf.model_type} config.json: {what} is not supported by llmjax")


def _llama_from_hf(hf: Any) -> dict[str, Any]:
    if hf.hidden_act != "silu":
        raise _unsupported(hf, f"hidden_act={hf.hidden_act!r} (llmjax has SwiGLU with silu)")
    if getattr(hf, "mlp_bias", False):
        raise _unsupported(hf, "mlp_bias=true")
    if hf.model_type == "llama" and getattr(hf, "attention_bias", False):
        raise _unsupported(hf, "attention_bias=true (an output-projection bias)")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(hf, "partial_rotary_factor != 1")
    fields = dict(
        family="llama", vocab_size=hf.vocab_size, embed_dim=hf.hidden_size,
        num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        mlp_dim=hf.intermediate_size,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rope_theta=float(rope_theta), norm_eps=hf.rms_norm_eps,
        tie_embeddings=bool(hf.tie_word_embeddings),
        max_positions=hf.max_position_embeddings or 0)
    rope_type = rope.get("rope_type", "default")
    if rope_type == "llama3":
        fields.update(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                      rope_low_freq_factor=float(rope["low_freq_factor"]),
                      rope_high_freq_factor=float(rope["high_freq_factor"]),
                      rope_original_max_positions=int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise _unsupported(hf, f"rope_type={rope_type!r} (llmjax has default and llama3)")
    if hf.model_type == "mistral":
        fields["sliding_window"] = hf.sliding_window or 0
    if hf.model_type == "qwen2":
        fields["qkv_bias"] = True
        kinds = set(hf.layer_types or ["full_attention"])
        if kinds == {"sliding_attention"}:
            fields["sliding_window"] = hf.sliding_window
        elif kinds != {"full_attention"}:
            raise _unsupported(hf, "a mix of sliding-window and full-attention layers")
    return fields


def _llama_to_hf(cfg: Any) -> tuple[str, str, dict[str, Any]]:
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_positions)
    fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
                  intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_parameters=rope,
                  tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu")
    if cfg.max_positions:
        fields["max_position_embeddings"] = cfg.max_positions
    if cfg.qkv_bias:  # only Qwen2 has q/k/v biases without an output bias
        window = cfg.sliding_window or None
        fields.update(use_sliding_window=window is not None, sliding_window=window,
                      max_window_layers=0)
        return "qwen2", "Qwen2ForCausalLM", fields
    if cfg.sliding_window:
        return "mistral", "MistralForCausalLM", {**fields, "sliding_window": cfg.sliding_window}
    return "llama", "LlamaForCausalLM", fields


def _llama_rules(cfg: Any) -> list[Rule]:
    layer = "model.layers.{i}."
    rules = [
        Rule("embed", "model.embed_tokens.weight"),
        Rule("blocks/attn_norm/scale", layer + "input_layernorm.weight"),
        Rule("blocks/attn/q", layer + "self_attn.q_proj.weight", "(h k) d -> d h k"),
        Rule("blocks/attn/k", layer + "self_attn.k_proj.weight", "(h k) d -> d h k"),
        Rule("blocks/attn/v", layer + "self_attn.v_proj.weight", "(h k) d -> d h k"),
        Rule("blocks/attn/o", layer + "self_attn.o_proj.weight", "d (h k) -> h k d"),
        Rule("blocks/mlp_norm/scale", layer + "post_attention_layernorm.weight"),
        Rule("blocks/mlp/gate", layer + "mlp.gate_proj.weight", "m d -> d m"),
        Rule("blocks/mlp/up", layer + "mlp.up_proj.weight", "m d -> d m"),
        Rule("blocks/mlp/down", layer + "mlp.down_proj.weight", "d m -> m d"),
        Rule("final_norm/scale", "model.norm.weight"),
    ]
    if cfg.qkv_bias:
        rules += [Rule(f"blocks/attn/{x}_bias", layer + f"self_attn.{x}_proj.bias", "(h k) -> h k")
                  for x in "qkv"]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head", "lm_head.weight", "v d -> d v"))
    return rules + _score_rules(cfg)


def _score_rules(cfg: Any) -> list[Rule]:
    """A decoder classifier's head, as in HF's *ForSequenceClassification (fresh if absent)."""
    return [Rule("score", "score.weight", "l d -> d l")] if cfg.num_labels else []


GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _gpt2_from_hf(hf: Any) -> dict[str, Any]:
    if hf.activation_function not in GPT2_ACTIVATIONS:
        raise _unsupported(hf, f"activation_function={hf.activation_function!r}")
    for key, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if bool(getattr(hf, key, value)) != value:
            raise _unsupported(hf, f"{key}={getattr(hf, key)}")
    return dict(family="gpt2", vocab_size=hf.vocab_size, embed_dim=hf.n_embd,
                num_layers=hf.n_layer, num_heads=hf.n_head, mlp_dim=hf.n_inner or 4 * hf.n_embd,
                max_positions=hf.n_positions, norm_eps=hf.layer_norm_epsilon,
                activation=GPT2_ACTIVATIONS[hf.activation_function])


def _gpt2_to_hf(cfg: Any) -> tuple[str, str, dict[str, Any]]:
    return "gpt2", "GPT2LMHeadModel", dict(
        vocab_size=cfg.vocab_size, n_embd=cfg.embed_dim, n_layer=cfg.num_layers,
        n_head=cfg.num_heads, n_inner=cfg.mlp_dim, n_positions=cfg.max_positions,
        layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=True,
        activation_function="gelu_new" if cfg.activation == "gelu_tanh" else "gelu")


def _gpt2_rules(cfg: Any) -> list[Rule]:
    layer = "transformer.h.{i}."
    rules = [Rule("embed", "transformer.wte.weight"), Rule("pos_embed", "transformer.wpe.weight")]
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        rules += [Rule(f"blocks/{ours}/scale", layer + f"{theirs}.weight"),
                  Rule(f"blocks/{ours}/bias", layer + f"{theirs}.bias")]
    for n, x in enumerate("qkv"):  # c_attn: [embed, 3 x embed], Conv1D (in, out) layout
        rules += [Rule(f"blocks/attn/{x}", layer + "attn.c_attn.weight", "d (part h k) -> d h k",
                       (n, 3)),
                  Rule(f"blocks/attn/{x}_bias", layer + "attn.c_attn.bias", "(part h k) -> h k",
                       (n, 3))]
    return rules + [
        Rule("blocks/attn/o", layer + "attn.c_proj.weight", "(h k) d -> h k d"),
        Rule("blocks/attn/o_bias", layer + "attn.c_proj.bias"),
        Rule("blocks/mlp/up", layer + "mlp.c_fc.weight"),
        Rule("blocks/mlp/up_bias", layer + "mlp.c_fc.bias"),
        Rule("blocks/mlp/down", layer + "mlp.c_proj.weight"),
        Rule("blocks/mlp/down_bias", layer + "mlp.c_proj.bias"),
        Rule("final_norm/scale", "transformer.ln_f.weight"),
        Rule("final_norm/bias", "transformer.ln_f.bias"),
    ] + _score_rules(cfg)


BERT_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _bert_from_hf(hf: Any) -> dict[str, Any]:
    if hf.hidden_act not in BERT_ACTIVATIONS:
        raise _unsupported(hf, f"hidden_act={hf.hidden_act!r}")
    if getattr(hf, "position_embedding_type", "absolute") != "absolute":
        raise _unsupported(hf, f"position_embedding_type={hf.position_embedding_type!r}")
    if getattr(hf, "is_decoder", False):
        raise _unsupported(hf, "is_decoder=true")
    return dict(family="bert", vocab_size=hf.vocab_size, embed_dim=hf.hidden_size,
                num_layers=hf.num_hidden_layers, num_heads=hf.num_attention_heads,
                mlp_dim=hf.intermediate_size, num_labels=hf.num_labels,
                max_positions=hf.max_position_embeddings, type_vocab_size=hf.type_vocab_size,
                norm_eps=hf.layer_norm_eps, activation=BERT_ACTIVATIONS[hf.hidden_act])


def _bert_to_hf(cfg: Any) -> tuple[str, str, dict[str, Any]]:
    return "bert", "BertForSequenceClassification", dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim, num_labels=cfg.num_labels,
        max_position_embeddings=cfg.max_positions, type_vocab_size=cfg.type_vocab_size,
        layer_norm_eps=cfg.norm_eps, hidden_act="gelu" if cfg.activation == "gelu" else "gelu_new")


def _bert_rules(cfg: Any) -> list[Rule]:
    layer = "bert.encoder.layer.{i}."

    def norm(ours, theirs):
        return [Rule(f"{ours}/scale", f"{theirs}.weight"), Rule(f"{ours}/bias", f"{theirs}.bias")]

    rules = [Rule("embed", "bert.embeddings.word_embeddings.weight"),
             Rule("pos_embed", "bert.embeddings.position_embeddings.weight"),
             Rule("type_embed", "bert.embeddings.token_type_embeddings.weight"),
             *norm("embed_norm", "bert.embeddings.LayerNorm")]
    for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [Rule(f"blocks/attn/{x}", layer + f"attention.self.{name}.weight",
                       "(h k) d -> d h k"),
                  Rule(f"blocks/attn/{x}_bias", layer + f"attention.self.{name}.bias",
                       "(h k) -> h k")]
    return rules + [
        Rule("blocks/attn/o", layer + "attention.output.dense.weight", "d (h k) -> h k d"),
        Rule("blocks/attn/o_bias", layer + "attention.output.dense.bias"),
        *norm("blocks/attn_norm", layer + "attention.output.LayerNorm"),
        Rule("blocks/mlp/up", layer + "intermediate.dense.weight", "m d -> d m"),
        Rule("blocks/mlp/up_bias", layer + "intermediate.dense.bias"),
        Rule("blocks/mlp/down", layer + "output.dense.weight", "d m -> m d"),
        Rule("blocks/mlp/down_bias", layer + "output.dense.bias"),
        *norm("blocks/mlp_norm", layer + "output.LayerNorm"),
        Rule("pooler", "bert.pooler.dense.weight", "o i -> i o"),
        Rule("pooler_bias", "bert.pooler.dense.bias"),
        Rule("classifier", "classifier.weight", "l d -> d l"),
        Rule("classifier_bias", "classifier.bias"),
        # BertForMaskedLM's head; its decoder weight is the word embeddings (tied).
        Rule("mlm_dense", "cls.predictions.transform.dense.weight", "o i -> i o"),
        Rule("mlm_dense_bias", "cls.predictions.transform.dense.bias"),
        *norm("mlm_norm", "cls.predictions.transform.LayerNorm"),
        Rule("mlm_bias", "cls.predictions.bias"),
    ]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """How one llmjax family reads and writes Hugging Face checkpoints."""

    model_types: tuple[str, ...]  # config.json model_type values this family reads
    architectures: tuple[str, ...]  # config.json architectures whose weights it maps
    prefix: str  # the base model's prefix in HF names; checkpoints of the base model lack it
    config_from_hf: Callable[[Any], dict[str, Any]]  # HF config -> our model_config fields
    config_to_hf: Callable[[Any], tuple[str, str, dict[str, Any]]]  # -> type, arch, fields
    rules: Callable[[Any], list[Rule]]
    optional: tuple[str, ...] = ()  # our parameters initialised afresh when missing
    ignored: str = "$^"  # regex of HF tensor names that we read nothing from, silently
    # (config.task, architecture) pairs: what an export of a run trained for that task
    # says it is, where that differs from config_to_hf's architecture
    task_architectures: tuple[tuple[str, str], ...] = ()


ADAPTERS = {
    "llama": Adapter(("llama", "mistral", "qwen2"),
                     tuple(f"{m}{h}" for m in ("Llama", "Mistral", "Qwen2")
                           for h in ("ForCausalLM", "Model")),
                     "model.", _llama_from_hf, _llama_to_hf, _llama_rules, optional=("score",),
                     ignored=r"rotary_emb\.inv_freq$"),
    "gpt2": Adapter(("gpt2",), ("GPT2LMHeadModel", "GPT2Model"), "transformer.", _gpt2_from_hf,
                    _gpt2_to_hf, _gpt2_rules, optional=("score",),
                    ignored=r"(attn\.bias|attn\.masked_bias|^lm_head\.weight)$"),
    # A pretrained BERT (BertModel, BertForMaskedLM, ...) has no classifier: it starts
    # fresh, as in transformers' BertForSequenceClassification; a classifier's checkpoint
    # has no masked-LM head, which starts fresh too. The decoder weight (and bias) of that
    # head are tied to the word embeddings (and cls.predictions.bias); the next-sentence
    # head of BertForPreTraining has no counterpart here.
    "bert": Adapter(("bert",), ("BertForSequenceClassification", "BertModel", "BertForMaskedLM",
                                "BertForPreTraining"), "bert.", _bert_from_hf,
                    _bert_to_hf, _bert_rules,
                    optional=("pooler", "pooler_bias", "classifier", "classifier_bias",
                              "mlm_dense", "mlm_dense_bias", "mlm_norm/scale",
                              "mlm_norm/bias", "mlm_bias"),
                    ignored=r"(^cls\.predictions\.decoder\.|^cls\.seq_relationship\.|"
                            r"position_ids$)",
                    task_architectures=(("mlm", "BertForMaskedLM"),)),
}
assert set(ADAPTERS) == set(FAMILIES), "every model family needs an HF adapter"

"""Tiny random Hugging Face models (built with CPU torch, never downloaded), for the tests
that compare llmjax with transformers."""

import torch
import transformers

VOCAB, LENGTH = 128, 12
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32)
T = transformers
HF_MODELS = {  # name -> (model class, config class, config)
    "llama": (T.LlamaForCausalLM, T.LlamaConfig, SMALL),
    # Llama 3.1 RoPE scaling: head_dim 8 has wavelengths on both sides of the blend.
    "llama3": (T.LlamaForCausalLM, T.LlamaConfig,
               dict(SMALL, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "mistral": (T.MistralForCausalLM, T.MistralConfig, dict(SMALL, sliding_window=4)),
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, dict(SMALL, tie_word_embeddings=True)),
    "gpt2": (T.GPT2LMHeadModel, T.GPT2Config,
             dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "bert": (T.BertForSequenceClassification, T.BertConfig,
             dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, num_labels=3)),
}


def make_hf_model(name, model_cls=None, **overrides):
    """A tiny HF model whose weights are all random and O(1): biases and norm gains too,
    so a misplaced bias or a transposed matrix shows in the logits. `model_cls`: another
    head on the same config (BertForMaskedLM)."""
    torch.manual_seed(0)
    default_cls, config_cls, config = HF_MODELS[name]
    model = (model_cls or default_cls)(config_cls(**{**config, **overrides})).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            is_gain = p.ndim == 1 and ("norm" in pname.lower() or "ln_" in pname)
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.25) + float(is_gain))
    return model

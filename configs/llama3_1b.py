"""Llama 3.2 1B: the released architecture (Llama 3 RoPE scaling, tied embeddings), to
fine-tune from its Hugging Face weights.

Run (from `Llama-3.2-1B`, a local directory with meta-llama/Llama-3.2-1B as transformers
saves it):
    python -m llmjax.train --config=configs/llama3_1b.py \
        --config.init_from=Llama-3.2-1B --config.data.tokenizer=Llama-3.2-1B \
        --config.data.train='jsonl:/data/my_task/*.jsonl'
    python -m llmjax.hf export runs/llama3_1b runs/llama3_1b_hf   # back to transformers
(without init_from it trains from scratch: same dimensions, fresh weights.)
Hardware: one 80 GB GPU (H100 / A100) or a TPU v5e-8; more devices join the FSDP axis.
Expect:   1,235,814,400 parameters (as meta-llama/Llama-3.2-1B; tests/test_hf.py checks
          it). Fine-tuning loss and speed are not measured here yet.
"""

from llmjax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.name = "llama3_1b"
    config.num_train_steps = 2000
    config.global_batch_size = 16
    config.seq_len = 4096
    config.log_every_steps = 10
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 500

    config.data.tokenizer = "Llama-3.2-1B"  # a local directory with the Llama 3 tokenizer

    config.model.vocab_size = 128_256
    config.model.embed_dim = 2048
    config.model.num_layers = 16
    config.model.num_heads = 32
    config.model.num_kv_heads = 8
    config.model.head_dim = 64
    config.model.mlp_dim = 8192
    config.model.rope_theta = 500_000.0
    config.model.rope_scaling = "llama3"
    config.model.rope_scaling_factor = 32.0
    config.model.rope_low_freq_factor = 1.0
    config.model.rope_high_freq_factor = 4.0
    config.model.rope_original_max_positions = 8192
    config.model.max_positions = 131_072
    config.model.norm_eps = 1e-5
    config.model.tie_embeddings = True
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "dots_no_batch"

    config.optimizer.learning_rate = 2e-5  # fine-tuning
    config.optimizer.warmup_steps = 100
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.0
    config.optimizer.grad_clip_norm = 1.0
    return config

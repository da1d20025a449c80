"""A 1.24B-parameter Llama (Llama 3.2 1B dimensions), bf16 compute, on one 80 GB GPU.

Run:      python -m llmjax.bench --config=configs/llama_1b.py [--nopacked]
          (training: python -m llmjax.train --config=configs/llama_1b.py \
               --config.data.tokenizer=/path/to/Llama-3.2-1B --config.data.train='text:...')
Hardware: one NVIDIA H100 80 GB (single-device mesh; on more GPUs the FSDP axis takes
          them all).
Expect:   measured with llmjax.bench on an H100 80GB HBM3 (jax 0.11.2, 2026-11-23):
          batches with segment ids (as the training pipeline packs them) 53.6k tokens/s,
          0.61 s/step, 49% MFU; without segment ids (--nopacked: cuDNN's plain causal
          mask instead of a [batch, 1, length, length] bias) 60.4k tokens/s, 0.54 s/step,
          55% MFU. Compile ~30 s; 61.7 GiB device peak (batch 10 fits at 72.9 GiB, 12 not).
"""

from llmjax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.name = "llama_1b"
    config.num_train_steps = 10_000
    config.global_batch_size = 8
    config.seq_len = 4096
    config.log_every_steps = 10
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 1000

    config.data.tokenizer = "Llama-3.2-1B"  # a local directory with the Llama 3 tokenizer

    # Llama 3.2 1B: 1,235,814,400 parameters (tied embeddings).
    config.model.vocab_size = 128_256
    config.model.embed_dim = 2048
    config.model.num_layers = 16
    config.model.num_heads = 32
    config.model.num_kv_heads = 8
    config.model.head_dim = 64
    config.model.mlp_dim = 8192
    config.model.rope_theta = 500_000.0
    config.model.norm_eps = 1e-5
    config.model.tie_embeddings = True
    config.model.param_dtype = "float32"
    config.model.dtype = "bfloat16"
    config.model.scan_layers = False  # unrolled: +6% tokens/s on an H100, +5 s compile
    config.model.remat_policy = "dots_no_batch"
    config.model.attention_impl = "cudnn"

    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 500
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.1
    config.optimizer.grad_clip_norm = 1.0

    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.mesh.rules = "fsdp"
    return config

"""Llama 3 8B pretraining with FSDP, bf16 compute and 8192-token sequences.

Run (on every host of a TPU pod, e.g. v5p-128; see launch/ and the README):
    python -m llmjax.train --config=configs/llama3_8b.py \
        --config.data.tokenizer=/path/to/Meta-Llama-3-8B --config.data.train='text:/data/*.txt' \
        --workdir=gs://BUCKET/runs/llama3_8b
Hardware: a TPU v5p-128 slice (64 chips of 95 GiB). The fit check gives the verdict:
              python -m llmjax.train --config=configs/llama3_8b.py --compile_only \
                  --num_devices=64 --accelerator=v5p
          fits: 78.14 of 95.00 GiB per chip with 4 microbatches of 64 x 8192 tokens and
          dots_no_batch remat, MFU bound 92.6% (in one microbatch it needs 288.97 GiB).
          For another chip or slice, the same command with its --accelerator and
          --num_devices prints the first layouts that fit (more microbatches, full remat).
Expect:   the real Llama 3 8B dimensions (8.03B parameters); the test suite builds its
          abstract state and shardings on 8 simulated CPU devices without weights.
"""

from llmjax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.name = "llama3_8b"
    config.num_train_steps = 100_000
    config.global_batch_size = 256
    config.seq_len = 8192
    config.grad_accum_steps = 4  # 1 row of 8192 tokens per chip at a time: fits a v5p chip
    config.log_every_steps = 10
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000

    config.data.tokenizer = "Meta-Llama-3-8B"  # a local directory with the Llama 3 tokenizer

    config.model.vocab_size = 128_256
    config.model.embed_dim = 4096
    config.model.num_layers = 32
    config.model.num_heads = 32
    config.model.num_kv_heads = 8
    config.model.mlp_dim = 14_336
    config.model.rope_theta = 500_000.0
    config.model.norm_eps = 1e-5
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "float32"
    config.model.remat_policy = "dots_no_batch"

    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 2000
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.1
    config.optimizer.grad_clip_norm = 1.0

    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    config.mesh.rules = "fsdp"
    return config

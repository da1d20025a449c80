"""The model, batch and optimizer of ../shared/bench/baselines.py, for llmjax.bench.

Run:      python -m llmjax.bench --config=configs/bench_reference.py \
              --reference=../shared/bench/baselines.py
Hardware: a CPU (the reference numbers were taken on 2 AVX2 cores); needs torch and
          transformers for the HF row (the `test` extra) and, for the mimalloc row,
          cmeel-mimalloc (the `cpu-fast` extra).
Expect:   about 4 minutes on 2 cores; one table with llmjax, the plain-JAX reference
          and HF torch eager (sdpa) on the same Llama-style model (vocab 8192, hidden
          512, 8 layers, 8 heads, SwiGLU 1408, untied, fp32; batch 8 x 512, AdamW).
          Measured 2026-12-01 on 2 cores (median tok/s, one interleaved run): llmjax
          815, plain JAX 979, HF torch eager 734, llmjax + mimalloc 556.
The rest of the gap to plain JAX, measured on CPU: segment ids (the packed batches that
training feeds; the reference has none) cost about 5% (--nopacked leaves them out), and
the microbatch scan about 3%. The flat (batch * seq, embed) residual stream that both
use is worth about 20% on XLA:CPU (llmjax went from 730 to 876 tok/s with --nopacked
when it adopted it; baselines.py's own 3-D variant runs 4.55 s/step against 3.80).
Besides the reference: AdamW here masks weight decay off the norm scales (optax.adamw in
baselines.py decays them too); it costs no time.
"""

from llmjax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.name = "bench_reference"
    config.global_batch_size = 8
    config.seq_len = 512

    config.model.vocab_size = 8192
    config.model.embed_dim = 512
    config.model.num_layers = 8
    config.model.num_heads = 8
    config.model.num_kv_heads = 8
    config.model.mlp_dim = 1408
    config.model.rope_theta = 10000.0
    config.model.norm_eps = 1e-6
    config.model.tie_embeddings = False
    config.model.param_dtype = "float32"
    config.model.dtype = "float32"

    # baselines.py: optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01), no clip.
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-4
    config.optimizer.warmup_steps = 0
    config.optimizer.schedule = "constant"
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999
    config.optimizer.eps = 1e-8
    config.optimizer.weight_decay = 0.01
    config.optimizer.grad_clip_norm = 0.0

    config.mesh.data = 1
    config.mesh.fsdp = -1
    config.mesh.tensor = 1
    return config

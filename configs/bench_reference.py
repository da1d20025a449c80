"""The model, batch and optimizer of ../shared/bench/baselines.py, for llmjax.bench.

Run:      python -m llmjax.bench --config=configs/bench_reference.py \
              --reference=../shared/bench/baselines.py
Hardware: a CPU (the reference numbers were taken on 2 AVX2 cores); needs torch and
          transformers for the HF rows (the `test` extra), and jemalloc for the jemalloc
          rows (Debian/Ubuntu `libjemalloc2`; without it, glibc rows only).
Expect:   about 6 to 10 minutes on 2 cores, 3 more per --levers entry; one table with
          llmjax, the plain-JAX reference and HF torch eager (sdpa) on the same Llama-style
          model (vocab 8192, hidden 512, 8 layers, 8 heads, SwiGLU 1408, untied, fp32; batch
          8 x 512, AdamW), each on jemalloc and on glibc's malloc.
          Measured 2026-12-06 on 2 Intel Xeon cores (AVX-512, AMX-BF16), median tok/s of
          one run, with chunked attention (auto's choice on CPU): jemalloc: llmjax 880,
          plain JAX 792, HF torch eager 918; glibc: 800, 716, 986. Before it: 791, 830,
          1,031 and 426, 561, 957. The machine drifted: later runs gave llmjax / plain
          JAX / torch 792 / 799 / 1,032 and 619 / 714 / 895, the last with
          --levers=control, whose second llmjax worker (the same program) ran 782, 26%
          faster than the first: the first worker a run creates runs slower, and
          llmjax's is the first (README, "Benchmark"). The step's matrix products, each
          timed alone, bound any implementation at about 1,500 tok/s on this machine.
          Measured 2026-12-01 on 2 AMD EPYC cores (AVX2), before scan_unroll: jemalloc:
          llmjax 301, plain JAX 331, HF torch eager 393; glibc: 269, 282, 352.
Where the gap to plain JAX went, measured on CPU: attention was 37% of the step's thread
time on the Intel machine with XLA's [length, length] scores; the chunked kernel
(model.attention_impl) skips the blocks a causal query cannot see. XLA:CPU's rolled loop
over the layers copies each layer's saved activations into stacked buffers and back (11%
of the step on the Intel machine; model.scan_unroll=0 unrolls it on a CPU). Segment ids (the packed
batches that training feeds; the reference has none) cost about 5% on the AMD machine and
nothing measurable on the Intel one (--nopacked leaves them out). The flat (batch * seq,
embed) residual stream that both use is worth about 20% on XLA:CPU (llmjax went from 730
to 876 tok/s with --nopacked when it adopted it; baselines.py's own 3-D variant runs
4.55 s/step against 3.80).
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

"""GPT-2 small (124M parameters): the real GPT-2 dimensions, to pretrain or to fine-tune.

Run (fine-tune the released weights from `gpt2`, a local directory that transformers
saved, e.g. `huggingface-cli download openai-community/gpt2 --local-dir gpt2`):
    python -m llmjax.train --config=configs/gpt2_124m.py \
        --config.init_from=gpt2 --config.data.tokenizer=gpt2 \
        --config.data.train='text:/data/my_corpus/*.txt'
    python -m llmjax.hf export runs/gpt2_124m runs/gpt2_124m_hf   # back to transformers
(without init_from it trains from scratch: same dimensions, fresh weights.)
Hardware: one GPU (about 16 GB at this batch in bf16 compute); on more, FSDP takes them all.
Expect:   124,439,808 parameters (as openai-community/gpt2; tests/test_hf.py checks it).
          Loss and speed on a given corpus are not measured here yet.
"""

import ml_collections

from llmjax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.name = "gpt2_124m"
    config.num_train_steps = 5000
    config.global_batch_size = 32
    config.seq_len = 1024  # GPT-2's context: positions beyond max_positions do not exist
    config.log_every_steps = 10
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 1000

    config.data.tokenizer = "gpt2"  # a local directory with the GPT-2 tokenizer

    config.model = ml_collections.ConfigDict(dict(
        family="gpt2", vocab_size=50257, embed_dim=768, num_layers=12, num_heads=12,
        mlp_dim=3072, max_positions=1024, norm_eps=1e-5, activation="gelu_tanh",
        init_std=0.02, param_dtype="float32", dtype="bfloat16", scan_layers=True,
        remat_policy="none", attention_impl="auto"))

    config.optimizer.learning_rate = 6e-4  # from scratch; use ~6e-5 when fine-tuning
    config.optimizer.warmup_steps = 200
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.1
    config.optimizer.b2 = 0.95
    return config

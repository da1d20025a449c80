"""The default job: a small Llama-style model on the bundled Shakespeare corpus.

Run:      python -m llmjax.train --config=configs/shakespeare.py
Hardware: any CPU (2 cores is enough); also runs as-is on one GPU or TPU.
Expect:   about 6 minutes on 2 CPU cores; held-out loss from ~8.3 (untrained, ln 4096)
          to about 4.6, then a short generated sample printed at the end.
"""

from llmjax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.name = "shakespeare"
    config.num_train_steps = 600
    config.global_batch_size = 16
    config.seq_len = 128
    config.log_every_steps = 50
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    config.eval_batches = 6  # all that the held-out scenes fill at 16 x 128 with bpe:4096

    config.data.train = "bundled:shakespeare"
    config.data.tokenizer = "bpe:4096"

    config.model.embed_dim = 256
    config.model.num_layers = 4
    config.model.num_heads = 4
    config.model.num_kv_heads = 2
    config.model.mlp_dim = 704
    config.model.tie_embeddings = True

    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 50
    config.optimizer.schedule = "cosine"
    config.optimizer.weight_decay = 0.1

    config.sample.prompt = "ROMEO:\n"
    config.sample.max_new_tokens = 80
    return config

"""Masked-LM pretraining of a small BERT encoder on the bundled Shakespeare corpus.

Run:      python -m llmjax.train --config=configs/bert_mlm.py
Hardware: any CPU (2 cores is enough); also runs as-is on one GPU or TPU.
Expect:   held-out eval/masked_accuracy 0.122 at step 300 (the share of the masked tokens
          predicted exactly; 0.112 at step 100), eval/loss 5.86 (untrained: ln 2048 = 7.6).
          Measured once: 14 minutes wall on a shared 2-core AMD EPYC machine under load
          from other jobs (the run itself used 3.4 CPU-minutes user + 0.8 system, so a
          few minutes on two free cores; the first step, compilation included, took 98 s).

Then fine-tune a classifier from it: the encoder comes from the run, the pooler and
classifier start fresh, the tokenizer is the run's (llmjax.training.init_from):
          python -m llmjax.train --config=configs/bert_sentiment.py:tiny \\
              --workdir=runs/bert_sentiment_pretrained --config.init_from=runs/bert_mlm \\
              --config.data.tokenizer=runs/bert_mlm/tokenizer
held-out accuracy 1.000 at step 60 of 60 (0.992 at step 20); the same model and tokenizer
from scratch: 0.992 (1.000 at step 20, 0.958 at step 40) on bundled:sentiment, which is
too easy to show more (measured once each, same machine; commands in README.md).

`:tiny` (get_config("tiny")): a 2-layer encoder for a few steps, for tests.
"""

import ml_collections

from llmjax.config import base_config


def get_config(arg=None):
    config = base_config()
    config.name = "bert_mlm"
    config.task = "mlm"
    config.num_train_steps = 300
    config.global_batch_size = 16
    config.seq_len = 128
    config.log_every_steps = 50
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    config.eval_batches = 4

    config.data.train = "bundled:shakespeare"
    config.data.tokenizer = "bpe:2048"  # trained with a <mask> token for task "mlm"
    config.data.packing = "first_fit"
    config.model = ml_collections.ConfigDict(dict(
        family="bert", vocab_size=0, embed_dim=128, num_layers=2, num_heads=4, mlp_dim=512,
        max_positions=128))

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 30
    config.optimizer.schedule = "linear"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.weight_decay = 0.01
    config.optimizer.b2 = 0.999

    if arg == "tiny":
        config.num_train_steps = 6
        config.global_batch_size = 8
        config.seq_len = 32
        config.log_every_steps = 2
        config.eval_every_steps = 3
        config.checkpoint_every_steps = 3
        config.eval_batches = 2
        config.data.tokenizer = "bpe:320"
        config.model = ml_collections.ConfigDict(dict(
            family="bert", vocab_size=0, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64,
            max_positions=64))
        config.optimizer.warmup_steps = 2
        config.optimizer.learning_rate = 3e-3
    return config

"""Masked-LM pretraining of a small BERT encoder on the bundled Shakespeare corpus.

Run:      python -m llmjax.train --config=configs/bert_mlm.py
Hardware: any CPU (2 cores is enough); also runs as-is on one GPU or TPU.
Expect:   held-out eval/masked_accuracy 0.301 at step 800 (the share of the masked tokens
          predicted exactly; 0.241 at step 400), eval/loss 3.99 (untrained: ln 2048 =
          7.6; the corpus's unigram entropy 6.0), in 9 min 4 s on a free 2-core Intel Xeon,
          compiling included (measured). 3.9M parameters.

Then fine-tune a classifier from it: the encoder comes from the run, the pooler and
classifier start fresh, the tokenizer is the run's (llmjax.training.init_from):
          python -m llmjax.train --config=configs/bert_word_order.py
and the same model from scratch with configs/bert_word_order.py:scratch. The pretrained
start is worth about 14 points of held-out accuracy there (0.686 against 0.547, mean of 3
seeds; the figures are in that config and README.md).

`:tiny` (get_config("tiny")): a 2-layer encoder for a few steps, for tests.
"""

import ml_collections

from llmjax.config import base_config


def get_config(arg=None):
    config = base_config()
    config.name = "bert_mlm"
    config.task = "mlm"
    config.num_train_steps = 800
    # Rows of 32 tokens, 128 of them a step: at 128 tokens a row (16 rows) the encoder sat
    # for 1,500+ steps on the plateau where it predicts frequent tokens and barely uses
    # context (masked accuracy 0.18; transformers' BertForMaskedLM the same, README.md).
    config.global_batch_size = 128
    config.seq_len = 32
    config.log_every_steps = 100
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    config.eval_batches = 2

    config.data.train = "bundled:shakespeare"
    config.data.tokenizer = "bpe:2048"  # trained with a <mask> token for task "mlm"
    config.data.packing = "first_fit"
    config.model = ml_collections.ConfigDict(dict(
        family="bert", vocab_size=0, embed_dim=256, num_layers=4, num_heads=4, mlp_dim=1024,
        max_positions=128))

    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
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

"""The classic fine-tune: a pretrained BERT encoder trained for binary sentiment on IMDB.

Run:      tfds build imdb_reviews --file_format=array_record   # once: llmjax never downloads
          python -m llmjax.train --config=configs/bert_sentiment.py   # with ./bert-base-uncased,
              # a local HF directory (weights + tokenizer); else --config.init_from=DIR
              # --config.data.tokenizer=DIR
          python -m llmjax.evaluate --workdir=runs/bert_sentiment --best \\
              --output=runs/bert_sentiment/test.json
Hardware: one GPU (A100 / H100) or a TPU v4-8: about 15 minutes for 2 epochs of the 25,000
          reviews at 256 tokens; a CPU works but takes hours.
Expect:   test accuracy about 92-93% (BERT-base on IMDB reaches 93-94% at 512 tokens in
          the literature, e.g. Sun et al. 2019); not measured in this repository, which has
          neither the weights nor the data. The best checkpoint by eval/accuracy is kept in
          runs/bert_sentiment/best; training stops after 3 evaluations without a better one.

`:tiny` (get_config("tiny")) is what runs here without either: a 2-layer BERT trained from
scratch on a local JSONL of {"text", "label"} records (data.train=jsonl:...; 20% held out):
          python -m llmjax.train --config=configs/bert_sentiment.py:tiny \\
              --config.data.train=jsonl:/tmp/sentiment.jsonl
On the synthetic sentiment set of tests/test_finetune.py (600 records, 120 held out):
100% held-out accuracy from step 40 of 60, 19 s on a 2-core CPU (measured).
"""

import ml_collections

from llmjax.config import base_config


def get_config(arg=None):
    config = base_config()
    config.name = "bert_sentiment"
    config.task = "classify"
    config.num_train_steps = 1563  # 2 epochs of 25,000 reviews at 32 per batch
    config.global_batch_size = 32
    config.seq_len = 256  # longer reviews are cut (BERT's limit is 512)
    config.log_every_steps = 50
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 250
    config.data.train = "tfds:imdb_reviews:train"  # features text, label
    config.data.eval = "tfds:imdb_reviews:test"
    # A local copy of google-bert/bert-base-uncased (save_pretrained of model and tokenizer).
    config.init_from = "bert-base-uncased"
    config.data.tokenizer = "bert-base-uncased"
    config.model = ml_collections.ConfigDict(dict(family="bert", num_labels=2))

    config.optimizer.learning_rate = 2e-5
    config.optimizer.warmup_steps = 156  # 10% of training
    config.optimizer.schedule = "linear"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.weight_decay = 0.01
    config.optimizer.b2 = 0.999

    config.early_stopping.metric = "eval/accuracy"
    config.early_stopping.mode = "max"
    config.early_stopping.patience = 3

    if arg == "tiny":
        config.num_train_steps = 60
        config.global_batch_size = 16
        config.seq_len = 40
        config.log_every_steps = 10
        config.eval_every_steps = 20
        config.checkpoint_every_steps = 60
        config.init_from = ""
        config.data.train = "jsonl:sentiment.jsonl"
        config.data.eval = ""
        config.data.eval_fraction = 0.2
        config.data.tokenizer = "bpe:320"
        config.model = ml_collections.ConfigDict(dict(
            family="bert", vocab_size=0, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64,
            max_positions=64, num_labels=2))
        config.optimizer.learning_rate = 3e-3  # from scratch: no pretrained weights to keep
        config.optimizer.warmup_steps = 5
        config.optimizer.weight_decay = 0.1
    return config

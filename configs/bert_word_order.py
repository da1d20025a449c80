"""Does pretraining help? Fine-tune the masked-LM encoder of configs/bert_mlm.py on a small
labelled set, against the same model trained from scratch, same steps and settings.

The set is bundled:word_order (llmjax.data.word_order): 600 lines of the plays, lowercased
without punctuation, as written (label 1) or with their words shuffled (label 0), 20%
held out. Both labels hold the same words: the classifier has to know word order.
Run:      python -m llmjax.train --config=configs/bert_mlm.py        # the encoder, once
          python -m llmjax.train --config=configs/bert_word_order.py
          python -m llmjax.train --config=configs/bert_word_order.py:scratch
Both use the pretraining run's tokenizer (runs/bert_mlm/tokenizer), so the only
difference is where the encoder's weights start: the run's (pooler and classifier fresh)
or random. About 27 s each on 2 cores.
Measured (README.md, "Masked-LM pretraining"), held-out accuracy at steps 50 / 100 / 150,
mean of seeds 0, 1, 2 (`--config.seed=N`; 120 examples, so one run's noise is +-4.5%):
pretrained 0.689 / 0.681 / 0.686, scratch 0.494 / 0.531 / 0.547; at learning rate 1e-4,
0.619 / 0.683 / 0.686 against 0.536 / 0.453 / 0.569. At step 150 the pretrained start
wins for every seed at both rates.
"""

import ml_collections

from llmjax.config import base_config

PRETRAINED = "runs/bert_mlm"


def get_config(arg=None):
    if arg not in (None, "pretrained", "scratch"):
        raise ValueError(f"configs/bert_word_order.py:{arg}: the variants are :pretrained "
                         "(the default) and :scratch")
    config = base_config()
    config.name = "bert_word_order" + ("_scratch" if arg == "scratch" else "")
    config.task = "classify"
    config.num_train_steps = 150
    config.global_batch_size = 16  # 480 training examples: 5 epochs
    config.seq_len = 32  # 6 to 12 words
    config.log_every_steps = 25
    config.eval_every_steps = 50
    config.checkpoint_every_steps = 50
    config.eval_batches = 8  # all 120 held-out examples
    config.data.train = "bundled:word_order"
    config.data.eval = ""
    config.data.eval_fraction = 0.2
    config.data.tokenizer = f"{PRETRAINED}/tokenizer"
    if arg == "scratch":  # configs/bert_mlm.py's encoder, randomly initialised
        config.model = ml_collections.ConfigDict(dict(
            family="bert", vocab_size=0, embed_dim=256, num_layers=4, num_heads=4,
            mlp_dim=1024, max_positions=128, num_labels=2))
    else:  # the architecture comes from the run; a new head of two labels
        config.init_from = PRETRAINED
        config.model = ml_collections.ConfigDict(dict(family="bert", num_labels=2))

    config.optimizer.learning_rate = 3e-4  # the best of 1e-4, 3e-4, 1e-3 for both
    config.optimizer.warmup_steps = 15
    config.optimizer.schedule = "linear"
    config.optimizer.min_lr_ratio = 0.0
    config.optimizer.weight_decay = 0.01
    config.optimizer.b2 = 0.999
    return config

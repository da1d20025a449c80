"""BERT-base (uncased) with a two-class sequence-classification head: the real dimensions.

Use (this config describes the model for llmjax.hf and llmjax.models; to fine-tune a
BERT classifier see configs/bert_sentiment.py, which trains with config.task="classify"):
    python -m llmjax.hf import bert-base-uncased runs/bert_base   # HF dir -> llmjax checkpoint
    python -c "import llmjax.hf; m = llmjax.hf.from_pretrained('bert-base-uncased')"
    python -c "from configs.bert_base import get_config; from llmjax.models import *; \
               print(build_model(model_config(get_config().model), 0))"
Hardware: any; a CPU runs it.
Expect:   109,483,778 parameters: google-bert/bert-base-uncased's 109,482,240 plus the
          classifier (tests/integration/test_hf.py checks it). A checkpoint without a
          classifier (the released one) loads with a fresh one, as in transformers.
"""

import ml_collections

from llmjax.config import base_config


def get_config(arg=None):
    del arg
    config = base_config()
    config.name = "bert_base"
    config.task = "classify"  # a BERT trains as a classifier (a masked-LM task is to come)
    config.seq_len = 512
    config.data.tokenizer = "bert-base-uncased"  # a local directory with the BERT tokenizer
    config.model = ml_collections.ConfigDict(dict(
        family="bert", vocab_size=30522, embed_dim=768, num_layers=12, num_heads=12,
        mlp_dim=3072, num_labels=2, max_positions=512, type_vocab_size=2, norm_eps=1e-12,
        activation="gelu", init_std=0.02, param_dtype="float32", dtype="float32",
        scan_layers=True, remat_policy="none", attention_impl="auto"))
    return config

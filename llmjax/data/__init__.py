"""Data: sources (text in) -> tokenizer -> packed, per-process batches (grain)."""

from llmjax.data.pipeline import (
    BATCH_KEYS,
    DataIterator,
    make_eval_batches,
    make_train_iterator,
    split_documents,
    tokenize_documents,
)
from llmjax.data.sources import read_documents
from llmjax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "BATCH_KEYS",
    "DataIterator",
    "Tokenizer",
    "load_tokenizer",
    "make_eval_batches",
    "make_train_iterator",
    "read_documents",
    "split_documents",
    "tokenize_documents",
]

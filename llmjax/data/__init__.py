"""Data: sources (text in) -> tokenizer -> packed, per-process batches (grain).

    sources.py    source strings (bundled:, text:, jsonl:, parquet:, tfds:, prepared:) -> documents
    clean.py      normalisation, filters, exact and MinHash near-duplicate detection
    tokenizer.py  Hugging Face tokenizers (loaded or trained) and a byte tokenizer
    prepared.py   the on-disk format of `python -m llmjax.prepare` (TFDS, array_record)
    pipeline.py   token documents -> shuffled, mixed, packed, resumable batches (grain)
    loader.py     config.data -> tokenizer, training iterator and eval batches
    bench.py      throughput of the tokenizer, the pipeline and the train step

Names are imported on first use, so that a light module (sources, clean) does not pull in
grain, JAX or transformers, e.g. in the worker processes of `llmjax.prepare`.
"""

import importlib

_EXPORTS = {
    "BATCH_KEYS": "pipeline", "DataIterator": "pipeline", "TokenSource": "pipeline",
    "make_eval_batches": "pipeline", "make_mixture_iterator": "pipeline",
    "make_train_iterator": "pipeline", "split_documents": "pipeline",
    "tokenize_documents": "pipeline", "read_documents": "sources", "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmjax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llmjax.data.{_EXPORTS[name]}"), name)

"""Data: sources (text in) -> tokenizer -> packed, per-process batches (grain).

    sources.py       source strings (bundled:, text:, jsonl:, parquet:, tfds:, prepared:)
                     -> documents
    clean.py         normalisation, filters, exact and MinHash near-duplicate detection
    tokenizer.py     Hugging Face tokenizers (loaded or trained) and a byte tokenizer
    documents.py     documents -> token documents; held-out splits
    packing.py       token documents -> packed rows (first-fit or concat); the batch layout
    pipeline.py      the training stream: shuffled, mixed, resumable batches; eval batches
    stream_state.py  the stream's saved state: gathering, combining, restart points
    prepare/         the library behind `python -m llmjax.prepare`: raw text -> cleaned,
                     deduplicated, tokenized TFDS shards
    prepared.py      the on-disk format `llmjax.data.prepare` writes (TFDS, array_record)
    loader.py        config.data -> tokenizer, training iterator and eval batches
    classify.py      labelled text -> padded rows and labels (sequence classification)
    sentiment.py     bundled:sentiment, the synthetic labelled set of the :tiny classifiers
    bench.py         throughput of the tokenizer, the pipeline and the train step

Names are imported on first use, so that a light module (sources, clean, documents) does not
pull in grain, JAX or transformers, e.g. in the worker processes of `llmjax.data.prepare`.
"""

import importlib

_EXPORTS = {
    "BATCH_KEYS": "packing", "DataIterator": "pipeline", "TokenSource": "pipeline",
    "make_eval_batches": "pipeline", "make_mixture_iterator": "pipeline",
    "make_train_iterator": "pipeline", "split_documents": "documents",
    "tokenize_documents": "documents", "read_documents": "sources", "Tokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmjax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"llmjax.data.{_EXPORTS[name]}"), name)

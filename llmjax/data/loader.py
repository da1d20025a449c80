"""config.data -> the tokenizer, this process's training iterator and the eval batches.

    data.train     one source or a weighted mixture `SRC=W,SRC=W` (see sources.py)
    data.eval      one source; empty: hold out `eval_fraction` of the first training source
                   if it is read into memory, else use its `validation` split
    data.tokenizer a directory, `bpe:N` or `byte`. A prepared dataset carries the tokenizer
                   that made its tokens: with a prepared source, `bpe:N` means "that one"
                   (the start-up line prints the replacement), and any other tokenizer
                   must be the same one (else an error)

Text sources (bundled:, text:, jsonl:, parquet:) are read and tokenized whole by every
process: fine for what fits in memory. Prepared datasets are read record by record, each
process only its share; TFDS text datasets the same, tokenized as they are read.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from llmjax.data import documents, pipeline, prepared, sources
from llmjax.data.sources import IN_MEMORY_KINDS, SourceSpec
from llmjax.data.tokenizer import Tokenizer, fingerprint, load_tokenizer

# bpe:N on TFDS text trains on this many documents from the start of each source.
TOKENIZER_SAMPLE_DOCUMENTS = 20_000


@dataclasses.dataclass
class _Opened:
    spec: SourceSpec
    weight: float
    documents: list[Any] | None = None  # text read into memory
    records: Sequence[Any] | None = None  # prepared token records or TFDS text records
    metadata: dict[str, Any] | None = None  # of a prepared dataset


def build(data: ml_collections.ConfigDict, *, seed: int, seq_len: int, global_batch_size: int,
          eval_batches: int, workdir: str, process_index: int = 0, process_count: int = 1,
          mask_token: bool = False
          ) -> tuple[Tokenizer, pipeline.DataIterator, list[dict[str, np.ndarray]]]:
    """(tokenizer, training iterator, eval batches) for this process, from `config.data`.

    `mask_token`: a `bpe:N` tokenizer trained now gets a mask token (masked-LM runs)."""
    data_dir = data.tfds_data_dir or None
    train = [_open(spec, weight, data_dir)
             for spec, weight in sources.parse_mixture(data.train, "config.data.train")]
    if data.eval:
        mixture = sources.parse_mixture(data.eval, "config.data.eval")
        if len(mixture) > 1:
            raise ValueError(f"config.data.eval={data.eval!r}: give one source (a mixture's "
                             "weights mean nothing for evaluation)")
        evaluation = _open(mixture[0][0], 1.0, data_dir)
    else:
        evaluation = _held_out(train[0], data.eval_fraction, seed, data_dir)

    tokenizer = _tokenizer(data.tokenizer, [*train, evaluation], workdir, process_index,
                           process_count, mask_token)
    token_sources = [pipeline.TokenSource(o.spec.text, _token_records(o, tokenizer), o.weight)
                     for o in train]
    train_iter = pipeline.make_mixture_iterator(
        token_sources, seq_len=seq_len, global_batch_size=global_batch_size, seed=seed,
        packing=data.packing, packing_bins=data.packing_bins, num_workers=data.num_workers,
        process_index=process_index, process_count=process_count)
    eval_batches_ = pipeline.make_eval_batches(
        _token_records(evaluation, tokenizer), seq_len=seq_len,
        global_batch_size=global_batch_size, max_batches=eval_batches,
        process_index=process_index, process_count=process_count)
    return tokenizer, train_iter, eval_batches_


def _open(spec: SourceSpec, weight: float, data_dir: str | None) -> _Opened:
    if spec.kind in IN_MEMORY_KINDS:
        return _Opened(spec, weight, documents=sources.read_documents(spec))
    if spec.kind == "prepared":
        return _Opened(spec, weight,
                       records=prepared.open_split(spec.location, spec.split, spec.text),
                       metadata=prepared.read_metadata(spec.location, spec.text))
    return _Opened(spec, weight, records=sources.open_tfds(spec, data_dir))


def _held_out(first: _Opened, eval_fraction: float, seed: int, data_dir: str | None) -> _Opened:
    """The eval source when config.data.eval is empty (may shrink `first`'s documents)."""
    if first.documents is not None:
        first.documents, held_out = documents.split_documents(first.documents, eval_fraction,
                                                             seed)
        return dataclasses.replace(first, documents=held_out)
    spec = dataclasses.replace(first.spec, split="validation",
                               text=_with_split(first.spec, "validation"))
    if spec.kind == "prepared":
        if "validation" not in prepared.split_names(spec.location, first.spec.text):
            raise ValueError(f"config.data.eval is empty and {first.spec.text!r} has no "
                             "validation split; set config.data.eval (or prepare with "
                             "--validation_fraction > 0)")
        return _open(spec, 1.0, data_dir)
    try:
        return _open(spec, 1.0, data_dir)
    except ValueError:
        raise ValueError(f"config.data.eval is empty and {first.spec.text!r} has no prepared "
                         "validation split; set config.data.eval to a split it has, e.g. "
                         f"{_with_split(first.spec, 'test')}") from None


def _with_split(spec: SourceSpec, split: str) -> str:
    fields = "" if spec.fields == (sources.DEFAULT_FIELD,) else "#" + "+".join(spec.fields)
    return f"{spec.kind}:{spec.location}:{split}{fields}"


def _tokenizer(spec: str, opened: list[_Opened], workdir: str, process_index: int,
               process_count: int, mask_token: bool = False) -> Tokenizer:
    made_with = {o.metadata["tokenizer_fingerprint"]: (o.metadata["tokenizer"],
                                                       f"{o.spec.kind}:{o.spec.location}")
                 for o in opened if o.metadata is not None}
    if len(made_with) > 1:
        names = ", ".join(source for _, source in made_with.values())
        raise ValueError(f"config.data.train / data.eval: the prepared datasets {names} were "
                         "tokenized with different tokenizers; prepare them with one")
    if made_with:
        [(expected, (path, source))] = made_with.items()
        # bpe:N would train a new tokenizer; a prepared dataset's ids need the one that made
        # them, so it replaces bpe:N, and the start-up line says so.
        replaced = spec if spec.startswith("bpe:") else ""
        tokenizer = load_tokenizer(path if replaced else spec)
        if fingerprint(tokenizer) != expected:
            raise ValueError(f"config.data.tokenizer={spec!r} is not the tokenizer that "
                             f"tokenized {source!r} ({path}); leave data.tokenizer at bpe:N "
                             "to use that one")
        tokenizer.source = (f"{'built in' if path == 'byte' else 'from ' + path}, the "
                            f"tokenizer of {source}")
        if replaced:
            tokenizer.source += (f" (in place of config.data.tokenizer={replaced}: a prepared "
                                 "dataset is read with its own tokenizer)")
        return tokenizer
    texts = [sources.document_text(d) for o in opened if o.documents is not None
             for d in o.documents]
    for o in opened:
        if o.documents is None and spec.startswith("bpe:"):  # TFDS text: train on a sample
            texts += [sources.document_text(_tfds_document(o.spec, o.records[i], i))
                      for i in range(min(len(o.records), TOKENIZER_SAMPLE_DOCUMENTS))]
    if process_count == 1:
        return load_tokenizer(spec, texts, workdir, mask_token)
    from jax.experimental import multihost_utils

    # Process 0 trains and saves a `bpe:` tokenizer; the others then load the same files.
    if process_index == 0:
        tokenizer = load_tokenizer(spec, texts, workdir, mask_token)
    multihost_utils.sync_global_devices("llmjax.data tokenizer")
    if process_index != 0:
        tokenizer = load_tokenizer(spec, texts, workdir, mask_token)
    return tokenizer


def _token_records(opened: _Opened, tokenizer: Tokenizer) -> Sequence[Any]:
    if opened.documents is not None:
        return documents.tokenize_documents(tokenizer, opened.documents)
    if opened.metadata is not None:
        return opened.records
    return documents.TokenizedRecords(opened.records,
                                     functools.partial(_tfds_document, opened.spec), tokenizer)


def _tfds_document(spec: SourceSpec, record: Any, index: int) -> sources.Document:
    def fail(reason: str, where: str, detail: str, count: int = 1) -> None:
        raise ValueError(f"data source {spec.text!r}: {where} {detail}; name the text "
                         "field(s) with #FIELD or #PROMPT+RESPONSE")

    document = sources.record_document(spec, record, f"record {index}", fail)
    assert document is not None
    return document

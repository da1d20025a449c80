"""Sequence-classification data: labelled text -> padded [batch, length] rows and [batch] labels.

    jsonl:GLOB[#TEXT+LABEL]      one example per line (fields `text` and `label` by default)
    csv:GLOB[#TEXT+LABEL]        one example per row, with a header line
    tfds:NAME[/CONFIG][:SPLIT][#TEXT+LABEL]   e.g. tfds:imdb_reviews:train,
                                 tfds:glue/sst2:train#sentence+label (prepared, never downloaded)
    bundled:sentiment            600 synthetic two-class records (llmjax.data.sentiment)
    bundled:word_order           600 lines of the plays, as written or shuffled
                                 (llmjax.data.word_order)

Labels are integers 0..num_labels-1. Each row is one example: [bos] + tokens, cut to
`seq_len`, padded with segment id 0 (BERT pools the first token, decoders the last real one).
A batch: `inputs`, `segment_ids`, `positions` [batch, length] int32; `labels`,
`loss_mask` (1: a real row, 0: padding of a short final eval batch) [batch] int32.
"""

import csv
import glob
import json
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from llmjax.data import sentiment, sources, word_order
from llmjax.data.tokenizer import Tokenizer, load_tokenizer

DEFAULT_FIELDS = ("text", "label")
BUNDLED = {"sentiment": sentiment.examples, "word_order": word_order.examples}


def parse(source: str, key: str) -> tuple[str, str, str, tuple[str, str]]:
    """`KIND:LOCATION[#TEXT+LABEL]` -> (kind, location, split, (text field, label field))."""
    kind, _, rest = source.partition(":")
    location, hash_, field_text = rest.rpartition("#") if "#" in rest else (rest, "", "")
    fields = tuple(field_text.split("+")) if hash_ else DEFAULT_FIELDS
    if (kind not in ("jsonl", "csv", "tfds", "bundled") or not location or len(fields) != 2
            or (kind == "bundled" and location not in BUNDLED)):
        raise ValueError(f"{key}={source!r}: a classification source is jsonl:GLOB, csv:GLOB, "
                         "tfds:NAME[:SPLIT], optionally with #TEXT_FIELD+LABEL_FIELD, or "
                         + " or ".join(f"bundled:{name}" for name in BUNDLED))
    split = "train"
    if kind == "tfds":
        location, _, split = location.partition(":")
        split = split or "train"
    return kind, location, split, fields  # type: ignore[return-value]


def read_examples(source: str, key: str, data_dir: str | None = None
                  ) -> tuple[list[str], np.ndarray]:
    """(texts, int labels) of every example of `source`, in file order."""
    kind, location, split, (text_field, label_field) = parse(source, key)
    if kind == "bundled":
        texts, labels = BUNDLED[location]()
        return texts, np.asarray(labels, np.int32)
    if kind == "tfds":
        spec = sources.parse_source(f"tfds:{location}:{split}", key)
        records: Sequence[Any] = sources.open_tfds(spec, data_dir)
    else:
        paths = sorted(glob.glob(location))
        if not paths:
            raise FileNotFoundError(f"{key}={source!r}: no file matches {location}")
        records = []
        for path in paths:
            with open(path, encoding="utf-8", newline="") as f:
                records += (list(csv.DictReader(f)) if kind == "csv"
                            else [json.loads(line) for line in f if line.strip()])
    texts, labels = [], []
    for i, record in enumerate(records):
        if text_field not in record or label_field not in record:
            raise ValueError(f"{key}={source!r}: record {i} has no field {text_field!r} or "
                             f"{label_field!r} (fields: {sorted(record)}); name them with "
                             "#TEXT+LABEL")
        text = record[text_field]
        texts.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        try:
            labels.append(int(record[label_field]))
        except (TypeError, ValueError):
            raise ValueError(f"{key}={source!r}: record {i}: label {record[label_field]!r} "
                             "is not an integer class id") from None
    if not texts:
        raise ValueError(f"{key}={source!r} holds no examples")
    return texts, np.asarray(labels, np.int32)


def encode(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int) -> dict[str, np.ndarray]:
    """Texts -> padded `inputs`, `segment_ids`, `positions` [len(texts), seq_len]."""
    n = len(texts)
    inputs = np.full((n, seq_len), tokenizer.pad_id, np.int32)
    segment_ids = np.zeros((n, seq_len), np.int32)
    for i, ids in enumerate(tokenizer.encode_batch(list(texts))):
        ids = ([tokenizer.bos_id] + list(ids))[:seq_len]
        inputs[i, :len(ids)] = ids
        segment_ids[i, :len(ids)] = 1
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy()
    return {"inputs": inputs, "segment_ids": segment_ids, "positions": positions}


class ExampleIterator:
    """Endless shuffled epochs of this process's rows of each global batch; resumable with
    get_state / set_state (a JSON dict: epoch and position)."""

    def __init__(self, rows: dict[str, np.ndarray], *, global_batch_size: int, seed: int,
                 process_index: int, process_count: int):
        self.rows, self.seed = rows, seed
        self.global_batch_size = global_batch_size
        local = global_batch_size // process_count
        self.local = slice(process_index * local, (process_index + 1) * local)
        self.num = len(rows["labels"])
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        order = self._order()
        take = []
        while len(take) < self.global_batch_size:
            if self.position >= self.num:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            n = min(self.global_batch_size - len(take), self.num - self.position)
            take += list(order[self.position:self.position + n])
            self.position += n
        index = np.asarray(take)[self.local]
        return {k: v[index] for k, v in self.rows.items()}

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def close(self) -> None:
        pass


def build(data: ml_collections.ConfigDict, *, seed: int, seq_len: int, global_batch_size: int,
          workdir: str, process_index: int = 0, process_count: int = 1
          ) -> tuple[Tokenizer, ExampleIterator, list[dict[str, np.ndarray]]]:
    """(tokenizer, training iterator, every eval example in batches) from `config.data`.

    `data.eval` empty: hold out `data.eval_fraction` of the training examples.
    """
    data_dir = data.tfds_data_dir or None
    texts, labels = read_examples(data.train, "config.data.train", data_dir)
    if data.eval:
        eval_texts, eval_labels = read_examples(data.eval, "config.data.eval", data_dir)
    else:
        order = np.random.default_rng(seed).permutation(len(texts))
        held = order[:max(1, int(len(texts) * data.eval_fraction))]
        keep = np.setdiff1d(order, held)
        eval_texts, eval_labels = [texts[i] for i in held], labels[held]
        texts, labels = [texts[i] for i in keep], labels[keep]
    tokenizer = load_tokenizer(data.tokenizer, texts, workdir)
    train_rows = {**encode(tokenizer, texts, seq_len), "labels": labels,
                  "loss_mask": np.ones(len(labels), np.int32)}
    train_iter = ExampleIterator(train_rows, global_batch_size=global_batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count)
    return tokenizer, train_iter, eval_batches(tokenizer, eval_texts, eval_labels, seq_len,
                                               global_batch_size, process_index, process_count)


def eval_batches(tokenizer: Tokenizer, texts: Sequence[str], labels: np.ndarray, seq_len: int,
                 global_batch_size: int, process_index: int = 0, process_count: int = 1
                 ) -> list[dict[str, np.ndarray]]:
    """All examples, in order, as this process's rows of global batches (the last one
    padded with loss_mask 0 rows)."""
    rows = {**encode(tokenizer, texts, seq_len), "labels": np.asarray(labels, np.int32),
            "loss_mask": np.ones(len(labels), np.int32)}
    local = global_batch_size // process_count
    batches = []
    for start in range(0, len(labels), global_batch_size):
        batch = {k: v[start:start + global_batch_size] for k, v in rows.items()}
        missing = global_batch_size - len(batch["labels"])
        if missing:
            batch = {k: np.pad(v, [(0, missing)] + [(0, 0)] * (v.ndim - 1))
                     for k, v in batch.items()}
        batches.append({k: v[process_index * local:(process_index + 1) * local]
                        for k, v in batch.items()})
    return batches


def accuracy_and_f1(predictions: np.ndarray, labels: np.ndarray,
                    num_labels: int) -> tuple[float, float]:
    """Accuracy, and F1: of class 1 for two classes, macro-averaged over classes otherwise."""
    accuracy = float(np.mean(predictions == labels)) if len(labels) else 0.0
    f1s = []
    for c in ([1] if num_labels == 2 else range(num_labels)):
        tp = np.sum((predictions == c) & (labels == c))
        fp = np.sum((predictions == c) & (labels != c))
        fn = np.sum((predictions != c) & (labels == c))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return accuracy, float(np.mean(f1s))

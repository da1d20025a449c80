"""Masked-LM data: the language-model stream (llmjax.data.loader) with the maskable tokens.

The same sources, packing, sharding and resumable state as `task = "lm"`; each batch of
it keeps `inputs`, `segment_ids` and `positions`, and gets `targets` = `inputs` and
`loss_mask` 1 on the tokens that masking may choose: text, never padding (segment 0) or a
special token ([CLS], [SEP], [MASK], ...). The train step masks them
(llmjax.training.masking). A `bpe:N` tokenizer trained for the run gets a mask token; any
other tokenizer must have one.
"""

from collections.abc import Sequence

import ml_collections
import numpy as np

from llmjax.data import loader
from llmjax.data.packing import Batch
from llmjax.data.tokenizer import Tokenizer


def maskable(batch: Batch, special_ids: Sequence[int]) -> Batch:
    """A language-model batch [rows, seq_len] -> the masked-LM batch described above."""
    inputs = batch["inputs"]
    keep = (batch["segment_ids"] > 0) & ~np.isin(inputs, np.asarray(special_ids, inputs.dtype))
    return {**batch, "targets": inputs, "loss_mask": keep.astype(np.int32)}


class MaskableIterator:
    """A training iterator whose batches go through `maskable`; state as the one it wraps."""

    def __init__(self, batches, special_ids: Sequence[int]):
        self.batches, self.special_ids = batches, tuple(special_ids)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        return maskable(next(self.batches), self.special_ids)

    def get_state(self):
        return self.batches.get_state()

    def set_state(self, state) -> None:
        self.batches.set_state(state)

    def close(self) -> None:
        self.batches.close()


def build(data: ml_collections.ConfigDict, **kwargs
          ) -> tuple[Tokenizer, MaskableIterator, list[Batch]]:
    """(tokenizer, training iterator, eval batches) as llmjax.data.loader.build (same
    arguments), with the maskable tokens marked."""
    tokenizer, train_iter, eval_batches = loader.build(data, mask_token=True, **kwargs)
    if tokenizer.mask_id is None:
        train_iter.close()
        raise ValueError(f"config.task=mlm needs a tokenizer with a mask token, and "
                         f"config.data.tokenizer={data.tokenizer!r} has none: use bpe:N "
                         "(trained with one) or a BERT tokenizer directory")
    special = tokenizer.special_ids
    return (tokenizer, MaskableIterator(train_iter, special),
            [maskable(batch, special) for batch in eval_batches])

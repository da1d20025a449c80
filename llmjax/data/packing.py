"""Token documents -> packed rows (grain): cutting into input/target pieces, then packing.

Input/target pairs are formed per document before packing, so no position predicts a token
of another document; `segment_ids` and `positions` let attention and position embeddings
respect the same boundaries.

A batch is a dict of int32 numpy arrays, each [rows, seq_len]:

    inputs       token ids fed to the model (0 on padding)
    targets      the token that follows each input (0 on padding)
    segment_ids  1, 2, 3, ... for the documents packed into a row, 0 on padding
    positions    position within its own document piece, restarting at 0 per segment
    loss_mask    1 where the target counts in the loss: 0 on padding and on the prompt of
                 a fine-tuning example
"""

import grain
import numpy as np

from llmjax.config import PACKINGS
from llmjax.data.documents import TokenDoc

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class _CutIntoPieces(grain.experimental.FlatMapTransform):
    """A token document -> {'inputs', 'targets', 'loss_mask'} pieces of <= seq_len pairs.

    Pairs are formed before cutting, so a long document loses no prediction at a cut;
    each piece is its own segment (its positions restart at 0). Pieces in which no target
    counts (all prompt) are left out: they could not inform any other piece.
    """

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, document: TokenDoc) -> list[dict[str, np.ndarray]]:
        prompt_length = 0
        if isinstance(document, dict):
            prompt_length, document = int(document["prompt_length"]), document["tokens"]
        tokens = np.asarray(document).astype(np.int32)
        inputs, targets = tokens[:-1], tokens[1:]
        # Target i is tokens[i + 1]: it counts once it is past the prompt.
        mask = (np.arange(1, len(tokens)) >= prompt_length).astype(np.int32)
        return [{"inputs": inputs[start:start + self.seq_len],
                 "targets": targets[start:start + self.seq_len],
                 "loss_mask": mask[start:start + self.seq_len]}
                for start in range(0, len(inputs), self.seq_len)
                if mask[start:start + self.seq_len].any()]


def pack_documents(documents: grain.IterDataset, seq_len: int, num_rows: int, packing: str, *,
                   seed: int, shuffle_rows: bool) -> grain.IterDataset:
    """Token documents -> packed rows: dicts of [seq_len] arrays under BATCH_KEYS."""
    pieces = grain.experimental.FlatMapIterDataset(documents, _CutIntoPieces(seq_len))
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    if packing == "first_fit":
        # Packs a window of `num_rows` rows at a time: a wider window pads less but holds
        # more documents back (and mixes neighbouring epochs more).
        rows = grain.experimental.FirstFitPackIterDataset(
            pieces, length_struct=lengths, num_packing_bins=num_rows, seed=seed,
            shuffle_bins=shuffle_rows)
    else:
        rows = grain.experimental.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
    return rows.map(_model_features)


def _model_features(row: dict[str, np.ndarray]) -> Batch:
    # Inputs and targets come from the same pieces, so their segment ids and positions
    # agree; keep one copy under the names the model uses.
    return {"inputs": row["inputs"].astype(np.int32),
            "targets": row["targets"].astype(np.int32),
            "segment_ids": row["inputs_segment_ids"].astype(np.int32),
            "positions": row["inputs_positions"].astype(np.int32),
            "loss_mask": row["loss_mask"].astype(np.int32)}


def pad_rows(batch: Batch, num_rows: int) -> Batch:
    """Fills a short final batch up to num_rows with all-zero rows (loss_mask 0)."""
    missing = num_rows - len(batch["inputs"])
    if missing == 0:
        return batch
    return {key: np.pad(value, ((0, missing), (0, 0))) for key, value in batch.items()}


def check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise ValueError(f"data.packing={packing!r} is not one of {', '.join(PACKINGS)}")

"""Documents (text, Example, Chat) -> token documents, what packing.py and pipeline.py take.

Needs neither grain nor JAX, so the worker processes of `llmjax.data.prepare` tokenize with it.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llmjax.data.sources import Chat, Example

# A token document: [bos, ..., eos] ids, or {"tokens": [...], "prompt_length": int} where the
# first prompt_length tokens are never a target (fine-tuning prompts).
TokenDoc = Any


def tokenize_documents(tokenizer, documents: Sequence[Any]) -> list[TokenDoc]:
    """Each document as int32 ids [bos] + ids + [eos], the form packing and the stream take.

    A fine-tuning `Example(prompt, response)` becomes {"tokens": [bos] + prompt + response +
    [eos], "prompt_length": 1 + len(prompt ids)}: only the response and eos are targets.
    A `Chat` is first rendered into such an Example (`render_chat`).
    """
    documents = [render_chat(tokenizer, d) if isinstance(d, Chat) else d for d in documents]
    texts: list[str] = []
    for document in documents:
        texts.extend([document] if isinstance(document, str) else document)
    ids = iter(tokenizer.encode_batch(texts))
    bos, eos = np.int32(tokenizer.bos_id), np.int32(tokenizer.eos_id)
    token_docs: list[TokenDoc] = []
    for document in documents:
        if isinstance(document, str):
            token_docs.append(np.concatenate([[bos], np.asarray(next(ids), np.int32), [eos]]))
        else:
            prompt, response = next(ids), next(ids)
            token_docs.append({"tokens": np.array([bos, *prompt, *response, eos], np.int32),
                               "prompt_length": 1 + len(prompt)})
    return token_docs


def render_chat(tokenizer, chat: Chat) -> Example:
    """Chat -> Example(prompt: every message but the last, rendered with the tokenizer's
    chat template and its generation prompt; response: the rest of the rendered chat, i.e.
    the last assistant message with its end-of-turn marker). Without a chat template:
    "role: content" lines and "assistant: ", then the message."""
    messages = [{"role": role, "content": content} for role, content in chat.messages]
    hf_tokenizer = getattr(tokenizer, "hf_tokenizer", None)
    if hf_tokenizer is None or not getattr(hf_tokenizer, "chat_template", None):
        history = "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1])
        return Example(history + "assistant: ", messages[-1]["content"])
    prompt = hf_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True,
                                              tokenize=False)
    full = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    response = full[len(prompt):] if full.startswith(prompt) else messages[-1]["content"]
    bos_text = hf_tokenizer.bos_token
    if bos_text and prompt.startswith(bos_text):
        prompt = prompt[len(bos_text):]  # tokenize_documents adds the bos itself
    return Example(prompt, response)


class TokenizedRecords(Sequence):
    """Random-access token documents from records that hold text, tokenized on access.

    `to_document(record, index)` returns the text (or Example) of a record. Used for TFDS
    text datasets: each process (or grain worker) tokenizes only the records it reads.
    """

    def __init__(self, records: Sequence[Any], to_document: Callable[[Any, int], Any],
                 tokenizer):
        self._records, self._to_document, self._tokenizer = records, to_document, tokenizer

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> TokenDoc:  # type: ignore[override]
        document = self._to_document(self._records[index], index)
        return tokenize_documents(self._tokenizer, [document])[0]


def split_documents(documents: Sequence[Any], eval_fraction: float,
                    seed: int) -> tuple[list[Any], list[Any]]:
    """Holds out round(eval_fraction * len) documents (at least one if eval_fraction > 0).

    Which documents are held out depends only on `seed`; both lists keep the input order.
    When whole documents cannot meet it (one text file: holding out its only document
    would leave nothing to train on), the tail `eval_fraction` of each text document's
    characters is held out instead, cut at a line break where one is near.
    Returns (train_documents, eval_documents).
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction={eval_fraction} must be in [0, 1)")
    num_eval = max(round(eval_fraction * len(documents)), 1) if eval_fraction > 0 else 0
    if num_eval >= len(documents):
        return _split_text(documents, eval_fraction)
    held_out = set(np.random.default_rng(seed).permutation(len(documents))[:num_eval].tolist())
    train = [d for i, d in enumerate(documents) if i not in held_out]
    evaluation = [d for i, d in enumerate(documents) if i in held_out]
    return train, evaluation


def _split_text(documents: Sequence[Any], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(heads, tails): each text document cut before its last `eval_fraction` of text."""
    if not all(isinstance(d, str) for d in documents) or not any(len(d) > 1 for d in documents):
        raise ValueError(f"cannot hold out {eval_fraction:g} of {len(documents)} documents "
                         "for eval and still train; give more documents or a separate "
                         "data.eval")
    train, evaluation = [], []
    for text in documents:
        cut = min(max(round(len(text) * (1 - eval_fraction)), 1), len(text) - 1)
        line_break = text.rfind("\n", 0, cut)
        if 0 < line_break and cut - line_break <= 1000:  # near: keep lines whole
            cut = line_break + 1
        if 0 < cut < len(text):
            train.append(text[:cut])
            evaluation.append(text[cut:])
    return train, evaluation

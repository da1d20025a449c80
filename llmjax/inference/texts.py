"""Text around the engine's token ids: prompts in, completion text out (streamed in
pieces), chat templates, and the token texts that logprobs are keyed by.

A string prompt is encoded as training saw documents: [bos] + tokens. Token-id prompts
are used as they are (lm-evaluation-harness tokenizes them itself). Chat messages go
through the chat template, the tokenizer's own or a file's, rendered in a sandboxed
Jinja environment; a model without one is an error, never a made-up format.
"""

from collections.abc import Sequence
from typing import Any

import jinja2.sandbox

from llmjax.data.tokenizer import Tokenizer


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template failed on these messages."""


class Texts:
    def __init__(self, tokenizer: Tokenizer, chat_template: str | None = None):
        """`chat_template`: a Jinja template (as in tokenizer_config.json) to use instead of
        the tokenizer's."""
        self.tokenizer = tokenizer
        hf = tokenizer.hf_tokenizer
        self.chat_template = chat_template or (getattr(hf, "chat_template", None)
                                               if hf is not None else None)
        self._template = None
        if self.chat_template:
            environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True)
            environment.globals["raise_exception"] = _raise
            self._template = environment.from_string(self.chat_template)
        self._specials = self._special_tokens()

    # --- prompts -----------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`text` as token ids; special token strings (e.g. "<eos>") become their ids."""
        ids: list[int] = [self.tokenizer.bos_id] if add_special_tokens else []
        if text in self._specials:
            return ids + [self._specials[text]]
        return ids + self.tokenizer.encode(text)

    def prompts(self, prompt: str | list) -> list[list[int]]:
        """A completions `prompt` field as token-id prompts."""
        if isinstance(prompt, str):
            return [self.encode(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return [self.encode(p) for p in prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return [list(p) for p in prompt]

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        if self._template is None:
            raise ChatTemplateError("this model has no chat template; start the server with "
                                    "--chat_template=FILE (a Jinja template)")
        hf = self.tokenizer.hf_tokenizer
        specials = {"bos_token": getattr(hf, "bos_token", None) or "",
                    "eos_token": getattr(hf, "eos_token", None) or ""}
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=True,
                                         **specials)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The rendered chat as token ids (the template writes any BOS it wants)."""
        return self.tokenizer.encode(self.render_chat(messages))

    # --- outputs -----------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def piece(self, token: int) -> str:
        """One token's text (special tokens by name), the key of a top_logprobs entry."""
        name = self._names.get(token)
        return name if name is not None else self.tokenizer.decode([token])

    def info(self) -> dict[str, Any]:
        """What lm-evaluation-harness's remote tokenizer reads from /tokenizer_info."""
        names = {v: k for k, v in self._specials.items()}
        return {"eos_token": names.get(self.tokenizer.eos_id),
                "bos_token": names.get(self.tokenizer.bos_id),
                "pad_token": names.get(self.tokenizer.pad_id),
                "chat_template": self.chat_template, "vocab_size": self.tokenizer.vocab_size}

    def _special_tokens(self) -> dict[str, int]:
        hf = self.tokenizer.hf_tokenizer
        if hf is not None:
            specials = {token: hf.convert_tokens_to_ids(token) for token in hf.all_special_tokens}
        else:  # the byte tokenizer
            from llmjax.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN

            specials = {PAD_TOKEN: self.tokenizer.pad_id, BOS_TOKEN: self.tokenizer.bos_id,
                        EOS_TOKEN: self.tokenizer.eos_id}
        self._names = {v: k for k, v in specials.items()}
        return specials


class TextStream:
    """A request's completion as text deltas: what is new since the last call, holding back
    an unfinished UTF-8 character and anything that may be the start of a stop string.

    Decoding is incremental, so an event costs the same at the 10th token as at the
    1000th: the new tokens are decoded after the chunk before them (the context a
    SentencePiece space or a byte-level character needs), and the text they add is
    the difference. A chunk ends where its text is whole (no U+FFFD), so the next one
    starts on a character boundary."""

    def __init__(self, texts: Texts, stops: Sequence[str]):
        self.texts, self.stops = texts, list(stops)
        self.text = ""  # the text of tokens[:self._read]
        self._context = self._read = 0  # tokens[_context:_read]: the chunk decoded last
        self._context_text = ""
        self.sent = 0  # characters of self.text already returned

    def delta(self, tokens: Sequence[int], final_text: str | None) -> str:
        """New text of `tokens` (the completion so far); at the end (`final_text`: the
        engine's, cut before a stop string) all of what remains."""
        if final_text is not None:
            piece, self.sent = final_text[self.sent:], max(self.sent, len(final_text))
            return piece
        if len(tokens) > self._read:
            self._extend(tokens)
        text, cut = self.text, len(self.text)
        for stop in self.stops:
            for n in range(min(len(stop), len(text)) - 1, 0, -1):
                if text.endswith(stop[:n]):
                    cut = min(cut, len(text) - n)
                    break
        piece, self.sent = text[self.sent:cut], max(self.sent, cut)
        return piece

    def _extend(self, tokens: Sequence[int]) -> None:
        decoded = self.texts.decode(tokens[self._context:])
        if decoded.endswith("\ufffd") or len(decoded) < len(self._context_text):
            return  # mid-character: wait for the token that completes it
        self.text += decoded[len(self._context_text):]
        self._context, self._read = self._read, len(tokens)
        self._context_text = self.texts.decode(tokens[self._context:self._read])


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)

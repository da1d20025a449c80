"""The OpenAI-compatible request bodies (pydantic) and the response bodies built from
finished or streaming requests.

Completions (`/v1/completions`) take `prompt` as a string, a list of strings, a list of
token ids or a list of such lists; chat completions (`/v1/chat/completions`) take
`messages`. Settings outside what the engine does (penalties, logit bias, best_of,
suffix) are refused with a 400 naming them rather than silently ignored.
"""

import time
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmjax.inference.requests import Request
from llmjax.inference.steps import TOP_N

Prompt = str | list[str] | list[int] | list[list[int]]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields: see `unsupported`

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 or -1: off
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2**31)
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def unsupported(self) -> list[str]:
        """Fields set to something the engine does not do."""
        bad = [name for name in ("presence_penalty", "frequency_penalty")
               if getattr(self, name) != 0]
        if self.logit_bias:
            bad.append("logit_bias")
        for name, value in (self.model_extra or {}).items():
            if name == "best_of" and value in (None, 1):
                continue
            if name in ("user", "suffix") and not value:
                continue
            if name in ("best_of", "suffix", "tools", "functions", "response_format",
                        "tool_choice"):
                bad.append(name)
        return bad


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=TOP_N)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and not value:
            raise ValueError("prompt is an empty list")
        return value


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=TOP_N)


class TokenizeRequest(BaseModel):
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]


def error(status: int, message: str, param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
            503: "service_unavailable", 504: "timeout"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status}}, status_code=status, headers=headers)


def new_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(request: Request, piece: Any, echo: bool, top: int,
                        text_of: Any) -> dict[str, list]:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs
    ({token text: logprob}) and text_offset, for the prompt first when echoing (its first
    token has none), then the generated tokens. `piece(id)` names a token (special ones
    by name), `text_of(id)` is what it adds to the text (special ones: nothing)."""
    ids, logprobs, tops = [], [], []
    if echo:
        ids += request.prompt
        logprobs += list(request.prompt_logprobs or [None] * len(request.prompt))
        tops += list(request.prompt_top_logprobs or [None] * len(request.prompt))
    ids += request.tokens
    logprobs += request.logprobs
    tops += request.top_logprobs
    offsets, at = [], 0
    for token in ids:
        offsets.append(at)
        at += len(text_of(token))
    return {"tokens": [piece(i) for i in ids], "token_logprobs": logprobs,
            "top_logprobs": [None if t is None else {piece(i): lp for i, lp in t[:top]}
                             for t in tops],
            "text_offset": offsets}


def chat_logprobs(request: Request, piece: Any) -> dict[str, list]:
    """The chat `logprobs` object: per generated token its text, logprob, UTF-8 bytes and
    top alternatives."""
    content = []
    for token, logprob, top in zip(request.tokens, request.logprobs, request.top_logprobs):
        text = piece(token)
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": piece(i), "logprob": lp,
                                          "bytes": list(piece(i).encode())} for i, lp in top]})
    return {"content": content}


def completion_body(kind: str, model: str, choices: list[dict], usage_: dict | None
                    ) -> dict[str, Any]:
    body = {"id": new_id("cmpl" if kind == "text_completion" else "chatcmpl"),
            "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body

"""What a caller asks of the engine and what it gets back: sampling settings and requests.

A `Request` is filled in as the engine generates: the completion's token ids, each one's
logprob and top alternatives, the prompt's logprobs if asked, and why it finished
("stop": EOS, a stop token or a stop string; "length": max_tokens). Stop strings are
matched on the decoded completion text: the text ends before the stop string.
"""

import dataclasses
import threading
from collections.abc import Callable, Sequence

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # tokens to generate at most (0: score the prompt only)
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    seed: int = 0
    stop: tuple[str, ...] = ()  # each ends the completion where it appears
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # top alternatives reported per generated token (at most TOP_N)
    prompt_logprobs: bool = False  # the logprob of each prompt token given those before

    def check(self, top_n: int) -> None:
        """ValueError naming the first field out of range."""
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.logprobs <= top_n:
            raise ValueError(f"logprobs={self.logprobs} must be in [0, {top_n}]")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"seed={self.seed} must be in [0, 2**31)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    tokens: list[int] = dataclasses.field(default_factory=list)  # an ending EOS included
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    # Prompt token i given tokens < i (None for the first); filled if params.prompt_logprobs.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    text: str | None = None  # the completion, when the engine has a detokenizer
    finish_reason: str | None = None
    num_generated: int = 0  # sampled tokens
    cancelled: bool = False
    # Called from the engine's thread after every new token and once when finished.
    on_update: Callable[["Request"], None] | None = None
    _done: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def cancel(self) -> None:
        """Leave the engine at its next step (the client went away)."""
        self.cancelled = True


def accept(request: Request, token: int, logprob: float,
           top: Callable[[], Sequence[tuple[int, float]]], eos_ids: Sequence[int],
           detokenize: Callable[[list[int]], str] | None, room: int) -> bool:
    """Record a sampled token; True when the request is finished. `top()` gives its most
    likely alternatives (read only if asked for); `room`: tokens the cache still holds."""
    params = request.params
    request.num_generated += 1
    request.tokens.append(token)
    request.logprobs.append(logprob)
    request.top_logprobs.append(list(top()[:params.logprobs]) if params.logprobs else [])
    if (token in params.stop_token_ids) or (token in eos_ids and not params.ignore_eos):
        # The ending token stays in the ids and logprobs (lm-evaluation-harness counts one
        # generated token after an echoed prompt), not in the text.
        if detokenize is not None:
            request.text = detokenize(request.tokens[:-1])
        return finish(request, FINISH_STOP, None)
    if params.stop and detokenize is not None and _stop_in_tail(request, detokenize):
        text = detokenize(request.tokens)
        request.text = text[:min(i for s in params.stop if (i := text.find(s)) >= 0)]
        return finish(request, FINISH_STOP, None)
    if len(request.tokens) >= params.max_tokens or room <= 0:
        return finish(request, FINISH_LENGTH, detokenize)
    if request.on_update is not None:
        request.on_update(request)
    return False


def _stop_in_tail(request: Request, detokenize: Callable[[list[int]], str]) -> bool:
    """Whether a stop string ends in the text of the newest tokens: only the newest token
    can complete one, and a string of n characters spans at most 4n tokens (bytes)."""
    longest = max(len(s) for s in request.params.stop)
    tail = detokenize(request.tokens[-(4 * longest + 4):])
    return any(s in tail for s in request.params.stop)


def finish(request: Request, reason: str,
           detokenize: Callable[[list[int]], str] | None = None) -> bool:
    """Mark the request finished (its text decoded, if there is a detokenizer)."""
    if detokenize is not None:
        request.text = detokenize(request.tokens)
    request.finish_reason = reason
    if request.on_update is not None:
        request.on_update(request)
    request._done.set()
    return True

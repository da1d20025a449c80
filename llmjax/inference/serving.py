"""Serving one HTTP request: settings -> engine requests -> a JSON body or an SSE stream.

The engine thread calls each request's `on_update`; it wakes the HTTP side's asyncio loop
(`call_soon_threadsafe`, once for all the updates of a step), which reads the request's
tokens so far. A non-streaming handler polls for the client going away while it waits,
and gives up at the deadline; a streaming one stops when the client disconnects. Either
way the engine requests are cancelled and leave their slots at the next step.
"""

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llmjax.inference import openai_api
from llmjax.inference.openai_api import error
from llmjax.inference.requests import Request, SamplingParams
from llmjax.inference.runner import EngineRunner, NotAccepting, QueueFull
from llmjax.inference.server_metrics import ServerMetrics
from llmjax.inference.texts import ChatTemplateError, Texts, TextStream

POLL_SECONDS = 0.1  # how often a waiting handler checks that its client is still there


class _Wakeups:
    """Updates from the engine's thread, handed to the asyncio loop in one call per burst:
    a step updates every busy slot in a row, and one wake-up of the loop (a write to its
    self-pipe, a turn of the loop) for all of them costs less than one each."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self._lock = loop, threading.Lock()
        self._pending: list[tuple[_Job, int]] = []

    def add(self, job: "_Job", key: int) -> None:  # on the engine's thread
        with self._lock:
            self._pending.append((job, key))
            if len(self._pending) > 1:  # a flush is already scheduled
                return
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        now = time.monotonic()
        for job, key in pending:
            job.first_token.setdefault(key, now)
            job.changed.set()


async def _changed(job: "_Job") -> bool:
    """Wait for the job's next update: True, or False after POLL_SECONDS without one.
    (`asyncio.timeout`, not `wait_for`, which makes a task per wait: one per token.)"""
    try:
        async with asyncio.timeout(POLL_SECONDS):
            await job.changed.wait()
        return True
    except TimeoutError:
        return False


class _Job:
    """The engine requests of one HTTP request, and an asyncio event per update."""

    def __init__(self, wakeups: _Wakeups):
        self.wakeups, self.changed, self.requests = wakeups, asyncio.Event(), []
        self.submitted = time.monotonic()
        self.first_token: dict[int, float] = {}

    def on_update(self, request: Request) -> None:  # on the engine's thread
        self.wakeups.add(self, id(request))

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    @property
    def finished(self) -> bool:
        return all(r.finished for r in self.requests)


class Service:
    def __init__(self, runner: EngineRunner, texts: Texts, metrics: ServerMetrics,
                 model_name: str, request_timeout: float):
        self.runner, self.texts, self.metrics = runner, texts, metrics
        self.model_name, self.request_timeout = model_name, request_timeout
        self._wakeups: _Wakeups | None = None  # for the server's event loop

    # --- the endpoints -----------------------------------------------------------------------

    async def completions(self, body: openai_api.CompletionRequest, http: HttpRequest
                          ) -> Response:
        if bad := body.unsupported():
            return error(400, f"{bad[0]} is not supported by this server", param=bad[0])
        if body.max_tokens == 0 and not body.echo:
            return error(400, "max_tokens=0 needs echo=true (score the prompt only)",
                         param="max_tokens")
        prompts = self.texts.prompts(body.prompt)
        logprobs = body.logprobs if body.logprobs is not None else 0
        params = self._params(body, body.max_tokens, logprobs,
                              prompt_logprobs=body.echo and body.logprobs is not None)
        job = self._submit(prompts, params, body.n)
        if isinstance(job, Response):
            return job
        if body.stream:
            return self._stream(job, "text_completion", http, body, prompts)
        if (failed := await self._wait(job, http)) is not None:
            return failed
        choices = []
        for index, request in enumerate(job.requests):
            text = self.texts.decode(request.prompt) if body.echo else ""
            choices.append({"index": index, "text": text + (request.text or ""),
                            "logprobs": (openai_api.completion_logprobs(
                                request, self.texts.piece, body.echo, logprobs,
                                self._text_of) if body.logprobs is not None else None),
                            "finish_reason": request.finish_reason})
        return JSONResponse(openai_api.completion_body(
            "text_completion", self.model_name, choices, self._usage(job, prompts)))

    async def chat(self, body: openai_api.ChatRequest, http: HttpRequest) -> Response:
        if bad := body.unsupported():
            return error(400, f"{bad[0]} is not supported by this server", param=bad[0])
        prompt = self.chat_tokens(body.messages)
        if isinstance(prompt, Response):
            return prompt
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as much as the context leaves
            max_tokens = max(self.runner.engine.max_seq_len - len(prompt), 1)
        logprobs = (body.top_logprobs or 0) if body.logprobs else 0
        job = self._submit([prompt], self._params(body, max_tokens, logprobs, False), body.n)
        if isinstance(job, Response):
            return job
        if body.stream:
            return self._stream(job, "chat.completion.chunk", http, body, [prompt])
        if (failed := await self._wait(job, http)) is not None:
            return failed
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text or ""},
                    "logprobs": (openai_api.chat_logprobs(r, self.texts.piece)
                                 if body.logprobs else None),
                    "finish_reason": r.finish_reason} for i, r in enumerate(job.requests)]
        return JSONResponse(openai_api.completion_body(
            "chat.completion", self.model_name, choices, self._usage(job, [prompt])))

    def chat_tokens(self, messages: Sequence[openai_api.ChatMessage]) -> list[int] | Response:
        try:
            return self.texts.chat_prompt([m.model_dump() for m in messages])
        except ChatTemplateError as e:
            return error(400, str(e), param="messages")

    def _text_of(self, token: int) -> str:
        return self.texts.decode([token])

    # --- submitting and waiting --------------------------------------------------------------

    def _params(self, body: Any, max_tokens: int, logprobs: int, prompt_logprobs: bool
                ) -> SamplingParams:
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - 64)
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                              top_k=max(body.top_k, 0), top_p=body.top_p, seed=seed,
                              stop=tuple(body.stop), logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs, ignore_eos=body.ignore_eos)

    def _submit(self, prompts: list[list[int]], params: SamplingParams, n: int
                ) -> "_Job | Response":
        """Submit n choices per prompt (choice i seeded seed + i), or an error response."""
        vocab = self.texts.tokenizer.vocab_size
        for prompt in prompts:
            if any(not 0 <= t < vocab for t in prompt):
                return error(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        loop = asyncio.get_running_loop()
        if self._wakeups is None or self._wakeups.loop is not loop:
            self._wakeups = _Wakeups(loop)
        job = _Job(self._wakeups)
        try:
            for prompt in prompts:
                for i in range(n):
                    choice = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
                    job.requests.append(self.runner.submit(prompt, choice, job.on_update))
        except ValueError as e:  # does not fit, or a setting out of range
            job.cancel()
            return error(400, str(e), param="max_tokens" if "max_seq_len" in str(e) else None)
        except QueueFull as e:
            job.cancel()
            return error(429, f"the server is busy ({e}); retry shortly",
                         headers={"Retry-After": "1"})
        except NotAccepting as e:
            job.cancel()
            return error(503, f"not accepting requests: {e}", headers={"Retry-After": "5"})
        return job

    async def _wait(self, job: _Job, http: HttpRequest) -> Response | None:
        """Until every request of `job` is finished: None, or an error response (the client
        left, the deadline passed, the engine stopped)."""
        deadline = job.submitted + self.request_timeout
        while not job.finished:
            job.changed.clear()
            if job.finished:
                break
            await _changed(job)
            if self.runner.error is not None:
                job.cancel()
                return error(500, f"the engine stopped: {self.runner.error}")
            if await http.is_disconnected():
                job.cancel()
                return Response(status_code=499)
            if time.monotonic() > deadline:
                job.cancel()
                return error(504, f"not finished within --request_timeout="
                                  f"{self.request_timeout:g}s")
        self._record(job)
        return None

    def _record(self, job: _Job) -> None:
        done = time.monotonic()
        for request in job.requests:
            self.metrics.finished(len(request.prompt), request.num_generated, job.submitted,
                                  job.first_token.get(id(request)), done)

    def _usage(self, job: _Job, prompts: list[list[int]]) -> dict[str, int]:
        return openai_api.usage(sum(len(p) for p in prompts),
                                sum(r.num_generated for r in job.requests))

    # --- streaming ---------------------------------------------------------------------------

    def _stream(self, job: _Job, kind: str, http: HttpRequest, body: Any,
                prompts: list[list[int]]) -> StreamingResponse:
        return StreamingResponse(self._events(job, kind, http, body, prompts),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _events(self, job: _Job, kind: str, http: HttpRequest, body: Any,
                      prompts: list[list[int]]) -> AsyncIterator[str]:
        chat = kind != "text_completion"
        streams = [TextStream(self.texts, body.stop) for _ in job.requests]
        logged = [0] * len(job.requests)  # tokens whose logprobs were sent
        head = openai_api.completion_body(kind, self.model_name, [], None)
        deadline = job.submitted + self.request_timeout

        def event(choices: list[dict], **extra: Any) -> str:
            return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

        try:
            if chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}
                             for i in range(len(job.requests))])
            elif body.echo:
                yield event([{"index": i, "text": self.texts.decode(r.prompt),
                              "logprobs": None, "finish_reason": None}
                             for i, r in enumerate(job.requests)])
            sent_final = [False] * len(job.requests)
            while not all(sent_final):
                job.changed.clear()
                choices = []
                for i, request in enumerate(job.requests):
                    if sent_final[i]:
                        continue
                    done = request.finished
                    tokens = list(request.tokens)
                    piece = streams[i].delta(tokens, request.text if done else None)
                    if piece or done:
                        choices.append(self._chunk(chat, i, piece, request, tokens,
                                                   logged, body, done))
                        sent_final[i] = done
                if choices:
                    yield event(choices)
                if all(sent_final):
                    break
                if not await _changed(job) and (await http.is_disconnected()
                                                or time.monotonic() > deadline):
                    job.cancel()
                    return
                if self.runner.error is not None:
                    job.cancel()
                    return
            self._record(job)
            if body.stream_options is not None and body.stream_options.include_usage:
                yield event([], usage=self._usage(job, prompts))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # a no-op for finished requests; frees the slots of the rest

    def _chunk(self, chat: bool, index: int, piece: str, request: Request, tokens: list[int],
               logged: list[int], body: Any, done: bool) -> dict[str, Any]:
        logprobs = None
        wants = body.logprobs if chat else body.logprobs is not None
        if wants and len(tokens) > logged[index]:
            part = Request(request.prompt, request.params, tokens=tokens[logged[index]:],
                           logprobs=request.logprobs[logged[index]:len(tokens)],
                           top_logprobs=request.top_logprobs[logged[index]:len(tokens)])
            logprobs = (openai_api.chat_logprobs(part, self.texts.piece) if chat else
                        openai_api.completion_logprobs(part, self.texts.piece, False,
                                                       body.logprobs, self._text_of))
            logged[index] = len(tokens)
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs,
                                  "finish_reason": request.finish_reason if done else None}
        choice.update({"delta": {"content": piece}} if chat else {"text": piece})
        return choice

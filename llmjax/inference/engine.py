"""The inference engine: fixed decode slots, bucketed prefill, continuous batching.

    engine = Engine(model, max_slots=8, max_seq_len=512, eos_ids=(tokenizer.eos_id,))
    engine.warmup()                # compiles every step it will run; nothing compiles later
    request = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7))
    engine.run()                   # or engine.step() in a serving loop
    request.tokens, request.logprobs, request.finish_reason

A step:
    admit     each waiting request takes a free slot: its prompt is prefilled at the
              smallest bucket length that holds it (one compiled prefill per bucket, the
              model's cached forward over a fresh cache of that length), its first token
              sampled from the last prompt position, and its keys and values copied into
              the slot's rows of the decode cache
    generate  one compiled step over all slots, the cache donated and updated in place:
              each slot feeds its last token at its position and samples the next
    retire    a request leaves its slot at EOS, a stop token or string, or max_tokens, and
              a waiting request takes the slot at the next step

The host never waits for a step before starting the next: step t + 1 is dispatched (its
inputs are step t's outputs, still on the device) and then step t's tokens are read and
checked, so the device is not idle while Python bookkeeps. A request that finishes at
step t costs its slot one more (discarded) token.

Every request's settings (temperature, top-k, top-p, seed) are arrays of the step, so no
setting or prompt length compiles anything after `warmup`; `compilations` counts every
XLA program compiled (or loaded from the persistent compilation cache, llmjax.runtime)
since the engine was made (a jax.monitoring listener), so a test can assert that. The
model runs the training modules and weights (llmjax.models: `decode`, `logits`,
`init_cache`), so its logprobs are the training forward's; its stacked layers
are split per layer first (llmjax.models.kv_cache.unstack_layers).
"""

import contextlib
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from llmjax.inference import requests, steps
from llmjax.inference.requests import Request, SamplingParams
from llmjax.inference.steps import TOP_N
from llmjax.models.kv_cache import CACHE_AXES, unstack_layers
from llmjax.parallel import sharding

COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration",
                  "/jax/compilation_cache/cache_retrieval_time_sec")  # (only on a hit)


def default_buckets(max_seq_len: int, smallest: int = 32) -> tuple[int, ...]:
    """Prefill lengths: powers of two from `smallest`, and max_seq_len itself."""
    buckets, length = [], smallest
    while length < max_seq_len:
        buckets.append(length)
        length *= 2
    return (*buckets, max_seq_len)


class Engine:
    def __init__(self, model: nnx.Module, *, max_slots: int = 8, max_seq_len: int = 512,
                 prefill_buckets: Sequence[int] | None = None, eos_ids: Sequence[int] = (),
                 detokenize: Callable[[list[int]], str] | None = None,
                 prompt_logprobs: bool = False, mesh: jax.sharding.Mesh | None = None,
                 rules: Sequence[tuple[str, Any]] | None = None):
        """`model`: a decoder (llmjax.models), its weights placed already. `prompt_logprobs`
        compiles prompt scoring too (echo with logprobs). `mesh` and `rules`: the placement
        the activations and the cache follow (default: none, one device's layout)."""
        if not hasattr(model, "decode"):
            raise ValueError(f"{type(model).__name__} has no cached decoder: generation "
                             "needs a decoder family (llama, gpt2)")
        buckets = tuple(sorted(set(prefill_buckets or default_buckets(max_seq_len))))
        if buckets[-1] > max_seq_len or buckets[0] < 1:
            raise ValueError(f"prefill buckets {buckets} must lie in [1, max_seq_len="
                             f"{max_seq_len}]")
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots} must be >= 1")
        positions = model.pos_embed.shape[0] if hasattr(model, "pos_embed") else max_seq_len
        if max_seq_len > positions:  # learned positions (GPT-2) end there
            raise ValueError(f"max_seq_len={max_seq_len} is longer than the model's "
                             f"{positions} learned positions")
        self.graphdef, self.params = nnx.split(unstack_layers(model))
        self.max_slots, self.max_seq_len, self.buckets = max_slots, max_seq_len, buckets
        self.eos_ids, self.detokenize = tuple(eos_ids), detokenize
        self.score_prompts = prompt_logprobs
        self.mesh, self.rules = mesh, tuple(rules or ())
        self.compilations = self.warmup_compilations = 0
        self.warmup_seconds = math.nan
        jax.monitoring.register_event_duration_secs_listener(self._count_compilation)
        self._compiled: dict[Any, Any] = {}
        self._cache = None
        self._waiting: deque[Request] = deque()
        self._slots: list[Request | None] = [None] * max_slots
        # Per slot, on the host: the sampling settings, and an admitted request's first
        # token and its position (the device keeps the running ones).
        self._temperature = np.zeros(max_slots, np.float32)
        self._top_k = np.zeros(max_slots, np.int32)
        self._top_p = np.ones(max_slots, np.float32)
        self._seeds = np.zeros(max_slots, np.int32)
        self._first_tokens = np.zeros(max_slots, np.int32)
        self._first_positions = np.zeros(max_slots, np.int32)
        self._admitted = np.zeros(max_slots, bool)  # since the last step was dispatched
        self._settings: tuple[jax.Array, ...] | None = None  # on the device; None: stale
        # Where host inputs go: replicated over the weights' mesh (or their one device).
        placed = jax.tree.leaves(self.params)[0].sharding
        on = self.mesh or getattr(placed, "mesh", None)
        self._replicated: jax.sharding.Sharding = (
            jax.sharding.NamedSharding(on, jax.sharding.PartitionSpec()) if on is not None
            else placed)
        self._inputs: tuple[jax.Array, jax.Array] | None = None  # tokens, positions
        self._in_flight: tuple[list[Request | None], tuple[jax.Array, ...]] | None = None

    def close(self) -> None:
        """Stop counting compilations (the listener is process-wide)."""
        jax.monitoring.unregister_event_duration_listener(self._count_compilation)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _count_compilation(self, event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs
        self.compilations += event in COMPILE_EVENTS

    # --- Compiling ---------------------------------------------------------------------------

    def warmup(self) -> float:
        """Compile the cache, every prefill bucket, insert, prompt scoring (if enabled) and
        the generate step; returns the seconds it took."""
        start = time.perf_counter()
        g, slots = self.graphdef, self.max_slots
        with self._placement():
            self._cache = jax.jit(functools.partial(
                steps.new_cache, g, slots=slots, length=self.max_seq_len),
                out_shardings=self._cache_shardings()).lower(self.params).compile()(self.params)
            zeros = self._put(np.zeros(slots, np.int32))
            self._inputs = (zeros, zeros)
            # Outputs that come back as inputs are pinned to the inputs' placement: left to
            # itself XLA may shard the [slots] tokens, and a compiled step takes only the
            # placement it was compiled for.
            cache, replicated = jax.tree.map(lambda a: a.sharding, self._cache), zeros.sharding
            self._compiled["generate"] = self._compile(
                functools.partial(steps.generate, g, self.max_seq_len), self.params,
                self._cache, *self._inputs, *self._put(self._slot_settings()), donate=(1,),
                out_shardings=(cache, *[replicated] * 5))
            self._compiled["set_rows"] = self._compile(
                steps.set_rows, *self._inputs, *self._put(
                    (self._first_tokens, self._first_positions, self._admitted)),
                out_shardings=(replicated, replicated))
            for bucket in self.buckets:
                args = (self.params, np.zeros((1, bucket), np.int32), np.int32(1),
                        *_request_arrays(SamplingParams()))
                prefill = self._compiled["prefill", bucket] = self._compile(
                    functools.partial(steps.prefill, g), *args)
                # The next steps take prefill's outputs as they are placed.
                prefix, hidden, *_ = jax.tree.map(
                    lambda out: jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=out.sharding),
                    prefill.out_info)
                self._compiled["insert", bucket] = self._compile(
                    steps.insert, self._cache, prefix, np.int32(0), donate=(0,),
                    out_shardings=cache)
                if self.score_prompts:
                    self._compiled["score", bucket] = self._compile(
                        functools.partial(steps.score, g), self.params, hidden,
                        np.zeros((1, bucket), np.int32))
        self.warmup_seconds = time.perf_counter() - start
        self.warmup_compilations = self.compilations
        return self.warmup_seconds

    @staticmethod
    def _compile(fn: Callable, *args: Any, donate: tuple[int, ...] = (),
                 out_shardings: Any = None) -> Any:
        jitted = (jax.jit(fn, donate_argnums=donate) if out_shardings is None else
                  jax.jit(fn, donate_argnums=donate, out_shardings=out_shardings))
        return jitted.lower(*args).compile()

    def _put(self, arrays: Any) -> Any:
        """Host arrays to the device(s) the model is on, replicated."""
        # Copies: the transfer may still be reading a host array when device_put returns,
        # and the engine rewrites its per-slot arrays in place at the next admission.
        return jax.device_put(jax.tree.map(np.array, arrays), self._replicated)

    def _placement(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.activate(self.mesh, self.rules)

    def _cache_shardings(self) -> Any:
        """The decode cache's placement: by the rules on a mesh, else where the weights are
        (replicated over their devices)."""
        shapes = jax.eval_shape(functools.partial(
            steps.new_cache, self.graphdef, slots=self.max_slots, length=self.max_seq_len),
            self.params)
        if self.mesh is None:
            return jax.tree.map(lambda _: self._replicated, shapes)
        return jax.tree.map(lambda s: sharding.mesh_sharding(
            self.mesh, self.rules, CACHE_AXES[-len(s.shape):], s.shape), shapes)

    # --- Requests ----------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               on_update: Callable[[Request], None] | None = None) -> Request:
        """Queue a request; it takes a slot at the next step with a free one."""
        params = params or SamplingParams()
        self.check(prompt, params)
        return self.add(Request([int(t) for t in prompt], params, on_update=on_update))

    def add(self, request: Request) -> Request:
        """Queue a request already checked (`check`)."""
        self._waiting.append(request)
        return request

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """ValueError if the engine cannot serve this request as asked."""
        params.check(TOP_N)
        if not len(prompt):
            raise ValueError("the prompt is empty: give at least one token (e.g. the BOS id)")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"the prompt's {len(prompt)} tokens plus max_tokens="
                             f"{params.max_tokens} exceed max_seq_len={self.max_seq_len}; "
                             "shorten the prompt or ask for fewer tokens")
        if params.prompt_logprobs and not self.score_prompts:
            raise ValueError("prompt logprobs were asked for but this engine was made "
                             "without prompt_logprobs=True")

    def has_work(self) -> bool:
        return bool(self._waiting) or self.active > 0 or self._in_flight is not None

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def run(self) -> None:
        """Step until every submitted request is finished."""
        while self.has_work():
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[Request]:
        """Submit every prompt, run until all are finished, return them in order."""
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        submitted = [self.submit(p, q) for p, q in zip(prompts, params, strict=True)]
        self.run()
        return submitted

    # --- Stepping ----------------------------------------------------------------------------

    def step(self) -> None:
        """Admit waiting requests to free slots, dispatch one generate step over all slots,
        and record the tokens of the step dispatched before it."""
        if self._cache is None:
            raise ValueError("call engine.warmup() before generating")
        self._retire_cancelled()
        for slot in range(self.max_slots):
            if self._slots[slot] is None and self._waiting:
                self._admit(self._waiting.popleft(), slot)
        dispatched = self._dispatch() if self.active else None
        previous, self._in_flight = self._in_flight, dispatched
        if previous is not None:
            self._record(*previous)

    def _dispatch(self) -> tuple[list[Request | None], tuple[jax.Array, ...]]:
        if self._admitted.any():  # admitted slots start from their prompt's first token
            self._inputs = self._compiled["set_rows"](*self._inputs, *self._put(
                (self._first_tokens, self._first_positions, self._admitted)))
            self._admitted[:] = False
        if self._settings is None:
            self._settings = self._put(self._slot_settings())
        self._cache, tokens, positions, *outputs = self._compiled["generate"](
            self.params, self._cache, *self._inputs, *self._settings)
        self._inputs = (tokens, positions)
        return list(self._slots), (tokens, *outputs)

    def _record(self, occupants: list[Request | None], outputs: tuple[jax.Array, ...]) -> None:
        """The tokens a dispatched step sampled, for the requests that were in its slots."""
        tokens, logprobs, top_ids, top_lps = outputs
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        for slot, request in enumerate(occupants):
            if request is None or request.finished:  # it finished at the step before
                continue
            room = self.max_seq_len - len(request.prompt) - request.num_generated - 1
            if requests.accept(request, int(tokens[slot]), float(logprobs[slot]),
                               _top(top_ids, top_lps, slot), self.eos_ids, self.detokenize,
                               room):
                self._free(slot)

    def _admit(self, request: Request, slot: int) -> None:
        length = len(request.prompt)
        bucket = next(b for b in self.buckets if b >= length)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :length] = request.prompt
        settings = _request_arrays(request.params)
        prefix, hidden, token, logprob, top_ids, top_lps = self._compiled["prefill", bucket](
            self.params, tokens, np.int32(length), *settings)
        if request.params.prompt_logprobs:
            self._record_prompt_logprobs(request, self._compiled["score", bucket](
                self.params, hidden, tokens))
        if request.params.max_tokens == 0:
            requests.finish(request, requests.FINISH_LENGTH, self.detokenize)
            return
        self._cache = self._compiled["insert", bucket](self._cache, prefix, np.int32(slot))
        token = int(np.asarray(token)[0])
        if requests.accept(request, token, float(np.asarray(logprob)[0]),
                           _top(top_ids, top_lps, 0), self.eos_ids, self.detokenize,
                           self.max_seq_len - 1 - length):
            return
        self._slots[slot] = request
        self._first_tokens[slot], self._first_positions[slot] = token, length
        self._admitted[slot] = True
        self._temperature[slot], self._top_k[slot], self._top_p[slot], self._seeds[slot] = (
            a[0] for a in settings)
        self._settings = None

    def _record_prompt_logprobs(self, request: Request, scored: Any) -> None:
        length = len(request.prompt)
        logprobs, top_ids, top_lps = (np.asarray(x)[:length] for x in scored)
        request.prompt_logprobs = [None] + logprobs[1:].tolist()
        n = request.params.logprobs
        request.prompt_top_logprobs = [None] + [
            list(zip(ids[:n].tolist(), lps[:n].tolist()))
            for ids, lps in zip(top_ids[1:], top_lps[1:])]

    def _retire_cancelled(self) -> None:
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                requests.finish(request, requests.FINISH_STOP, self.detokenize)
                self._free(slot)
        for request in self._waiting:
            if request.cancelled:
                requests.finish(request, requests.FINISH_STOP)
        self._waiting = deque(r for r in self._waiting if not r.cancelled)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        self._temperature[slot], self._top_k[slot], self._top_p[slot] = 0.0, 0, 1.0
        self._settings = None

    def _slot_settings(self) -> tuple[np.ndarray, ...]:
        want_top = any(r is not None and r.params.logprobs > 0 for r in self._slots)
        return (self._temperature, self._top_k, self._top_p, self._seeds, np.bool_(want_top))


def _request_arrays(params: SamplingParams) -> tuple[np.ndarray, ...]:
    return (np.array([params.temperature], np.float32), np.array([params.top_k], np.int32),
            np.array([params.top_p], np.float32), np.array([params.seed], np.int32))


def _top(top_ids: jax.Array, top_lps: jax.Array, row: int
         ) -> Callable[[], list[tuple[int, float]]]:
    """Row `row`'s (token, logprob) alternatives, copied to the host only when asked for."""
    return lambda: list(zip(np.asarray(top_ids)[row].tolist(),
                            np.asarray(top_lps)[row].tolist()))

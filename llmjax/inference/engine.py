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

Every request's settings (temperature, top-k, top-p, seed) are arrays of the step, so no
setting or prompt length compiles anything after `warmup`; `compilations` counts every
XLA compilation since the engine was made (a jax.monitoring listener), so a test can
assert that. The model runs the training modules and weights (llmjax.models: `decode`,
`logits`, `init_cache`), so its logprobs are the training forward's.
"""

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.inference import requests, sampling
from llmjax.inference.requests import Request, SamplingParams
from llmjax.models.kv_cache import CACHE_AXES, unstack_layers
from llmjax.parallel import sharding

TOP_N = 20  # alternatives computed per token (OpenAI's top_logprobs maximum)
SCORE_CHUNK = 64  # prompt positions whose [chunk, vocab] logits exist at once


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
        self.compilations = 0
        jax.monitoring.register_event_duration_secs_listener(self._count_compilation)
        self._compiled: dict[Any, Any] = {}
        self._cache = None
        self._waiting: deque[Request] = deque()
        self._slots: list[Request | None] = [None] * max_slots
        # The generate step's inputs, one row per slot (free slots: zeros).
        self._tokens = np.zeros(max_slots, np.int32)
        self._positions = np.zeros(max_slots, np.int32)
        self._temperature = np.zeros(max_slots, np.float32)
        self._top_k = np.zeros(max_slots, np.int32)
        self._top_p = np.ones(max_slots, np.float32)
        self._seeds = np.zeros(max_slots, np.int32)
        self.warmup_seconds = math.nan

    def close(self) -> None:
        """Stop counting compilations (the listener is process-wide)."""
        jax.monitoring.unregister_event_duration_listener(self._count_compilation)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _count_compilation(self, event: str, duration: float, **kwargs: Any) -> None:
        del duration, kwargs
        if event == "/jax/core/compile/backend_compile_duration":
            self.compilations += 1

    # --- Compiling ---------------------------------------------------------------------------

    def warmup(self) -> float:
        """Compile the cache, every prefill bucket, insert, prompt scoring (if enabled) and
        the generate step; returns the seconds it took."""
        start = time.perf_counter()
        with self._placement():
            cache_fn = self._jit(self._new_cache, out=self._cache_shardings())
            self._cache = cache_fn()
            self._compiled["generate"] = self._compile(
                jax.jit(self._generate, donate_argnums=1), self.params, self._cache,
                *self._slot_arrays())
            for bucket in self.buckets:
                args = (self.params, np.zeros((1, bucket), np.int32), np.int32(1),
                        *self._request_arrays(SamplingParams()))
                prefill = self._compiled["prefill", bucket] = self._compile(
                    jax.jit(self._prefill), *args)
                # The next steps take prefill's outputs as they are placed.
                prefix, hidden, *_ = jax.tree.map(
                    lambda out: jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=out.sharding),
                    prefill.out_info)
                self._compiled["insert", bucket] = self._compile(
                    jax.jit(_insert, donate_argnums=0), self._cache, prefix, np.int32(0))
                if self.score_prompts:
                    self._compiled["score", bucket] = self._compile(
                        jax.jit(self._score), self.params, hidden,
                        np.zeros((1, bucket), np.int32))
        self.warmup_seconds = time.perf_counter() - start
        return self.warmup_seconds

    def _compile(self, jitted: Callable, *args: Any) -> Any:
        return jitted.lower(*args).compile()

    def _jit(self, fn: Callable, out: Any) -> Callable:
        return jax.jit(fn, out_shardings=out).lower().compile()

    def _placement(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        return sharding.activate(self.mesh, self.rules)

    def _cache_shardings(self) -> Any:
        if self.mesh is None:
            return None
        model = nnx.merge(self.graphdef, self.params)
        shapes = jax.eval_shape(lambda: model.init_cache(self.max_slots, self.max_seq_len))
        return jax.tree.map(lambda s: sharding.mesh_sharding(
            self.mesh, self.rules, CACHE_AXES[-len(s.shape):], s.shape), shapes)

    # --- The compiled functions ---------------------------------------------------------------

    def _new_cache(self):
        model = nnx.merge(self.graphdef, self.params)
        return model.init_cache(self.max_slots, self.max_seq_len)

    def _prefill(self, params, tokens, length, temperature, top_k, top_p, seed):
        """tokens [1, bucket] (a prompt of `length` tokens, padded) -> (its cache of
        `bucket` positions, hidden states [1, bucket, embed], the first generated token
        and its logprob and top alternatives)."""
        model = nnx.merge(self.graphdef, params)
        bucket = tokens.shape[1]
        cache = model.init_cache(1, bucket)
        hidden, cache = model.decode(tokens, jnp.arange(bucket)[None], cache)
        last = jax.lax.dynamic_index_in_dim(hidden, length - 1, axis=1)  # [1, 1, embed]
        logits = model.logits(last)[:, 0]
        token = sampling.choose(logits, temperature, top_k, top_p,
                                sampling.request_keys(seed, length[None]))
        return (cache, hidden, token, *sampling.logprobs(logits, token, TOP_N))

    def _score(self, params, hidden, tokens):
        """Each prompt token's logprob given those before, [bucket] (position 0: none),
        with its top alternatives; [chunk, vocab] logits at a time."""
        model = nnx.merge(self.graphdef, params)
        bucket = tokens.shape[1]
        chunk = math.gcd(bucket, SCORE_CHUNK)
        # Position t predicts token t + 1: the logprob of token t comes from position t - 1.
        targets = jnp.roll(tokens[0], -1)

        def one(args):
            h, t = args
            return sampling.logprobs(model.logits(h[None])[0], t, TOP_N)

        out = jax.lax.map(one, (hidden[0].reshape(-1, chunk, hidden.shape[-1]),
                                targets.reshape(-1, chunk)))
        return jax.tree.map(lambda x: jnp.roll(x.reshape(bucket, *x.shape[2:]), 1, axis=0),
                            out)

    def _generate(self, params, cache, tokens, positions, temperature, top_k, top_p, seeds):
        """One token for every slot: tokens [slots] at positions [slots] -> the cache with
        their keys and values, and the next token of each slot with its logprobs."""
        model = nnx.merge(self.graphdef, params)
        hidden, cache = model.decode(tokens[:, None], positions[:, None], cache)
        logits = model.logits(hidden)[:, 0]
        # The token sampled now will sit at position + 1: its key is that position's.
        token = sampling.choose(logits, temperature, top_k, top_p,
                                sampling.request_keys(seeds, positions + 1))
        return (cache, token, *sampling.logprobs(logits, token, TOP_N))

    # --- Requests ----------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], params: SamplingParams | None = None,
               on_update: Callable[[Request], None] | None = None) -> Request:
        """Queue a request; it takes a slot at the next step with a free one."""
        params = params or SamplingParams()
        self.check(prompt, params)
        request = Request([int(t) for t in prompt], params, on_update=on_update)
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
        return bool(self._waiting) or any(r is not None for r in self._slots)

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

    def step(self) -> None:
        """Admit waiting requests to free slots, then generate one token in every slot."""
        if self._cache is None:
            raise ValueError("call engine.warmup() before generating")
        self._retire_cancelled()
        for slot in range(self.max_slots):
            if self._slots[slot] is None and self._waiting:
                self._admit(self._waiting.popleft(), slot)
        if not any(r is not None for r in self._slots):
            return
        self._cache, tokens, logprobs, top_ids, top_lps = self._compiled["generate"](
            self.params, self._cache, *self._slot_arrays())
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        for slot, request in enumerate(self._slots):
            if request is None:
                continue
            position = int(self._positions[slot]) + 1
            self._tokens[slot], self._positions[slot] = tokens[slot], position
            if requests.accept(request, int(tokens[slot]), float(logprobs[slot]),
                               _top(top_ids, top_lps, slot), self.eos_ids, self.detokenize,
                               self.max_seq_len - 1 - position):
                self._free(slot)

    def _admit(self, request: Request, slot: int) -> None:
        length = len(request.prompt)
        bucket = next(b for b in self.buckets if b >= length)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :length] = request.prompt
        args = self._request_arrays(request.params)
        prefix, hidden, token, logprob, top_ids, top_lps = self._compiled["prefill", bucket](
            self.params, tokens, np.int32(length), *args)
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
        self._tokens[slot], self._positions[slot] = token, length
        self._temperature[slot], self._top_k[slot], self._top_p[slot], self._seeds[slot] = (
            a[0] for a in args)

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
        kept = [r for r in self._waiting if not r.cancelled]
        for request in self._waiting:
            if request.cancelled:
                requests.finish(request, requests.FINISH_STOP)
        self._waiting = deque(kept)

    def _free(self, slot: int) -> None:
        self._slots[slot] = None
        self._tokens[slot] = self._positions[slot] = self._top_k[slot] = self._seeds[slot] = 0
        self._temperature[slot], self._top_p[slot] = 0.0, 1.0

    def _slot_arrays(self) -> tuple[np.ndarray, ...]:
        return (self._tokens, self._positions, self._temperature, self._top_k, self._top_p,
                self._seeds)

    @staticmethod
    def _request_arrays(params: SamplingParams) -> tuple[np.ndarray, ...]:
        return (np.array([params.temperature], np.float32), np.array([params.top_k], np.int32),
                np.array([params.top_p], np.float32), np.array([params.seed], np.int32))

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


def _top(top_ids: jax.Array, top_lps: jax.Array, row: int
         ) -> Callable[[], list[tuple[int, float]]]:
    """Row `row`'s (token, logprob) alternatives, copied to the host only when asked for."""
    return lambda: list(zip(np.asarray(top_ids)[row].tolist(),
                            np.asarray(top_lps)[row].tolist()))


def _insert(cache: Any, prefix: Any, slot: jax.Array) -> Any:
    """The prefilled cache of one request ([1, bucket, kv_heads, head_dim] per layer) into
    `slot`'s row of the decode cache ([slots, max_seq_len, kv_heads, head_dim] per layer;
    a stacked cache has a leading layers axis)."""
    return jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice(
        c, p.astype(c.dtype), (0,) * (c.ndim - 4) + (slot, 0, 0, 0)), cache, prefix)

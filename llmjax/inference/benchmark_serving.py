"""Serving beside the engine alone: the same closed-loop workload through
`python -m llmjax.serve` over HTTP and through an Engine in this process, in one run.

    python -m llmjax.bench --serve --model=runs/shakespeare

At each concurrency C (1, 8, 32), C clients each send `requests` greedy completions one
after another (a random token-id prompt of `prompt_tokens`, exactly `new_tokens`
generated: ignore_eos). Over HTTP a client is an asyncio task streaming Server-Sent
Events over its own kept-alive connection (a bare HTTP/1.1 client in this process: it
shares the CPU with the server, as a client on the same machine does); alone, a client is a chain
of engine.submit calls made as the previous request finishes. Both engines have the
same slots, sequence length, EOS ids and detokenizer. Each level runs `rounds` times,
engine and server alternating. Per mode and C: generated tokens/s over a round's wall
time (the median round), time to first token (from sending, queueing included) and time
per output token after it (p50/p99 over every request of every round).
"""

import asyncio
import dataclasses
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from llmjax.inference.engine import Engine
from llmjax.inference.requests import Request, SamplingParams

CONCURRENCY = (1, 8, 32)


@dataclasses.dataclass
class Level:
    mode: str
    clients: int
    tokens: int
    seconds: float
    ttft: list[float]  # seconds, per request
    tpot: list[float]
    rates: list[float] = dataclasses.field(default_factory=list)  # tokens/s per round

    @property
    def tokens_per_second(self) -> float:
        return statistics.median(self.rates) if self.rates else self.tokens / self.seconds

    def merged(self, other: "Level") -> "Level":
        """This round and another of the same mode and concurrency, pooled."""
        return Level(self.mode, self.clients, self.tokens + other.tokens,
                     self.seconds + other.seconds, self.ttft + other.ttft,
                     self.tpot + other.tpot, (self.rates or [self.tokens / self.seconds])
                     + [other.tokens / other.seconds])


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]  # one per request of the largest level, reused by the others
    new_tokens: int
    requests: int  # per client

    def prompt(self, client: int, index: int) -> list[int]:
        return self.prompts[(client * self.requests + index) % len(self.prompts)]


def make_workload(vocab_size: int, prompt_tokens: int, new_tokens: int, requests: int,
                  seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    count = max(CONCURRENCY) * requests
    return Workload(rng.integers(3, vocab_size, (count, prompt_tokens)).tolist(), new_tokens,
                    requests)


# --- the engine alone ----------------------------------------------------------------------

def engine_level(engine: Engine, work: Workload, clients: int) -> Level:
    """Run `clients` closed-loop clients on the engine in this thread."""
    params = SamplingParams(max_tokens=work.new_tokens, ignore_eos=True)
    ttft, tpot, tokens = [], [], 0

    def send(client: int, index: int) -> None:
        sent, first = time.perf_counter(), []

        def on_update(request: Request) -> None:
            nonlocal tokens
            now = time.perf_counter()
            if not first:
                first.append(now)
                ttft.append(now - sent)
            if request.finished:
                tokens += request.num_generated
                if request.num_generated > 1:
                    tpot.append((now - first[0]) / (request.num_generated - 1))
                if index + 1 < work.requests:
                    send(client, index + 1)

        engine.submit(work.prompt(client, index), params, on_update=on_update)

    start = time.perf_counter()
    for client in range(clients):
        send(client, 0)
    engine.run()
    return Level("engine alone", clients, tokens, time.perf_counter() - start, ttft, tpot)


# --- over HTTP -----------------------------------------------------------------------------

async def _stream_one(connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                      host: str, prompt: list[int], new_tokens: int
                      ) -> tuple[float, float | None, int]:
    """(time to first token, time per output token after it, tokens) of one request, on a
    kept-alive connection (as the openai client and most others keep theirs).

    A bare asyncio HTTP/1.1 client: the load generator shares the cores with the server,
    so it spends as little as it can, reading the chunked body's event lines and parsing
    only the usage event."""
    reader, writer = connection
    body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0,
                       "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    sent, first, last, count = time.perf_counter(), None, None, 0
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                 f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    status = await reader.readline()
    headers = (await reader.readuntil(b"\r\n\r\n")).lower()
    if b" 200 " not in status or b"transfer-encoding: chunked" not in headers:
        raise RuntimeError(f"the server answered {status.decode().strip()}: "
                           f"{(await reader.read(300))!r}")
    while size := int((await reader.readline()).split(b";")[0], 16):  # a chunk: size, data
        chunk = await reader.readexactly(size + 2)
        for line in chunk.splitlines():
            if not line.startswith(b"data: {"):
                continue
            if b'"usage"' in line:
                count = json.loads(line[6:])["usage"]["completion_tokens"]
            else:
                last = time.perf_counter()
                first = first or last
    await reader.readline()  # the blank line after the last (empty) chunk
    if first is None or count != new_tokens:
        raise RuntimeError(f"a streamed request ended with {count} of {new_tokens} tokens")
    return first - sent, (last - first) / (count - 1) if count > 1 else None, count


async def _http_level(host: str, port: int, work: Workload, clients: int) -> Level:
    results: list[tuple[float, float | None, int]] = []

    async def client(c: int) -> None:
        connection = await asyncio.open_connection(host, port)
        try:
            for i in range(work.requests):
                results.append(await _stream_one(connection, host, work.prompt(c, i),
                                                 work.new_tokens))
        finally:
            connection[1].close()

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    seconds = time.perf_counter() - start
    return Level("server (HTTP, streaming)", clients, sum(n for *_, n in results), seconds,
                 [t for t, _, _ in results], [t for _, t, _ in results if t is not None])


def http_level(server: "ServerProcess", work: Workload, clients: int) -> Level:
    return asyncio.run(_http_level("127.0.0.1", server.port, work, clients))


class ServerProcess:
    """`python -m llmjax.serve` on a free loopback port, ready (warm) on entry."""

    def __init__(self, model_path: str, flags: Sequence[str], ready_timeout: float = 900):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmjax.serve", f"--model={model_path}", f"--port={port}",
             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, HF_HUB_OFFLINE="1"))
        self.ready_timeout = ready_timeout

    def __enter__(self) -> "ServerProcess":
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llmjax.serve exited: {self.process.stdout.read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2):
                    return self  # 200 (a 503 raises)
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"llmjax.serve was not ready within {self.ready_timeout:g}s")

    def __exit__(self, *exc_info: Any) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()


# --- the comparison ------------------------------------------------------------------------

def compare_serving(model: nnx.Module, model_path: str, eos_ids: Sequence[int],
                    detokenize: Callable[[list[int]], str], vocab_size: int, *,
                    max_slots: int, prompt_tokens: int, new_tokens: int, requests: int,
                    rounds: int) -> tuple[list[Level], dict[str, Any]]:
    """Each concurrency level `rounds` times on the engine alone and over HTTP, the two
    alternating (this machine's speed drifts over minutes); (levels, facts)."""
    work = make_workload(vocab_size, prompt_tokens, new_tokens, requests)
    max_seq_len = prompt_tokens + new_tokens
    flags = [f"--max_slots={max_slots}", f"--max_seq_len={max_seq_len}",
             f"--max_queue={max(CONCURRENCY)}"]
    with Engine(model, max_slots=max_slots, max_seq_len=max_seq_len, eos_ids=eos_ids,
                detokenize=detokenize) as engine, ServerProcess(model_path, flags) as server:
        warmup = engine.warmup()
        engine_level(engine, work, 1)  # an untimed first pass of each
        http_level(server, work, 1)
        levels = []
        for clients in CONCURRENCY:
            alone, served = engine_level(engine, work, clients), http_level(server, work, clients)
            for _ in range(rounds - 1):
                alone = alone.merged(engine_level(engine, work, clients))
                served = served.merged(http_level(server, work, clients))
            levels += [alone, served]
        compilations = engine.compilations - engine.warmup_compilations
    parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return levels, {"parameters": parameters, "warmup_seconds": warmup,
                    "compilations_after_warmup": compilations, "max_slots": max_slots,
                    "max_seq_len": max_seq_len}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else float("nan")


def format_levels(levels: list[Level]) -> str:
    rows = ["| mode | clients | requests | tokens/s (median round) | TTFT p50 ms | TTFT p99 ms "
            "| TPOT p50 ms | TPOT p99 ms | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        rows.append(f"| {level.mode} | {level.clients} | {len(level.ttft)} | "
                    f"{level.tokens_per_second:,.1f} | {_percentile(level.ttft, 50):.1f} | "
                    f"{_percentile(level.ttft, 99):.1f} | {_percentile(level.tpot, 50):.2f} | "
                    f"{_percentile(level.tpot, 99):.2f} | {level.seconds:.2f} |")
    alone = {lv.clients: lv for lv in levels if lv.mode == "engine alone"}
    notes = []
    for level in levels:
        if level.mode != "engine alone":
            base = alone[level.clients]
            rate = level.tokens_per_second / base.tokens_per_second - 1
            tpot = statistics.median(level.tpot) / statistics.median(base.tpot) - 1
            notes.append(f"{level.clients} clients, the server against the engine alone: "
                         f"tokens/s {rate:+.1%}, median TPOT {tpot:+.1%}")
    return "\n".join(rows + [""] + notes)

"""The engine on a thread of its own, for a server: requests come in from any thread,
through a bounded queue, and the engine steps while there is work.

    runner = EngineRunner(engine, max_queue=64)
    runner.start()                         # warms the engine up, then serves
    request = runner.submit(prompt, params, on_update=callback)   # from any thread
    runner.drain(); runner.stop()

`submit` raises QueueFull when `max_queue` requests already wait for a slot, and
NotAccepting while warming up or draining: the server answers 429 and 503. Callbacks
(`on_update`) run on the engine's thread after each new token and at the end; a request's
`cancel()` (a client went away, a deadline passed) frees its slot at the next step.
"""

import queue
import threading
import time
from collections.abc import Callable, Sequence

from llmjax.inference.engine import Engine
from llmjax.inference.requests import Request, SamplingParams


class QueueFull(Exception):
    """As many requests as the queue holds already wait for a slot."""


class NotAccepting(Exception):
    """The engine is warming up or draining."""


class EngineRunner:
    def __init__(self, engine: Engine, *, max_queue: int,
                 on_step: Callable[[Engine], None] | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue={max_queue} must be >= 1")
        self.engine, self.max_queue, self.on_step = engine, max_queue, on_step
        self.ready = threading.Event()  # warm-up done
        self.error: BaseException | None = None  # what stopped the engine's thread, if any
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._queued = 0  # in the inbox or waiting in the engine for a slot
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._draining = self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llmjax-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self.ready.is_set() and not self._draining and self.error is None

    @property
    def queued(self) -> int:
        return self._queued

    def submit(self, prompt: Sequence[int], params: SamplingParams,
               on_update: Callable[[Request], None] | None = None) -> Request:
        """Queue a request for the engine (ValueError if it cannot be served as asked)."""
        self.engine.check(prompt, params)
        request = Request([int(t) for t in prompt], params, on_update=on_update)
        with self._lock:
            if not self.accepting:
                raise NotAccepting("draining" if self._draining else "warming up")
            if self._queued >= self.max_queue:
                raise QueueFull(f"{self._queued} requests already wait for a slot")
            self._queued += 1
            self._inbox.put(request)
        self._wake.set()
        return request

    def drain(self, timeout: float | None = None) -> bool:
        """Stop accepting; wait until every accepted request is finished (True) or
        `timeout` seconds passed (False)."""
        with self._lock:
            self._draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queued or self.engine.has_work():
            if self.error is not None or (deadline is not None and time.monotonic() > deadline):
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            self.engine.warmup()
            self.ready.set()
            while not self._stopping:
                self._take_inbox()
                if not self.engine.has_work():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                waiting_before = self.engine.waiting
                self.engine.step()
                with self._lock:  # requests that took a slot (or were cancelled) left the queue
                    self._queued -= waiting_before - self.engine.waiting
                if self.on_step is not None:
                    self.on_step(self.engine)
        except BaseException as e:  # noqa: BLE001 (reported by the server's /ready and errors)
            self.error = e
            self.ready.set()
            raise

    def _take_inbox(self) -> None:
        while True:
            try:
                self.engine.add(self._inbox.get_nowait())
            except queue.Empty:
                return

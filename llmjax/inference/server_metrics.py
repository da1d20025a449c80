"""What GET /metrics reports (Prometheus text format, prometheus-client), one registry per
server so that tests can run several.

    llmjax_time_to_first_token_seconds     histogram, from submission to the first token
    llmjax_time_per_output_token_seconds   histogram, per request after its first token
    llmjax_queue_depth                     requests waiting for a slot
    llmjax_busy_slots                      slots decoding a request
    llmjax_requests_total{endpoint,status} responses by endpoint and HTTP status
    llmjax_prompt_tokens_total, llmjax_generation_tokens_total
    llmjax_compilations_total              XLA compilations since start (warm-up included)
    llmjax_compilations_after_warmup       compilations since warm-up finished (0 expected)
"""

import prometheus_client as prom

from llmjax.inference.runner import EngineRunner

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    def __init__(self, runner: EngineRunner):
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.time_to_first_token = prom.Histogram(
            "llmjax_time_to_first_token_seconds", "Submission to first generated token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = prom.Histogram(
            "llmjax_time_per_output_token_seconds", "Mean time per token after the first.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = prom.Counter("llmjax_requests", "HTTP responses.",
                                     ("endpoint", "status"), registry=r)
        self.prompt_tokens = prom.Counter("llmjax_prompt_tokens", "Prompt tokens admitted.",
                                          registry=r)
        self.generation_tokens = prom.Counter("llmjax_generation_tokens", "Tokens generated.",
                                              registry=r)
        engine = runner.engine
        prom.Gauge("llmjax_queue_depth", "Requests waiting for a slot.",
                   registry=r).set_function(lambda: runner.queued)
        prom.Gauge("llmjax_busy_slots", "Slots decoding a request.",
                   registry=r).set_function(lambda: engine.active)
        prom.Gauge("llmjax_compilations_total", "XLA compilations since the server started.",
                   registry=r).set_function(lambda: engine.compilations)
        self._warm_compilations: int | None = None
        prom.Gauge("llmjax_compilations_after_warmup", "XLA compilations after warm-up.",
                   registry=r).set_function(self._after_warmup)
        self._runner = runner

    def _after_warmup(self) -> float:
        if not self._runner.ready.is_set():
            return 0
        if self._warm_compilations is None:
            self._warm_compilations = self._runner.engine.warmup_compilations
        return self._runner.engine.compilations - self._warm_compilations

    def render(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST

    def finished(self, prompt_tokens: int, generated: int, submitted: float,
                 first_token: float | None, done: float) -> None:
        """Record one finished request (times from time.monotonic())."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated)
        if first_token is not None:
            self.time_to_first_token.observe(first_token - submitted)
            if generated > 1:
                self.time_per_output_token.observe((done - first_token) / (generated - 1))


"""The OpenAI-compatible HTTP server: FastAPI over the engine's runner (its own thread).

    app = create_app(runner, texts, model_name="my_run", api_key="...")

Endpoints: GET /v1/models; POST /v1/completions and /v1/chat/completions (JSON, or
Server-Sent Events with `stream`); POST /tokenize, POST /detokenize, GET /tokenizer_info
(what lm-evaluation-harness's remote tokenizer reads); GET /health (alive), /ready (503
until warm-up compiled everything), /metrics (Prometheus); GET / (a chat page).

What a client can rely on: a full queue answers 429 with Retry-After, warming up or
draining 503, a prompt that does not fit or a bad field 400 naming it (never a silent
truncation); `finish_reason` is what happened; a client that goes away frees its slot at
the next step; with an API key every endpoint but /health wants `Authorization: Bearer
KEY` (compared in constant time). Request bodies: llmjax.inference.openai_api; streaming
and waiting: llmjax.inference.serving.
"""

import hmac
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from llmjax.inference import openai_api, serving
from llmjax.inference.openai_api import error
from llmjax.inference.runner import EngineRunner
from llmjax.inference.server_metrics import ServerMetrics
from llmjax.inference.texts import Texts

OPEN_PATHS = ("/health",)


class Guard:
    """ASGI middleware: the API key check (constant time) and the response counter. (A
    plain ASGI one: Starlette's BaseHTTPMiddleware hides client disconnects from the app.)"""

    def __init__(self, app: Any, api_key: str | None, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.expected is not None and path not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.requests.labels(path, "401").inc()
                response = error(401, "missing or wrong API key: send Authorization: "
                                      "Bearer KEY")
                return await response(scope, receive, send)
        status = {"code": 499}  # no response started: the client went away first

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(path, str(status["code"])).inc()


def create_app(runner: EngineRunner, texts: Texts, *, model_name: str,
               api_key: str | None = None, request_timeout: float = 600.0) -> FastAPI:
    app = FastAPI(title="llmjax", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(runner)
    service = serving.Service(runner, texts, metrics, model_name, request_timeout)
    app.state.service = service

    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(400, f"the request body is not valid JSON ({first.get('msg')})")
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return error(400, f"{where}: {first.get('msg', 'invalid')}", param=where)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if runner.error is not None:
            return error(503, f"the engine stopped: {runner.error}")
        if not runner.accepting:
            return error(503, "draining" if runner.ready.is_set() else "warming up")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "owned_by": "llmjax",
            "max_model_len": runner.engine.max_seq_len}]}

    @app.post("/v1/completions")
    async def completions(body: openai_api.CompletionRequest, request: Request) -> Response:
        return await service.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: openai_api.ChatRequest, request: Request) -> Response:
        return await service.chat(body, request)

    @app.post("/tokenize")
    async def tokenize(body: openai_api.TokenizeRequest) -> Response:
        if body.messages is not None:
            tokens = service.chat_tokens(body.messages)
            if isinstance(tokens, Response):
                return tokens
        elif body.prompt is not None:
            tokens = texts.encode(body.prompt, body.add_special_tokens)
        else:
            return error(400, "give prompt (a string) or messages", param="prompt")
        return JSONResponse({"tokens": tokens, "count": len(tokens),
                             "max_model_len": runner.engine.max_seq_len})

    @app.post("/detokenize")
    async def detokenize(body: openai_api.DetokenizeRequest) -> Response:
        vocab = texts.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            return error(400, f"tokens: ids must be in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": texts.decode(body.tokens)})

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return {**texts.info(), "model_max_length": runner.engine.max_seq_len}

    @app.get("/")
    async def chat_page() -> HTMLResponse:
        page = resources.files("llmjax.inference").joinpath("chat.html").read_text()
        return HTMLResponse(page.replace("{{MODEL}}", model_name))

    return app

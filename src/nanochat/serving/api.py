"""The OpenAI-compatible HTTP API: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`.

The request body is parsed by hand rather than by a pydantic model so that every mistake, including
malformed JSON and wrong types, comes back as a 4xx in OpenAI's error shape naming the field:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Nothing a client sends should produce a 500. Unknown body fields are ignored (as OpenAI's SDKs add new
ones over time); known ones this server cannot honour (top_p != 1, penalties, logprobs, tools, ...) are
rejected so a client never silently gets different behaviour than it asked for.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.serving.generation import Finish, GenerationQueue, QueueFull, TextDelta
from nanochat.serving.limits import RequestError, validate_chat

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_000_000
CHAT_PATH = "/v1/chat/completions"
ROUTES = {CHAT_PATH: {"POST"}, "/v1/models": {"GET"}}

# Fields whose only supported value is the default: anything else is a 400 naming the field.
UNSUPPORTED_UNLESS = {
    "top_p": lambda v: v is None or v == 1,
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "logprobs": lambda v: v is None or v is False,
    "top_logprobs": lambda v: v is None or v == 0,
    "logit_bias": lambda v: v is None or v == {},
    "tools": lambda v: v is None or v == [],
    "functions": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "response_format": lambda v: v is None or v == {"type": "text"},
}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, **kwargs) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = kwargs.pop("code", None)
    return JSONResponse(error_body(message, param, kind, code), status_code=status, **kwargs)


async def read_json_body(request: Request, limit: int) -> dict:
    """The request's JSON object, reading at most `limit` bytes (413 beyond, whatever Content-Length says)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(None, f"the request body is {int(declared):,} bytes; the limit is {limit:,}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(None, f"the request body is over the limit of {limit:,} bytes", status=413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise RequestError(None, f"the request body is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(body, dict):
        raise RequestError(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def bearer_guard(api_key: str | None):
    """A dependency that demands `Authorization: Bearer <api_key>` (compared in constant time) when a key is set."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise RequestError(None, "missing or wrong API key: send 'Authorization: Bearer <key>'", status=401)

    return check


class ChatCompletions:
    """Turns an OpenAI request body into a validated request on the queue, and events into OpenAI responses."""

    def __init__(self, queue: GenerationQueue, tokenizer, model_name: str, max_context: int,
                 defaults: dict, max_body_bytes: int):
        self.queue, self.tokenizer, self.model_name = queue, tokenizer, model_name
        self.max_context, self.defaults, self.max_body_bytes = max_context, defaults, max_body_bytes

    def parse(self, body: dict):
        for name, ok in UNSUPPORTED_UNLESS.items():
            if not ok(body.get(name)):
                raise RequestError(name, f"{name}={body[name]!r} is not supported by this server; leave it out")
        if "messages" not in body:
            raise RequestError("messages", "messages is required")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise RequestError("stream", "stream must be true or false")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("stream_options", "stream_options must be an object")
        limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if limit_name == "max_completion_tokens" and body.get("max_tokens") not in (None, body["max_completion_tokens"]):
            raise RequestError("max_tokens", "max_tokens and max_completion_tokens disagree; send one of them")

        def setting(name):
            value = body.get(name)
            return self.defaults.get(name) if value is None else value

        try:
            request = validate_chat(
                body["messages"], setting("temperature"), setting("top_k"), body.get(limit_name), setting("n"),
                body.get("seed"), body.get("stop"), tokenizer=self.tokenizer, max_context=self.max_context,
                default_max_tokens=self.defaults.get("max_tokens", 512),
            )
        except RequestError as e:
            if e.field == "max_tokens":
                e.field = limit_name
            raise
        return request, stream, bool(options.get("include_usage"))

    async def __call__(self, http_request: Request):
        body = await read_json_body(http_request, self.max_body_bytes)
        request, stream, include_usage = self.parse(body)
        job = self.queue.submit(request)  # QueueFull -> 503 before any response starts
        meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": self.model_name}
        prompt_tokens = len(request.prompt_ids)
        if stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self._sse(job, meta, prompt_tokens, include_usage), media_type="text/event-stream", headers=headers)
        texts, reasons, completion_tokens = [""] * request.n, ["length"] * request.n, 0
        async for event in job.events():
            if isinstance(event, TextDelta):
                texts[event.index] += event.text
            elif isinstance(event, Finish):
                reasons[event.index] = event.reason
                completion_tokens += event.tokens
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reasons[i]}
            for i, text in enumerate(texts)
        ]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}

    async def _sse(self, job, meta: dict, prompt_tokens: int, include_usage: bool):
        def chunk(choices: list, **extra) -> str:
            return f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

        def choice(index: int, delta: dict, finish_reason: str | None = None) -> dict:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        completion_tokens = 0
        try:
            for i in range(job.request.n):
                yield chunk([choice(i, {"role": "assistant", "content": ""})])
            async for event in job.events():
                if isinstance(event, TextDelta):
                    yield chunk([choice(event.index, {"content": event.text})])
                elif isinstance(event, Finish):
                    completion_tokens += event.tokens
                    yield chunk([choice(event.index, {}, event.reason)])
            if include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
                yield chunk([], usage=usage)
        except Exception:  # the status line is already sent: report in-band, then end the stream normally
            log.exception("generation failed mid-stream")
            yield f"data: {json.dumps(error_body('generation failed on the server', kind='server_error'))}\n\n"
        finally:
            job.cancel()  # also runs when the client disconnects and the response task is cancelled
        yield "data: [DONE]\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI-shaped JSON: bad input 4xx, a full queue 503, a bug 500 without details."""

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        code = "invalid_api_key" if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.field, headers=headers, code=code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(400, first.get("msg", "invalid request"), param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc: QueueFull):
        return error_response(503, str(exc), headers={"Retry-After": "1"}, code="queue_full")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")


def create_app(engine, tokenizer, model_name: str = "nanochat", *, api_key: str | None = None, max_waiting: int = 16,
               max_body_bytes: int = MAX_BODY_BYTES, defaults: dict | None = None) -> FastAPI:
    """The API app. The engine is shared through one GenerationQueue (`app.state.queue`), which the web UI reuses."""
    queue = GenerationQueue(engine, tokenizer, max_waiting=max_waiting)

    @asynccontextmanager
    async def lifespan(app):
        yield
        queue.shutdown()

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.queue, app.state.tokenizer, app.state.model_name = queue, tokenizer, model_name
    app.state.max_context = engine.max_context
    app.state.defaults = {"temperature": 0.6, "top_k": 50, "max_tokens": 512, "n": 1, **(defaults or {})}
    install_error_handlers(app)
    guard = [Depends(bearer_guard(api_key))]
    completions = ChatCompletions(queue, tokenizer, model_name, engine.max_context, app.state.defaults, max_body_bytes)
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "nanochat"}

    @app.post(CHAT_PATH, dependencies=guard)
    async def chat_completions(request: Request):
        return await completions(request)

    @app.get("/v1/models", dependencies=guard)
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id}", dependencies=guard)
    async def model(model_id: str):
        if model_id != model_name:
            raise RequestError("model", f"no model named {model_id!r}; this server has {model_name!r}", status=404)
        return model_card

    @app.get("/health")
    async def health():
        return {"status": "ok", "ready": True, "model": model_name, "pending": queue.pending, "max_waiting": max_waiting}

    # A catch-all for /v1: the web UI is mounted at "/" and would otherwise answer unknown API paths (and
    # wrong methods on known ones) with its own HTML/404, so API clients get JSON 404/405 here instead.
    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], dependencies=guard)
    async def unknown(request: Request, rest: str):
        allowed = ROUTES.get(request.url.path.rstrip("/"))
        if allowed and request.method not in allowed:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}; use {', '.join(sorted(allowed))}",
                                  headers={"Allow": ", ".join(sorted(allowed))})
        return error_response(404, f"no route {request.method} {request.url.path}")

    return app

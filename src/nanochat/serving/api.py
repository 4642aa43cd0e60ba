"""The OpenAI-compatible HTTP API: `POST /v1/chat/completions`, `POST /v1/completions` (nanochat.serving.completions),
`GET /v1/models`, `GET /health`.

The request body is parsed by hand rather than by a pydantic model so that every mistake, including
malformed JSON and wrong types, comes back as a 4xx in OpenAI's error shape naming the field:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

Nothing a client sends should produce a 500. Unknown body fields are ignored (as OpenAI's SDKs add new
ones over time); known ones this server cannot honour (top_p != 1, penalties, logprobs, tools, ...) are
rejected so a client never silently gets different behaviour than it asked for.

No client can hold the engine it does not use: a request takes its slot in the queue only once its body
is in (which must arrive within `body_timeout`), a client that disconnects cancels its generation (streamed
or not), and a streaming client that stops reading is dropped after `send_timeout`. `GET /health` is 200
only when the engine has run and is making progress, 503 with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import asdict

import h11
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from nanochat.serving.completions import COMPLETIONS_PATH, Completions
from nanochat.serving.generation import Finish, GenerationQueue, QueueFull, TextDelta
from nanochat.serving.limits import RequestError, shown, validate_chat
from nanochat.settings import SamplingConfig, ServerLimits

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
ROUTES = {CHAT_PATH: {"POST"}, COMPLETIONS_PATH: {"POST"}, "/v1/models": {"GET"}}

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


def error_body(
    message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, **kwargs) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = kwargs.pop("code", None)
    return JSONResponse(error_body(message, param, kind, code), status_code=status, **kwargs)


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(None, f"the request body is over the limit of {limit:,} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int, timeout: float) -> dict:
    """The request's JSON object: at most `limit` bytes (413 beyond, whatever Content-Length says), arriving
    within `timeout` seconds (408 after; a client trickling its body in must not keep a task forever)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:  # "²".isdigit() is True, int("²") fails
        raise RequestError(None, f"the request body is {int(declared):,} bytes; the limit is {limit:,}", status=413)
    try:
        raw = await asyncio.wait_for(_read_body(request, limit), timeout)
    except asyncio.TimeoutError:
        raise RequestError(None, f"the request body did not arrive within {timeout:g} s", status=408) from None
    except ClientDisconnect:  # nobody will read the answer; a 400 keeps it out of the error log
        raise RequestError(None, "the client disconnected before sending the whole body") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        reason = str(e).split(";")[0]  # int-size errors go on with advice for Python programmers
        raise RequestError(None, f"the request body is not valid JSON ({type(e).__name__}: {reason})") from None
    if not isinstance(body, dict):
        raise RequestError(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def asked(request: Request) -> str:
    """'GET /some/path' for an error message, cut short (paths and methods come from the client)."""
    return shown(f"{request.method} {request.url.path}")


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


async def disconnected(request: Request) -> None:
    """Returns when the client goes away. Only after the body is read: then only http.disconnect can come."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events that let go of the engine when the client does.

    A client that disconnects cancels the response (Starlette listens for that). One that stops reading
    fills the socket buffers until a chunk waits in `send`; after `send_timeout` seconds of that the stream is
    abandoned and uvicorn closes the connection. Either way the body generator is closed here and now (not
    whenever it is garbage-collected), which cancels the job: the engine stops at its next step.
    """

    def __init__(self, content, send_timeout: float, headers: dict | None = None):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.send_timeout = send_timeout

    async def stream_response(self, send) -> None:
        async def send_or_give_up(message) -> None:
            await asyncio.wait_for(send(message), self.send_timeout)

        try:
            await super().stream_response(send_or_give_up)
        except asyncio.TimeoutError:
            log.warning("dropped a streaming client that read nothing for %g s", self.send_timeout)
        finally:
            await self.body_iterator.aclose()


class ChatCompletions:
    """Turns an OpenAI request body into a validated request on the queue, and events into OpenAI responses."""

    def __init__(
        self,
        queue: GenerationQueue,
        tokenizer,
        model_name: str,
        max_context: int,
        defaults: dict,
        max_body_bytes: int,
        body_timeout: float,
        send_timeout: float,
    ):
        self.queue, self.tokenizer, self.model_name = queue, tokenizer, model_name
        self.max_context, self.defaults, self.max_body_bytes = max_context, defaults, max_body_bytes
        self.body_timeout, self.send_timeout = body_timeout, send_timeout

    def parse(self, body: dict):
        for name, ok in UNSUPPORTED_UNLESS.items():
            if not ok(body.get(name)):
                raise RequestError(name, f"{name}={shown(body[name])} is not supported by this server; leave it out")
        if "messages" not in body:
            raise RequestError("messages", "messages is required")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise RequestError("stream", "stream must be true or false")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError("stream_options", "stream_options must be an object")
        limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        if limit_name == "max_completion_tokens" and body.get("max_tokens") not in (
            None,
            body["max_completion_tokens"],
        ):
            raise RequestError("max_tokens", "max_tokens and max_completion_tokens disagree; send one of them")

        def setting(name):
            value = body.get(name)
            return self.defaults.get(name) if value is None else value

        try:
            request = validate_chat(
                body["messages"],
                setting("temperature"),
                setting("top_k"),
                body.get(limit_name),
                setting("n"),
                body.get("seed"),
                body.get("stop"),
                tokenizer=self.tokenizer,
                max_context=self.max_context,
                default_max_tokens=self.defaults["max_tokens"],
            )
        except RequestError as e:
            if e.field == "max_tokens":
                e.field = limit_name
            raise
        return request, stream, bool(options.get("include_usage"))

    async def __call__(self, http_request: Request):
        # The parsed body is not kept: unknown fields may hold up to a megabyte of junk, and a queued request
        # would hold it for as long as it waits.
        request, stream, include_usage = self.parse(
            await read_json_body(http_request, self.max_body_bytes, self.body_timeout)
        )
        job = self.queue.submit(request)  # the slot is taken only now, with the body in; QueueFull -> 503
        meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": self.model_name}
        prompt_tokens = len(request.prompt_ids)
        if stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return EventStream(self._sse(job, meta, prompt_tokens, include_usage), self.send_timeout, headers)
        collect = asyncio.ensure_future(self._collect(job))
        gone = asyncio.ensure_future(disconnected(http_request))
        try:  # nothing is sent until the reply is complete, so watch for the client leaving meanwhile
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():  # the client left (or the server is stopping): the engine stops at its next step
                collect.cancel()
                job.cancel()
        if not collect.done() or collect.cancelled():
            return error_response(400, "the client disconnected before the reply was ready")  # read by nobody
        texts, reasons, completion_tokens = collect.result()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reasons[i],
            }
            for i, text in enumerate(texts)
        ]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}

    @staticmethod
    async def _collect(job) -> tuple[list[str], list[str], int]:
        texts, reasons, completion_tokens = [""] * job.request.n, ["length"] * job.request.n, 0
        async for event in job.events():
            if isinstance(event, TextDelta):
                texts[event.index] += event.text
            elif isinstance(event, Finish):
                reasons[event.index] = event.reason
                completion_tokens += event.tokens
        return texts, reasons, completion_tokens

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
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                }
                yield chunk([], usage=usage)
        except Exception:  # the status line is already sent: report in-band, then end the stream normally
            log.exception("generation failed mid-stream")
            yield f"data: {json.dumps(error_body('generation failed on the server', kind='server_error'))}\n\n"
        finally:
            job.cancel()  # also runs when the client disconnects and the response task is cancelled
        yield "data: [DONE]\n\n"


class AlreadyAnswered:
    """ASGI middleware: drop our response when uvicorn has already answered the request itself.

    Uvicorn hands a request to the app as soon as its headers are in; if the body then turns out malformed
    (say, a broken chunk size) uvicorn sends its own 400 and closes. An answer the app sends after that fails
    in h11 with LocalProtocolError, which would be logged as two tracebacks; the client has its 400.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_unless_answered(message) -> None:
            try:
                await send(message)
            except h11.LocalProtocolError:
                pass

        await self.app(scope, receive, send_unless_answered if scope["type"] == "http" else send)


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
        message = str(exc.detail)
        if exc.status_code in (404, 405):  # Starlette says just "Not Found": name what was asked for
            message = f"{message}: {asked(request)}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc: QueueFull):
        return error_response(503, str(exc), headers={"Retry-After": "1"}, code="queue_full")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")


def create_app(
    engine,
    tokenizer,
    model_name: str = "nanochat",
    *,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    sampling: SamplingConfig | None = None,
) -> FastAPI:
    """The API app. The engine is shared through one GenerationQueue (`app.state.queue`), which the web UI reuses;
    `sampling` fills in what a request leaves out."""
    limits = limits or ServerLimits()
    queue = GenerationQueue(engine, tokenizer, max_waiting=limits.max_waiting, max_batch=limits.max_batch)
    queue.warm_up()  # runs while uvicorn starts; /health is 503 until it is done

    @asynccontextmanager
    async def lifespan(app):
        yield
        queue.shutdown()

    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.queue, app.state.tokenizer, app.state.model_name = queue, tokenizer, model_name
    app.state.max_context = engine.max_context
    app.state.sampling = sampling or SamplingConfig()
    app.state.defaults = {**asdict(app.state.sampling), "n": 1}
    install_error_handlers(app)
    app.add_middleware(AlreadyAnswered)
    guard = [Depends(bearer_guard(api_key))]
    completions = ChatCompletions(
        queue,
        tokenizer,
        model_name,
        engine.max_context,
        app.state.defaults,
        limits.max_body_bytes,
        limits.body_timeout,
        limits.send_timeout,
    )
    text_completions = Completions(
        queue, tokenizer, model_name, engine.max_context, app.state.defaults, limits.max_body_bytes, limits.body_timeout
    )
    created = int(time.time())
    model_card = {"id": model_name, "object": "model", "created": created, "owned_by": "nanochat"}

    @app.post(CHAT_PATH, dependencies=guard)
    async def chat_completions(request: Request):
        return await completions(request)

    @app.post(COMPLETIONS_PATH, dependencies=guard)
    async def completions_endpoint(request: Request):
        return await text_completions(request)

    @app.get("/v1/models", dependencies=guard)
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id}", dependencies=guard)
    async def model(model_id: str):
        if model_id != model_name:
            raise RequestError("model", f"no model named {shown(model_id)}; this server has {model_name!r}", status=404)
        return model_card

    @app.get("/health")
    async def health():
        """Readiness for a load balancer (no API key needed; it reveals only the model name and the load)."""
        problem = queue.problem(limits.stall_timeout)
        body = {
            "status": "ok" if problem is None else "unavailable",
            "ready": problem is None,
            "model": model_name,
            "generating": queue.generating,
            "pending": queue.pending,
            "free": max(0, limits.max_waiting + 1 - queue.pending),
            "max_waiting": limits.max_waiting,
        }
        if problem is None:
            return body
        return JSONResponse({**body, "reason": problem}, status_code=503, headers={"Retry-After": "1"})

    # A catch-all for /v1: the web UI is mounted at "/" and would otherwise answer unknown API paths (and
    # wrong methods on known ones) with its own HTML/404, so API clients get JSON 404/405 here instead.
    @app.api_route(
        "/v1/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], dependencies=guard
    )
    async def unknown(request: Request, rest: str):
        allowed = ROUTES.get(request.url.path.rstrip("/"))
        if allowed and request.method not in allowed:
            return error_response(
                405,
                f"{asked(request)} is not allowed; use {', '.join(sorted(allowed))}",
                headers={"Allow": ", ".join(sorted(allowed))},
            )
        return error_response(404, f"no route {asked(request)}")

    return app

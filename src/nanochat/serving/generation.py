"""From a validated request to streamed events: the one place that drives the engine for API, UI and CLI.

`generate_events` turns the engine's token columns into per-choice events:

* `TextDelta`: new reply text. Text is released only when its UTF-8 is complete (the decoded text does not end
  in U+FFFD), so a character split across tokens never reaches a client in halves.
* `ToolUse`: a calculator call and its result. The model writes `<|python_start|> expr <|python_end|>` and
  the engine forces `<|output_start|> result <|output_end|>`. With `tools_as_text=True` (the HTTP API) the
  pair becomes plain text in the reply, `\\n[calculator] 12*7 = 84\\n` (`= (no result)` when the calculator
  refused), so any OpenAI client shows it; the UI and CLI ask for `ToolUse` events and show them apart.
* `Finish`: the choice ended: "stop" (the model ended its turn or a stop string appeared; the text is cut
  before the stop string) or "length" (max_tokens ran out), with the tokens it generated (ending token included).

`GenerationQueue` owns the engine for a server: a single worker thread decodes the requests in its batch
together (continuous batching, nanochat.engine.batching: one forward per step for all their rows; a request
joins between steps after its own prefill, so its first token does not wait for the others to finish), others
wait in FIFO order in a bounded queue (`QueueFull` when it is full), and a cancelled request (a client that
went away) stops at its next decoding step and leaves the batch, which frees its rows of the KV cache.
Scoring (`ScoreRequest`, for /v1/completions' logprobs) is one forward over a token sequence that the worker runs
between two decoding steps, so it neither waits for the batch to drain nor races it for the model.
It also knows whether the engine works, for /health: `problem()` names what keeps it from being ready
(warming up, a failed warm-up generation, a generation that stopped making progress, shut down).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from nanochat.engine.batching import BatchDecoder
from nanochat.serving.limits import ChatRequest
from nanochat.settings import ServerLimits

log = logging.getLogger(__name__)
REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ToolUse:
    index: int
    expression: str
    output: str | None  # None: the calculator refused the expression, nothing was forced


@dataclass(frozen=True)
class Finish:
    index: int
    reason: str  # "stop" | "length"
    tokens: int  # tokens this choice generated, forced tool output and the closing token included
    ids: tuple[int, ...] = field(default=(), compare=False)  # those tokens (for logprobs)


@dataclass(frozen=True)
class ScoreRequest:
    """Log-probabilities of every token of `tokens` after the first, with the `top` likeliest at each position."""

    tokens: list[int]
    top: int = 0
    n: int = 0  # rows of the decoding batch it takes: none, it is one forward between two decoding steps


@dataclass(frozen=True)
class Scores:
    token_logprobs: list[float]  # of tokens[1:]
    top_logprobs: list[list[tuple[int, float]]]  # per position of tokens[1:]: (id, logprob), likeliest first


def score_tokens(engine, tokens: list[int], top: int = 0) -> Scores:
    """One forward over `tokens` in the engine's compute dtype; log-softmax in fp32."""
    import torch

    from nanochat.precision import computing

    with torch.inference_mode(), computing(engine.model, engine.compute_dtype()):
        logits = engine.model(torch.tensor([tokens], device=engine.device))[0, :-1]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(tokens[1:], device=logprobs.device)
    chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
    if top <= 0:
        return Scores(chosen, [[] for _ in chosen])
    values, indices = logprobs.topk(top, dim=-1)
    return Scores(chosen, [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())])


def tool_marker(expression: str, output: str | None) -> str:
    return f"\n[calculator] {expression.strip()} = {output if output is not None else '(no result)'}\n"


class _Choice:
    """One row of the engine's output: a small state machine over text, tool-call and tool-output tokens."""

    def __init__(self, index: int, tokenizer, stops: tuple[str, ...], tools_as_text: bool):
        self.index, self.tok, self.stops, self.tools_as_text = index, tokenizer, stops, tools_as_text
        t = tokenizer.token_id
        self.end_ids = {t("<|assistant_end|>"), t("<|bos|>")}
        self.ids = {
            name: t(name) for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
        }
        self.special_ids = set(tokenizer.special_tokens.values())
        self.mode = "text"  # "text" | "call" | "output"
        self.segment: list[int] = []  # text tokens not yet released (incomplete UTF-8)
        self.call: list[int] = []
        self.output: list[int] = []
        self.expression: str | None = None  # a finished call waiting to see whether output follows
        self.text = ""  # the reply so far as the client sees it (for stop strings)
        self.sent = 0  # characters of self.text already released
        self.tokens = 0
        self.generated: list[int] = []
        self.done = False

    # --- text and stop strings ----------------------------------------------------------------
    def _release(self, final: bool = False) -> list:
        """Emit self.text[self.sent:] except what could still grow into a stop string; end at a stop string."""
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            events = [TextDelta(self.index, self.text[self.sent : cut])] if cut > self.sent else []
            self.text, self.sent = self.text[:cut], cut
            return events + self._finish("stop")
        limit = len(self.text)
        if not final:
            for s in self.stops:  # hold back a tail that is the start of a stop string
                for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        limit = min(limit, len(self.text) - k)
                        break
        if limit <= self.sent:
            return []
        delta, self.sent = self.text[self.sent : limit], limit
        return [TextDelta(self.index, delta)]

    def _add_text(self, text: str) -> list:
        self.text += text
        return self._release()

    def _flush_segment(self) -> list:
        if not self.segment:
            return []
        text, self.segment = self.tok.decode(self.segment), []
        return self._add_text(text)

    # --- tools ----------------------------------------------------------------------------------
    def _tool(self, output: str | None) -> list:
        expression, self.expression = self.expression or "", None
        if self.tools_as_text:
            return self._add_text(tool_marker(expression, output))
        # A tool call breaks any stop string: release what was held back so events stay in order.
        events = self._release(final=True)
        return events if self.done else [*events, ToolUse(self.index, expression, output)]

    # --- the state machine ------------------------------------------------------------------------
    def feed(self, token: int) -> list:
        self.tokens += 1
        self.generated.append(token)
        ids = self.ids
        if token in self.end_ids:
            return self.finish("stop")
        if self.mode == "call":
            if token == ids["<|python_end|>"]:
                self.expression, self.call, self.mode = self.tok.decode(self.call), [], "text"
            else:
                self.call.append(token)
            return []
        if self.mode == "output":
            if token == ids["<|output_end|>"]:
                output, self.output, self.mode = self.tok.decode(self.output), [], "text"
                return self._tool(output)
            self.output.append(token)
            return []
        if token == ids["<|output_start|>"]:
            events = self._flush_segment()
            self.mode = "output"
            if self.expression is None:
                self.expression = ""
            return events
        events = self._tool(None) if self.expression is not None else []  # a call the calculator refused
        if self.done:
            return events
        if token == ids["<|python_start|>"]:
            self.mode = "call"
            return events + self._flush_segment()
        if token in self.special_ids:  # a stray chat token (e.g. <|user_start|>) is not reply text
            return events
        self.segment.append(token)
        text = self.tok.decode(self.segment)
        if text.endswith(REPLACEMENT_CHAR):
            return events
        self.segment = []
        return events + self._add_text(text)

    def _finish(self, reason: str) -> list:
        self.done = True
        return [Finish(self.index, reason, self.tokens, tuple(self.generated))]

    def finish(self, reason: str) -> list:
        """End the choice: release everything pending (an unfinished call or output counts as no result)."""
        events = []
        if self.mode == "call":
            self.expression = self.tok.decode(self.call)
        if self.mode in ("call", "output") or self.expression is not None:
            events += self._tool(self.tok.decode(self.output) if self.mode == "output" else None)
        self.mode = "text"
        if not self.done:
            events += self._flush_segment()
        if not self.done:
            events += self._release(final=True)
        if not self.done:
            events += self._finish(reason)
        return events


class _Reply:
    """A request's choices: the engine's token columns in, events out."""

    def __init__(self, tokenizer, request: ChatRequest, tools_as_text: bool):
        self.choices = [_Choice(i, tokenizer, request.stop, tools_as_text) for i in range(request.n)]

    def feed(self, column: list[int]) -> list:
        return [event for choice, token in zip(self.choices, column) if not choice.done for event in choice.feed(token)]

    @property
    def done(self) -> bool:
        return all(c.done for c in self.choices)

    def finish(self) -> list:
        """The generation ended with choices still open: max_tokens ran out."""
        return [event for choice in self.choices for event in choice.finish("length")]


def request_seed(request: ChatRequest) -> int:
    return request.seed if request.seed is not None else secrets.randbits(63)


def generate_events(
    engine,
    tokenizer,
    request: ChatRequest,
    cancel: threading.Event | None = None,
    tools_as_text: bool = True,
    on_step: Callable[[], None] | None = None,
) -> Iterator[TextDelta | ToolUse | Finish]:
    """Run one request on the engine; stops early when every choice finished or `cancel` is set.

    `on_step` is called after every decoding step (a heartbeat: a step need not produce an event)."""
    reply = _Reply(tokenizer, request, tools_as_text)
    steps = engine.generate(
        request.prompt_ids,
        num_samples=request.n,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_k=request.top_k,
        seed=request_seed(request),
    )
    try:
        for column, _masks in steps:
            if on_step is not None:
                on_step()
            if cancel is not None and cancel.is_set():
                return
            yield from reply.feed(column)
            if reply.done:
                return
        yield from reply.finish()
    finally:
        steps.close()  # frees the KV cache now, not whenever the generator is collected


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts; the client should retry later (HTTP 503)."""


_END = object()


class Job:
    """A submitted request: iterate `events()` in the event loop; `cancel()` stops its generation."""

    def __init__(self, request: ChatRequest, tools_as_text: bool, loop: asyncio.AbstractEventLoop):
        self.request, self.tools_as_text, self.loop = request, tools_as_text, loop
        self.cancelled = threading.Event()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item) -> None:
        """Called from the worker thread: hand an event to the loop (cancel if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def events(self) -> AsyncIterator[TextDelta | ToolUse | Finish]:
        try:
            while (item := await self._queue.get()) is not _END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:  # the consumer stopped (finished, disconnected or cancelled): stop generating
            self.cancel()


class GenerationQueue:
    """Owns the one engine for a server: a single worker thread decodes up to `max_batch` rows (the choices of
    the requests in the batch) together, one forward per step for all of them. Requests join the batch between
    steps as soon as it has room for their rows (a request larger than `max_batch` runs when the batch is
    empty) and leave it when they finish or are cancelled; the rest wait in FIFO order. At most `max_waiting`
    + 1 requests are accepted at once, running or waiting (`QueueFull` beyond)."""

    def __init__(
        self, engine, tokenizer, max_waiting: int = ServerLimits.max_waiting, max_batch: int = ServerLimits.max_batch
    ):
        self.engine, self.tokenizer, self.max_waiting, self.max_batch = engine, tokenizer, max_waiting, max_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanochat-engine")
        self._lock = threading.Lock()
        self._pending = 0  # running + waiting
        self._waiting: deque[Job] = deque()
        self._working = False  # a worker loop (`_work`) is queued or running
        self._decoder = None  # the worker's, while it runs; only the worker thread touches it and `_active`
        self._active: dict = {}  # generation handle -> (Job, _Reply), for every request in the batch
        self.generating = 0  # requests holding the engine (rows in the batch, a KV cache) right now
        self._last_step: float | None = None  # monotonic time of the worker's last step while it generates
        self.warm, self.stopped = False, False  # for /health (see problem)
        self.failure: str | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def warm_up(self) -> None:
        """Queue a one-token generation ahead of any request, so readiness means "the engine has run"."""
        self._executor.submit(self._warm_up)

    def _warm_up(self) -> None:
        request = ChatRequest([], temperature=0.0, top_k=1, max_tokens=1, prompt_ids=[self.tokenizer.bos_token_id])
        try:
            for _ in self._generate(request):
                pass
            self.warm = True
        except Exception as e:  # e.g. out of device memory: /health says so instead of every request failing
            log.exception("the engine failed its warm-up generation")
            self.failure = f"the engine failed its warm-up generation ({type(e).__name__}); see the server log"

    def problem(self, stall_after: float) -> str | None:
        """Why the server cannot answer now (one sentence), or None when it is ready."""
        if self.stopped:
            return "the generation worker is shut down"
        if self.failure:
            return self.failure
        if not self.warm:
            return "the engine is warming up: its first generation has not finished"
        last = self._last_step  # read once: the worker may reset it meanwhile
        idle = 0.0 if last is None else time.monotonic() - last
        return f"the generation worker has made no progress for {idle:.0f} s" if idle > stall_after else None

    def _beat(self) -> None:
        self._last_step = time.monotonic()

    def _generate(self, request: ChatRequest, cancel: threading.Event | None = None, tools_as_text: bool = True):
        """generate_events alone on the engine (the warm-up), tracked for /health like the batch."""
        self.generating = 1
        self._beat()
        try:
            yield from generate_events(self.engine, self.tokenizer, request, cancel, tools_as_text, on_step=self._beat)
        finally:
            self.generating, self._last_step = 0, None

    def submit(self, request: ChatRequest | ScoreRequest, tools_as_text: bool = True) -> Job:
        """Queue a request (call from inside the event loop); raises QueueFull instead of waiting forever.
        A ScoreRequest's one event is its Scores, computed between two decoding steps of the batch."""
        job = Job(request, tools_as_text, asyncio.get_running_loop())
        with self._lock:
            if self.stopped:
                raise QueueFull("the server is shutting down")
            if self._pending > self.max_waiting:
                raise QueueFull(f"the server is busy: {self._pending} requests are running or waiting; retry later")
            self._pending += 1
            self._waiting.append(job)
            start, self._working = not self._working, True
        if start:
            self._executor.submit(self._work)
        return job

    # --- the worker thread ------------------------------------------------------------------------
    def _work(self) -> None:
        """Admit waiting requests while the batch has room, run a step for the batch, repeat; return when idle."""
        self._decoder = BatchDecoder(self.engine)
        limit = self.max_batch
        try:
            while True:
                if (job := self._take(limit)) is not None:
                    self._admit(job)
                elif self._active:
                    self._step()
                else:
                    with self._lock:  # under the lock: a request submitted now either is seen here or starts a new loop
                        if not self._waiting or self.stopped:
                            self._working = False
                            return
        except BaseException as e:  # a bug: fail what it holds rather than leave every client waiting forever
            log.exception("the generation worker failed")
            with self._lock:
                jobs, self._working = [job for job, _ in self._active.values()] + list(self._waiting), False
                self._waiting.clear()
            self._active.clear()
            self.generating, self._last_step = 0, None
            for job in jobs:
                job.put(e)
                self._end(job)
        finally:
            self._decoder = None

    def _take(self, limit: int) -> Job | None:
        """The first waiting request if it left already or the batch has room for its rows (always when empty)."""
        rows = self._decoder.rows
        with self._lock:
            if self._waiting and not self.stopped:
                job = self._waiting[0]
                if job.cancelled.is_set() or rows == 0 or rows + job.request.n <= limit:
                    return self._waiting.popleft()
        return None

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():  # a client that left while waiting costs nothing
            return self._end(job)
        request = job.request
        if isinstance(request, ScoreRequest):
            try:
                job.put(score_tokens(self.engine, request.tokens, request.top))
            except Exception as e:
                job.put(e)
            self._beat()
            return self._end(job)
        self.generating = len(self._active) + 1
        self._beat()
        try:  # the prefill: its first tokens go out at once, its rows decode with the batch from the next step
            gen, column, _ = self._decoder.add(
                request.prompt_ids,
                request.n,
                request.max_tokens,
                request.temperature,
                request.top_k,
                request_seed(request),
            )
        except Exception as e:  # reported to the waiting request, which turns it into an error response
            job.put(e)
            self._end(job)
        else:
            self._active[gen] = (job, _Reply(self.tokenizer, request, job.tools_as_text))
            self._deliver(gen, column)
        self._beat()

    def _step(self) -> None:
        try:
            outputs = self._decoder.step()
        except Exception as e:  # the shared forward failed (e.g. out of memory): so did every request in the batch
            for gen, (job, _) in list(self._active.items()):
                job.put(e)
                self._drop(gen, job)
            return
        self._beat()
        for gen, column, _masks in outputs:
            self._deliver(gen, column)

    def _deliver(self, gen, column: list[int]) -> None:
        """Route a request's new tokens to its stream as events; end it when it finished or was cancelled."""
        job, reply = self._active[gen]
        if job.cancelled.is_set():  # cancelled: stops here, at this step, and frees its rows
            return self._drop(gen, job)
        try:
            events = reply.feed(column)
            over = reply.done or gen.finished
            if over and not reply.done:
                events += reply.finish()
        except Exception as e:
            events, over = [e], True
        for event in events:
            job.put(event)
        if over:
            self._drop(gen, job)

    def _drop(self, gen, job: Job) -> None:
        del self._active[gen]
        self._decoder.remove(gen)
        self.generating = len(self._active)
        if not self._active:
            self._last_step = None
        self._end(job)

    def _end(self, job: Job) -> None:
        with self._lock:
            self._pending -= 1
        job.put(_END)

    def shutdown(self) -> None:
        """Stop admitting requests: the batch runs to its end, waiting requests never start."""
        self.stopped = True
        self._executor.shutdown(wait=False, cancel_futures=True)

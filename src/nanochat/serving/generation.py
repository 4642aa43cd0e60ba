"""From a validated request to streamed events: the one place that drives the engine for API, UI and CLI.

`generate_events` turns the engine's token columns into per-choice events:

* `TextDelta`: new reply text. Text is released only when its UTF-8 is complete (the decoded text does not end
  in U+FFFD), so a character split across tokens never reaches a client in halves.
* `ToolUse`: a calculator call and its result. The model writes `<|python_start|> expr <|python_end|>` and
  the engine forces `<|output_start|> result <|output_end|>`. With `tools_as_text=True` (the HTTP API) the
  pair becomes plain text in the reply, `\\n[calculator] 12*7 = 84\\n` (`= (no result)` when the calculator
  refused), so any OpenAI client shows it; the UI and CLI ask for `ToolUse` events and show them apart.
* `Finish`: the choice ended: "stop" (the model ended its turn or a stop string appeared; the text is cut
  before the stop string) or "length" (max_tokens ran out), with the number of tokens it generated.

`GenerationQueue` owns the engine for a server: a single worker thread runs one request at a time, others
wait in FIFO order in a bounded queue (`QueueFull` when it is full), and a cancelled request (a client that
went away) stops at its next decoding step and closes the engine's generator, which frees its KV cache.
It also knows whether the engine works, for /health: `problem()` names what keeps it from being ready
(warming up, a failed warm-up generation, a generation that stopped making progress, shut down).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from nanochat.serving.limits import ChatRequest

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


def tool_marker(expression: str, output: str | None) -> str:
    return f"\n[calculator] {expression.strip()} = {output if output is not None else '(no result)'}\n"


class _Choice:
    """One row of the engine's output: a small state machine over text, tool-call and tool-output tokens."""

    def __init__(self, index: int, tokenizer, stops: tuple[str, ...], tools_as_text: bool):
        self.index, self.tok, self.stops, self.tools_as_text = index, tokenizer, stops, tools_as_text
        t = tokenizer.token_id
        self.end_ids = {t("<|assistant_end|>"), t("<|bos|>")}
        self.ids = {name: t(name) for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")}
        self.special_ids = set(tokenizer.special_tokens.values())
        self.mode = "text"  # "text" | "call" | "output"
        self.segment: list[int] = []  # text tokens not yet released (incomplete UTF-8)
        self.call: list[int] = []
        self.output: list[int] = []
        self.expression: str | None = None  # a finished call waiting to see whether output follows
        self.text = ""  # the reply so far as the client sees it (for stop strings)
        self.sent = 0  # characters of self.text already released
        self.tokens = 0
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
        return [Finish(self.index, reason, self.tokens)]

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


def generate_events(engine, tokenizer, request: ChatRequest, cancel: threading.Event | None = None,
                    tools_as_text: bool = True, on_step: Callable[[], None] | None = None,
                    ) -> Iterator[TextDelta | ToolUse | Finish]:
    """Run one request on the engine; stops early when every choice finished or `cancel` is set.

    `on_step` is called after every decoding step (a heartbeat: a step need not produce an event)."""
    seed = request.seed if request.seed is not None else secrets.randbits(63)
    choices = [_Choice(i, tokenizer, request.stop, tools_as_text) for i in range(request.n)]
    steps = engine.generate(request.prompt_ids, num_samples=request.n, max_tokens=request.max_tokens,
                            temperature=request.temperature, top_k=request.top_k, seed=seed)
    try:
        for column, _masks in steps:
            if on_step is not None:
                on_step()
            if cancel is not None and cancel.is_set():
                return
            for choice, token in zip(choices, column):
                if not choice.done:
                    yield from choice.feed(token)
            if all(c.done for c in choices):
                return
        for choice in choices:
            yield from choice.finish("length")
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
    """Serializes access to the one engine: a single worker thread and at most `max_waiting` queued requests."""

    def __init__(self, engine, tokenizer, max_waiting: int = 16):
        self.engine, self.tokenizer, self.max_waiting = engine, tokenizer, max_waiting
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanochat-engine")
        self._lock = threading.Lock()
        self._pending = 0  # running + waiting
        self.generating = 0  # generations holding the engine (and a KV cache) right now: 0 or 1
        self._last_step: float | None = None  # monotonic time of the running generation's last step
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

    def _generate(self, request: ChatRequest, cancel: threading.Event | None = None, tools_as_text: bool = True):
        """generate_events, tracked for /health: `generating` while it runs, a heartbeat at every step."""
        def beat() -> None:
            self._last_step = time.monotonic()

        self.generating = 1
        beat()
        try:
            yield from generate_events(self.engine, self.tokenizer, request, cancel, tools_as_text, on_step=beat)
        finally:
            self.generating, self._last_step = 0, None

    def submit(self, request: ChatRequest, tools_as_text: bool = True) -> Job:
        """Queue a request (call from inside the event loop); raises QueueFull instead of waiting forever."""
        job = Job(request, tools_as_text, asyncio.get_running_loop())
        with self._lock:
            if self._pending > self.max_waiting:
                raise QueueFull(f"the server is busy: {self._pending} requests are running or waiting; retry later")
            self._pending += 1
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        try:
            if not job.cancelled.is_set():  # a client that left while waiting costs nothing
                for event in self._generate(job.request, job.cancelled, job.tools_as_text):
                    job.put(event)
        except Exception as e:  # reported to the waiting request, which turns it into an error response
            job.put(e)
        finally:
            with self._lock:
                self._pending -= 1
            job.put(_END)

    def shutdown(self) -> None:
        self.stopped = True
        self._executor.shutdown(wait=False, cancel_futures=True)

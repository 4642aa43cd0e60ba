"""`POST /v1/completions`: OpenAI's text completions, with `echo` and `logprobs`.

A prompt is a string, a list of strings, a list of token ids or a list of such lists. A string is encoded as a
document the model was trained on, `<|bos|>` first; token ids are taken as they are. Each prompt gets `n` choices
(index prompt * n + j). `logprobs` (0..5) adds the log-probability of every returned token and the `logprobs`
likeliest tokens at its position; with `echo` the returned text and tokens start with the prompt's (its first
token has no log-probability). That is what lm-eval's `local-completions` model reads to score log-likelihood
tasks (`echo`, `logprobs=1`, `max_tokens=1`, `temperature=0`). Log-probabilities are the model's own (temperature
1, no top-k) from one forward over the prompt and the generated tokens, the token that ended a choice included;
a request with logprobs is therefore limited to the model's training context (`sequence_len`). Streaming is not
offered here (the chat endpoint streams).
"""

from __future__ import annotations

import asyncio
import codecs
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

from nanochat.serving.generation import Finish, ScoreRequest, TextDelta
from nanochat.serving.limits import MAX_TOTAL_CHARS, ChatRequest, RequestError, int_in, shown, validate_sampling

COMPLETIONS_PATH = "/v1/completions"
MAX_PROMPTS = 16
MAX_LOGPROBS = 5
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint
UNSUPPORTED_UNLESS = {
    "stream": lambda v: v is None or v is False,
    "suffix": lambda v: v is None or v == "",
    "best_of": lambda v: v is None or v == 1,
    "top_p": lambda v: v is None or v == 1,
    "presence_penalty": lambda v: v is None or v == 0,
    "frequency_penalty": lambda v: v is None or v == 0,
    "logit_bias": lambda v: v is None or v == {},
}


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str  # what `echo` returns: the prompt string, or the decoded ids
    implicit_bos: bool  # <|bos|> was put in front of a string prompt (it adds no text)


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[Prompt]
    temperature: float
    top_k: int
    max_tokens: int
    n: int
    seed: int | None
    stop: tuple[str, ...]
    echo: bool
    logprobs: int | None


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)  # bools are not ids


def parse_prompts(prompt, tokenizer) -> list[Prompt]:
    if isinstance(prompt, str) or _is_ids(prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) or _is_ids(p) for p in prompt):
        raise RequestError(
            "prompt",
            "prompt must be a string, a list of strings, a non-empty list of token ids, or a list of such lists",
        )
    if len(prompt) > MAX_PROMPTS:
        raise RequestError("prompt", f"prompt holds {len(prompt)} prompts; the limit is {MAX_PROMPTS}")
    chars = sum(len(p) for p in prompt if isinstance(p, str))
    if chars > MAX_TOTAL_CHARS:
        raise RequestError("prompt", f"the prompts hold {chars:,} characters in all; the limit is {MAX_TOTAL_CHARS:,}")
    prompts = []
    for p in prompt:
        if isinstance(p, str):
            prompts.append(Prompt(tokenizer.encode(p, prepend="<|bos|>"), p, True))
            continue
        bad = next((t for t in p if not 0 <= t < tokenizer.vocab_size), None)
        if bad is not None:
            raise RequestError(
                "prompt", f"token id {shown(bad)} is outside the vocabulary 0..{tokenizer.vocab_size - 1}"
            )
        prompts.append(Prompt(list(p), tokenizer.decode(p), False))
    return prompts


def token_string(tokenizer, token: int) -> str:
    """A token as text (a piece of a multi-byte character shows as U+FFFD)."""
    return tokenizer.enc.decode_single_token_bytes(token).decode("utf-8", errors="replace")


def top_dict(tokenizer, row: list[tuple[int, float]]) -> dict[str, float]:
    """{token text: logprob}, likeliest first; of two tokens with the same text the likelier is kept."""
    top: dict[str, float] = {}
    for token, logprob in row:
        top.setdefault(token_string(tokenizer, token), logprob)
    return top


def text_offsets(tokenizer, ids: list[int], start: int, silent_first: bool) -> list[int]:
    """Each token's character offset in the returned text, from `start` (an implicit first <|bos|> adds no text)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    offsets, position = [], start
    for i, token in enumerate(ids):
        offsets.append(position)
        if not (silent_first and i == 0):
            position += len(decoder.decode(tokenizer.enc.decode_single_token_bytes(token)))
    return offsets


class Completions:
    """Turns a completions body into generations and scorings on the queue, and their results into a response."""

    def __init__(
        self,
        queue,
        tokenizer,
        model_name: str,
        max_context: int,
        defaults: dict,
        max_body_bytes: int,
        body_timeout: float,
    ):
        self.queue, self.tokenizer, self.model_name = queue, tokenizer, model_name
        self.max_context, self.defaults = max_context, defaults
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    @property
    def score_context(self) -> int:
        """The most tokens one scoring forward takes: the model's training context."""
        return self.queue.engine.model.config.sequence_len

    def parse(self, body: dict) -> CompletionRequest:
        for name, ok in UNSUPPORTED_UNLESS.items():
            if not ok(body.get(name)):
                raise RequestError(
                    name, f"{name}={shown(body[name])} is not supported on {COMPLETIONS_PATH}; leave it out"
                )
        if "prompt" not in body:
            raise RequestError("prompt", "prompt is required")
        prompts = parse_prompts(body["prompt"], self.tokenizer)

        def setting(name):
            value = body.get(name)
            return self.defaults.get(name) if value is None else value

        temperature, top_k, n, seed, stop = validate_sampling(
            setting("temperature"),
            setting("top_k"),
            setting("n"),
            body.get("seed"),
            body.get("stop"),
            self.tokenizer.vocab_size,
        )
        max_tokens = body.get("max_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else int_in("max_tokens", max_tokens, 0, self.max_context)
        echo = body.get("echo") or False
        if not isinstance(echo, bool):
            raise RequestError("echo", "echo must be true or false")
        logprobs = body.get("logprobs")
        if logprobs is not None:
            logprobs = int_in("logprobs", logprobs, 0, MAX_LOGPROBS)
        if logprobs is not None:
            limit, what = self.score_context, "training context"
        else:
            limit, what = self.max_context, "context"
        longest = max(len(p.ids) for p in prompts)
        if longest + max_tokens > limit:
            raise RequestError(
                "prompt",
                f"a prompt of {longest} tokens + max_tokens={max_tokens} is more than the "
                f"model's {what} of {limit} tokens; shorten it or ask for fewer tokens",
            )
        return CompletionRequest(prompts, temperature, top_k, max_tokens, n, seed, stop, echo, logprobs)

    async def __call__(self, http_request: Request):
        from nanochat.serving.api import disconnected, error_response, read_json_body

        request = self.parse(await read_json_body(http_request, self.max_body_bytes, self.body_timeout))
        work = asyncio.ensure_future(self._complete(request))
        gone = asyncio.ensure_future(disconnected(http_request))
        try:  # as for chat: a client that leaves stops its generations at their next step
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if not work.done() or work.cancelled():
            return error_response(400, "the client disconnected before the reply was ready")
        return work.result()

    async def _complete(self, request: CompletionRequest) -> dict:
        choices, completion_tokens = [], 0
        for p, prompt in enumerate(request.prompts):
            texts, reasons, generated = [""] * request.n, ["length"] * request.n, [[] for _ in range(request.n)]
            if request.max_tokens:
                job = self.queue.submit(
                    ChatRequest(
                        [],
                        request.temperature,
                        request.top_k,
                        request.max_tokens,
                        request.n,
                        request.seed,
                        request.stop,
                        prompt.ids,
                    )
                )
                async for event in job.events():
                    if isinstance(event, TextDelta):
                        texts[event.index] += event.text
                    elif isinstance(event, Finish):
                        reasons[event.index], generated[event.index] = event.reason, list(event.ids)
                        completion_tokens += event.tokens
            for j in range(request.n):
                block = await self._logprobs(request, prompt, generated[j]) if request.logprobs is not None else None
                text = (prompt.text if request.echo else "") + texts[j]
                choices.append(
                    {"text": text, "index": p * request.n + j, "logprobs": block, "finish_reason": reasons[j]}
                )
        prompt_tokens = sum(len(p.ids) for p in request.prompts)
        return {
            "id": f"cmpl-{secrets.token_hex(12)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _logprobs(self, request: CompletionRequest, prompt: Prompt, generated: list[int]) -> dict:
        tokens = prompt.ids + generated
        scores = None
        async for event in self.queue.submit(ScoreRequest(tokens, request.logprobs)).events():
            scores = event
        strings = [token_string(self.tokenizer, t) for t in tokens]
        token_logprobs: list = [None, *scores.token_logprobs]
        tops: list = [None, *(top_dict(self.tokenizer, row) for row in scores.top_logprobs)]
        if request.echo:
            shown_from, offset, silent = 0, 0, prompt.implicit_bos
        else:
            shown_from, offset, silent = len(prompt.ids), len(prompt.text), False
        return {
            "tokens": strings[shown_from:],
            "token_logprobs": token_logprobs[shown_from:],
            "top_logprobs": tops[shown_from:],
            "text_offset": text_offsets(self.tokenizer, tokens[shown_from:], offset, silent),
        }

"""The inference engine: everything that generates text (CLI, web UI, API, chat eval, RL rollouts) goes through it.

    prompt --prefill (batch 1)--> KV cache --replicate--> num_samples rows --> one decode forward per step

Each row runs a small tool-use state machine: tokens between <|python_start|> and <|python_end|> are an
expression for the calculator; when it yields a result, the row's next tokens are forced to
<|output_start|> result <|output_end|> instead of being sampled (mask 0), then sampling resumes.
A row finishes when it emits <|assistant_end|> or <|bos|>; generation ends when every row has finished or
`max_tokens` steps have run.

Precision: a generation computes and caches in one dtype, fixed when it starts (`compute_dtype`): the engine's
`dtype` if given, else the caller's autocast dtype (a trainer's bf16-mixed), else the weights' (a model loaded
for inference in its precision). Every forward re-enters that dtype (`nanochat.precision.computing`); logits
and sampling are fp32.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from nanochat.engine.calculator import calculate
from nanochat.engine.kv_cache import KVCache
from nanochat.errors import UserError
from nanochat.precision import ambient_dtype, computing


def sample_next(logits: torch.Tensor, rng: torch.Generator, temperature: float, top_k: int | None) -> torch.Tensor:
    """One token id per row of (B, vocab) logits: argmax at temperature 0, else softmax sampling over the top k."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=rng)
        return indices.gather(-1, choice).squeeze(-1)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=rng).squeeze(-1)


@dataclass
class Row:
    forced: deque = field(default_factory=deque)  # tool output tokens waiting to be emitted
    expression: list[int] | None = None  # tokens of a tool call being collected
    done: bool = False


class Engine:
    def __init__(self, model, tokenizer, *, use_tools: bool = True, dtype: torch.dtype | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.use_tools = use_tools
        self.dtype = dtype  # None: the caller's, when a generation starts (see compute_dtype)
        t = tokenizer.token_id
        self.stop_ids = {t("<|assistant_end|>"), t("<|bos|>")}
        self.python_start, self.python_end = t("<|python_start|>"), t("<|python_end|>")
        self.output_start, self.output_end = t("<|output_start|>"), t("<|output_end|>")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        """The most prompt + new tokens one generation may hold (the model's rotary table)."""
        return self.model.rotary_len

    def compute_dtype(self) -> torch.dtype:
        """The dtype of a generation starting now: the engine's own, else the caller's autocast, else the weights'."""
        return self.dtype if self.dtype is not None else ambient_dtype(self.model)

    def forward(self, idx: torch.Tensor, dtype: torch.dtype, **kwargs) -> torch.Tensor:
        """The model's last-position logits (rows, vocab), fp32, computed in `dtype`; kwargs go to GPT.forward."""
        with computing(self.model, dtype):
            return self.model(idx, **kwargs)[:, -1]

    @torch.inference_mode()
    def generate(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield (token per row, mask per row) each step; mask 0 marks a forced tool-output token."""
        self.check(tokens, max_tokens)
        device = self.device
        rng = torch.Generator(device=device).manual_seed(seed)
        rows = [Row() for _ in range(num_samples)]
        dtype = self.compute_dtype()
        # One row decodes in the cache it prefilled: no replica to allocate and copy the prompt into, and no
        # one-row prefill cache held alongside the decode cache for the whole generation.
        total = len(tokens) + max_tokens
        cache = KVCache.for_model(self.model, 1, total if num_samples == 1 else len(tokens), dtype)
        logits = self.forward(torch.tensor([tokens], device=device), dtype, kv_cache=cache, last_only=True)
        if num_samples > 1:
            cache = cache.replicate(num_samples, total)  # the one-row prefill cache is released here
        logits = logits.expand(num_samples, -1)  # each row samples its own first token
        column: list[int] = []  # the tokens of the previous step, fed back in
        for step in range(max_tokens):
            if step:
                logits = self.forward(torch.tensor(column, device=device).view(-1, 1), dtype, kv_cache=cache)
            column, masks = self.next_column(rows, logits, rng, temperature, top_k)
            yield column, masks
            if all(row.done for row in rows):
                return

    def check(self, tokens: list[int], max_tokens: int) -> None:
        """UserError unless the prompt is non-empty and prompt + max_tokens fits the context."""
        if not tokens:
            raise UserError("generation needs a non-empty prompt")
        if len(tokens) + max_tokens > self.max_context:
            raise UserError(
                f"prompt of {len(tokens)} tokens + max_tokens={max_tokens} exceeds the context of {self.max_context}"
            )

    def next_column(
        self, rows: list[Row], logits: torch.Tensor, rng: torch.Generator, temperature: float, top_k: int | None
    ) -> tuple[list[int], list[int]]:
        """One step of one generation's rows: sample from (rows, vocab) logits, or take a row's forced tool output
        (mask 0), and advance each row's tool-use state. Shared by `generate` and the server's BatchDecoder."""
        sampled = sample_next(logits, rng, temperature, top_k).tolist()
        column, masks = [], []
        for row, token in zip(rows, sampled):
            token, mask = (row.forced.popleft(), 0) if row.forced else (token, 1)
            column.append(token)
            masks.append(mask)
            self._advance_row(row, token)
        return column, masks

    def _advance_row(self, row: Row, token: int) -> None:
        if token in self.stop_ids:
            row.done = True
        if not self.use_tools:
            return
        if token == self.python_start:
            row.expression = []
        elif token == self.python_end and row.expression is not None:
            result = calculate(self.tokenizer.decode(row.expression))
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
            row.expression = None
        elif row.expression is not None:
            row.expression.append(token)

    def generate_batch(
        self, tokens: list[int], num_samples: int = 1, keep_stop: bool = False, **kwargs
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Whole sequences per row: prompt + generated tokens, and their masks (prompt and forced tokens 0).
        The stop token is dropped unless `keep_stop` (RL trains on the decision to stop, like any sampled token)."""
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, mask_column)):
                if done[i]:
                    continue
                done[i] = token in self.stop_ids
                if keep_stop or not done[i]:
                    results[i].append(token)
                    masks[i].append(mask)
        return results, masks


@torch.inference_mode()
def generate_naive(
    model,
    tokens: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 42,
    dtype: torch.dtype | None = None,
) -> list[int]:
    """Reference decoding without a cache: recompute the whole sequence for every new token (tests, benchmarks),
    in `dtype` (default: as Engine.compute_dtype)."""
    device = next(model.parameters()).device
    dtype = dtype if dtype is not None else ambient_dtype(model)
    rng = torch.Generator(device=device).manual_seed(seed)
    ids = list(tokens)
    for _ in range(max_tokens):
        with computing(model, dtype):
            logits = model(torch.tensor([ids], device=device))[:, -1]
        ids.append(int(sample_next(logits, rng, temperature, top_k)[0]))
    return ids[len(tokens) :]

"""Continuous batching for the server: generations join and leave between decode steps, which they share.

    add(prompt)  --prefill (batch 1), first token sampled-->  its rows join the RowKVCache
    step()       --one forward for every row of every generation-->  a column per generation
    remove(gen)  --its rows leave (a cancelled request); a generation that finished leaves by itself

Each generation keeps what `Engine.generate` gives a request: its own torch.Generator seeded with its seed,
its own temperature and top_k, sampling over its own rows only (`Engine.next_column`, the same code), and
the tool-use state of each row. So a generation's tokens are those it gets running alone, up to the float
rounding of batched matmuls: in fp32 ~1e-6 (a near-tie could flip; on the test models none does); in bf16 a
matmul output rounded differently moves logits by up to ~1 % of their scale, which can change a sampled token
(greedy ones keep their wide margins on the test models).
It ends like `Engine.generate`: after the column in which all its rows are done, or after `max_tokens` columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nanochat.engine.engine import Engine, Row
from nanochat.engine.kv_cache import KVCache, RowKVCache


@dataclass(eq=False)
class Generation:
    """One request's rows in the batch."""

    rows: list[Row]
    rng: torch.Generator
    temperature: float
    top_k: int | None
    max_tokens: int
    slots: list[int] = field(default_factory=list)  # the cache row of each of its rows, in row order
    steps: int = 0  # columns produced so far
    finished: bool = False  # all rows done or max_tokens reached: no more columns


class BatchDecoder:
    def __init__(self, engine: Engine):
        self.engine, self.model = engine, engine.model
        self.dtype = engine.compute_dtype()  # fixed for the decoder's life: every row shares its cache
        self.cache = RowKVCache.for_model(engine.model, self.dtype)
        self.generations: list[Generation] = []
        self.owners: list[Generation] = []  # per cache row: whose it is
        self.inputs: list[int] = []  # per cache row: the token it feeds to the next step

    @property
    def rows(self) -> int:
        return len(self.owners)

    @torch.inference_mode()
    def add(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int = 42,
    ) -> tuple[Generation, list[int], list[int]]:
        """Prefill a prompt and sample its first column: (generation, tokens, masks). Unless that already
        finished it, the generation's rows join the batch and decode in the following steps."""
        engine = self.engine
        engine.check(tokens, max_tokens)
        device = engine.device
        gen = Generation(
            [Row() for _ in range(num_samples)],
            torch.Generator(device=device).manual_seed(seed),
            temperature,
            top_k,
            max_tokens,
        )
        prefill = KVCache.for_model(self.model, 1, len(tokens), self.dtype)
        logits = engine.forward(torch.tensor([tokens], device=device), self.dtype, kv_cache=prefill, last_only=True)
        column, masks = engine.next_column(gen.rows, logits.expand(num_samples, -1), gen.rng, temperature, top_k)
        self._advance(gen)
        if not gen.finished:
            gen.slots = self.cache.add(prefill, copies=num_samples)
            self.generations.append(gen)
            self.owners += [gen] * num_samples
            self.inputs += column
        return gen, column, masks

    @torch.inference_mode()
    def step(self) -> list[tuple[Generation, list[int], list[int]]]:
        """One decode forward for all rows; (generation, tokens, masks) for each generation in the batch."""
        if not self.generations:
            return []
        engine = self.engine
        positions, key_mask = self.cache.step_inputs()
        idx = torch.tensor(self.inputs, device=positions.device).view(-1, 1)
        logits = engine.forward(idx, self.dtype, kv_cache=self.cache, positions=positions, key_mask=key_mask)
        out = []
        for gen in self.generations:
            column, masks = engine.next_column(gen.rows, logits[gen.slots], gen.rng, gen.temperature, gen.top_k)
            for slot, token in zip(gen.slots, column):
                self.inputs[slot] = token
            self._advance(gen)
            out.append((gen, column, masks))
        for gen, _, _ in out:
            if gen.finished:
                self.remove(gen)
        return out

    def _advance(self, gen: Generation) -> None:
        gen.steps += 1
        gen.finished = gen.steps >= gen.max_tokens or all(row.done for row in gen.rows)

    @torch.inference_mode()
    def remove(self, gen: Generation) -> None:
        """Take a generation's rows out of the batch (its cache rows are reused); no-op if it is not in it."""
        if gen not in self.generations:
            return
        self.generations.remove(gen)
        for slot in sorted(gen.slots, reverse=True):  # a row moved into a freed slot is never one of gen's
            last = self.rows - 1
            self.cache.remove(slot)
            if slot != last:
                mover = self.owners[last]
                mover.slots[mover.slots.index(last)] = slot
                self.owners[slot], self.inputs[slot] = mover, self.inputs[last]
            self.owners.pop()
            self.inputs.pop()
        gen.slots = []

"""Continuous batching: requests share decode steps, yet each gets exactly the tokens it gets running alone.

The engine level (nanochat.engine.batching.BatchDecoder: tokens and masks compared with Engine.generate) and
the server level (GenerationQueue: events compared with generate_events alone, forward calls counted).
"""

import asyncio
import copy
import threading

import pytest
import torch
from conftest import dtype_of, random_gpt
from torch import nn

from nanochat.engine.batching import BatchDecoder
from nanochat.engine.engine import Engine
from nanochat.models.components import GPT, GPTConfig
from nanochat.precision import cast_weights
from nanochat.serving.generation import (
    Finish,
    GenerationQueue,
    TextDelta,
    generate_events,
)
from nanochat.serving.limits import validate_chat

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEXTS = ["def fibonacci(n):", "The", "import os\nimport sys\n", "class Foo(object):\n    def __init__", "x = 1"]


class Recording(nn.Module):
    """A GPT that records the (rows, tokens) shape of every forward; while `gate` is clear, forwards wait."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt, self.config, self.rotary_len = gpt, gpt.config, gpt.rotary_len
        self.shapes: list[tuple[int, int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def forward(self, idx, **kwargs):
        assert self.gate.wait(20)
        self.shapes.append(tuple(idx.shape))
        return self.gpt(idx, **kwargs)

    def decode_batches(self) -> list[int]:
        return [rows for rows, tokens in self.shapes if tokens == 1]


@pytest.fixture(scope="module")
def fp32_gpt(serving_tokenizer):
    return random_gpt(serving_tokenizer.vocab_size, 0.5, sequence_len=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


@pytest.fixture
def gpt(fp32_gpt, precision):
    """The test GPT as the server loads it in each precision: bf16 matmul weights for bf16."""
    return fp32_gpt if precision == "fp32" else cast_weights(copy.deepcopy(fp32_gpt), dtype_of(precision))


def requests(tok, sampled: bool = False) -> list[dict]:
    """Different prompt lengths, max_tokens and n; greedy, or seeded sampling on every other request."""
    return [
        dict(
            tokens=tok.encode(t, prepend="<|bos|>"),
            num_samples=1 + i % 3,
            max_tokens=9 + 7 * i,
            temperature=1.0 if sampled and i % 2 else 0.0,
            top_k=20 if sampled and i % 2 else None,
            seed=i,
        )
        for i, t in enumerate(TEXTS)
    ]


def run_batched(decoder, reqs: list[dict], remove_at: dict[int, int] | None = None) -> dict[int, list]:
    """Admit one request per step (so rows join mid-flight); `remove_at` {request: step}: take it out then."""
    outputs = {i: [] for i in range(len(reqs))}
    index, waiting, step = {}, list(range(len(reqs))), 0
    while waiting or decoder.generations:
        if waiting:
            i = waiting.pop(0)
            gen, column, masks = decoder.add(**reqs[i])
            index[gen] = i
            outputs[i].append((column, masks))
        for gen, column, masks in decoder.step():
            outputs[index[gen]].append((column, masks))
        step += 1
        for gen in list(decoder.generations):
            if (remove_at or {}).get(index[gen]) == step:
                decoder.remove(gen)
    return outputs


def comparable(outputs: list, reqs: list[dict], precision: str) -> list:
    """What batching must leave unchanged: everything in fp32. In bf16 a batched matmul rounds differently (batch
    vs alone logits measured up to 0.09 apart at a scale of 10), which can move a sampled token, never a greedy one
    on these models (wide margins): sampled requests keep their first column, drawn from the prefill alone."""
    if precision == "fp32":
        return outputs
    return [out if r["temperature"] == 0 else out[:1] for out, r in zip(outputs, reqs)]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
def test_batched_rows_get_exactly_the_tokens_they_get_alone(gpt, serving_tokenizer, sampled, precision):
    engine = Engine(gpt, serving_tokenizer, use_tools=False, dtype=dtype_of(precision))
    reqs = requests(serving_tokenizer, sampled)
    alone = [list(engine.generate(**r)) for r in reqs]
    assert len({tuple(c[0] for c, _ in a) for a in alone}) == len(reqs)  # varied replies, not one repeated token
    decoder = BatchDecoder(engine)
    batched = run_batched(decoder, reqs)
    assert comparable([batched[i] for i in range(len(reqs))], reqs, precision) == comparable(alone, reqs, precision)
    assert [len(batched[i]) for i in range(len(reqs))] == [r["max_tokens"] for r in reqs]  # no stop token: full length
    assert decoder.rows == 0 and decoder.cache.k is None  # everything left and the memory went with it


def test_a_removed_generation_frees_its_rows_and_the_others_continue_exactly(gpt, serving_tokenizer, precision):
    model = Recording(gpt)
    engine = Engine(model, serving_tokenizer, use_tools=False, dtype=dtype_of(precision))
    reqs = requests(serving_tokenizer, sampled=True)
    alone = [list(engine.generate(**r)) for r in reqs]
    model.shapes.clear()
    decoder = BatchDecoder(engine)
    batched = run_batched(decoder, reqs, remove_at={2: 6})  # request 2 (3 rows, in the middle of the batch) leaves
    kept = [0, 1, 3, 4]
    assert comparable([batched[i] for i in kept], [reqs[i] for i in kept], precision) == comparable(
        [alone[i] for i in kept], [reqs[i] for i in kept], precision
    )
    assert batched[2] == alone[2][: len(batched[2])] and len(batched[2]) < len(alone[2])  # greedy: exact
    # rows per decode step: 1 + 2 + 3 + 1 + 2 join one by one; after step 6 request 2's 3 rows are gone; request 0
    # (9 columns: the prefill's and 8 steps') leaves after step 8
    assert model.decode_batches()[:9] == [1, 3, 6, 7, 9, 9, 6, 6, 5]
    assert decoder.rows == 0


class ScriptedByPosition(nn.Module):
    """A stand-in GPT whose every row predicts `script[p]` after the token at position p: rows with different
    prompt lengths follow different parts of the script, whatever else is in the batch."""

    def __init__(self, script: list[int], vocab_size: int):
        super().__init__()
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)
        self.rotary_len = 640
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script, self.inputs = script, []

    def forward(self, idx, kv_cache=None, last_only=False, positions=None, key_mask=None):
        B, T = idx.shape
        last = positions if positions is not None else torch.full((B,), kv_cache.pos + T - 1)
        self.inputs.append(dict(zip(last.tolist(), idx[:, -1].tolist())))
        kv_cache.advance(T)
        logits = torch.full((B, 1, self.config.vocab_size), -1e9)
        logits[torch.arange(B), 0, torch.tensor([self.script[p] for p in last.tolist()])] = 0.0
        return logits


def test_tool_call_forcing_works_for_a_batched_row(serving_tokenizer):
    tok = serving_tokenizer
    t = tok.token_id
    call = [t("<|python_start|>"), *tok.encode("12*7"), t("<|python_end|>")]
    forced = [t("<|output_start|>"), *tok.encode("84"), t("<|output_end|>")]
    answer, end = tok.encode(" so 84."), [t("<|assistant_end|>")]
    filler = t("<|user_end|>")  # what the model "would" say while the output is forced: must be ignored
    plain = tok.encode(" a plain reply with no tool call at all")
    # A (prompt of 2) reads script[1:]: a tool call; B (prompt of 40) reads script[39:]: plain text.
    script = [0] + call + [filler] * len(forced) + answer + end
    script += [filler] * (39 - len(script)) + plain + end
    model = ScriptedByPosition(script, tok.vocab_size)
    engine = Engine(model, tok)
    a = dict(tokens=[t("<|bos|>"), t("<|user_start|>")], max_tokens=60, temperature=0.0)
    b = dict(tokens=[t("<|bos|>")] * 40, max_tokens=60, temperature=0.0)
    alone_a, alone_b = list(engine.generate(**a)), list(engine.generate(**b))
    assert [c[0] for c, _ in alone_a] == call + forced + answer + end
    assert [m[0] for _, m in alone_a] == [1] * len(call) + [0] * len(forced) + [1] * len(answer + end)
    model.inputs.clear()
    decoder = BatchDecoder(engine)
    batched = run_batched(decoder, [b, a])
    assert batched[0] == alone_b and batched[1] == alone_a
    # A's forced tokens were fed back to the model as its input, in steps shared with B
    a_inputs = [step[p] for step in model.inputs if len(step) == 2 for p in step if p < 39]
    assert a_inputs[len(call) : len(call) + len(forced)] == forced


# --- the server's queue --------------------------------------------------------------------------------------


def chat_requests(tok, max_context: int) -> list:
    prompts = ["Hi", "Tell me a story about a cat", "What is two plus two? Answer briefly, please", "Why?"]
    return [
        validate_chat(
            [{"role": "user", "content": p}],
            0.0,
            None,
            12 + 9 * i,
            1 + (i == 1),
            i,
            tokenizer=tok,
            max_context=max_context,
        )
        for i, p in enumerate(prompts)
    ]


async def collect(jobs) -> list[list]:
    replies = []
    for job in jobs:  # a loop: Python 3.10 has no async comprehension inside a comprehension
        replies.append([e async for e in job.events()])
    return replies


def events_of(jobs_or_lists) -> list:
    return [
        [(type(e).__name__, e.index, getattr(e, "text", None), getattr(e, "reason", None)) for e in events]
        for events in jobs_or_lists
    ]


def queued_together(gpt, tok, precision):
    """(model, reqs, replies alone, start): `start()` makes a queue and submits every request while the first
    prefill is held, so they all join the first decode step; it returns (queue, jobs)."""
    model = Recording(gpt)
    engine = Engine(model, tok, dtype=dtype_of(precision))
    reqs = chat_requests(tok, engine.max_context)
    alone = [list(generate_events(engine, tok, r)) for r in reqs]
    model.shapes.clear()

    def start():
        queue = GenerationQueue(engine, tok, max_waiting=8, max_batch=8)
        model.gate.clear()
        jobs = [queue.submit(r) for r in reqs]
        model.gate.set()
        return queue, jobs

    return model, reqs, alone, start


def test_concurrent_requests_share_steps_and_each_gets_its_own_reply(gpt, serving_tokenizer, precision):
    model, reqs, alone, start = queued_together(gpt, serving_tokenizer, precision)

    async def scenario():
        queue, jobs = start()
        replies = await collect(jobs)
        assert queue.pending == 0 and queue.generating == 0
        queue.shutdown()
        return replies

    replies = asyncio.run(scenario())
    assert events_of(replies) == events_of(alone)
    assert all(isinstance(r[-1], Finish) for r in replies) and any(isinstance(e, TextDelta) for e in replies[2])
    rows = model.decode_batches()
    longest = max(r.max_tokens for r in reqs)
    assert rows[0] == 5 and len(rows) == longest - 1  # 4 requests (5 rows) decode together, one forward per step


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish_exactly(gpt, serving_tokenizer, precision):
    model, reqs, alone, start = queued_together(gpt, serving_tokenizer, precision)

    async def scenario():
        queue, jobs = start()
        async for _ in jobs[3].events():  # the longest request's client leaves after its first event
            break
        replies = await collect(jobs[:3])
        while queue.pending or queue.generating:
            await asyncio.sleep(0.01)
        queue.shutdown()
        return replies

    replies = asyncio.run(scenario())
    assert events_of(replies) == events_of(alone[:3])
    rows = model.decode_batches()
    assert rows[0] == 5 and rows[-1] == 1  # request 2 (the longest left) finished alone: request 3 had left
    assert len(rows) == reqs[2].max_tokens - 1

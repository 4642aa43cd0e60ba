"""Serving under load: the real `serve.py` answering 1, 4 and 16 concurrent streaming chat clients.

    python bench/serving.py [--clients 1 4 16] [--requests 24] [--max-tokens 64] [--depth 4] [--vocab 4096]
                            [--server-threads 1] [--json bench/results/serving.json]

The model is a freshly initialised d4 GPT (5.2M parameters, vocab 4,096, context 256 x 10) whose zero-initialised
matrices are filled with random values, so replies vary with the prompt; its BPE is trained in a second on
stdlib source. Decoding cost does not depend on what the weights learned. The special tokens' output rows are
zero, so greedy decoding never ends a reply early: every request generates exactly `max_tokens` tokens.

For each concurrency level, `clients` clients send `requests` chat completions between them, each client one
at a time (closed loop), all with stream=true, temperature 0 and the same max_tokens. Per request: latency (send
to the end of the stream) and time to first token (send to the first chunk holding reply text; the server sends
a role-only chunk before generating, which does not count). Per level: requests/s and generated tokens/s
(completion tokens from the stream's usage chunk, summed, over the level's wall time).

The last row is a reference, not a load level: `--requests-batched` single requests with n=8 (8 replies to one
prompt, the API's maximum), which the engine decodes as one batch of 8 rows, one forward per step: about what
8 concurrent clients would get if the server decoded their requests together. It does not: one worker thread
runs one request at a time (nanochat.serving.generation.GenerationQueue), so requests/s and tokens/s stay
flat as clients are added and the extra clients' latency is time spent waiting in the queue (TTFT).

The server runs with `--server-threads` torch threads (default 1, as the serving tests do: on a 2-core machine
the clients get the other core).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import json
import os
import tempfile
import time
from pathlib import Path

from common import markdown_table, save, serve_process

PROMPTS = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What is 12 times 7?",
    "Tell me about the history of Rome.",
    "How do I sort a list in Python?",
    "Who are you?",
]
CORPUS_MODULES = [
    "argparse",
    "collections",
    "difflib",
    "email.message",
    "http.client",
    "json.decoder",
    "logging",
    "pathlib",
    "pydoc",
    "textwrap",
    "typing",
    "inspect",
]


# --- the model and the server ---------------------------------------------------------------------------


def make_export(
    out_dir: Path, depth: int = 4, vocab: int = 4096, sequence_len: int = 256, tokenizer=None
) -> tuple[Path, dict]:
    """A random-weight export in `out_dir` that never ends a reply early; returns (export dir, model facts)."""
    import torch

    from nanochat.export import save_export
    from nanochat.models.components import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    if tokenizer is None:  # ~1M characters of stdlib source: a 4,096-token BPE in about a second
        docs = [inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES]
        tokenizer = Tokenizer.train(docs, vocab_size=vocab, show_progress=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, tokenizer.vocab_size, sequence_len))
    with torch.no_grad():  # init zeroes the output projections: fill them, or every reply is one token repeated
        for w in (
            [model.lm_head.weight]
            + [b.attn.c_proj.weight for b in model.transformer.h]
            + [b.mlp.c_proj.weight for b in model.transformer.h]
        ):
            w.normal_(0, w.shape[1] ** -0.5)
        model.lm_head.weight[list(tokenizer.special_tokens.values())] = 0  # logit 0 never wins the argmax of thousands
    facts = {"depth": depth, "params": model.num_params(), "vocab": tokenizer.vocab_size, "sequence_len": sequence_len}
    return save_export(model, tokenizer, Path(out_dir) / "export"), facts


@contextlib.contextmanager
def running_server(export_dir: Path, threads: int = 1, max_waiting: int = 16, log_dir: Path | None = None):
    """`python serve.py` on 127.0.0.1 and a free port, until /health says ready; yields its base URL."""
    log = Path(log_dir or tempfile.mkdtemp(prefix="bench-serving-")) / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_API_KEY"}
    env["OMP_NUM_THREADS"] = str(threads)
    with serve_process(export_dir, ["model_name=bench", f"limits.max_waiting={max_waiting}"], env, log) as (_, port):
        yield f"http://127.0.0.1:{port}"


# --- the clients ----------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the nearest ranks (numpy's default); q in [0, 1]."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


async def one_request(client, url: str, body: dict) -> dict:
    """Stream one chat completion; the times are seconds from sending it."""
    t0 = time.perf_counter()
    first = None
    chunks, tokens, reasons = 0, None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error in the stream: {event['error']}")
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    chunks += 1
                    first = first if first is not None else time.perf_counter() - t0
                if choice["finish_reason"]:
                    reasons.append(choice["finish_reason"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {
        "latency_s": time.perf_counter() - t0,
        "ttft_s": first,
        "tokens": tokens,
        "chunks": chunks,
        "finish": reasons,
    }


async def measure_level(url: str, clients: int, requests: int, max_tokens: int, n: int = 1) -> dict:
    """`clients` closed-loop streaming clients sharing `requests` requests; per-request records and summary figures."""
    import httpx

    todo = iter(range(requests))
    records: list[dict] = []

    async def client_loop(client) -> None:
        for i in todo:  # a shared iterator: each request goes to whichever client is free
            body = {
                "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (request {i})"}],
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": max_tokens,
                "temperature": 0,
                "n": n,
            }
            records.append(await one_request(client, url, body))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    latencies = [r["latency_s"] for r in records]
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] or 0 for r in records)
    return {
        "clients": clients,
        "n": n,
        "max_tokens": max_tokens,
        "requests": len(records),
        "wall_s": wall,
        "requests_per_s": len(records) / wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": percentile(latencies, 0.50),
        "latency_p95_s": percentile(latencies, 0.95),
        "ttft_p50_s": percentile(ttfts, 0.50) if ttfts else None,
        "ttft_p95_s": percentile(ttfts, 0.95) if ttfts else None,
        "records": records,
    }


def measure(
    url: str, clients: list[int], requests: int, max_tokens: int, batched: int = 0, batched_n: int = 8
) -> list[dict]:
    """Every concurrency level in turn (after one warm-up request), then `batched` requests with n=`batched_n`."""
    asyncio.run(measure_level(url, 1, 1, max_tokens))  # first-request costs (allocator, thread pools) stay out
    levels = [asyncio.run(measure_level(url, c, max(requests, c), max_tokens)) for c in clients]
    if batched:
        levels.append(asyncio.run(measure_level(url, 1, batched, max_tokens, n=batched_n)))
    return levels


def table(levels: list[dict]) -> str:
    def ms(x):
        return "-" if x is None else f"{1000 * x:,.0f}"

    rows = []
    for lv in levels:
        load = (
            f"{lv['clients']} client{'s' if lv['clients'] > 1 else ''}"
            if lv["n"] == 1
            else f"reference: 1 request with n={lv['n']} (rows batched)"
        )
        rows.append(
            [
                load,
                lv["requests"],
                f"{lv['wall_s']:.1f}",
                f"{lv['requests_per_s']:.2f}",
                f"{ms(lv['latency_p50_s'])} / {ms(lv['latency_p95_s'])}",
                f"{ms(lv['ttft_p50_s'])} / {ms(lv['ttft_p95_s'])}",
                f"{lv['tokens_per_s']:,.0f}",
            ]
        )
    header = [
        "load (streaming, greedy)",
        "requests",
        "wall s",
        "requests/s",
        "latency p50 / p95 ms",
        "TTFT p50 / p95 ms",
        "generated tok/s (total)",
    ]
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=24, help="requests per level (at least one per client)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-batched", type=int, default=3, help="n=8 reference requests (0: none)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--sequence-len", type=int, default=256)
    parser.add_argument("--server-threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench/results/serving.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        export, model = make_export(Path(tmp), args.depth, args.vocab, args.sequence_len)
        with running_server(
            export, args.server_threads, max_waiting=max(16, max(args.clients)), log_dir=Path(tmp)
        ) as url:
            ready = time.perf_counter() - start
            levels = measure(url, args.clients, args.requests, args.max_tokens, args.requests_batched)
    wall = time.perf_counter() - start
    settings = {
        **vars(args),
        "json": str(args.json),
        "model": model,
        "server": "python serve.py device=cpu ui=false",
        "setup_s": round(ready, 1),
        "wall_s": round(wall, 1),
    }
    print(
        f"model: d{model['depth']}, {model['params']:,} parameters, vocab {model['vocab']:,}; "
        f"{args.max_tokens} new tokens per reply, greedy; server on {args.server_threads} torch thread(s); "
        f"setup {ready:.1f} s, total {wall:.1f} s\n"
    )
    save(args.json, table(levels), levels, settings)


if __name__ == "__main__":
    main()

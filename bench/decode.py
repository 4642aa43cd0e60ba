"""Decoding on this machine: prefill, time to first token, decode tok/s at batch 1 and 8, KV-cache bytes per token,
the KV cache against naive recompute, and 8 samples in one batch against 8 one after the other.

    python bench/decode.py [--depths 4 6] [--prompt 16] [--new 128 256] [--long-new 512] [--long-prompt 512]
                           [--naive-stride 16] [--repeats 3] [--threads N] [--precision fp32 bf16]
                           [--json bench/results/decode.json]

Models are freshly initialised presets (d4: vocab 4,096, seq 256; d6: vocab 8,192, seq 512, as conf/model/d4.yaml
and d6.yaml): decoding cost does not depend on what the weights learned. Each `--precision` (default: what
precision=auto gives here) loads the weights in its dtype, as serving does. At init the lm_head is zero, so greedy
decoding emits token 0 forever and never hits a stop token: every run decodes exactly the requested number of
tokens (checked). Everything goes through `Engine.generate`, the code path of the CLI, web UI, API and RL.

- prefill: one forward of a `--long-prompt`-token prompt (clamped to the model's sequence_len) into an empty
  KV cache, as the engine's prefill; best of `--repeats`.
- TTFT: from calling `Engine.generate` to its first yield with that prompt (prefill, cache replication, first
  sample); best of `--repeats`.
- decode tok/s: generated tokens after the first / time from the first yield to the last (prefill excluded),
  `--prompt`-token prompt, `--new[0]` tokens, batch 1 and batch 8 (8 rows of one prompt, as num_samples=8).
- KV bytes per token: the k and v tensors of the cache the engine decodes with (read from the running
  generator), divided by rows x cache positions; against 2 x n_layer x n_kv_head x head_dim x dtype bytes.
- cache vs naive: whole generations (prefill included) of `--new` tokens after the `--prompt`-token prompt;
  the cached engine is best of `--repeats`, `generate_naive` (the whole sequence recomputed for every token) one
  run. The `--long-new` row (d6 only, the >= 10x at 512 tokens target) would take ~1 min of naive
  recompute, so it is estimated: every `--naive-stride`-th step is timed (its midpoint length, best of
  `--repeats`) and the sum scaled by the stride; `--naive-stride 1` times the whole run once instead.
- 8 rows batched vs sequential: one generation of num_samples=8 (best of `--repeats`) against 8 x the best
  batch-1 generation of the same length.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import best_of, markdown_table, save, sync

from nanochat.engine.engine import Engine, generate_naive, sample_next
from nanochat.engine.kv_cache import KVCache
from nanochat.models.components import GPT, GPTConfig
from nanochat.precision import ambient_dtype, cast_weights, computing, resolve

PRESETS = {4: (4096, 256), 6: (8192, 512)}  # depth -> (vocab, sequence_len), as conf/model/d4.yaml and d6.yaml


class StubTokenizer:
    """Just enough tokenizer for tool-free decoding: special tokens at the top of the vocabulary."""

    names = (
        "<|bos|>",
        "<|user_start|>",
        "<|user_end|>",
        "<|assistant_start|>",
        "<|assistant_end|>",
        "<|python_start|>",
        "<|python_end|>",
        "<|output_start|>",
        "<|output_end|>",
    )

    def __init__(self, vocab_size: int):
        self.ids = {name: vocab_size - len(self.names) + i for i, name in enumerate(self.names)}

    def token_id(self, name: str) -> int:
        return self.ids[name]


def build(config: GPTConfig, precision: str = "fp32") -> tuple[GPT, Engine]:
    torch.manual_seed(0)
    model = cast_weights(GPT(config).eval(), resolve(precision).dtype)
    return model, Engine(model, StubTokenizer(config.vocab_size), use_tools=False)


def preset(depth: int) -> GPTConfig:
    vocab, seq_len = PRESETS[depth]
    return GPTConfig.from_depth(depth, vocab, seq_len)


def prompt_of(length: int) -> list[int]:
    return [1 + i % 100 for i in range(length)]


def run_generate(engine: Engine, prompt: list[int], num_samples: int, max_tokens: int) -> dict:
    """One greedy generation, timed at each yield: total (call to last token), TTFT, decode (first to last token)."""
    sync()
    t0 = time.perf_counter()
    first = last = t0
    steps = tokens = 0
    for column, _ in engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens, temperature=0):
        sync()
        last = time.perf_counter()
        if not steps:
            first = last
        steps += 1
        tokens += len(column)
    if steps != max_tokens or tokens != num_samples * max_tokens:
        raise RuntimeError(f"asked for {max_tokens} steps of {num_samples} rows, got {steps} steps, {tokens} tokens")
    return {"total_s": last - t0, "ttft_s": first - t0, "decode_s": last - first, "steps": steps, "tokens": tokens}


def best_generate(engine: Engine, prompt: list[int], num_samples: int, max_tokens: int, repeats: int) -> dict:
    """Fastest of `repeats` generations, each figure on its own (as best_of)."""
    runs = [run_generate(engine, prompt, num_samples, max_tokens) for _ in range(repeats)]
    best = {key: min(r[key] for r in runs) for key in ("total_s", "ttft_s", "decode_s")}
    return {**best, "steps": runs[0]["steps"], "tokens": runs[0]["tokens"], "repeats": repeats}


def decode_rate(run: dict, num_samples: int) -> float:
    """Tokens per second after the first token: (steps - 1) decode forwards of num_samples rows each."""
    return num_samples * (run["steps"] - 1) / run["decode_s"]


def kv_bytes_per_token(engine: Engine, prompt: list[int], num_samples: int = 1, max_tokens: int = 4) -> dict:
    """Bytes of the engine's decode cache per row and position, read from a running generation's frame."""
    gen = engine.generate(prompt, num_samples=num_samples, max_tokens=max_tokens, temperature=0)
    try:
        next(gen)
        frame = gen.gi_frame  # torch.inference_mode wraps the generator: its frame holds the engine's as `gen`
        while "cache" not in frame.f_locals:
            frame = frame.f_locals["gen"].gi_frame
        cache: KVCache = frame.f_locals["cache"]
        nbytes = cache.k.nbytes + cache.v.nbytes
        rows, positions = cache.k.shape[1], cache.max_len
        dtype = cache.k.dtype
    finally:
        gen.close()
    c = engine.model.config
    expected = engine.compute_dtype()
    formula = 2 * c.n_layer * c.n_kv_head * c.head_dim * expected.itemsize
    return {
        "bytes_per_token": nbytes / (rows * positions),
        "formula": formula,
        "cache_bytes": nbytes,
        "rows": rows,
        "positions": positions,
        "dtype": str(dtype).removeprefix("torch."),
        "formula_dtype": str(expected).removeprefix("torch."),
    }


def prefill(engine: Engine, length: int, repeats: int) -> dict:
    """The engine's prefill alone: a fresh one-row cache and one forward of `length` tokens."""
    model, dtype = engine.model, engine.compute_dtype()
    ids = torch.tensor([prompt_of(length)], device=engine.device)

    def once():
        with torch.inference_mode(), computing(model, dtype):
            model(ids, kv_cache=KVCache.for_model(model, 1, length, dtype))

    seconds = best_of(once, repeats=repeats)
    return {"tokens": length, "seconds": seconds, "tok_per_s": length / seconds}


def naive_step_seconds(model, length: int, repeats: int) -> float:
    """One step of generate_naive at a `length`-token sequence: full forward, last position, argmax."""
    device = next(model.parameters()).device
    ids = prompt_of(length)

    @torch.inference_mode()
    def step():
        with computing(model, ambient_dtype(model)):  # as generate_naive runs each forward
            logits = model(torch.tensor([ids], device=device))[:, -1]
        int(sample_next(logits, None, 0.0, None)[0])

    return best_of(step, repeats=repeats, warmup=0)


def naive_seconds(model, prompt: list[int], max_tokens: int, stride: int = 1, repeats: int = 3) -> dict:
    """generate_naive's time for `max_tokens` tokens: one full run (stride 1), or every stride-th step timed at its
    midpoint length (best of `repeats`) and the sum scaled by the stride (cost grows ~linearly with length)."""
    if stride <= 1:
        sync()
        t0 = time.perf_counter()
        out = generate_naive(model, prompt, max_tokens, temperature=0)
        sync()
        assert len(out) == max_tokens
        return {"seconds": time.perf_counter() - t0, "measured": "one full run"}
    steps = list(range(stride // 2, max_tokens, stride))
    seconds = stride * sum(naive_step_seconds(model, len(prompt) + t, repeats) for t in steps)
    return {
        "seconds": seconds,
        "measured": f"{len(steps)} of {max_tokens} steps (every {stride}th, best of {repeats}) x {stride}",
    }


def bench_depth(depth: int, args, precision: str = "fp32") -> dict:
    config = preset(depth)
    model, engine = build(config, precision)
    prompt = prompt_of(args.prompt)
    run_generate(engine, prompt, 8, 8)  # warm-up: thread pools, allocator
    long_len = min(args.long_prompt, config.sequence_len)
    out = {
        "depth": depth,
        "precision": precision,
        "params": model.num_params(),
        "vocab": config.vocab_size,
        "sequence_len": config.sequence_len,
        "prompt": args.prompt,
        "n_layer": config.n_layer,
        "n_kv_head": config.n_kv_head,
        "head_dim": config.head_dim,
    }
    out["prefill"] = prefill(engine, long_len, args.repeats)
    out["ttft"] = best_generate(engine, prompt_of(long_len), 1, 1, args.repeats)
    out["kv"] = kv_bytes_per_token(engine, prompt)
    out["kv"]["full_context_mb"] = out["kv"]["bytes_per_token"] * config.sequence_len / 1e6
    lengths = [(n, 1) for n in args.new]  # (new tokens, naive stride): the long row is estimated
    if args.long_new and depth == max(args.depths):
        lengths.append((args.long_new, args.naive_stride))
    out["decode"] = []
    for n, stride in lengths:
        cache = best_generate(engine, prompt, 1, n, args.repeats)
        naive = naive_seconds(model, prompt, n, stride, args.repeats)
        out["decode"].append(
            {
                "new_tokens": n,
                "cache": cache,
                "naive": naive,
                "cache_tok_per_s": n / cache["total_s"],
                "naive_tok_per_s": n / naive["seconds"],
                "speedup": naive["seconds"] / cache["total_s"],
            }
        )
    n = args.new[0]
    single = out["decode"][0]["cache"]
    batched = best_generate(engine, prompt, 8, n, args.repeats)
    out["batch1"] = {
        "new_tokens": n,
        "decode_tok_per_s": decode_rate(single, 1),
        "step_ms": 1e3 * single["decode_s"] / (n - 1),
    }
    out["batch8"] = {
        "new_tokens": n,
        "decode_tok_per_s": decode_rate(batched, 8),
        "step_ms": 1e3 * batched["decode_s"] / (n - 1),
        "run": batched,
    }
    sequential_s = 8 * single["total_s"]
    out["samples8"] = {
        "new_tokens": n,
        "batched_tok_per_s": 8 * n / batched["total_s"],
        "sequential_tok_per_s": 8 * n / sequential_s,
        "speedup": sequential_s / batched["total_s"],
    }
    return out


def tables(results: list[dict]) -> str:
    r0 = results[0]
    caption = (
        f"Prefill and TTFT: one row, the prompt length shown (at most the model's sequence_len). Decode: "
        f"{r0['prompt']}-token prompt, {r0['batch1']['new_tokens']} new tokens, rate after the first token. "
        f"KV bytes/token: the engine's cache tensors / 2 x n_layer x n_kv_head x head_dim x dtype bytes."
    )
    out = [caption, ""]
    rows = []
    for r in results:
        kv, b1, b8 = r["kv"], r["batch1"], r["batch8"]
        rows.append(
            [
                f"d{r['depth']} ({r['params'] / 1e6:.1f}M)",
                r["precision"],
                f"{r['prefill']['tokens']}",
                f"{r['prefill']['tok_per_s']:,.0f}",
                f"{1e3 * r['ttft']['ttft_s']:.1f}",
                f"{b1['decode_tok_per_s']:,.0f} ({b1['step_ms']:.2f} ms/step)",
                f"{b8['decode_tok_per_s']:,.0f} ({b8['step_ms']:.2f} ms/step)",
                f"{kv['bytes_per_token']:,.0f} / {kv['formula']:,} ({kv['dtype']})",
                f"{kv['full_context_mb']:.1f}",
            ]
        )
    out += [
        markdown_table(
            [
                "model",
                "precision",
                "prefill prompt",
                "prefill tok/s",
                "TTFT ms",
                "decode tok/s, batch 1",
                "decode tok/s, batch 8",
                "KV bytes/token: cache / formula",
                "KV MB at sequence_len",
            ],
            rows,
        ),
        "",
    ]
    rows = [
        [
            f"d{r['depth']}",
            r["precision"],
            d["new_tokens"],
            f"{d['cache_tok_per_s']:,.0f}",
            f"{d['naive_tok_per_s']:,.1f}",
            f"{d['speedup']:.1f}x" + ("" if d["naive"]["measured"] == "one full run" else " (naive estimated)"),
        ]
        for r in results
        for d in r["decode"]
    ]
    out += [
        markdown_table(["model", "precision", "new tokens", "KV cache tok/s", "naive tok/s", "cache speedup"], rows),
        "",
    ]
    rows = [
        [
            f"d{r['depth']}",
            r["precision"],
            s["new_tokens"],
            f"{s['batched_tok_per_s']:,.0f}",
            f"{s['sequential_tok_per_s']:,.0f}",
            f"{s['speedup']:.1f}x",
        ]
        for r in results
        for s in [r["samples8"]]
    ]
    out.append(
        markdown_table(
            [
                "model",
                "precision",
                "new tokens",
                "8 rows in one batch, tok/s",
                "8 x batch 1, tok/s",
                "batching speedup",
            ],
            rows,
        )
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6], choices=sorted(PRESETS))
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens for decoding runs")
    parser.add_argument(
        "--new", type=int, nargs="+", default=[128, 256], help="new tokens, cache vs naive (first: batch runs)"
    )
    parser.add_argument(
        "--long-new", type=int, default=512, help="extra cache-vs-naive length on the deepest model (0: none)"
    )
    parser.add_argument(
        "--naive-stride", type=int, default=16, help="time every n-th naive step at --long-new (1: all)"
    )
    parser.add_argument("--long-prompt", type=int, default=512, help="prefill / TTFT prompt, clamped to sequence_len")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (naive full runs: one)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=[resolve("auto").name],
        help="weights and compute dtype, one run each (default: what precision=auto gives here)",
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/decode.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}; {resolve('auto')}")
    t0 = time.perf_counter()
    results = [bench_depth(d, args, p) for p in args.precision for d in args.depths]
    wall = time.perf_counter() - t0
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | {"wall_s": round(wall, 1)}
    save(args.json, tables(results), results, settings)
    print(f"wall time {wall:.0f} s")


if __name__ == "__main__":
    main()

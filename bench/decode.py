"""Decoding speed on this machine: KV-cached engine vs naive recompute, and 8 samples batched vs sequential.

    python bench/decode.py [--depths 4 6] [--prompt 16] [--new 128 256] [--json bench/results/decode.json]

Models are freshly initialised presets (d4: vocab 4,096, seq 256; d6: vocab 8,192, seq 512): decoding cost
does not depend on what the weights learned. At init the lm_head is zero, so greedy decoding emits token 0
forever and never hits a stop token: every run decodes exactly the requested number of tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from nanochat.engine.engine import Engine, generate_naive
from nanochat.models.components import GPT, GPTConfig

PRESETS = {4: (4096, 256), 6: (8192, 512)}  # depth -> (vocab, sequence_len), as conf/model/d4.yaml and d6.yaml


class StubTokenizer:
    """Just enough tokenizer for tool-free decoding: special tokens at the top of the vocabulary."""

    names = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
             "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]

    def __init__(self, vocab_size: int):
        self.ids = {name: vocab_size - len(self.names) + i for i, name in enumerate(self.names)}

    def token_id(self, name: str) -> int:
        return self.ids[name]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_depth(depth: int, prompt_len: int, lengths: list[int]) -> dict:
    vocab, seq_len = PRESETS[depth]
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, vocab, seq_len)).eval()
    engine = Engine(model, StubTokenizer(vocab), use_tools=False)
    prompt = list(range(1, prompt_len + 1))
    engine.generate_batch(prompt, max_tokens=8, temperature=0)  # warm-up: thread pools, allocator
    out = {"depth": depth, "params": model.num_params(), "vocab": vocab, "prompt": prompt_len, "decode": []}
    for n in lengths:
        cache_s = timed(lambda: engine.generate_batch(prompt, max_tokens=n, temperature=0))
        naive_s = timed(lambda: generate_naive(model, prompt, n, temperature=0))
        out["decode"].append({"new_tokens": n, "cache_tok_per_s": n / cache_s, "naive_tok_per_s": n / naive_s,
                              "speedup": naive_s / cache_s})
    n = lengths[0]
    batched_s = timed(lambda: engine.generate_batch(prompt, num_samples=8, max_tokens=n, temperature=0))
    sequential_s = timed(lambda: [engine.generate_batch(prompt, max_tokens=n, temperature=0) for _ in range(8)])
    out["samples8"] = {"new_tokens": n, "batched_tok_per_s": 8 * n / batched_s, "sequential_tok_per_s": 8 * n / sequential_s,
                       "speedup": sequential_s / batched_s}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6], choices=sorted(PRESETS))
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--json", type=Path, default=Path("bench/results/decode.json"))
    args = parser.parse_args()
    results = [bench_depth(d, args.prompt, args.new) for d in args.depths]
    print("| model | new tokens | KV cache tok/s | naive tok/s | cache speedup |")
    print("|---|---|---|---|---|")
    for r in results:
        for d in r["decode"]:
            print(f"| d{r['depth']} | {d['new_tokens']} | {d['cache_tok_per_s']:,.0f} | {d['naive_tok_per_s']:,.0f} | {d['speedup']:.1f}x |")
    print("\n| model | new tokens | 8 rows in one batch, tok/s | 8 x batch 1, tok/s | batching speedup |")
    print("|---|---|---|---|---|")
    for r in results:
        s = r["samples8"]
        print(f"| d{r['depth']} | {s['new_tokens']} | {s['batched_tok_per_s']:,.0f} | {s['sequential_tok_per_s']:,.0f} | {s['speedup']:.1f}x |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform()}}
    args.json.write_text(json.dumps({**meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()

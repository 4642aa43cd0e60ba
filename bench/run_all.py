"""`make bench`: every hot path's benchmark at a size that fits ~10 minutes on a 2-core CPU, then
docs/benchmarks.md's "Latest `make bench`" tables refreshed from the JSON files the scripts write.

    python bench/run_all.py [--only NAME ...] [--no-docs] [--list] [--nanochat CHECKOUT]

On a machine with CUDA the training entry measures d12 and d20 at sequence 2,048 in bf16 with torch.compile
(the GPU items) instead of the CPU sizes. With `--nanochat` (a karpathy/nanochat checkout; `make bench
NANOCHAT=DIR`) the side-by-side with nanochat's own training and decoding runs too (~10 more minutes).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time

import torch
from common import REPO as ROOT

from nanochat.hardware import fast_bf16

RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"


def entries(nanochat: str | None = None) -> dict[str, tuple[str, list[str]]]:
    """name -> (section title, script + arguments). Sizes chosen for the 10-minute budget on 2 CPU cores."""
    if torch.cuda.is_available():
        train = [
            "train_step.py",
            "--depths",
            "12",
            "20",
            "--seq-len",
            "2048",
            "--batch",
            "16",
            "--steps",
            "10",
            "--warmup",
            "5",
            "--repeats",
            "2",
            "--skip-fp32",
            "--compile",
        ]
    else:
        train = [
            "train_step.py",
            "--depths",
            "4",
            "6",
            "--seq-len",
            "512",
            "--batch",
            "4",
            "--steps",
            "6",
            "--warmup",
            "2",
            "--repeats",
            "2",
        ] + ([] if fast_bf16("cpu") else ["--skip-bf16"])
    return {
        "train_step": ("Training step: Lightning vs a plain loop", train),
        "head_loss": (
            "Output head + loss at vocab 32,768: plain ops vs fused",
            [
                "fused_head_loss.py",
                "--depth",
                "4",
                "--vocab",
                "32768",
                "--rows",
                "16",
                "--seq-len",
                "512",
                "--repeats",
                "2",
            ],
        ),
        "muon_batching": (
            "Muon's Newton-Schulz: per matrix vs batched by shape",
            ["muon_batching.py", "--depths", "4", "6", "--repeats", "3"],
        ),
        "data_stream": ("Pretraining data stream vs one GPU's appetite at d20", ["data_stream.py", "--seconds", "5"]),
        "tokenizer_speed": (
            "Tokenizer training and encoding",
            ["tokenizer_speed.py", "--train-mb", "10", "--encode-mb", "1"],
        ),
        "decode": ("Inference: prefill, decode, TTFT, KV memory, cache vs naive", ["decode.py"]),
        "serving": ("Serving: streaming clients on 127.0.0.1", ["serving.py"]),
        "comm_volume": ("Distributed communication per step on paper (8 GPUs)", ["comm_volume.py"]),
        "tokenizer_trainers": (
            "Tokenizer training: rustbpe vs HF tokenizers",
            ["tokenizer_trainers.py", "--max-chars", "20000000", "--repeats", "1"],
        ),
        "head_loss_memory": (
            "Peak memory of the d20 head + loss (fake tensors): plain ops vs chunked",
            ["head_loss_memory.py"],
        ),
        **(
            {
                "nanochat_side_by_side": (
                    "Side by side with nanochat: training, common evaluator, decoding",
                    ["nanochat_side_by_side.py", "--nanochat", nanochat],
                )
            }
            if nanochat
            else {}
        ),
    }


def refresh_docs(names: list[str], seconds: dict[str, float]) -> None:
    text = DOCS.read_text()
    for name in names:
        record = json.loads((RESULTS / f"{name}.json").read_text())
        m = record["machine"]
        where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads, {m['cpu_capability']}"
        block = (
            f"<!-- bench:{name} -->\n{record['date']}, {where}, torch {m['torch']}, {seconds[name]:.0f} s:\n"
            f"`{record['command']}`\n\n{record['table']}\n<!-- /bench:{name} -->"
        )
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _, block=block: block, text)
        else:
            raise SystemExit(
                f"docs/benchmarks.md has no '<!-- bench:{name} -->' block to refresh; add one under 'Latest make bench'"
            )
    DOCS.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nanochat", help="a karpathy/nanochat checkout: also run the side-by-side with it")
    known, _ = p.parse_known_args()
    table = entries(known.nanochat)
    p.add_argument("--only", nargs="+", choices=sorted(table), help="run these entries only")
    p.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md alone")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    args = p.parse_args()
    names = args.only or list(table)
    if args.list:
        for name in names:
            print(f"{name}: python bench/{' '.join(table[name][1])} --json bench/results/{name}.json")
        return
    seconds, failed = {}, []
    started = time.perf_counter()
    for name in names:
        script, *script_args = table[name][1]
        # Paths relative to the repository, so the command recorded in the JSON and the docs runs anywhere.
        command = [sys.executable, f"bench/{script}", *script_args, "--json", f"bench/results/{name}.json"]
        print(f"\n=== {name}: {table[name][0]}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            failed.append(name)
        seconds[name] = time.perf_counter() - t0
        print(f"=== {name}: {seconds[name]:.0f} s", flush=True)
    done = [n for n in names if n not in failed]
    if not args.no_docs and done:
        refresh_docs(done, seconds)
        print(f"\nrefreshed {len(done)} table(s) in {DOCS.relative_to(ROOT)}")
    print(f"make bench: {time.perf_counter() - started:.0f} s in all")
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)} (their tables were left as they were)")


if __name__ == "__main__":
    main()

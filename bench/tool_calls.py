"""Does a chat model call the calculator on GSM8K questions? Counts replies holding a `<|python_start|>` call.

    python bench/tool_calls.py <run or export dir>... [--n 20] [--samples 4] [--gsm8k ../shared/data/gsm8k]

For each of the first `n` GSM8K test questions (shuffled with seed 42, as the task does): one greedy reply and
`samples` replies at temperature 1.0 / top-k 50, 160 new tokens each, the calculator live. Prints one row per
model: replies with a tool call, and greedy answers that are exactly right.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanochat.engine.engine import Engine
from nanochat.export import load_export
from nanochat.paths import shared_data_dir
from nanochat.tasks.gsm8k import GSM8K


def measure(ckpt: str, task: GSM8K, n: int, samples: int) -> dict:
    model, tok, meta = load_export(ckpt)
    engine = Engine(model, tok, use_tools=True)
    call = tok.token_id("<|python_start|>")
    greedy_calls = sampled_calls = correct = 0
    for i in range(n):
        conv = task[i]
        prompt = tok.render_for_completion(conv)
        (row,), _ = engine.generate_batch(prompt, max_tokens=160, temperature=0)
        reply = row[len(prompt) :]
        greedy_calls += call in reply
        correct += task.evaluate(conv, tok.decode(reply))
        rows, _ = engine.generate_batch(prompt, num_samples=samples, max_tokens=160, temperature=1.0, top_k=50, seed=i)
        sampled_calls += sum(call in r[len(prompt) :] for r in rows)
    return {
        "stage": meta.get("stage", "?"),
        "step": meta.get("step", "?"),
        "greedy": f"{greedy_calls}/{n}",
        "sampled": f"{sampled_calls}/{n * samples}",
        "correct": f"{correct}/{n}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpts", nargs="+", help="stage run dirs or export dirs")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--gsm8k", type=Path, default=None, help="GSM8K jsonl folder (default ../shared/data/gsm8k)")
    args = parser.parse_args()
    path = args.gsm8k or (shared_data_dir() / "gsm8k" if shared_data_dir() else None)
    task = GSM8K(split="test", path=path)
    print(
        "| model | stage (step) | greedy replies with a tool call | sampled replies with a tool call "
        "| greedy exactly right |"
    )
    print("|---|---|---|---|---|")
    for ckpt in args.ckpts:
        r = measure(ckpt, task, args.n, args.samples)
        print(f"| {ckpt} | {r['stage']} ({r['step']}) | {r['greedy']} | {r['sampled']} | {r['correct']} |")


if __name__ == "__main__":
    main()

"""Where one training step's time goes, eager vs `torch.compile`, at the side-by-side configuration with nanochat.

    python bench/step_profile.py [--depth 4] [--vocab 32768] [--seq-len 512] [--batch 16] [--steps 4]
        [--precision bf16|fp32] [--threads 2] [--top 12] [--json bench/results/step_profile.json]

The GPT (head_dim 128, as nanochat's) and MuonAdamW train on random tokens, as `nanochat train` runs them: forward
under autocast (bf16) or in fp32, backward, optimizer step with the schedule applied, zero_grad. Phases are timed
per step (median of `--steps` after two warm-up steps; compiled: after compilation). Then torch.profiler records
one step of each mode and the table lists the ops with the most self CPU time; the head + loss op shows up as its
autograd function (`SoftcapCrossEntropy`) and its matmuls.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from common import markdown_table, save
from torch.profiler import ProfilerActivity, profile

from nanochat.models.components import GPT, GPTConfig
from nanochat.optim import build_optimizer


def make_step(model, forward, opt, batches, precision):
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def step(i):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        with autocast():
            loss = forward(b[:, :-1], b[:, 1:].contiguous())
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.apply_schedule(1.0, 0.95)
        opt.step()
        model.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", default="bench/results/step_profile.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tokens = args.batch * args.seq_len
    phases, ops = [], []
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_depth(args.depth, args.vocab, args.seq_len, head_dim=128))
        opt = build_optimizer(model)
        forward = torch.compile(model, dynamic=False) if mode == "compiled" else model
        batches = torch.randint(0, args.vocab, (4, args.batch, args.seq_len + 1))
        step = make_step(model, forward, opt, batches, args.precision)
        for i in range(2):
            step(i)
        times = [step(i) for i in range(args.steps)]
        fwd, bwd, opt_s = (statistics.median(t[k] for t in times) for k in range(3))
        total = fwd + bwd + opt_s
        phases.append(
            {
                "mode": mode,
                "forward ms": f"{1e3 * fwd:,.0f}",
                "backward ms": f"{1e3 * bwd:,.0f}",
                "optimizer ms": f"{1e3 * opt_s:,.0f} ({100 * opt_s / total:.0f} %)",
                "step ms": f"{1e3 * total:,.0f}",
                "tok/s": f"{tokens / total:,.0f}",
            }
        )
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(0)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        whole = sum(e.self_cpu_time_total for e in events)
        for e in events[: args.top]:
            ops.append(
                {
                    "mode": mode,
                    "op": e.key[:60],
                    "calls": e.count,
                    "self ms": f"{e.self_cpu_time_total / 1e3:,.0f}",
                    "share": f"{100 * e.self_cpu_time_total / whole:.1f} %",
                }
            )
    table = (
        markdown_table(list(phases[0]), [list(r.values()) for r in phases])
        + "\n\n"
        + markdown_table(list(ops[0]), [list(r.values()) for r in ops])
    )
    save(args.json, table, {"phases": phases, "ops": ops}, vars(args))


if __name__ == "__main__":
    main()

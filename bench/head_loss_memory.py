"""Peak memory of a training step's output head + loss at GPU scale, plain ops vs the chunked op, without a GPU.

    python bench/head_loss_memory.py [--depth 20] [--batches 32 16] [--vocab 65536] [--seq-len 2048] [--json PATH]

Everything runs on fake tensors (torch's FakeTensorMode: shapes, dtypes and storage sizes, no data, no compute)
under bf16 autocast, and torch's MemTracker records every tensor's storage while it is alive: the peak is the most
bytes alive at once. Two measurements per device batch:
- head: the final hidden states (N x width, bf16, requiring grad) and the lm_head weight -> loss -> backward;
- step: a whole GPT forward + backward (parameters, activations, gradients), eager.
"plain ops" is `cap * tanh(F.linear(h, W).float() / cap)` then `cross_entropy`, what GPT.forward computed on its
compiled path before; "chunked" is `softcap_cross_entropy`. The chunked op's eager blocks are 2 MiB on a real run;
on fake tensors they are set to 64 MiB (thousands of tiny fake ops would take minutes), which adds at most ~0.2 GiB
of block temporaries to its figures. The trunk's figures are eager: a compiled trunk (inductor) keeps fewer
activations, but the same for both heads, so the head's difference carries over. Attention runs as the CPU flash
kernel (keeps one log-sum-exp per row, as flash attention on a GPU does).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import markdown_table, save
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

from nanochat.models.components import GPT, GPTConfig, head_loss
from nanochat.models.components import gpt as gpt_module

GIB = 2**30


def plain_ops(h, weight, targets, cap, reduction="mean"):
    logits = F.linear(h, weight).float()
    logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


HEADS = {"plain ops": plain_ops, "chunked": head_loss.softcap_cross_entropy}


def peak(run) -> int:
    """Most bytes of tensor storage alive at once while `run()` executes on fake tensors."""
    head_loss._workspace.buf = None  # the eager CPU path's kept logits buffer belongs to the previous fake mode
    with FakeTensorMode():
        tracker = MemTracker()
        with tracker:
            run()
        snapshot = tracker.get_tracker_snapshot("peak")
    return max(dev["Total"] for dev in snapshot.values())


def head_peak(fn, n: int, width: int, vocab: int) -> int:
    def run():
        h = torch.randn(n, width, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(vocab, width, requires_grad=True)
        targets = torch.randint(0, vocab, (n,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, targets, 15.0)
        loss.backward()

    return peak(run)


def step_peak(fn, config: GPTConfig, batch: int) -> int:
    def run():
        model = GPT(config)
        x = torch.randint(0, config.vocab_size, (batch, config.sequence_len))
        y = torch.randint(0, config.vocab_size, (batch, config.sequence_len))
        gpt_module.softcap_cross_entropy = fn
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, y)
            loss.backward()
        finally:
            gpt_module.softcap_cross_entropy = head_loss.softcap_cross_entropy

    return peak(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 16], help="device batch sizes (rows)")
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--json", default="bench/results/head_loss_memory.json")
    args = p.parse_args()
    started = time.perf_counter()
    head_loss.BLOCK_BYTES = 64 << 20  # see the docstring: fewer fake ops, slightly larger temporaries
    config = GPTConfig.from_depth(args.depth, args.vocab, args.seq_len)
    results = []
    for batch in args.batches:
        n = batch * args.seq_len
        for name, fn in HEADS.items():
            row = {
                "batch": batch,
                "tokens": n,
                "head": name,
                "head_peak_bytes": head_peak(fn, n, config.n_embd, args.vocab),
                "step_peak_bytes": step_peak(fn, config, batch),
            }
            results.append(row)
            print(
                f"  batch {batch} {name}: head {row['head_peak_bytes'] / GIB:.2f} GiB, "
                f"step {row['step_peak_bytes'] / GIB:.2f} GiB",
                flush=True,
            )
    rows = []
    for r in results:
        plain = next(x for x in results if x["batch"] == r["batch"] and x["head"] == "plain ops")
        rows.append(
            [
                f"d{args.depth} x {r['batch']} x {args.seq_len}",
                r["head"],
                f"{r['head_peak_bytes'] / GIB:.2f}",
                f"{r['step_peak_bytes'] / GIB:.2f}",
                f"{(plain['step_peak_bytes'] - r['step_peak_bytes']) / GIB:.2f}",
            ]
        )
    table = markdown_table(
        [
            "step (depth x rows x seq)",
            "head + loss",
            "head peak (GiB)",
            "eager step peak (GiB)",
            "saved vs plain (GiB)",
        ],
        rows,
    )
    settings = {**vars(args), "config": config.to_dict(), "wall_seconds": round(time.perf_counter() - started, 1)}
    save(args.json, table, results, settings)


if __name__ == "__main__":
    main()

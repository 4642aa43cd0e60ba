"""Muon's Newton-Schulz per matrix (what MuonAdamW does) vs batched over same-shape matrices, side by side.

    python bench/muon_batching.py [--depths 4 6 12] [--repeats 5] [--json bench/results/muon_batching.json]

Times the Muon part of one optimizer step over a GPT's block matrices (momentum + Newton-Schulz + update),
alternating the two ways in one process; fastest of `--repeats`. On the 2-core CPU the batched way was
slower (docs/benchmarks.md), so MuonAdamW keeps the per-matrix loop; this script measures it again on a GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import markdown_table, save, sync

from nanochat.models.components import GPTConfig
from nanochat.optim.muon import muon_lr_scale, newton_schulz, ns_dtype
from nanochat.optim.muon_adamw import MuonAdamW


def block_shapes(depth: int) -> list[tuple[int, int]]:
    c = GPTConfig.from_depth(depth)
    d, kv = c.n_embd, c.n_kv_head * c.head_dim
    return [(d, d), (kv, d), (kv, d), (d, d), (4 * d, d), (d, 4 * d)] * depth  # q, k, v, o, MLP in, MLP out


def batched_step(params: list[torch.nn.Parameter], buffers: list[torch.Tensor], lr: float, dtype: torch.dtype) -> None:
    """One Newton-Schulz per shape over the stacked matrices (nanochat stacks them the same way)."""
    by_shape: dict[torch.Size, list[int]] = {}
    for i, p in enumerate(params):
        by_shape.setdefault(p.shape, []).append(i)
    for shape, idx in by_shape.items():
        ps, bufs = [params[i] for i in idx], [buffers[i] for i in idx]
        grads = [p.grad for p in ps]
        torch._foreach_lerp_(bufs, grads, 0.05)
        directions = newton_schulz(torch.stack(torch._foreach_lerp(grads, bufs, 0.95)), dtype=dtype)
        torch._foreach_add_(ps, list(directions.to(ps[0].dtype).unbind(0)), alpha=-lr * muon_lr_scale(shape))


def measure(depth: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in block_shapes(depth)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = MuonAdamW([dict(params=params, kind="muon", lr=0.02, momentum=0.95)])
    buffers = [torch.zeros_like(p) for p in params]
    dtype = ns_dtype("auto", torch.device(device))
    ways = {"per matrix": opt.step, "batched by shape": lambda: batched_step(params, buffers, 0.02, dtype)}
    best = {name: float("inf") for name in ways}
    with torch.no_grad():
        for fn in ways.values():
            fn()  # warm-up (allocates MuonAdamW's momentum buffers)
    for _ in range(repeats):
        for name, fn in ways.items():
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            sync()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {
        "depth": depth,
        "matrices": len(params),
        "shapes": len(set(block_shapes(depth))),
        "ns_dtype": str(dtype),
        "per_matrix_s": best["per matrix"],
        "batched_s": best["batched by shape"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6, 12])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="bench/results/muon_batching.json")
    args = p.parse_args()
    rows = [measure(d, args.repeats, args.device) for d in args.depths]
    table = markdown_table(
        ["model", "matrices (shapes)", "NS dtype", "per matrix (ms)", "batched by shape (ms)", "speedup"],
        [
            [
                f"d{r['depth']}",
                f"{r['matrices']} ({r['shapes']})",
                r["ns_dtype"].replace("torch.", ""),
                f"{1e3 * r['per_matrix_s']:,.1f}",
                f"{1e3 * r['batched_s']:,.1f}",
                f"{r['per_matrix_s'] / r['batched_s']:.2f}x",
            ]
            for r in rows
        ],
    )
    save(args.json, table, rows, vars(args))


if __name__ == "__main__":
    main()

"""The output head + softcap + cross-entropy: plain PyTorch ops vs the fused op, side by side.

    python bench/fused_head_loss.py [--depth 4] [--vocab 32768] [--rows 16] [--seq-len 512] [--repeats 3] [--json ...]

Two measurements, each alternating the two implementations in one process and keeping the fastest of
`--repeats` runs:
- head only: forward + backward of the loss from the final hidden states (N = rows x seq_len tokens);
- whole step: forward + backward + optimizer step of a GPT at `--depth` (head_dim 64, as the CPU reference
  configuration) on one batch, with GPT's loss swapped between the two implementations.
Losses and gradients of the two agree (tests/test_head_loss.py); the script checks the losses again.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import markdown_table, save

from nanochat.models.components import GPT, GPTConfig
from nanochat.models.components import gpt as gpt_module
from nanochat.models.components.head_loss import softcap_cross_entropy
from nanochat.optim import build_optimizer


def plain_ops(h, weight, targets, cap, reduction="mean"):
    logits = F.linear(h, weight).float()
    logits = cap * torch.tanh(logits / cap)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction=reduction)


IMPLEMENTATIONS = {"plain ops": plain_ops, "fused": softcap_cross_entropy}


def alternate(fns: dict, repeats: int) -> dict[str, dict]:
    """Run each fn `repeats` times, alternating; {name: {"seconds": fastest, "loss": last loss}}."""
    out = {name: {"seconds": float("inf")} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            loss = fn()
            out[name]["seconds"] = min(out[name]["seconds"], time.perf_counter() - t0)
            out[name]["loss"] = loss
    return out


def head_only(n: int, dim: int, vocab: int, repeats: int) -> dict:
    torch.manual_seed(0)
    h = torch.randn(n, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.02).requires_grad_()
    targets = torch.randint(0, vocab, (n,))

    def run(impl):
        h.grad = weight.grad = None
        loss = impl(h, weight, targets, 15.0)
        loss.backward()
        return loss.item()

    return alternate({name: (lambda impl=impl: run(impl)) for name, impl in IMPLEMENTATIONS.items()}, repeats)


def whole_step(depth: int, vocab: int, rows: int, seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(depth, vocab, seq_len, head_dim=64))
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # zero at init; a trained head is not
    opt = build_optimizer(model)
    batch = torch.randint(0, vocab, (rows, seq_len + 1))
    x, y = batch[:, :-1], batch[:, 1:].contiguous()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def run(impl):
        model.load_state_dict(state)  # every run takes the same step from the same weights
        gpt_module.softcap_cross_entropy = impl
        try:
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            gpt_module.softcap_cross_entropy = softcap_cross_entropy
        return loss.item()

    out = alternate({name: (lambda impl=impl: run(impl)) for name, impl in IMPLEMENTATIONS.items()}, repeats)
    out["params"] = model.num_params()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-step", action="store_true", help="head only")
    p.add_argument("--json", default="bench/results/head_loss.json")
    args = p.parse_args()
    n = args.rows * args.seq_len
    dim = 64 * args.depth
    results = {"head": head_only(n, dim, args.vocab, args.repeats)}
    if not args.skip_step:
        results["step"] = whole_step(args.depth, args.vocab, args.rows, args.seq_len, args.repeats)
    rows = []
    for part, label in (
        ("head", f"head + loss ({n:,} x {dim} -> {args.vocab:,})"),
        ("step", f"d{args.depth} training step"),
    ):
        if part not in results:
            continue
        r = results[part]
        plain, fused = r["plain ops"], r["fused"]
        if abs(plain["loss"] - fused["loss"]) > 1e-4 * abs(plain["loss"]):
            raise SystemExit(f"{part}: losses disagree ({plain['loss']} vs {fused['loss']}): a bug, not a benchmark")
        rows.append(
            [
                label,
                f"{1e3 * plain['seconds']:,.0f}",
                f"{1e3 * fused['seconds']:,.0f}",
                f"{plain['seconds'] / fused['seconds']:.2f}x",
                f"{n / plain['seconds']:,.0f}",
                f"{n / fused['seconds']:,.0f}",
                f"{fused['loss']:.6f}",
            ]
        )
    table = markdown_table(
        ["what", "plain ops (ms)", "fused (ms)", "speedup", "plain tok/s", "fused tok/s", "loss (both)"], rows
    )
    save(args.json, table, results, vars(args))


if __name__ == "__main__":
    main()

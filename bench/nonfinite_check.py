"""What the per-step NaN/inf check costs next to the step it guards, side by side in one process.

    python bench/nonfinite_check.py [--depths 4 6] [--rows 16] [--seq 512] [--json out.json]

The check (PretrainModule.step_is_finite) sums the loss and every gradient's norm and reads back one bool: one
`_foreach_norm` pass over the gradients and one host-device sync per optimizer step.
"""

from __future__ import annotations

import argparse

import torch
from common import best_of, markdown_table, save  # bench/ is on sys.path when a script here runs

from nanochat.models.components import GPT, GPTConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for depth in args.depths:
        model = GPT(GPTConfig.from_depth(depth, args.vocab, args.seq, aspect_ratio=64, head_dim=64)).to(args.device)
        x = torch.randint(0, args.vocab, (args.rows, args.seq + 1), device=args.device)
        state = {}

        def step(model=model, x=x, state=state):
            model.zero_grad(set_to_none=True)
            state["loss"] = model(x[:, :-1], x[:, 1:].contiguous())
            state["loss"].backward()

        def check(model=model, state=state):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum() + state["loss"].detach()))

        step_s = best_of(step, 3)  # after one warm-up call
        check_s = best_of(check, 20)
        rows.append(
            {
                "depth": depth,
                "params": model.num_params(),
                "tokens": args.rows * args.seq,
                "fwd_bwd_ms": 1e3 * step_s,
                "check_ms": 1e3 * check_s,
                "check_share": check_s / step_s,
            }
        )
    print(f"device={args.device} threads={torch.get_num_threads()} rows={args.rows} seq={args.seq} vocab={args.vocab}")
    table = markdown_table(
        ["depth", "params", "forward + backward (ms)", "finiteness check (ms)", "share of the step"],
        [
            [
                r["depth"],
                f"{r['params']:,}",
                f"{r['fwd_bwd_ms']:,.1f}",
                f"{r['check_ms']:.2f}",
                f"{100 * r['check_share']:.2f} %",
            ]
            for r in rows
        ],
    )
    save(args.json, table, rows, vars(args))


if __name__ == "__main__":
    main()

"""The CPU choices behind the training step's defaults, each measured against its alternative in one process.

    python bench/cpu_step_choices.py [--rows 8192] [--width 256] [--vocab 32768] [--repeats 3] [--threads 2]
        [--json bench/results/cpu_step_choices.json]

At d4's head (8,192 tokens of width 256 against a 32,768-token vocabulary, bf16 autocast as `precision=auto` on a
bf16 CPU), forward + backward of `softcap_cross_entropy`, fastest of `--repeats` after one warm-up, alternating:
- chunk size: the whole batch in one chunk (the default CHUNK_BYTES) vs 4 and 16 chunks;
- the eager path's kept logits buffer vs a fresh buffer per chunk;
- the op eager (as it runs inside a compiled GPT on a CPU) vs traced by torch.compile (inductor's kernels).
And one AdamW step over d4's AdamW tensors (embedding and lm_head, fp32): torch's fused CPU kernel vs foreach.
"""

from __future__ import annotations

import argparse

import torch
from common import best_of, markdown_table, save

from nanochat.models.components import head_loss


def head_seconds(h, w, y, repeats: int, fn=head_loss.softcap_cross_entropy, **kwargs) -> float:
    def run():
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, y, 15.0, **kwargs)
        loss.backward()

    return best_of(run, repeats=repeats, warmup=1)


def fresh_logits(h, w):
    return h @ w.t()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="bench/results/cpu_step_choices.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    h = torch.randn(args.rows, args.width, requires_grad=True)
    w = (0.02 * torch.randn(args.vocab, args.width)).requires_grad_()
    y = torch.randint(0, args.vocab, (args.rows,))
    full = args.rows * args.vocab * 4  # the fp32-equivalent bytes of all logits: one chunk
    rows = []

    def row(choice, default, alternative, t_default, t_alt):
        rows.append([choice, default, alternative, f"{1e3 * t_default:,.0f}", f"{1e3 * t_alt:,.0f}",
                     f"{t_alt / t_default:.2f}x"])  # fmt: skip

    one = head_seconds(h, w, y, args.repeats, chunk_bytes=full)
    for n in (4, 16):
        row(
            "head + loss: chunks",
            "1 chunk",
            f"{n} chunks",
            one,
            head_seconds(h, w, y, args.repeats, chunk_bytes=full // n),
        )
    kept = head_seconds(h, w, y, args.repeats)
    original = head_loss._logits
    head_loss._logits = fresh_logits
    try:
        fresh = head_seconds(h, w, y, args.repeats)
    finally:
        head_loss._logits = original
    row("head + loss: logits buffer", "kept", "fresh per chunk", kept, fresh)
    eager_devices = head_loss.EAGER_DEVICES
    head_loss.EAGER_DEVICES = set()  # let torch.compile trace the op's plain-ops path on a CPU
    try:
        traced = torch.compile(head_loss.softcap_cross_entropy, dynamic=False)
        compiled = head_seconds(h, w, y, args.repeats, fn=traced)
    finally:
        head_loss.EAGER_DEVICES = eager_devices
    row("head + loss: on a CPU", "eager, cache-blocked", "torch.compile (inductor)", kept, compiled)

    params = [torch.randn(args.vocab, args.width) for _ in range(2)]
    for p_ in params:
        p_.grad = torch.randn_like(p_)
    times = {}
    for name in ("fused", "foreach"):
        opt = torch.optim.AdamW(params, lr=1e-3, **{name: True})
        times[name] = best_of(opt.step, repeats=args.repeats * 3, warmup=1)
    row("AdamW step (2 x vocab x width)", "fused", "foreach", times["fused"], times["foreach"])
    header = ["choice", "default", "alternative", "default ms", "alternative ms", "alternative / default"]
    save(args.json, markdown_table(header, rows), rows, vars(args))


if __name__ == "__main__":
    main()

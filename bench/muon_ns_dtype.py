"""Newton-Schulz in bf16 vs fp32 on this machine, side by side (why ns_dtype defaults to 'auto').

python bench/muon_ns_dtype.py [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch
from common import best_of, markdown_table, save

from nanochat.hardware import fast_bf16
from nanochat.optim.muon import newton_schulz


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    # d4 attention / MLP matrices, and d12's for scale.
    for shape in [(256, 256), (1024, 256), (768, 768), (3072, 768)]:
        G = torch.randn(shape, device=args.device)
        row = {"shape": f"{shape[0]}x{shape[1]}"}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            row[f"ns_{name}_ms"] = 1e3 * best_of(lambda G=G, dtype=dtype: newton_schulz(G, dtype=dtype))
        row["bf16_over_fp32"] = row["ns_bf16_ms"] / row["ns_fp32_ms"]
        rows.append(row)
    print(
        f"device={args.device} capability={torch.backends.cpu.get_cpu_capability()} fast_bf16={fast_bf16(args.device)}"
    )
    table = markdown_table(
        ["matrix", "NS fp32 (ms)", "NS bf16 (ms)", "bf16 / fp32"],
        [[r["shape"], f"{r['ns_fp32_ms']:.2f}", f"{r['ns_bf16_ms']:.2f}", f"{r['bf16_over_fp32']:.1f}x"] for r in rows],
    )
    save(args.json, table, rows, vars(args))


if __name__ == "__main__":
    main()

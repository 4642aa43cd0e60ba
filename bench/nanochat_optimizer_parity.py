"""Our MuonAdamW with the 2026 recipe's optimizer against nanochat's own MuonAdamW, update for update.

    python bench/nanochat_optimizer_parity.py --nanochat /path/to/nanochat [--depth 4] [--steps 3]
                                              [--json bench/results/nanochat_optimizer_parity.json]
    python bench/nanochat_optimizer_parity.py --nanochat /path/to/nanochat \
        --record tests/data/nanochat_optimizer_reference.json

`--nanochat` is a checkout of karpathy/nanochat (run, never imported into this project); without one the script
prints why it skips and exits 0. nanochat's side runs in a child process (PYTHONPATH = the checkout,
NANOCHAT_DTYPE=float32, TORCHDYNAMO_DISABLE=1 so its compiled step functions run eagerly on a CPU): it builds its
GPT at `--depth` (window pattern SSSL), loads weights drawn by name from a seed (bench/nanochat_parity.py's
`reference_weights`), builds its optimizer with `GPT.setup_optimizer` at base_train's lrs times a batch lr scale
and a Muon weight decay, and takes `--steps` steps on gradients drawn by name from the seed, setting every group's
lr multiplier, Muon momentum and weight decay per step as base_train does. This process loads the same weights
into our GPT (conf/arch/nanochat2026.yaml), builds `build_optimizer` from conf/recipe_optimizer/nanochat2026.yaml
with the same lr scale and weight decay, applies the same schedule values and gradients, and compares each step's
update parameter by parameter, reported per optimizer role. Both run in fp32.

`--record` writes the small reference the test suite checks our optimizer against without nanochat
(tests/test_optimizer_parity.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from nanochat_parity import nanochat_shape, reference_weights

REPO = Path(__file__).resolve().parents[1]
OPTIMIZER_PRESET = REPO / "conf" / "recipe_optimizer" / "nanochat2026.yaml"
# (lr multiplier, Muon momentum, Muon weight-decay multiplier) per step: warmup, flat, and warmdown-like values.
SCHEDULE = [(0.025, 0.85, 1.0), (1.0, 0.88, 0.95), (0.6, 0.95, 0.5), (0.3, 0.93, 0.2)]
BASE_LRS = dict(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5)  # base_train's defaults


def reference_grads(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """A gradient per parameter, drawn in name order from one generator: N(0, 0.01^2), a few with larger scale."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shapes[name], generator=g) * (0.01 if len(shapes[name]) > 1 else 0.1)
        for name in sorted(shapes)
    }


# --- nanochat's side (child process: `nanochat` is the checkout's package) -------------------------------------
def nanochat_run(config_kwargs: dict, seed: int, steps: int, lr_scale: float, muon_wd: float) -> dict:
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**config_kwargs))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(reference_weights(shapes, seed))
    optimizer = model.setup_optimizer(**{k: v * lr_scale for k, v in BASE_LRS.items()}, weight_decay=muon_wd)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        {
            "kind": g["kind"],
            "params": [names[id(p)] for p in g["params"]],
            "lr": g["lr"],
            "betas": list(g.get("betas", [])),
            "weight_decay": g["weight_decay"],
        }
        for g in optimizer.param_groups
    ]
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    history = []
    for k, (lrm, momentum, wdm) in enumerate(SCHEDULE[:steps]):
        grads = reference_grads({n: tuple(p.shape) for n, p in params.items()}, seed + 1 + k)
        for n, p in params.items():
            p.grad = grads[n].clone()
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = momentum
                group["weight_decay"] = muon_wd * wdm
        optimizer.step()
        history.append({n: p.detach().clone() for n, p in params.items()})
    return {"config": config_kwargs, "seed": seed, "groups": groups, "start": start, "history": history}


def nanochat_worker(args) -> None:
    import nanochat.common

    print(f"nanochat side: {nanochat.common.COMPUTE_DTYPE_REASON}", file=sys.stderr)
    config = json.loads(args.config)
    torch.save(nanochat_run(config, args.seed, args.steps, args.lr_scale, args.muon_wd), args.worker_out)


def run_nanochat(args, config: dict, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--nanochat",
        str(args.nanochat),
        "--worker-out",
        str(out),
        "--config",
        json.dumps(config),
        "--seed",
        str(args.seed),
        "--steps",
        str(args.steps),
        "--lr-scale",
        str(args.lr_scale),
        "--muon-wd",
        str(args.muon_wd),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": f"{args.nanochat}{os.pathsep}{Path(__file__).parent}",
        "NANOCHAT_DTYPE": "float32",
        "TORCHDYNAMO_DISABLE": "1",
    }
    subprocess.run(cmd, check=True, env=env, cwd=args.nanochat)
    return torch.load(out, weights_only=False)


# --- our side ----------------------------------------------------------------------------------------------
def our_config(ns_dtype: str = "float32"):
    from omegaconf import OmegaConf

    from nanochat.settings import OptimizerConfig

    merged = OmegaConf.merge(
        OmegaConf.structured(OptimizerConfig), OmegaConf.load(OPTIMIZER_PRESET), {"ns_dtype": ns_dtype}
    )
    return OmegaConf.to_object(merged)


def our_run(config_kwargs: dict, seed: int, steps: int, lr_scale: float, muon_wd: float, ns_dtype: str = "float32"):
    """Our model and optimizer through the same steps; (optimizer, start weights, weights after each step)."""
    from nanochat_parity import our_model

    from nanochat.optim import build_optimizer

    model = our_model(config_kwargs)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(reference_weights(shapes, seed))
    config = our_config(ns_dtype)
    optimizer = build_optimizer(model, config, lr_scale=lr_scale, weight_decay_scale=muon_wd / config.muon_weight_decay)
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    history = []
    for k, (lrm, momentum, wdm) in enumerate(SCHEDULE[:steps]):
        grads = reference_grads({n: tuple(p.shape) for n, p in params.items()}, seed + 1 + k)
        for n, p in params.items():
            p.grad = grads[n].clone()
        optimizer.apply_schedule(lrm, momentum, wdm)
        optimizer.step()
        history.append({n: p.detach().clone() for n, p in params.items()})
    return model, optimizer, start, history


def groups_of(model, optimizer) -> dict[str, dict]:
    """Parameter name -> its param group."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in optimizer.param_groups for p in g["params"]}


def updates(start: dict, history: list[dict]) -> list[dict[str, torch.Tensor]]:
    before = [start] + history[:-1]
    return [{n: after[n] - prev[n] for n in after} for prev, after in zip(before, history)]


def cautious_flips(
    diff: torch.Tensor, before: torch.Tensor, step: float, weight_decay: float, tol: float
) -> torch.Tensor:
    """Elements whose update differs by exactly their weight-decay term step x wd x |w|: where cautious weight
    decay's sign test (update x weight >= 0) sits at zero within rounding and the two implementations decide apart."""
    return (diff.abs() > tol) & ((diff.abs() - step * weight_decay * before.abs()).abs() <= tol)


def compare(nanochat_out: dict, args) -> tuple[list[dict], list[list]]:
    from nanochat.optim.muon import muon_lr_scale

    model, optimizer, start, history = our_run(
        nanochat_out["config"], args.seed, args.steps, args.lr_scale, args.muon_wd
    )
    ours_group = groups_of(model, optimizer)
    roles = {n: g["role"] for n, g in ours_group.items()}
    nanochat_group = {n: g for g in nanochat_out["groups"] for n in g["params"]}
    for n, p in start.items():
        if not torch.equal(p, nanochat_out["start"][n]):
            raise SystemExit(f"the start weights differ at {n}")
    ours_up, nanochat_up = updates(start, history), updates(nanochat_out["start"], nanochat_out["history"])
    befores = [start] + history[:-1]
    results, rows = [], []
    for role in dict.fromkeys(roles.values()):
        names = [n for n, r in roles.items() if r == role]
        g, h = ours_group[names[0]], nanochat_group[names[0]]
        scale = max(u[n].abs().max().item() for u in nanochat_up for n in names)
        flips = elements = 0
        diff = 0.0
        for k, (lrm, _, wdm) in enumerate(SCHEDULE[: args.steps]):
            for n in names:
                d = ours_up[k][n] - nanochat_up[k][n]
                elements += d.numel()
                if g["kind"] == "muon" and g["cautious_weight_decay"]:
                    step = g["initial_lr"] * lrm * muon_lr_scale(d.shape)
                    flip = cautious_flips(d, befores[k][n], step, g["initial_weight_decay"] * wdm, 1e-5 * scale)
                    flips += int(flip.sum())
                    d = d[~flip]
                diff = max(diff, d.abs().max().item() if d.numel() else 0.0)
        pairs = [(ours_group[n], nanochat_group[n]) for n in names]
        lrs_equal = all(math.isclose(o["initial_lr"], t["lr"], rel_tol=1e-12) for o, t in pairs)
        betas_equal = g["kind"] != "adamw" or all(list(o["betas"]) == t["betas"] for o, t in pairs)
        wd_equal = math.isclose(g["initial_weight_decay"], h["weight_decay"], rel_tol=1e-9, abs_tol=1e-12)
        row = {
            "role": role,
            "kind": g["kind"],
            "parameters": len(names),
            "lr ours": g["initial_lr"],
            "lr nanochat": h["lr"],
            "lrs equal": lrs_equal,
            "betas equal": betas_equal,
            "weight decay equal": wd_equal,
            "max |update|": scale,
            "max |update diff|": diff,
            "relative": diff / scale,
            "cautious-decay ties": flips,
            "element updates": elements,
        }
        results.append(row)
        rows.append(
            [
                role,
                g["kind"],
                len(names),
                f"{g['initial_lr']:.6g}",
                f"{h['lr']:.6g}",
                "yes" if lrs_equal and betas_equal and wd_equal else "NO",
                f"{scale:.3e}",
                f"{diff:.2e}",
                f"{diff / scale:.1e}",
                f"{flips} of {elements:,}" if g["kind"] == "muon" else "",
            ]
        )
    return results, rows


def record(args) -> None:
    """The test suite's reference: a 2-layer nanochat model (width 64, vocab 200 padded to 256), fp32, `--steps`
    steps, summarised per parameter as the last update's sum of squares and first 8 values."""
    nanochat_config = dict(
        sequence_len=256, vocab_size=200, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SSSL"
    )
    with tempfile.TemporaryDirectory() as tmp:
        nanochat_out = run_nanochat(args, nanochat_config, Path(tmp) / "nanochat_out.pt")
    last = updates(nanochat_out["start"], nanochat_out["history"])
    ref = {
        "source": f"nanochat {args.label}: nanochat/optim.py MuonAdamW via GPT.setup_optimizer on CPU, fp32, "
        f"written by bench/nanochat_optimizer_parity.py --record",
        "config": nanochat_config,
        "seed": args.seed,
        "steps": args.steps,
        "lr_scale": args.lr_scale,
        "muon_wd": args.muon_wd,
        "schedule": SCHEDULE[: args.steps],
        "lrs": {n: g["lr"] for g in nanochat_out["groups"] for n in g["params"]},
        "updates": {
            n: {
                "sum_sq": [float(f"{u[n].double().square().sum().item():.9g}") for u in last],
                "first": [float(f"{x:.7g}") for x in last[-1][n].flatten()[:8].tolist()],
            }
            for n in sorted(nanochat_out["start"])
        },
    }
    Path(args.record).write_text(json.dumps(ref, separators=(",", ":")) + "\n")
    print(f"wrote {args.record} ({Path(args.record).stat().st_size:,} bytes)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanochat", type=Path, default=None, help="a karpathy/nanochat checkout (outside this repo)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4000, help="not a multiple of 64: both pad the tables to 4,032")
    p.add_argument("--steps", type=int, default=len(SCHEDULE))
    p.add_argument("--lr-scale", type=float, default=2**0.5, help="batch lr transfer, as at B = 2^20")
    p.add_argument("--muon-wd", type=float, default=0.1, help="Muon weight decay at step 0 (after transfer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--record", default=None, help="write the test suite's small reference here instead")
    p.add_argument("--label", default="92d63d4", help="what nanochat checkout this is, for the record")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.nanochat is None or not (args.nanochat / "nanochat" / "optim.py").is_file():
        print(
            f"skipped: no nanochat checkout given (--nanochat {args.nanochat}: needs nanochat/optim.py); e.g. "
            f"git clone https://github.com/karpathy/nanochat /tmp/nanochat"
        )
        return
    args.nanochat = args.nanochat.resolve()
    if args.worker_out:
        nanochat_worker(args)
        return
    sys.path.insert(0, str(REPO / "src"))
    if args.record:
        record(args)
        return
    from common import markdown_table, save

    width, heads = nanochat_shape(args.depth, args.head_dim)
    config = dict(
        sequence_len=args.seq,
        vocab_size=args.vocab,
        n_layer=args.depth,
        n_head=heads,
        n_kv_head=heads,
        n_embd=width,
        window_pattern="SSSL",
    )
    with tempfile.TemporaryDirectory() as tmp:
        nanochat_out = run_nanochat(args, config, Path(tmp) / "nanochat_out.pt")
    results, rows = compare(nanochat_out, args)
    table = markdown_table(
        [
            "role",
            "kind",
            "params",
            "lr ours",
            "lr nanochat",
            "lr, betas, wd equal",
            "max abs update",
            f"max abs diff ({args.steps} steps)",
            "relative",
            "cautious-decay ties (excluded)",
        ],
        rows,
    )
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker_out", "config")
    }
    save(args.json, table, results, settings)


if __name__ == "__main__":
    main()

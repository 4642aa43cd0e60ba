"""Our GPT with the nanochat2026 preset against nanochat's own code, number for number, on the same weights.

    python bench/nanochat_parity.py --nanochat /path/to/nanochat [--depth 4] [--head-dims 128 64] [--seq 512]
                                    [--new 64] [--json bench/results/nanochat_parity.json]
    python bench/nanochat_parity.py --nanochat /path/to/nanochat --record tests/data/nanochat_reference.json

`--nanochat` is a checkout of karpathy/nanochat (run, never imported into this project); without one the script
prints why it skips and exits 0. Both packages are called `nanochat`, so nanochat's side runs in a child process
(PYTHONPATH = the checkout, NANOCHAT_DTYPE = float32 or bfloat16): it builds its GPT at `--depth` for each head
size (its sizing: width rounded up to a multiple of the head size), window pattern SSSL, and writes its state dict,
its initialisation under a seed, a batch's logits and loss, and 64 greedy tokens from its KV-cached Engine and from
its naive `generate`. This process loads that state dict into our GPT (conf/arch/nanochat2026.yaml, same shape)
and compares: initialisation under the same seed, logits and loss in fp32 and bf16 (our bf16 is autocast over fp32
weights; nanochat's casts its weights and keeps embeddings and activations in bf16), and greedy tokens from our
Engine and our naive decoding.

The weights compared are not nanochat's initialisation (zero output projections, a near-zero head: nearly uniform
logits) but `reference_weights`, drawn by parameter name from a seed, so every layer and feature changes the output.
`--record` writes the small reference the test suite checks our GPT against without nanochat (tests/test_gpt_arch.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "conf" / "arch" / "nanochat2026.yaml"
SPECIAL = ("<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")


def reference_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor drawn from one generator in name order: unit-scale matrices (non-zero output projections, a head
    whose logits spread over several units), N(0, 1) embeddings, lambdas and gates near their working values."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        r = torch.randn(shapes[name], generator=g)
        if name.endswith("resid_lambdas"):
            out[name] = 1.0 + 0.1 * r
        elif name.endswith("x0_lambdas"):
            out[name] = 0.2 + 0.1 * r
        elif name.endswith(("smear_lambda", "backout_lambda")):
            out[name] = 0.3 + 0.1 * r
        elif name.startswith(("transformer.wte", "value_embeds")):
            out[name] = r
        else:
            out[name] = r * shapes[name][1] ** -0.5 * (3.0 if name == "lm_head.weight" else 1.0)
    return out


def reference_tokens(vocab_size: int, rows: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(vocab_size, (rows, length), generator=torch.Generator().manual_seed(seed))


class StubTokenizer:
    """Special tokens outside the vocabulary (never generated): both engines decode exactly `max_tokens` tokens."""

    def token_id(self, name: str) -> int:  # ours
        return -1 - SPECIAL.index(name)

    encode_special = token_id  # nanochat's

    def get_bos_token_id(self) -> int:
        return self.token_id("<|bos|>")


# --- nanochat's side (child process: `nanochat` is the checkout's package) -------------------------------------
def nanochat_shape(depth: int, head_dim: int) -> tuple[int, int]:
    """nanochat's sizing from depth: width 64*depth rounded up to a multiple of head_dim; (width, heads)."""
    width = -(-depth * 64 // head_dim) * head_dim
    return width, width // head_dim


def nanochat_case(config_kwargs: dict, seed: int, rows: int, prompt_len: int, new_tokens: int) -> dict:
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**config_kwargs))
    torch.manual_seed(seed)
    model.init_weights()
    init_state = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(reference_weights(shapes, seed))
    model.eval()
    idx = reference_tokens(config_kwargs["vocab_size"], rows, config_kwargs["sequence_len"] + 1, seed)
    x, y = idx[:, :-1].contiguous(), idx[:, 1:].contiguous()
    with torch.no_grad():
        logits = model(x)
        loss = model(x, y)
    prompt = idx[0, :prompt_len].tolist()
    engine = Engine(model, StubTokenizer())
    cached = [column[0] for column, _ in engine.generate(prompt, num_samples=1, max_tokens=new_tokens, temperature=0.0)]
    naive = list(model.generate(prompt, new_tokens, temperature=0.0))
    return {
        "config": config_kwargs,
        "seed": seed,
        "state": model.state_dict(),
        "init_state": init_state,
        "idx": idx,
        "logits": logits,
        "loss": float(loss),
        "prompt": prompt,
        "cached": cached,
        "naive": naive,
    }


def nanochat_worker(args) -> None:
    import nanochat.common

    print(f"nanochat side: {nanochat.common.COMPUTE_DTYPE_REASON}", file=sys.stderr)
    cases = []
    for head_dim in args.head_dims:
        width, heads = nanochat_shape(args.depth, head_dim)
        kwargs = dict(
            sequence_len=args.seq,
            vocab_size=args.vocab,
            n_layer=args.depth,
            n_head=heads,
            n_kv_head=heads,
            n_embd=width,
            window_pattern="SSSL",
        )
        cases.append(nanochat_case(kwargs, args.seed, args.rows, args.prompt, args.new))
    torch.save(cases, args.worker_out)


def run_nanochat(args, dtype: str, out: Path, **overrides) -> list[dict]:
    """nanochat's cases computed in a child process with NANOCHAT_DTYPE=dtype."""
    cmd = [sys.executable, __file__, "--nanochat", str(args.nanochat), "--worker-out", str(out)]
    settings = {**vars(args), **overrides}
    for key in ("depth", "seq", "vocab", "rows", "prompt", "new", "seed"):
        cmd += [f"--{key}", str(settings[key])]
    cmd += ["--head-dims", *map(str, settings["head_dims"])]
    env = {**os.environ, "PYTHONPATH": str(args.nanochat), "NANOCHAT_DTYPE": dtype}
    subprocess.run(cmd, check=True, env=env, cwd=args.nanochat)
    return torch.load(out, weights_only=False)


# --- our side ----------------------------------------------------------------------------------------------
def preset() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(PRESET))


def our_model(nanochat_config: dict):
    from nanochat.models.components import GPT, GPTConfig

    shape = {k: v for k, v in nanochat_config.items() if k != "window_pattern"}
    config = GPTConfig(**shape, **preset())
    if config.window_pattern != nanochat_config["window_pattern"]:
        raise SystemExit(
            f"{PRESET} has window_pattern {config.window_pattern}, nanochat's run {nanochat_config['window_pattern']}"
        )
    return GPT(config)


def compare(case: dict, dtype: torch.dtype, nanochat_fp32: dict | None) -> dict:
    from nanochat.engine.engine import Engine, generate_naive
    from nanochat.precision import computing

    model = our_model(case["config"])
    ours_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    nanochat_shapes = {k: tuple(v.shape) for k, v in case["state"].items()}
    if ours_shapes != nanochat_shapes:
        raise SystemExit(
            f"state dict layouts differ: ours only {sorted(set(ours_shapes) - set(nanochat_shapes))}, "
            f"nanochat's only {sorted(set(nanochat_shapes) - set(ours_shapes))}, shapes {ours_shapes} vs "
            f"{nanochat_shapes}"
        )
    row = {}
    if dtype == torch.float32:
        torch.manual_seed(case["seed"])
        model.init_weights()
        row["init max |diff|"] = max(
            (model.state_dict()[k] - v.float()).abs().max().item() for k, v in case["init_state"].items()
        )
    model.load_state_dict(case["state"])
    model.eval()
    x, y = case["idx"][:, :-1].contiguous(), case["idx"][:, 1:].contiguous()
    with torch.no_grad(), computing(model, dtype):
        logits = model(x)
        loss = float(model(x, y))
    row["logits max |ours - nanochat|"] = (logits - case["logits"]).abs().max().item()
    row["loss |ours - nanochat|"] = abs(loss - case["loss"])
    row["loss"] = loss
    if nanochat_fp32 is not None:  # what bf16 itself costs each implementation against nanochat's fp32
        row["ours bf16 vs nanochat fp32"] = (logits - nanochat_fp32["logits"]).abs().max().item()
        row["nanochat bf16 vs nanochat fp32"] = (case["logits"] - nanochat_fp32["logits"]).abs().max().item()
    row["logit scale (max |logit|)"] = case["logits"].abs().max().item()
    engine = Engine(model, StubTokenizer(), use_tools=False, dtype=dtype)
    cached = [column[0] for column, _ in engine.generate(case["prompt"], max_tokens=len(case["cached"]), temperature=0)]
    naive = generate_naive(model, case["prompt"], len(case["cached"]), temperature=0, dtype=dtype)
    row["ours: cached = naive"] = first_difference(cached, naive)
    row["nanochat: cached = naive"] = first_difference(case["cached"], case["naive"])
    row["ours = nanochat (cached)"] = first_difference(cached, case["cached"])
    return row


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token where two greedy decodings differ; None: equal."""
    shorter = None if len(a) == len(b) else min(len(a), len(b))
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), shorter)


def yes_no(first: int | None) -> str:
    return "yes" if first is None else f"no, from token {first}"


def record(args) -> None:
    """The test suite's reference: a tiny nanochat model (3 layers, width 64, GQA, seq 256 so S layers get a
    128-token window, vocab 200 padded to 256) in fp32, summarised in a few KB."""
    config = dict(sequence_len=256, vocab_size=200, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SSSL")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nanochat.pt"
        cmd = [
            sys.executable,
            __file__,
            "--nanochat",
            str(args.nanochat),
            "--worker-out",
            str(out),
            "--record-config",
            json.dumps(config),
            "--seed",
            str(args.seed),
            "--prompt",
            "160",
            "--new",
            "32",
            "--rows",
            "1",
        ]
        env = {**os.environ, "PYTHONPATH": str(args.nanochat), "NANOCHAT_DTYPE": "float32"}
        subprocess.run(cmd, check=True, env=env, cwd=args.nanochat)
        case = torch.load(out, weights_only=False)[0]
    logits = case["logits"][0]
    positions = [0, 1, 127, 128, 129, 200, 255]
    ref = {
        "source": f"nanochat {args.label}: nanochat/gpt.py GPT and nanochat/engine.py Engine on CPU, fp32, "
        f"written by bench/nanochat_parity.py --record",
        "config": config,
        "seed": args.seed,
        "shapes": {k: list(v.shape) for k, v in case["state"].items()},
        "init": {
            k: [round(v.double().sum().item(), 6), round(v.double().square().sum().item(), 6)]
            for k, v in case["init_state"].items()
        },
        "loss": case["loss"],
        "logsumexp_every_8": [float(f"{x:.7g}") for x in torch.logsumexp(logits, -1)[::8].tolist()],
        "logits_first_16": {str(p): [float(f"{x:.7g}") for x in logits[p, :16].tolist()] for p in positions},
        "prompt_len": len(case["prompt"]),
        "greedy_cached": case["cached"],
        "greedy_naive": case["naive"],
    }
    Path(args.record).write_text(json.dumps(ref, separators=(",", ":")) + "\n")
    print(f"wrote {args.record} ({Path(args.record).stat().st_size:,} bytes)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nanochat", type=Path, default=None, help="a karpathy/nanochat checkout (outside this repo)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4000, help="not a multiple of 64: both pad the tables to 4,032")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--prompt", type=int, default=300, help="prompt tokens: past the 128-token short window")
    p.add_argument("--new", type=int, default=64, help="greedy tokens decoded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--record", default=None, help="write the test suite's small reference here instead")
    p.add_argument("--label", default="92d63d4", help="what nanochat checkout this is, for the record")
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--record-config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.nanochat is None or not (args.nanochat / "nanochat" / "gpt.py").is_file():
        print(
            f"skipped: no nanochat checkout given (--nanochat {args.nanochat}: needs nanochat/gpt.py); e.g. "
            f"git clone https://github.com/karpathy/nanochat /tmp/nanochat"
        )
        return
    args.nanochat = args.nanochat.resolve()
    if args.worker_out and args.record_config:
        torch.save(
            [nanochat_case(json.loads(args.record_config), args.seed, args.rows, args.prompt, args.new)],
            args.worker_out,
        )
        return
    if args.worker_out:
        nanochat_worker(args)
        return
    if args.record:
        record(args)
        return
    sys.path.insert(0, str(REPO / "src"))
    from common import markdown_table, save

    results, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        theirs = {name: run_nanochat(args, name, Path(tmp) / f"{name}.pt") for name in ("float32", "bfloat16")}
    for dtype, name in ((torch.float32, "float32"), (torch.bfloat16, "bfloat16")):
        for i, case in enumerate(theirs[name]):
            fp32_case = theirs["float32"][i] if dtype == torch.bfloat16 else None
            row = compare(case, dtype, fp32_case)
            c = case["config"]
            label = {
                "head_dim": c["n_embd"] // c["n_head"],
                "heads": c["n_head"],
                "width": c["n_embd"],
                "precision": "fp32" if dtype == torch.float32 else "bf16",
            }
            results.append({**label, **row})
            rows.append(
                [
                    label["head_dim"],
                    label["precision"],
                    f"{row['logits max |ours - nanochat|']:.2e}",
                    f"{row['loss |ours - nanochat|']:.2e}",
                    f"{row['loss']:.6f}",
                    *(
                        f"{row[k]:.3f}" if k in row else ""
                        for k in ("ours bf16 vs nanochat fp32", "nanochat bf16 vs nanochat fp32")
                    ),
                    f"{row['logit scale (max |logit|)']:.2f}",
                    yes_no(row["ours: cached = naive"]),
                    yes_no(row["nanochat: cached = naive"]),
                    yes_no(row["ours = nanochat (cached)"]),
                    f"{row['init max |diff|']:.1e}" if "init max |diff|" in row else "",
                ]
            )
    table = markdown_table(
        [
            "head dim",
            "precision",
            "logits max abs diff",
            "loss abs diff",
            "loss",
            "ours bf16 vs nanochat fp32",
            "nanochat bf16 vs nanochat fp32",
            "max abs logit",
            f"ours: {args.new} greedy cached = naive",
            "nanochat: cached = naive",
            "ours = nanochat (greedy)",
            "init max abs diff (same seed)",
        ],
        rows,
    )
    settings = {
        k: (str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
        if k not in ("worker_out", "record_config")
    }
    save(args.json, table, results, settings)


if __name__ == "__main__":
    main()

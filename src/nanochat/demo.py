"""`make demo`: local text -> shards -> tokenizer -> a d4 base model trained on CPU -> midtraining -> SFT -> chat,
with CORE and chat evaluations after each stage and the report card in <home>/runs/<run>/report.md.

Each step is the same `python train.py ...` command a user would type, printed before it runs, so the
demo doubles as a tour. Text comes from NANOCHAT_PRETRAIN_TEXT (the Makefile points it at
../shared/data/pretrain_text when that folder exists); without it the demo builds a small stand-in corpus
from Python's own standard-library sources and says so. The chat stages need the conversations in
../shared/data (`mixture=shared`); without them the demo stops after the base model and says why.

    python -m nanochat.demo [--steps 250] [--mid-steps 150] [--sft-steps 40] [--run demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from nanochat.errors import UserError, exit_on_user_error
from nanochat.io import atomic_write
from nanochat.paths import base_dir, shared_data_dir

REPO = Path(__file__).resolve().parents[2]


def stand_in_corpus(out: Path) -> Path:
    """Python's standard-library sources as a jsonl corpus: on every machine, clearly not FineWeb."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = [json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) for f in sorted(stdlib.glob("*.py"))]
    atomic_write(out / "stdlib.jsonl", "\n".join(rows) + "\n")
    return out


def train(*overrides: str) -> None:
    cmd = [sys.executable, "train.py", *overrides]
    print(f"\n$ python train.py {shlex.join(overrides)}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise UserError(f"`python train.py {shlex.join(overrides)}` failed (see its output above)")


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanochat.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250, help="base training steps of 2,048 tokens")
    parser.add_argument("--mid-steps", type=int, default=150, help="midtraining steps of 2,048 tokens (0: stop after base)")
    parser.add_argument("--sft-steps", type=int, default=40, help="SFT steps of 32 conversations")
    parser.add_argument("--run", default="demo", help="run name: artifacts go to <home>/runs/<run>/")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    data = ["data=local"]  # data.source defaults to $NANOCHAT_PRETRAIN_TEXT
    if os.environ.get("NANOCHAT_PRETRAIN_TEXT"):
        print(f"text: {os.environ['NANOCHAT_PRETRAIN_TEXT']} (NANOCHAT_PRETRAIN_TEXT)")
    else:
        source = stand_in_corpus(base_dir() / "demo_text")
        print(f"text: no NANOCHAT_PRETRAIN_TEXT and no ../shared/data; using Python standard-library sources "
              f"({source}) as a stand-in corpus - not FineWeb, so expect code-flavoured samples")
        data += ["data.name=stdlib", f"data.source={source}", "data.dir=${paths.data_dir}/stdlib"]
    common = [*data, "model=d4", f"run={args.run}"]
    shared = shared_data_dir() is not None
    train("stage=tokenizer", *common, "tokenizer.progress=false")
    # With ../shared/data the base model is also scored on its CORE bundle (20 examples per task).
    train("stage=base", *common, "trainer=cpu", f"model.num_iterations={args.steps}", *(["mixture=shared"] if shared else []))

    runs = base_dir() / "runs" / args.run
    report("base", runs / "base", "greedy samples")
    if args.mid_steps > 0 and not shared:
        print("\nno ../shared/data beside the checkout: skipping midtraining and SFT (they read its conversations)")
    elif args.mid_steps > 0:
        chat = ["model=d4", f"run={args.run}", "trainer=cpu", "mixture=shared"]
        train("stage=mid", *chat, f"module.horizon.num_iterations={args.mid_steps}")
        train("stage=sft", *chat, f"module.horizon.num_iterations={args.sft_steps}",
              "callbacks.val_bpb.every_n_steps=20", "callbacks.val_bpb.eval_tokens=32768", "callbacks.samples.every_n_steps=0")
        report("mid", runs / "mid", None)
        report("sft", runs / "sft", "chat answers (greedy, calculator live)")
        print(f"\nchat with it: python -m nanochat.chat --ckpt {runs / 'sft'}")
    summary = (runs / "report.md").read_text(encoding="utf-8").partition("## Summary")[2].strip()
    print(f"\nreport card: {runs / 'report.md'}\n{summary}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")


def report(stage: str, run_dir: Path, samples_title: str | None) -> None:
    export = run_dir / "export"
    meta = json.loads((export / "config.json").read_text())["meta"]
    if samples_title:
        step, _, samples = (run_dir / "samples.md").read_text(encoding="utf-8").split("### step ")[-1].partition("\n")
        print(f"\n{stage}: {samples_title} at step {step}:{samples.rstrip()}")
    metrics = meta["metrics"]
    loss = f", val/loss {metrics['val/loss']:.3f}" if "val/loss" in metrics else ""
    print(f"{stage}: val/bpb {metrics.get('val/bpb', float('nan')):.3f}{loss} after {meta['step']} steps; exported to {export}")


if __name__ == "__main__":
    main()

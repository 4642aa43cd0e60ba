"""`make demo`: local text -> shards -> tokenizer -> a d4 base model trained on CPU -> greedy samples -> export.

Each step is the same `python train.py ...` command a user would type, printed before it runs, so the
demo doubles as a tour. Text comes from NANOCHAT_PRETRAIN_TEXT (the Makefile points it at
../shared/data/pretrain_text when that folder exists); without it the demo builds a small stand-in corpus
from Python's own standard-library sources and says so.

    python -m nanochat.demo [--steps 250] [--run demo]
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
from nanochat.paths import base_dir

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
    train("stage=tokenizer", *common, "tokenizer.progress=false")
    train("stage=base", *common, "trainer=cpu", f"model.num_iterations={args.steps}")

    export = base_dir() / "runs" / args.run / "base" / "export"
    meta = json.loads((export / "config.json").read_text())["meta"]
    step, _, samples = (export.parent / "samples.md").read_text(encoding="utf-8").split("### step ")[-1].partition("\n")
    print(f"\ngreedy samples at step {step}:{samples.rstrip()}")
    print(f"\nval/bpb {meta['metrics'].get('val/bpb', float('nan')):.3f} after {meta['step']} steps")
    print(f"exported model: {export}")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()

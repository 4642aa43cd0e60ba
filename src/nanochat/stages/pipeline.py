"""`stage=pipeline` (what the `experiment=speedrun_*` presets select): a recipe's stages one after another.

Each step is a normal run, `nanochat train stage=<stage> <your overrides> <data> <step overrides>`, in its
own process (under torchrun when the trainer has several devices), printed before it starts so the pipeline
doubles as a tour of the commands. Every stage writes under runs/<run>/<stage> and the next one init_froms
it by default. runs/<run>/pipeline/steps.json records each step that finished, with its command; running
the same pipeline again skips those and re-runs the first unfinished one, which resumes from its last
checkpoint (resume=auto). So a killed pipeline continues where it was, and a changed command is refused
rather than mixed into finished work.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.configs import override_key
from nanochat.data.resolve import resolve_sources
from nanochat.errors import UserError
from nanochat.io import atomic_write

RANKED_STAGES = ("base", "mid", "sft", "rl", "eval")  # the stages that run one process per device
OWN_KEYS = ("stage", "pipeline", "hydra")  # overrides that configure the pipeline itself, not its stages


@dataclass
class Step:
    name: str
    argv: list[str]  # after the interpreter: `-m nanochat train stage=...` or `-m nanochat data ...`
    stage: str | None = None

    def launcher(self, nproc: int) -> list[str]:
        """torchrun's arguments for a stage that trains on several devices, else none."""
        return ["--standalone", f"--nproc_per_node={nproc}"] if self.stage in RANKED_STAGES and nproc > 1 else []

    def command(self, nproc: int) -> list[str]:
        torchrun = self.launcher(nproc)
        return [sys.executable, *(["-m", "torch.distributed.run", *torchrun] if torchrun else []), *self.argv]

    def shown(self, nproc: int) -> str:
        """The command as a user types it: `nanochat train ...`, or under torchrun
        `torchrun ... -m nanochat train ...`."""
        torchrun = self.launcher(nproc)
        argv = self.argv if torchrun else self.argv[1:]  # -m nanochat ... reads `nanochat ...` at a shell
        return shlex.join(["torchrun", *torchrun, *argv] if torchrun else argv)


def forwarded_overrides() -> list[str]:
    """The command line this pipeline was started with, minus what configures the pipeline itself."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    return [o for o in overrides if override_key(o).split(".", 1)[0] not in OWN_KEYS]


def plan(cfg, forwarded: list[str], data_overrides: list[str], prep: list[list[str]]) -> list[Step]:
    steps = [Step("data" if i == 0 else f"data{i}", argv) for i, argv in enumerate(prep)]
    for name, spec in cfg.pipeline.steps.items():
        if spec is None:  # pipeline.steps.rl=null drops a step
            continue
        stage = spec.get("stage")
        if stage is None:
            raise UserError(f"pipeline.steps.{name} names no stage: give it `stage: <tokenizer|base|mid|sft|rl|eval>`")
        argv = [
            "-m",
            "nanochat",
            "train",
            f"stage={stage}",
            *forwarded,
            *data_overrides,
            *map(str, spec.get("overrides") or []),
        ]
        steps.append(Step(name, argv, stage))
    if not steps:
        raise UserError("pipeline.steps is empty: the experiment names no stages to run")
    return steps


class Ledger:
    """runs/<run>/pipeline/steps.json: the steps that finished and the exact command each ran."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if path.exists():
            try:
                self.done = json.loads(path.read_text(encoding="utf-8"))["done"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path} is not a pipeline record (damaged?); delete it to re-run every step") from None

    def finished(self, step: Step) -> bool:
        rec = self.done.get(step.name)
        if rec is None:
            return False
        if rec["argv"] != step.argv:
            raise UserError(
                f"step {step.name!r} of this pipeline already finished with a different command "
                f"({shlex.join(rec['argv'])}); start a new run=<name>, or delete "
                + (f"{self.path.parent.parent / step.stage} and " if step.stage else "")
                + f"the '{step.name}' entry of {self.path} to redo it"
            )
        return True

    def record(self, step: Step, seconds: float) -> None:
        self.done[step.name] = {
            "argv": step.argv,
            "seconds": round(seconds, 1),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write(self.path, json.dumps({"done": self.done}, indent=2))


def device_count(cfg) -> int:
    t = cfg.trainer
    if int(t.get("num_nodes") or 1) > 1:
        raise UserError(
            "a pipeline runs on one node; on a cluster launch each stage with srun/torchrun on every node "
            '(docs/training.md, "Several nodes")'
        )
    devices = t.get("devices")
    if t.get("accelerator") == "cpu" or not isinstance(devices, int):
        return 1
    return devices


def run(cfg) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "start a pipeline with plain `nanochat train experiment=...`: it launches torchrun itself "
            "for the stages that train on several devices"
        )
    t0 = time.perf_counter()
    run_root = Path(cfg.paths.runs_dir) / cfg.run
    nproc = device_count(cfg)
    forwarded = forwarded_overrides()
    data_overrides, prep, announcements = resolve_sources(cfg, forwarded)
    for line in announcements:
        print(line, flush=True)
    steps = plan(cfg, forwarded, data_overrides, prep)
    ledger = Ledger(Path(cfg.paths.run_dir) / "steps.json")
    print(f"pipeline {cfg.run}: {' -> '.join(s.name for s in steps)} (artifacts in {run_root})", flush=True)
    for i, step in enumerate(steps, 1):
        if ledger.finished(step):
            print(f"[{i}/{len(steps)}] {step.name}: finished earlier, skipped", flush=True)
            continue
        print(f"\n[{i}/{len(steps)}] {step.name}\n$ {step.shown(nproc)}", flush=True)
        started = time.perf_counter()
        code = run_child(step.command(nproc))
        if code != 0:
            status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            raise UserError(
                f"step {step.name!r} stopped ({status}; its output is above); re-run the same command to "
                "continue from it"
            )
        ledger.record(step, time.perf_counter() - started)
    write_pipeline_section(run_root, steps, ledger, data_overrides, nproc)
    finish(run_root, steps, time.perf_counter() - t0)


def run_child(cmd: list[str]) -> int:
    """One step's process. Ctrl-C reaches it directly (same process group); a SIGTERM sent to the pipeline alone
    (a scheduler stopping the job) is passed on, so no stage keeps training after its pipeline is gone."""
    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the step got the same Ctrl-C: let it finish stopping, then say how to go on
        proc.wait()
        return -signal.SIGINT
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_pipeline_section(
    run_root: Path, steps: list[Step], ledger: Ledger, data_overrides: list[str], nproc: int
) -> None:
    from nanochat.report import write_section

    seconds = [ledger.done[s.name]["seconds"] for s in steps]
    rows = [[s.name, s.shown(nproc), f"{t:.0f}"] for s, t in zip(steps, seconds)]
    items = {
        "steps": " -> ".join(s.name for s in steps),
        "data": " ".join(data_overrides) or "as configured",
        "steps' wall time": f"{sum(seconds):.0f} s (each step's process, start to exit)",
    }
    write_section(
        run_root,
        "pipeline",
        {
            "title": "Pipeline",
            "items": items,
            "tables": [{"title": "Steps", "columns": ["step", "command", "seconds"], "rows": rows}],
        },
    )


def finish(run_root: Path, steps: list[Step], seconds: float) -> None:
    """Where the report is and how to talk to the model the last training stage exported."""
    exports = [
        run_root / s.stage / "export"
        for s in steps
        if s.stage and (run_root / s.stage / "export" / "config.json").exists()
    ]
    print(f"\npipeline finished in {seconds:.0f} s; report card: {run_root / 'report.md'}")
    if exports:
        last = exports[-1]
        print(f"serve it (chat UI + OpenAI-compatible API): nanochat serve ckpt={last}")
        print(f"or ask it from the terminal: nanochat chat {last} -p 'Why is the sky blue?'")

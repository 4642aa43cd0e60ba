"""Depth sweeps: a Hydra callback that records each multirun job and draws the sweep's scaling-law summary.

    nanochat train -m stage=base model=d4,d6,d8      ->  <home>/sweeps/<date>/<time>/
      sweep_plan.json                  every job of the sweep and its run dir, written before any job starts
      <run>-<num>/sweep_result.json    one job: status, depth, params, training FLOPs, tokens, val/bpb, core/score
      sweep_summary.csv, .png          val bpb (and CORE) against training FLOPs and against parameters
    python -m nanochat.sweep <sweep dir>   rebuilds the summary from those files (e.g. after SLURM jobs end)

A stage's run dir is fixed by its run name and a re-run resumes it, so two jobs of one sweep with the same
run name would train into one directory. The sweep refuses that: from its plan before any job starts, and by
each job claiming its run dir (atomically, in the sweep dir) before it trains, for launchers that run jobs
elsewhere or sweepers whose jobs are not known up front. Single (non -m) runs pass through untouched.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from nanochat.configs import override_key
from nanochat.io import atomic_write

PLAN, RESULT, CLAIMS = "sweep_plan.json", "sweep_result.json", ".run_dirs"
CSV_NAME, PNG_NAME = "sweep_summary.csv", "sweep_summary.png"
COLUMNS = (
    "job",
    "run",
    "stage",
    "depth",
    "params",
    "flops_per_token",
    "tokens",
    "training_flops",
    "val_bpb",
    "core_score",
    "status",
    "overrides",
    "run_dir",
)
# Overrides that pick the depth: the x axis of the picture, so they do not split it into series.
DEPTH_KEYS = ("model", "model.depth", "model.name", "run")
FIX_RUN_NAME = "give each job its own run name, e.g. run='sweep_${model.name}'"


def _is_multirun(config) -> bool:
    from hydra.types import RunMode

    return OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN


def _rank() -> int:
    # SLURM tasks launched by submitit are ranks without torchrun's RANK; only one of them writes results
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _fail(message: str) -> None:
    # SystemExit, not an Exception: Hydra turns a callback's exceptions into warnings and carries on
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _differing(a: list[str], b: list[str]) -> tuple[str, str]:
    return " ".join(o for o in a if o not in b) or "same overrides", " ".join(
        o for o in b if o not in a
    ) or "same overrides"


class SweepSummary(Callback):
    """Registered under `hydra.callbacks`; every hook returns at once outside multirun."""

    def __init__(self) -> None:
        self.ended = False

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        shutil.rmtree(sweep_dir / CLAIMS, ignore_errors=True)  # an earlier sweep's, where hydra.sweep.dir is reused
        plan = planned_jobs(config)
        if plan is not None:
            seen: dict[str, dict] = {}
            for job in plan:
                first = seen.setdefault(job["run_dir"], job)
                if first is not job:
                    a, b = _differing(first["overrides"], job["overrides"])
                    _fail(
                        f"jobs {first['job']} ({a}) and {job['job']} ({b}) of this sweep share the run dir "
                        f"{job['run_dir']} (run={job['run']}), so the second would resume the first's checkpoint; "
                        f"{FIX_RUN_NAME}"
                    )
            atomic_write(sweep_dir / PLAN, json.dumps(plan, indent=2))
        # A failed job makes Hydra raise before on_multirun_end: still leave the summary of the others.
        atexit.register(self._summary_if_not_ended, sweep_dir)

    def on_job_start(self, config, **kwargs) -> None:
        if not _is_multirun(config):
            return
        job = _job_record(config)
        claim_run_dir(Path(str(config.hydra.sweep.dir)), job)
        if _rank() == 0:
            atomic_write(
                Path(config.hydra.runtime.output_dir) / RESULT, json.dumps({**job, "status": "started"}, indent=2)
            )

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        if not _is_multirun(config) or _rank() != 0:
            return
        from hydra.core.utils import JobStatus

        job = _job_record(config)
        if job_return is not None and job_return.status == JobStatus.COMPLETED:
            try:
                job.update(status="completed", **export_numbers(job["run_dir"]))
            except Exception as e:
                job.update(status=f"completed, but its export is unreadable: {' '.join(str(e).split())}")
        else:
            error = getattr(job_return, "_return_value", None)  # `return_value` re-raises a failed job's error
            job.update(status=f"failed: {_describe(error)}")
        atomic_write(Path(config.hydra.runtime.output_dir) / RESULT, json.dumps(job, indent=2))
        write_summary(Path(str(config.hydra.sweep.dir)))  # kept current, so a sweep cut short still has one

    def on_multirun_end(self, config, **kwargs) -> None:
        self.ended = True
        print(summary_line(*write_summary(Path(str(config.hydra.sweep.dir)))), flush=True)

    def _summary_if_not_ended(self, sweep_dir: Path) -> None:
        if self.ended or not any(sweep_dir.rglob(RESULT)):  # no job started: Hydra's own error says it all
            return
        with contextlib.suppress(Exception):  # the job's own error is the news; no second traceback at exit
            print(
                "the sweep ended with an error; " + summary_line(*write_summary(sweep_dir)), file=sys.stderr, flush=True
            )


def _describe(error) -> str:
    from hydra.errors import CompactHydraException

    # a UserError from run_stage arrives as its one-line message; anything else is named by its type
    if error is None:
        return "no error recorded"
    kind = "" if isinstance(error, CompactHydraException) else f"{type(error).__name__}: "
    return kind + " ".join(str(error).split())


def _job_record(config) -> dict:
    return {
        "job": int(config.hydra.job.num),
        "run": str(config.run),
        "stage": str(config.stage.name),
        "run_dir": str(config.paths.run_dir),
        "overrides": _raw_overrides(config),
    }


def _raw_overrides(config) -> list[str]:
    # as typed: iterating the ListConfig would resolve `run=x_${model.name}` against the config at hand
    return OmegaConf.to_container(config.hydra.overrides.task, resolve=False)


def planned_jobs(config) -> list[dict] | None:
    """Each job of a basic-sweeper multirun with its run dir, composed the way the launcher will compose it;
    None for other sweepers or when composing fails (Hydra then reports the bad override itself)."""
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if not str(OmegaConf.select(config, "hydra.sweeper._target_")).endswith(".BasicSweeper"):
            return None
        loader = GlobalHydra.instance().config_loader()
        params = [f"{k}={v}" for k, v in (OmegaConf.select(config, "hydra.sweeper.params") or {}).items()]
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + _raw_overrides(config))
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        plan = []
        for num, overrides in enumerate(jobs):
            cfg = loader.load_sweep_config(config, list(overrides))
            plan.append(
                {
                    "job": num,
                    "run": str(cfg.run),
                    "stage": str(cfg.stage.name),
                    "run_dir": str(cfg.paths.run_dir),
                    "overrides": list(overrides),
                }
            )
        return plan
    except Exception:
        return None


def claim_run_dir(sweep_dir: Path, job: dict) -> None:
    """Record that `job` trains in its run dir; stop it if another job of this sweep got there first.

    The claim is hard-linked into place, so exactly one of two racing jobs wins and a reader never sees a
    half-written claim. The same job claiming again (another rank of it, a requeue) is fine.
    """
    claims = sweep_dir / CLAIMS
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / (hashlib.sha1(job["run_dir"].encode()).hexdigest()[:16] + ".json")
    tmp = claims / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(job))
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        owner = json.loads(path.read_text())
    finally:
        tmp.unlink(missing_ok=True)
    if owner["job"] != job["job"]:
        a, b = _differing(owner["overrides"], job["overrides"])
        _fail(
            f"job {job['job']} ({b}) would train in the run dir {job['run_dir']} that job {owner['job']} ({a}) of this "
            f"sweep already uses (run={job['run']}) and resume its checkpoint; {FIX_RUN_NAME}"
        )


def export_numbers(run_dir: str) -> dict:
    """Size, compute and final metrics of the model a job exported; {} when its stage exports nothing.

    FLOPs are the GPT's own count (`flops_per_token`, as in the log and the report card) times the tokens
    the run trained on; parameters are all of them, embeddings included.
    """
    import torch

    from nanochat.export import CONFIG_FILE, read_export_config
    from nanochat.models.components import GPT, GPTConfig

    export = Path(run_dir) / "export"
    if not (export / CONFIG_FILE).is_file():
        return {}
    saved = read_export_config(export)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(saved["model"]))
    meta, per_token = saved.get("meta", {}), model.flops_per_token()
    metrics, tokens = meta.get("metrics", {}), int(meta.get("tokens") or 0)
    return {
        "depth": model.config.n_layer,
        "params": model.num_params(),
        "flops_per_token": per_token,
        "tokens": tokens,
        "training_flops": per_token * tokens,
        "step": meta.get("step"),
        "val_bpb": metrics.get("val/bpb"),
        "core_score": metrics.get("core/score"),
        "metrics": metrics,
    }


# --- the summary ------------------------------------------------------------------------------------
def collect(sweep_dir: Path) -> list[dict]:
    """One record per job, by job number: its result where it wrote one, else its planned entry."""
    jobs = {}
    if (sweep_dir / PLAN).is_file():
        jobs = {j["job"]: {**j, "status": "not started"} for j in json.loads((sweep_dir / PLAN).read_text())}
    for path in sweep_dir.rglob(RESULT):
        result = json.loads(path.read_text())
        jobs[result["job"]] = result
    return [jobs[k] for k in sorted(jobs)]


def _finished(job: dict) -> bool:
    bpb = job.get("val_bpb")
    return job.get("status") == "completed" and bpb is not None and math.isfinite(bpb) and (job.get("params") or 0) > 0


def write_summary(sweep_dir: Path) -> tuple[Path, Path, list[dict]]:
    jobs = collect(sweep_dir)
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for job in jobs:
        writer.writerow({**{k: job.get(k) for k in COLUMNS}, "overrides": " ".join(job.get("overrides", []))})
    atomic_write(sweep_dir / CSV_NAME, out.getvalue())
    plot(jobs, sweep_dir / PNG_NAME)
    return sweep_dir / CSV_NAME, sweep_dir / PNG_NAME, jobs


def summary_line(csv_path: Path, png_path: Path, jobs: list[dict]) -> str:
    done = [j for j in jobs if _finished(j)]
    line = f"sweep summary: {csv_path} and {png_path} ({len(done)} of {len(jobs)} jobs finished)"
    missing = [
        f"job {j['job']} ({' '.join(d) or 'no overrides'}): {_why(j)}"
        for j, d in zip(jobs, _distinct(jobs))
        if not _finished(j)
    ]
    return line + ("; not finished: " + "; ".join(missing) if missing else "")


def _why(job: dict) -> str:
    status = str(job.get("status"))
    if status == "started":
        return "stopped without a result (killed, or still running)"
    if status == "completed":
        return "completed without an exported val/bpb"
    return status if len(status) < 200 else status[:197] + "..."


def _distinct(jobs: list[dict]) -> list[list[str]]:
    """Each job's overrides that not every job shares: what the sweep varied."""
    sets = [j.get("overrides", []) for j in jobs]
    common = set.intersection(*map(set, sets)) if sets else set()
    return [[o for o in s if o not in common] for s in sets]


def _series(jobs: list[dict]) -> list[str]:
    """A label per job from what sets it apart other than depth: one line per setting in the plot."""
    return [" ".join(o for o in d if override_key(o) not in DEPTH_KEYS) for d in _distinct(jobs)]


def plot(jobs: list[dict], out_png: Path) -> Path:
    """val bpb (top) and CORE (bottom, when any job scored it) against training FLOPs and parameters, log x."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed

    done = [j for j in jobs if _finished(j)]
    metrics = [("val_bpb", "val bpb (bits per byte, held out)")]
    if any(j.get("core_score") is not None for j in done):
        metrics.append(("core_score", "CORE score"))
    axes_x = [("training_flops", "training FLOPs"), ("params", "parameters")]
    fig = Figure(figsize=(10, 3.8 * len(metrics)), dpi=100, layout="constrained")
    fig.suptitle(f"sweep: {len(done)} of {len(jobs)} jobs finished")
    grid = fig.subplots(len(metrics), 2, squeeze=False)
    labels = _series(done)
    for row, (metric, metric_label) in zip(grid, metrics):
        for ax, (x_key, x_label) in zip(row, axes_x):
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric_label)
            ax.grid(True, which="both", alpha=0.3)
            points = [
                (j[x_key], j[metric], j["run"], lab)
                for j, lab in zip(done, labels)
                if j.get(metric) is not None and (j.get(x_key) or 0) > 0
            ]
            if not points:
                ax.text(0.5, 0.5, "no finished job", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.set_xscale("log")
            ax.tick_params(axis="x", which="minor", labelsize=7)  # within a decade matplotlib labels minor ticks too
            for label in sorted({p[3] for p in points}):
                series = sorted(p for p in points if p[3] == label)
                ax.plot([p[0] for p in series], [p[1] for p in series], marker="o", label=label or None)
                for x, y, run, _ in series:
                    ax.annotate(run, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            if any(p[3] for p in points):
                ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(out_png, buf.getvalue())
    return out_png


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m nanochat.sweep",
        description=("Rebuild sweep_summary.csv and sweep_summary.png of a multirun from its jobs' results."),
    )
    parser.add_argument(
        "sweep_dir", type=Path, help="the sweep's directory (hydra.sweep.dir), e.g. <home>/sweeps/<date>/<time>"
    )
    args = parser.parse_args(argv)
    if not (args.sweep_dir / PLAN).is_file() and not any(args.sweep_dir.rglob(RESULT)):
        print(f"error: {args.sweep_dir} holds no {PLAN} or job {RESULT}: not the directory of a sweep", file=sys.stderr)
        return 2
    print(summary_line(*write_summary(args.sweep_dir)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The training stages' section of the report card: what was trained, at what cost, to what result.

At the end of training (after the last step's evaluations) it gathers the module's configuration and totals,
the final metrics, the evaluation callbacks' tables and a PNG of the loss curves, and writes them as the
stage's section of `runs/<run>/report.md` (nanochat.report).
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import lightning as L
import torch

from nanochat.callbacks.periodic import EvalCallback
from nanochat.callbacks.val_bpb import ValBPB
from nanochat.loggers import log_report_artifact
from nanochat.report import plot_curves, start_run, write_section

log = logging.getLogger(__name__)

REPORTED_METRICS = ("train/loss", "val/bpb", "val/loss", "rl/reward", "rl/seq_len")  # evaluators add their own


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA, allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS)"


def metrics_csv(trainer: L.Trainer) -> Path | None:
    """The CSV logger's file, flushed so it holds the last steps too."""
    from lightning.pytorch.loggers import CSVLogger

    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            logger.save()
            return Path(logger.experiment.metrics_file_path)
    return None


class ReportCard(L.Callback):
    def __init__(self, run_root: str, stage: str, curves: list[str] | tuple[str, ...] = ("train/loss", "val/bpb")):
        self.run_root = Path(run_root)
        self.stage = stage
        self.curves = tuple(curves)  # the metrics plotted, one panel each
        self.t0 = time.perf_counter()

    def on_fit_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()
        if trainer.is_global_zero:
            start_run(self.run_root)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        section = {
            "items": pl_module.report_items(),
            "metrics": {},
            "tables": [],
            "notes": [],
            "wall_time_s": time.perf_counter() - self.t0,
        }
        section["items"].update(
            {
                "world size": trainer.world_size,
                "precision": str(trainer.precision),
                "wall time": f"{section['wall_time_s']:.1f} s",
                "peak memory": peak_memory(pl_module.device),
            }
        )
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        section["metrics"] = {k: metrics[k] for k in REPORTED_METRICS if k in metrics}
        bpbs = [bpb for c in trainer.callbacks if isinstance(c, ValBPB) for _, bpb in c.history]
        if bpbs:
            section["metrics"]["val/bpb (min)"] = min(bpbs)
        for callback in trainer.callbacks:
            extra = callback.evaluator.report() if isinstance(callback, EvalCallback) else {}
            section["tables"] += extra.get("tables", [])
            section["metrics"].update(extra.get("metrics", {}))
            section["notes"] += extra.get("notes", [])
        csv = metrics_csv(trainer)
        png = self.run_root / "report" / f"{self.stage}_curves.png"
        if csv is not None and plot_curves(csv, png, f"{self.stage}: training curves", self.curves) is not None:
            section["plots"] = [str(png.relative_to(self.run_root))]
        path = write_section(self.run_root, self.stage, section)
        log.info(f"report card: {path}")
        log_report_artifact(trainer, path)

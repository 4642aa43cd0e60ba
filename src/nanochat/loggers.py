"""Logger tweaks the stock Lightning loggers need for resumable runs (and W&B without a key).

Nothing here imports wandb unless `logger=wandb` instantiates a WandbLogger or one is among a trainer's loggers.
"""

from __future__ import annotations

import csv
import io
import logging
import netrc
import os
import re
import secrets
import string
from pathlib import Path
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from nanochat.errors import UserError
from nanochat.io import atomic_write

log = logging.getLogger(__name__)


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here; a resumed run should extend its curves instead.
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning rewrites the file in place, so a kill in the middle would lose every row logged so far.
        with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, buf.getvalue())


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, except that a resumed run appends to `metrics.csv` rather than wiping it, rows are
    written when logged (Lightning buffers 100 steps, which a kill would lose), and `rewind` drops rows logged
    after the checkpoint a run resumes from."""

    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs):
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @rank_zero_only
    def rewind(self, step: int) -> None:
        """Keep the rows up to `step` (the checkpoint a run resumes from), dropping later ones and a torn last line."""
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not path.is_file():
            return
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            return
        header, col = rows[0], rows[0].index("step")
        kept = [r for r in rows[1:] if len(r) == len(header) and r[col].isdigit() and int(r[col]) <= step]
        if len(kept) < len(rows) - 1:
            buf = io.StringIO()
            csv.writer(buf).writerows([header, *kept])
            atomic_write(path, buf.getvalue())
            log.info(
                f"{path}: dropped {len(rows) - 1 - len(kept)} row(s) logged after step {step} by the interrupted run"
            )

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# --- Weights & Biases ----------------------------------------------------------------------------------------
WANDB_MISSING = "logger=wandb needs the wandb package: pip install 'nanochat[wandb]'"


def has_wandb_credentials() -> bool:
    """An API key in the environment or a netrc login for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_run_id(run_dir: Path, resume) -> tuple[str, bool]:
    """(id, is_new): the id saved in the run dir when training resumes from a checkpoint, else a fresh one.

    Tying the W&B run to the checkpoint rather than to the run's name means a deleted and restarted run dir
    gets a new W&B run instead of appending a second step 0 to the old one.
    """
    from nanochat.stages.fit import resume_checkpoint

    path = run_dir / "wandb_id"
    if resume_checkpoint(resume, run_dir / "checkpoints") and path.is_file():
        return path.read_text().strip(), False
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8)), True


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger that resumes with its run dir, goes offline without credentials and finishes.

    `resume_from` is the training resume setting (auto/never/a checkpoint); everything else goes to Lightning's
    WandbLogger and from there to `wandb.init`. WANDB_MODE, when set, is left to wandb.
    """

    def __init__(self, run_dir: str, resume_from=None, **kwargs):
        try:
            import wandb  # noqa: F401  (Lightning checks package metadata only; this catches a broken install too)
        except ImportError:
            raise UserError(WANDB_MISSING) from None
        self._run_dir = Path(run_dir)
        run_id, self._new_id = wandb_run_id(self._run_dir, resume_from)
        # Why the run is offline, if it is (not Lightning's `_offline`, which would set WANDB_MODE process-wide).
        self._offline_reason = None
        if "WANDB_MODE" not in os.environ and "mode" not in kwargs and not has_wandb_credentials():
            kwargs["mode"], self._offline_reason = "offline", "no WANDB_API_KEY and no `wandb login`"
        elif kwargs.get("mode", os.environ.get("WANDB_MODE")) in ("offline", "dryrun"):
            self._offline_reason = "WANDB_MODE=offline"
        from nanochat.report import REPO

        # W&B looks for git in the run dir; point it at this checkout (or nowhere) rather than warn each run.
        git = {"git_root": str(REPO)} if (REPO / ".git").exists() else {"disable_git": True}
        kwargs["settings"] = {**git, **(kwargs.get("settings") or {})}
        super().__init__(id=run_id, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning always passes it; wandb 0.31 warns about it
            del self._wandb_init["anonymous"]

    @property
    @rank_zero_experiment
    def experiment(self):
        created = self._experiment is None
        run = super().experiment
        if created:
            if self._new_id:  # only rank zero gets here, and only once the W&B run really exists
                atomic_write(self._run_dir / "wandb_id", run.id + "\n")
            if self._offline_reason:
                run_dir = Path(run.dir).parent  # run.dir is <wandb dir>/offline-run-<time>-<id>/files
                # The glob also picks up the earlier pieces of a resumed run; wandb syncs them in order.
                log.info(
                    f"W&B is offline ({self._offline_reason}): this run logs to {run_dir}; upload it later "
                    f"with `wandb sync {run_dir.parent}/offline-run-*-{run.id}`"
                )
        return run

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        # Lightning leaves the run open: finishing flushes offline files now, and lets a later WandbLogger
        # in this process start its own run instead of reusing this one.
        if self._experiment is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)


def log_report_artifact(trainer, report_md: Path) -> None:
    """Attach report.md and the plots it links (report/*.png) to each W&B run of `trainer` as a `report` artifact."""
    for logger in trainer.loggers:
        if not isinstance(logger, LightningWandbLogger):
            continue
        import wandb

        root = report_md.parent
        # One artifact name per pipeline run: each stage adds a version of the same, growing report card.
        artifact = wandb.Artifact(re.sub(r"[^\w.-]", "-", f"{root.name}-report"), type="report")
        artifact.add_file(str(report_md), name="report.md")
        for png in sorted((root / "report").glob("*.png")):
            artifact.add_file(str(png), name=f"report/{png.name}")
        logger.experiment.log_artifact(artifact)

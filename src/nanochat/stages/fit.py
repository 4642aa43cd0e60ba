"""The training stages' entry point: instantiate what the config names and `trainer.fit` it.

    datamodule, module, callbacks, loggers  <- cfg.datamodule, cfg.module, cfg.callbacks, cfg.logger
    Trainer                                 <- cfg.trainer, max_steps = the module's horizon for this data
    ckpt_path                               <- resume=auto: checkpoints/last.ckpt of this run dir, if any

SIGTERM or SIGUSR1 ends the run after the current step with a checkpoint (callbacks.Preemption) and exit status
128 + the signal's number, so a pipeline or a scheduler sees an interrupted run, not a finished one.
"""

from __future__ import annotations

import logging
import signal
import warnings
from pathlib import Path

from nanochat.errors import UserError

log = logging.getLogger(__name__)


def resume_checkpoint(resume: str | None, checkpoint_dir: Path) -> str | None:
    """`auto`: the run's last checkpoint if there is one; `never`/null: start fresh; else a checkpoint path."""
    if resume in (None, "never", False):
        return None
    if resume == "auto":
        from nanochat.checkpoint import latest_checkpoint

        found = latest_checkpoint(checkpoint_dir)
        return str(found) if found else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise UserError(f"resume={resume} is not a checkpoint file (use resume=auto, resume=never or a .ckpt path)")
    return str(path)


def quiet_lightning_logging() -> None:
    """One copy of each Lightning message (its own console handler duplicates Hydra's) and no product tips."""
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        lightning_logger.handlers.clear()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropTips())
    # Both are about choices made on purpose: checkpoints after the optimizer step; Lightning's own pytree use.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def build(cfg):
    """(trainer, module, datamodule, ckpt_path) for a training config; what `run` fits and tests inspect."""
    import lightning as L
    from hydra.utils import instantiate

    from nanochat.models.horizon import resolve_total_batch_size

    quiet_lightning_logging()
    resolve_total_batch_size(cfg)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = Path(cfg.paths.run_dir)
    datamodule = instantiate(cfg.datamodule, _convert_="all")
    module = instantiate(cfg.module, _convert_="object")  # typed settings arrive as their dataclasses
    callbacks = [instantiate(c, _convert_="all") for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c, _convert_="all") for c in (cfg.get("logger") or {}).values() if c]
    trainer = instantiate(
        cfg.trainer,
        max_steps=module.fit_horizon(datamodule),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(run_dir),
    )
    ckpt_path = resume_checkpoint(cfg.resume, run_dir / "checkpoints")
    if ckpt_path:  # resuming into our own checkpoint directory is the point, not a hazard
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    return trainer, module, datamodule, ckpt_path


def run(cfg) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from omegaconf import OmegaConf

    from nanochat.io import atomic_write
    from nanochat.precision import of_trainer

    trainer, module, datamodule, ckpt_path = build(cfg)
    run_dir = Path(cfg.paths.run_dir)
    if trainer.is_global_zero:
        log.info(
            f"{of_trainer(cfg.precision, trainer.strategy.root_device.type, trainer.precision)} "
            f"on {trainer.strategy.root_device}"
        )
        atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        for logger in trainer.loggers:  # W&B's run config (CSV: logs/hparams.yaml)
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        log.info(f"run dir: {run_dir}" + (f" (resuming from {ckpt_path})" if ckpt_path else ""))
    rewind_loggers(trainer, ckpt_path)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        from nanochat.callbacks.preemption import Preemption

        signum = next(
            (c.received for c in trainer.callbacks if isinstance(c, Preemption) and c.received), signal.SIGTERM
        )
        if trainer.is_global_zero:
            log.warning(
                f"stopped by {signal.Signals(signum).name} after step {trainer.global_step}; "
                f"run the same command again to resume from {run_dir / 'checkpoints'}"
            )
        raise SystemExit(128 + signum) from None


def rewind_loggers(trainer, ckpt_path: str | None) -> None:
    """Drop what the loggers recorded after the checkpoint: a killed run's last steps are about to be trained again.

    Without a checkpoint the run starts over, so everything an earlier attempt logged goes (step -1).
    """
    import torch

    step = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)["global_step"] if ckpt_path else -1
    for logger in trainer.loggers:
        if hasattr(logger, "rewind") and trainer.is_global_zero:
            logger.rewind(step)

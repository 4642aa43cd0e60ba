"""Pre-emption: on SIGTERM or SIGUSR1 finish the current step, write `last.ckpt`, and stop.

SLURM sends SIGTERM before killing a pre-empted job (and SIGUSR1 ahead of the time limit with
`--signal=USR1@<seconds>`); a cloud spot instance's shutdown sends SIGTERM. A handler only raises a flag:
Lightning's loop checks it after each step's callbacks (and under DDP broadcasts rank 0's flag every step, so
all ranks stop after the same step) and raises SIGTERMException; `on_exception` then saves the checkpoint
and `stages.fit.run` exits with 128 + the signal number. Saving inside the handler instead could catch the
model half-way through an optimizer step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class Preemption(L.Callback):
    def __init__(self, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning registers its SIGTERM handler just before this hook and restores the previous handlers at teardown.
        if threading.current_thread() is not threading.main_thread():
            return

        def raise_flag(signum, frame):
            self.received = signum
            trainer._signal_connector.received_sigterm = True  # what Lightning's loop checks after each step

        for signum in self.signals:
            signal.signal(signum, raise_flag)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        ckpt = trainer.checkpoint_callback
        if ckpt is None or not ckpt.dirpath:
            log.warning("stopped by a signal, but no checkpoint callback is configured: nothing saved")
            return
        if ckpt._last_global_step_saved == trainer.global_step and ckpt.last_model_path:
            return  # this step's checkpoint is already on disk
        path = os.path.join(ckpt.dirpath, ckpt.CHECKPOINT_NAME_LAST + ckpt.FILE_EXTENSION)
        ckpt.last_model_path = path  # part of the saved state: a resume keeps writing last.ckpt, not last-v1.ckpt
        trainer.save_checkpoint(path)
        ckpt._last_global_step_saved = trainer.global_step
        if trainer.is_global_zero:
            log.info(f"signal received: saved step {trainer.global_step} to {path}")

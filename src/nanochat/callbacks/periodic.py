"""What the evaluation callbacks share: when to run, how to log, and keeping eval time out of tok/s."""

from __future__ import annotations

import time
from contextlib import contextmanager

import lightning as L
import torch


def log_scalars(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Write scalars to every logger at the current optimizer step (usable in hooks where `self.log` is not)."""
    for name, value in metrics.items():
        trainer.callback_metrics[name] = value
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class Periodic(L.Callback):
    """Runs `run(trainer, pl_module)` every `every_n_steps` optimizer steps (0: never), after the last step,
    and at the start when `at_start`; never twice for the same step (an eval step that is also the last)."""

    at_start = False

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self.last_step = -1

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def _run_once(self, trainer, pl_module) -> None:
        if trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            self.run(trainer, pl_module)

    def on_train_start(self, trainer, pl_module):
        if self.at_start:
            self._run_once(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # The last step's evaluation runs here, before any callback's on_train_end (export, report) reads it.
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if last or (self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0):
            self._run_once(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._run_once(trainer, pl_module)


class EvalCallback(Periodic):
    """Runs an evaluator of nanochat.eval during training: every `every_n_steps` optimizer steps (0: never), after
    the last step, and at the start when `at_start`; logs its metrics at the step. Its results survive a resume
    (the evaluator's history is in the checkpoint), so the report of a resumed run shows them all."""

    def __init__(self, evaluator, every_n_steps: int = 0, at_start: bool = False):
        super().__init__(every_n_steps)
        self.evaluator, self.at_start = evaluator, at_start

    @property
    def state_key(self) -> str:  # one checkpoint entry per evaluator, though every one is an EvalCallback
        return f"EvalCallback[{type(self.evaluator).__name__}]"

    def setup(self, trainer, pl_module, stage):
        self.evaluator.load()  # missing data shows at the start of the run, not after it

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.evaluator.load() is None:
            return
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        with evaluating(trainer, pl_module):
            result = self.evaluator.evaluate(
                pl_module.model,
                pl_module.tokenizer,
                trainer.global_rank,
                trainer.world_size,
                reduce,
                step=trainer.global_step,
            )
        log_scalars(trainer, result["metrics"])
        if trainer.is_global_zero:
            self.evaluator.log_latest(f"step {trainer.global_step}: ")

    def state_dict(self) -> dict:
        return {**self.evaluator.state_dict(), "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.load_state_dict(state)
        self.last_step = state.get("last_step", -1)


@contextmanager
def evaluating(trainer: L.Trainer, pl_module: L.LightningModule):
    """Eval mode, no grad, the trainer's precision context, fp8 layers as plain ones (evaluation in bf16); the time
    spent is excluded from throughput."""
    from nanochat.models.float8 import plain_linears

    t0 = time.perf_counter()
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad(), trainer.precision_plugin.forward_context(), plain_linears(pl_module.model):
            yield
    finally:
        pl_module.train(was_training)
        pl_module.meter.excluded_seconds += time.perf_counter() - t0

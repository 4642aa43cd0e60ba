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


class Evaluator(Periodic):
    """A periodic evaluation that also runs outside training (`stage=eval`): `evaluate(model, tokenizer, rank,
    world_size, reduce)` keeps its result as `latest`, whose "metrics" are logged; `report()` is its report-card
    part. A subclass says how to load its data, compute a result, log it, and table it."""

    latest: dict | None = None

    def load(self):
        """The evaluation data, loaded once; None when there is none and the evaluation is optional."""
        raise NotImplementedError

    def compute(self, model, tokenizer, data, rank: int, world_size: int, reduce, show_progress: bool) -> dict:
        """{"metrics": {...}, ...} on `data` (what `load` returned), examples strided over ranks and `reduce`d."""
        raise NotImplementedError

    def log_latest(self, prefix: str = "", tasks: bool = True) -> None:
        raise NotImplementedError

    def tables(self) -> list[dict]:
        raise NotImplementedError

    def note(self) -> str:
        """One line on how the numbers were obtained (examples, samples), for the report."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, rank: int = 0, world_size: int = 1, reduce=None, show_progress=False) -> dict:
        self.latest = self.compute(model, tokenizer, self.load(), rank, world_size, reduce, show_progress)
        return self.latest

    def report(self) -> dict:
        if self.latest is None:
            return {}
        return {"tables": self.tables(), "metrics": dict(self.latest["metrics"]), "notes": [self.note()]}

    def setup(self, trainer, pl_module, stage):
        self.load()  # missing data shows at the start of the run, not after it

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.load() is None:
            return
        reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
        with evaluating(trainer, pl_module):
            result = self.evaluate(pl_module.model, pl_module.tokenizer, trainer.global_rank, trainer.world_size, reduce)
        log_scalars(trainer, result["metrics"])
        if trainer.is_global_zero:
            self.log_latest(f"step {trainer.global_step}: ")


@contextmanager
def evaluating(trainer: L.Trainer, pl_module: L.LightningModule):
    """Eval mode, no grad, the trainer's precision context; the time spent is excluded from throughput."""
    t0 = time.perf_counter()
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            yield
    finally:
        pl_module.train(was_training)
        if hasattr(pl_module, "excluded_seconds"):
            pl_module.excluded_seconds += time.perf_counter() - t0


"""val/bpb and val/loss during training: bits per byte (nanochat.eval.bpb) on the DataModule's held-out rows."""

from __future__ import annotations

import logging

import lightning as L

from nanochat.callbacks.periodic import Periodic, evaluating, log_scalars
from nanochat.eval.bpb import validation_losses

log = logging.getLogger(__name__)


class ValBPB(Periodic):
    """`val/bpb` and `val/loss` at the start, every `every_n_steps` optimizer steps and at the end, on `eval_tokens`
    held-out tokens (the SFT data yields (inputs, targets) pairs: only the assistant's trained tokens count)."""

    at_start = True  # the baseline every later value is compared with

    def __init__(self, every_n_steps: int, eval_tokens: int, batch_size: int | None = None):
        super().__init__(every_n_steps)
        self.eval_tokens = eval_tokens
        self.batch_size = batch_size
        self.history: list[tuple[int, float]] = []

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        token_bytes = pl_module.tokenizer.token_bytes().to(pl_module.device)
        batches = trainer.datamodule.val_batches(self.eval_tokens, self.batch_size)
        with evaluating(trainer, pl_module):
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
            bpb, loss = validation_losses(pl_module.model, batches, token_bytes, reduce=reduce)
        self.history.append((trainer.global_step, bpb))
        log_scalars(trainer, {"val/bpb": bpb, "val/loss": loss})
        if trainer.is_global_zero:
            log.info(f"step {trainer.global_step}: val/bpb {bpb:.4f} | val/loss {loss:.4f}")

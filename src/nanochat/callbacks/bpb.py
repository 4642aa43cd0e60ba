"""Validation bits per byte (nanochat's loss_eval): cross-entropy per UTF-8 byte, comparable across tokenizers.

    bpb = sum of per-token losses (nats) / (ln 2 * sum of the target tokens' byte lengths)

Special-token targets (byte length 0, such as <|bos|>) and ignored targets (-1) count in neither sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import lightning as L
import torch

from nanochat.callbacks.common import Periodic, evaluating, log_scalars

log = logging.getLogger(__name__)


def bpb_sums(model, rows: torch.Tensor, token_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nats, bytes) summed over one batch of (B, T+1) token rows."""
    x, y = rows[:, :-1], rows[:, 1:].contiguous()
    nats = model(x, y, loss_reduction="none").view(-1).float()
    y = y.view(-1)
    nbytes = torch.where(y >= 0, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
    counted = nbytes > 0
    return (nats * counted).sum(), nbytes.sum().to(torch.float64)


def bits_per_byte(model, batches: Iterable[torch.Tensor], token_bytes: torch.Tensor, reduce=None) -> float:
    """bpb over all batches; `reduce` sums a tensor across ranks (identity on one process)."""
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for rows in batches:
        n, b = bpb_sums(model, rows.to(device), token_bytes)
        nats += n.double()
        nbytes += b
    if reduce is not None:
        nats, nbytes = reduce(nats), reduce(nbytes)
    if nbytes.item() == 0:
        raise ValueError("no target bytes to evaluate bits per byte on")
    return (nats / (math.log(2) * nbytes)).item()


class ValBPB(Periodic):
    """`val/bpb` at the start, every `every_n_steps` optimizer steps and at the end, on `eval_tokens` held-out tokens."""

    at_start = True  # the baseline every later value is compared with

    def __init__(self, every_n_steps: int = 250, eval_tokens: int = 10_485_760, batch_size: int | None = None):
        super().__init__(every_n_steps)
        self.eval_tokens = eval_tokens
        self.batch_size = batch_size
        self.history: list[tuple[int, float]] = []

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        token_bytes = pl_module.tokenizer.token_bytes().to(pl_module.device)
        batches = trainer.datamodule.val_batches(self.eval_tokens, self.batch_size)
        with evaluating(trainer, pl_module):
            reduce = lambda t: trainer.strategy.reduce(t, reduce_op="sum")  # noqa: E731
            bpb = bits_per_byte(pl_module.model, batches, token_bytes, reduce=reduce)
        self.history.append((trainer.global_step, bpb))
        log_scalars(trainer, {"val/bpb": bpb})
        if trainer.is_global_zero:
            log.info(f"step {trainer.global_step}: val/bpb {bpb:.4f}")

"""Bits per byte (nanochat's loss_eval): cross-entropy per UTF-8 byte, comparable across tokenizers.

    bpb = sum of per-token losses (nats) / (ln 2 * sum of the target tokens' byte lengths)

Special-token targets (byte length 0, such as <|bos|>) and ignored targets (-1) count in neither sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def bpb_sums(model, batch, token_bytes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nats over byte-carrying targets, their bytes, nats over all targets, number of targets) for one batch:
    (B, T+1) token rows, or an (inputs, targets) pair whose targets are -1 where nothing is evaluated."""
    x, y = (batch[:, :-1], batch[:, 1:].contiguous()) if isinstance(batch, torch.Tensor) else batch
    nats = model(x, y, loss_reduction="none").view(-1).float()
    y = y.reshape(-1)
    valid = y >= 0
    nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
    counted = nbytes > 0
    return (nats * counted).sum(), nbytes.sum().to(torch.float64), (nats * valid).sum(), valid.sum().to(torch.float64)


def validation_losses(model, batches: Iterable, token_bytes: torch.Tensor, reduce=None) -> tuple[float, float]:
    """(bits per byte, mean loss in nats per target token) over all batches; `reduce` sums a tensor across ranks."""
    device = token_bytes.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device) if isinstance(batch, torch.Tensor) else tuple(t.to(device) for t in batch)
        sums += torch.stack([t.double() for t in bpb_sums(model, batch, token_bytes)])
    if reduce is not None:
        sums = reduce(sums)
    nats, nbytes, all_nats, count = sums.tolist()
    if nbytes == 0 or count == 0:
        raise ValueError("no target bytes to evaluate bits per byte on")
    return nats / (math.log(2) * nbytes), all_nats / count


def bits_per_byte(model, batches: Iterable, token_bytes: torch.Tensor, reduce=None) -> float:
    return validation_losses(model, batches, token_bytes, reduce)[0]

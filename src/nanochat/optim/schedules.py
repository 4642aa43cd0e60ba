"""Schedules as pure functions of the optimizer step (nanochat's base_train defaults)."""

from __future__ import annotations

from nanochat.errors import UserError


def lr_multiplier(
    step: int, num_steps: int, warmup_ratio: float = 0.0, warmdown_ratio: float = 0.2, final_lr_frac: float = 0.0
) -> float:
    """Linear warmup over the first warmup_ratio of steps, flat, then linear decay to final_lr_frac at num_steps."""
    if not (0 <= warmup_ratio <= 1 and 0 <= warmdown_ratio <= 1 and warmup_ratio + warmdown_ratio <= 1):
        raise UserError(
            f"schedule ratios warmup={warmup_ratio}, warmdown={warmdown_ratio} must lie in [0, 1] and sum to at most 1"
        )
    warmup = round(warmup_ratio * num_steps)
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_steps - warmdown:
        return 1.0
    progress = max(0.0, (num_steps - step) / warmdown)  # 1 at the start of warmdown, 0 at num_steps
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Momentum ramps linearly from `start` to `end` over the first warmup_steps, then stays at `end`."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end

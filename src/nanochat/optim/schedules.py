"""Schedules as pure functions of the optimizer step and the stage's ScheduleConfig (nanochat's base_train shapes)."""

from __future__ import annotations

from nanochat.settings import ScheduleConfig


def lr_multiplier(step: int, num_steps: int, schedule: ScheduleConfig) -> float:
    """init_lr_frac x (linear warmup over the first warmup_ratio of steps, flat, linear decay to final_lr_frac)."""
    warmup = round(schedule.warmup_ratio * num_steps)
    warmdown = round(schedule.warmdown_ratio * num_steps)
    if step < warmup:
        shape = (step + 1) / warmup
    elif step <= num_steps - warmdown:
        shape = 1.0
    else:
        progress = max(0.0, (num_steps - step) / warmdown)  # 1 at the start of warmdown, 0 at num_steps
        shape = progress + (1 - progress) * schedule.final_lr_frac
    return schedule.init_lr_frac * shape


def muon_momentum(step: int, schedule: ScheduleConfig) -> float:
    """Momentum ramps linearly from momentum_start to momentum_end over the first momentum_warmup_steps."""
    steps = schedule.momentum_warmup_steps
    frac = min(step / steps, 1.0) if steps > 0 else 1.0
    return (1 - frac) * schedule.momentum_start + frac * schedule.momentum_end

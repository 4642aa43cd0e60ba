"""Schedules as pure functions of the optimizer step and the stage's ScheduleConfig (nanochat's base_train shapes)."""

from __future__ import annotations

import math

from nanochat.settings import ScheduleConfig


def warmup_steps(num_steps: int, schedule: ScheduleConfig) -> int:
    return schedule.warmup_steps if schedule.warmup_steps >= 0 else round(schedule.warmup_ratio * num_steps)


def lr_multiplier(step: int, num_steps: int, schedule: ScheduleConfig) -> float:
    """init_lr_frac x (linear warmup, flat, linear decay to final_lr_frac over the last warmdown_ratio of steps)."""
    warmup = warmup_steps(num_steps, schedule)
    warmdown = round(schedule.warmdown_ratio * num_steps)
    if step < warmup:
        shape = (step + 1) / warmup
    elif step <= num_steps - warmdown:
        shape = 1.0
    else:
        progress = max(0.0, (num_steps - step) / warmdown)  # 1 at the start of warmdown, 0 at num_steps
        shape = progress + (1 - progress) * schedule.final_lr_frac
    return schedule.init_lr_frac * shape


def muon_momentum(step: int, schedule: ScheduleConfig, num_steps: int | None = None) -> float:
    """Momentum ramps linearly from momentum_start to momentum_end over the first momentum_warmup_steps; with
    momentum_final set (and the run's num_steps given), it then moves linearly to that over the lr warmdown."""
    steps = schedule.momentum_warmup_steps
    if step < steps:
        frac = step / steps
        return (1 - frac) * schedule.momentum_start + frac * schedule.momentum_end
    warmdown = round(schedule.warmdown_ratio * num_steps) if num_steps else 0
    if schedule.momentum_final is not None and warmdown and step >= num_steps - warmdown:
        progress = (step - (num_steps - warmdown)) / warmdown
        return (1 - progress) * schedule.momentum_end + progress * schedule.momentum_final
    return schedule.momentum_end


def muon_weight_decay_multiplier(step: int, num_steps: int, schedule: ScheduleConfig) -> float:
    """1 throughout (constant), or a cosine from 1 at step 0 to 0 at num_steps (cosine)."""
    if schedule.muon_weight_decay_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / num_steps))
    return 1.0

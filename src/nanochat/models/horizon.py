"""How long and how wide a run is: gradient accumulation and the token horizon, derived in one place.

Depth is the one dial: the model size follows from it, the horizon from the model size (tokens = ratio x
parameters unless a step count or FLOP budget says otherwise), and gradient accumulation from the batch
sizes and the number of ranks. Every stage that trains reads these functions; nothing recomputes them.
"""

from __future__ import annotations

from nanochat.errors import UserError


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that every step sees exactly `total_batch_size` tokens."""
    per_pass = device_batch_size * seq_len * world_size
    if total_batch_size <= 0 or total_batch_size % per_pass:
        raise UserError(
            f"total_batch_size={total_batch_size:,} tokens is not a positive multiple of device_batch_size x "
            f"sequence_len x world_size = {device_batch_size} x {seq_len} x {world_size} = {per_pass:,}; "
            f"change model.total_batch_size or model.device_batch_size"
        )
    return total_batch_size // per_pass


def num_iterations(
    *,
    num_params: int,
    flops_per_token: int,
    total_batch_size: int,
    num_iterations: int = -1,
    target_flops: float = -1,
    param_data_ratio: float = 20,
) -> int:
    """Optimizer steps, by precedence: an explicit step count, else a FLOP budget, else tokens:params ratio."""
    if num_iterations > 0:
        steps = num_iterations
    elif target_flops > 0:
        steps = round(target_flops / (flops_per_token * total_batch_size))
    elif param_data_ratio > 0:
        steps = int(param_data_ratio * num_params) // total_batch_size  # Chinchilla: ~20 tokens per parameter
    else:
        raise UserError("set one of num_iterations, target_flops or param_data_ratio to a positive value")
    if steps < 1:
        raise UserError(f"the training horizon comes to {steps} steps; raise num_iterations, target_flops or the ratio")
    return steps

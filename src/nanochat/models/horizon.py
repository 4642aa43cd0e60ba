"""How long and how wide a run is: gradient accumulation and the token horizon, derived in one place.

Depth is the one dial: the model size follows from it, the horizon from the model size (tokens = ratio x
parameters unless a step count or FLOP budget says otherwise), and gradient accumulation from the batch
sizes and the number of ranks. Every stage that trains reads these functions; nothing recomputes them.
"""

from __future__ import annotations

from nanochat.errors import UserError
from nanochat.settings import HorizonConfig


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


def examples_grad_accum(examples_per_step: int, device_batch_size: int, world_size: int) -> int:
    """Micro-batches per step when a step is `examples_per_step` examples (conversations, questions) over all ranks."""
    per_pass = device_batch_size * world_size
    if examples_per_step <= 0 or examples_per_step % per_pass:
        raise UserError(
            f"examples_per_step={examples_per_step} is not a positive multiple of device_batch_size x world_size "
            f"= {device_batch_size} x {world_size}; change datamodule.examples_per_step or datamodule.device_batch_size"
        )
    return examples_per_step // per_pass


def num_iterations(*, num_params: int, flops_per_token: int, total_batch_size: int, horizon: HorizonConfig) -> int:
    """Optimizer steps, by precedence: an explicit step count, else a FLOP budget, else tokens:params ratio."""
    if horizon.num_iterations > 0:
        steps = horizon.num_iterations
    elif horizon.target_flops > 0:
        steps = round(horizon.target_flops / (flops_per_token * total_batch_size))
    elif horizon.param_data_ratio > 0:
        steps = int(horizon.param_data_ratio * num_params) // total_batch_size  # Chinchilla: ~20 tokens per parameter
    else:
        raise UserError("set one of num_iterations, target_flops or param_data_ratio to a positive value")
    if steps < 1:
        raise UserError(f"the training horizon comes to {steps} steps; raise num_iterations, target_flops or the ratio")
    return steps

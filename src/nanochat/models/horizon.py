"""How long and how wide a run is: gradient accumulation and the token horizon, derived in one place.

Depth is the one dial: the model size follows from it, the horizon from the model size (tokens = ratio x
parameters unless a step count or FLOP budget says otherwise), and gradient accumulation from the batch
sizes and the number of ranks. Every stage that trains reads these functions; nothing recomputes them.
"""

from __future__ import annotations

import logging
import math

from nanochat.errors import UserError
from nanochat.settings import HorizonConfig, TransferConfig

log = logging.getLogger(__name__)

SCALING_ROLES = ("matrix", "unembedding")  # the parameters nanochat's 2026 scaling laws count
SHAPE_KEYS = ("aspect_ratio", "head_dim", "n_kv_head")  # the pretraining module's sizing keys besides depth


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


def scaling_params(model) -> int:
    """Block matrices + output head: the parameter count nanochat's 2026 horizon and transfer rules use (embeddings,
    value embeddings and scalars left out)."""
    roles = model.param_roles()
    return sum(p.numel() for role in SCALING_ROLES for p in roles[role])


def ratio_params(model, horizon: HorizonConfig) -> int:
    """The parameters `param_data_ratio` counts: all of them, or the block matrices + output head."""
    return model.num_params() if horizon.ratio_params == "total" else scaling_params(model)


def shape_scaling_params(depth: int, vocab_size: int, sequence_len: int, **shape) -> int:
    """scaling_params of the GPT `GPTConfig.from_depth(depth, ...)` describes, counted on the meta device."""
    import torch

    from nanochat.models.components import GPT, GPTConfig

    with torch.device("meta"):
        return scaling_params(GPT(GPTConfig.from_depth(depth, vocab_size, sequence_len, **shape)))


def auto_batch_size(params: int, reference_params: int, transfer: TransferConfig) -> int:
    """Tokens per step for a horizon of `params` against the reference's: B_ref x (D / D_ref)^exponent, to the nearest
    power of 2 (the optimal batch grows as a power of the horizon; the ratio cancels in D / D_ref)."""
    predicted = transfer.reference_batch_size * (params / reference_params) ** transfer.batch_exponent
    return 2 ** round(math.log2(predicted))


def transfer_scales(
    total_batch_size: int, params: int, reference_params: int, transfer: TransferConfig
) -> tuple[float, float]:
    """(lr scale, Muon weight-decay scale) for this batch and horizon: sqrt(B / B_ref) for the lrs; for the weight decay
    sqrt(B / B_ref) x D_ref / D, which keeps B / (lr x wd x D) constant. 1.0 where `transfer` switches one off."""
    batch = (total_batch_size / transfer.reference_batch_size) ** 0.5
    return (batch if transfer.lr else 1.0), (batch * reference_params / params if transfer.weight_decay else 1.0)


def num_iterations(*, num_params: int, flops_per_token: int, total_batch_size: int, horizon: HorizonConfig) -> int:
    """Optimizer steps, by precedence: an explicit step count, else a FLOP budget, else tokens:params ratio
    (`num_params`: the count the ratio is of, see `ratio_params`)."""
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


def pretrain_plan(
    model, *, total_batch_size: int, horizon: HorizonConfig, transfer: TransferConfig, reference_shape: dict
) -> tuple[int, float, float]:
    """(optimizer steps, lr scale, Muon weight-decay scale) of a pretraining run of `model` (a meta-device GPT
    will do); `reference_shape`: GPTConfig.from_depth's arguments besides depth, for the transfer's reference."""
    steps = num_iterations(
        num_params=ratio_params(model, horizon),
        flops_per_token=model.flops_per_token(),
        total_batch_size=total_batch_size,
        horizon=horizon,
    )
    if not (transfer.lr or transfer.weight_decay):
        return steps, 1.0, 1.0
    reference = shape_scaling_params(transfer.reference_depth, **reference_shape)
    return steps, *transfer_scales(total_batch_size, scaling_params(model), reference, transfer)


def resolve_total_batch_size(cfg) -> None:
    """`model.total_batch_size=auto` -> a number, in place, before anything reads it (the datamodule's accumulation,
    the module's horizon and transfer): nanochat's rule from the configured depth, vocab_size, sequence_len and arch
    against `module.transfer`'s reference (TransferConfig's defaults for stages without one). Logs the result."""
    from omegaconf import open_dict

    model = cfg.model
    if model.get("total_batch_size") != "auto":
        return
    module = cfg.get("module") or {}
    transfer = module.get("transfer") or TransferConfig()
    shape = {k: module[k] for k in SHAPE_KEYS if k in module}
    shape.update(model.get("arch") or {})
    params = shape_scaling_params(model.depth, model.vocab_size, model.sequence_len, **shape)
    reference = shape_scaling_params(transfer.reference_depth, model.vocab_size, model.sequence_len, **shape)
    batch = auto_batch_size(params, reference, transfer)
    with open_dict(cfg):
        cfg.model.total_batch_size = batch
    log.info(
        f"model.total_batch_size=auto: {batch:,} tokens per step for d{model.depth} ({params:,} block-matrix + "
        f"head parameters; reference d{transfer.reference_depth}: {reference:,} at "
        f"{transfer.reference_batch_size:,})"
    )

"""The one precision decision: fp32 or bf16, for training, evaluation, the engine and loading a model.

    precision=auto|fp32|bf16  (config key of train.py and serve.py, --precision of the chat CLI)
    auto -> NANOCHAT_PRECISION if set, else bf16 where the device multiplies bf16 natively, else fp32

An explicit `fp32`/`bf16` wins over the environment; the environment wins over the hardware, so one variable
forces a whole test run or CI job either way. Training maps the result onto Lightning's precision (bf16-mixed:
fp32 master weights, bf16 autocast); inference loads the weights in the chosen dtype. Either way the model's
activations, keys, values and KV caches share one compute dtype, and logits and sampling stay fp32.

Kept free of a top-level torch import: the Hydra resolver that calls `resolve` runs while composing configs.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

from nanochat.errors import UserError

CHOICES = ("auto", "fp32", "bf16")
ENV = "NANOCHAT_PRECISION"
LIGHTNING = {"fp32": "32-true", "bf16": "bf16-mixed"}


@dataclass(frozen=True)
class Precision:
    name: str  # "fp32" | "bf16"
    reason: str  # why this one, for the line printed at start

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def lightning(self) -> str:
        """Lightning's name for it (Trainer/Fabric `precision=`)."""
        return LIGHTNING[self.name]

    def __str__(self) -> str:
        return f"precision: {self.name} ({self.reason})"


def resolve(requested: str = "auto", device_type: str = "cpu") -> Precision:
    """fp32 or bf16 for a device type (cpu, cuda, mps), with the reason; UserError for an unknown value."""
    from nanochat.hardware import bf16_support

    requested = str(requested).lower()
    if requested not in CHOICES:
        raise UserError(f"precision={requested!r} is not one of {', '.join(CHOICES)}")
    native, hardware = bf16_support(device_type)
    slow = "" if native else f"; not native on this {hardware}, so emulated and slow"
    if requested != "auto":
        return Precision(requested, f"precision={requested}" + (slow if requested == "bf16" else ""))
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in LIGHTNING:
            raise UserError(
                f"{ENV}={forced!r} is not one of {', '.join(LIGHTNING)} (it decides what precision=auto means)"
            )
        return Precision(forced, f"{ENV}={forced}" + (slow if forced == "bf16" else ""))
    if native:
        return Precision("bf16", f"auto: {hardware} multiplies bf16 natively")
    return Precision("fp32", f"auto: {hardware} has no native bf16")


def from_lightning(precision: str) -> Precision:
    """The decision behind a Lightning precision string (a preset's `trainer.precision`, possibly set by hand)."""
    text = str(precision)
    name = "bf16" if "bf16" in text else "fp32" if text in ("32", "32-true", "64", "64-true") else None
    if name is None:
        raise UserError(f"trainer.precision={text!r} is not supported: use precision=fp32 or precision=bf16")
    return Precision(name, f"trainer.precision={text}")


def of_trainer(requested: str, device_type: str, lightning_value) -> Precision:
    """What a Trainer or Fabric built from the config runs at, for the start-up line: the `precision` key's
    decision, or `trainer.precision` where that was set by hand."""
    chosen = resolve(requested, device_type)
    return chosen if chosen.lightning == str(lightning_value) else from_lightning(lightning_value)


def computing(model, dtype):
    """The context in which `model` computes in `dtype`, whatever autocast the caller has on.

    bf16: bf16 autocast, over fp32 weights (the trainer's master weights, in evaluation and RL rollouts) or over
    bf16 matmul weights (`cast_weights`, inference) alike, so the residual stream stays fp32 and the numbers are
    training's. fp32: autocast off, so an outer bf16 autocast cannot re-cast the model.
    Entered around each forward rather than around a whole generation: autocast is thread-local state that a
    generator's `yield` (and `inference_mode`'s re-entry on every resume) does not carry along.
    """
    import torch

    kind = next(model.parameters()).device.type
    if dtype == torch.bfloat16:
        return torch.autocast(kind, dtype=dtype)
    if weights_dtype(model) != torch.float32:
        raise UserError(
            f"a model with {weights_dtype(model)} weights cannot compute in {dtype}; load it with precision=fp32"
        )
    return torch.autocast(kind, enabled=False) if kind in ("cpu", "cuda") else nullcontext()


def cast_weights(model, dtype):
    """`model`'s matmul weights (every nn.Linear) in `dtype`, in place, for inference: half the memory and no
    per-forward cast under autocast. The embedding table and the rotary tables stay fp32, so the residual stream
    is fp32 and bf16 inference computes exactly what training's autocast does with the same weights."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.to(dtype)
    return model


def weights_dtype(model):
    """The narrowest floating dtype among the model's parameters (bf16 once `cast_weights` ran)."""
    return min((p.dtype for p in model.parameters() if p.is_floating_point()), key=lambda d: d.itemsize)


def ambient_dtype(model):
    """The dtype a caller computes `model` in: autocast's where the caller has it on (the trainer's bf16-mixed,
    Fabric's autocast), else its weights' (`weights_dtype`)."""
    import torch

    kind = next(model.parameters()).device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weights_dtype(model)

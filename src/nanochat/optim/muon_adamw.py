"""MuonAdamW: one torch.optim.Optimizer whose param groups are either Muon or AdamW (`group["kind"]`).

One optimizer object means one `configure_optimizers` return value, one state_dict in the checkpoint and
one place to apply schedules. Under DDP every rank holds the full (replicated) state and steps on the
already-averaged gradients, so the optimizer itself does no communication.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw as adamw_functional

from nanochat.optim.muon import muon_direction, muon_lr_scale, ns_dtype
from nanochat.settings import OptimizerConfig

_DEFAULT = OptimizerConfig()  # a group leaves out what it keeps at the project's defaults; its lr it must give
MUON_DEFAULTS = dict(momentum=_DEFAULT.muon_momentum, nesterov=True, ns_steps=_DEFAULT.ns_steps, ns_dtype=_DEFAULT.ns_dtype,
                     weight_decay=_DEFAULT.muon_weight_decay)
ADAMW_DEFAULTS = dict(betas=tuple(_DEFAULT.betas), eps=_DEFAULT.eps, weight_decay=_DEFAULT.adamw_weight_decay)


class MuonAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict]):
        groups = []
        for group in param_groups:
            kind = group.get("kind")
            if kind not in ("muon", "adamw"):
                raise ValueError(f"param group kind must be 'muon' or 'adamw', got {kind!r}")
            group = {**(MUON_DEFAULTS if kind == "muon" else ADAMW_DEFAULTS), **group}
            if "lr" not in group:
                raise ValueError(f"param group {len(groups)} ({kind}) has no lr")
            if kind == "muon" and any(p.ndim != 2 for p in group["params"]):
                raise ValueError("Muon groups take 2-D weight matrices only")
            if kind == "muon" and group["ns_dtype"] not in ("auto", "bfloat16", "float32"):
                raise ValueError(f"ns_dtype must be 'auto', 'bfloat16' or 'float32', got {group['ns_dtype']!r}")
            group.setdefault("initial_lr", group["lr"])  # schedules scale this, so restarts stay exact
            groups.append(group)
        super().__init__(groups, defaults={})

    def apply_schedule(self, lr_multiplier: float, muon_momentum: float | None = None) -> None:
        """Set every group's lr to initial_lr x multiplier and, when given, the Muon momentum."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon" and muon_momentum is not None:
                group["momentum"] = muon_momentum

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            direction = muon_direction(
                p.grad, state["momentum_buffer"], group["momentum"], group["nesterov"], group["ns_steps"],
                ns_dtype(group["ns_dtype"], p.device),
            )
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(direction.to(p.dtype), alpha=-lr * muon_lr_scale(p.shape))

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        # torch's fused kernel (one pass per tensor) on GPUs and CPUs, where it beats the foreach path too
        # (docs/benchmarks.md); the foreach path elsewhere.
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
        step_device = params[0].device if fused else "cpu"  # where torch's fused / foreach kernels expect the counter
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = state["step"].to(step_device)  # no-op unless a checkpoint came from another device
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw_functional(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            foreach=not fused,
            fused=fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

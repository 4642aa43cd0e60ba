"""MuonAdamW: one torch.optim.Optimizer whose param groups are either Muon or AdamW (`group["kind"]`).

One optimizer object means one `configure_optimizers` return value, one state_dict in the checkpoint and
one place to apply schedules. Under DDP every rank holds the full (replicated) state and steps on the
already-averaged gradients, so the optimizer itself does no communication. A group's options are the
OptimizerConfig fields of the same meaning (nanochat.settings); left out, they take its defaults.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw as adamw_functional

from nanochat.optim.muon import muon_direction, muon_lr_scale, normuon_scale, normuon_state_shape, ns_dtype, renormalise
from nanochat.settings import NS_SCHEMES, OptimizerConfig

_DEFAULT = OptimizerConfig()  # a group leaves out what it keeps at the project's defaults; its lr it must give
MUON_DEFAULTS = dict(
    momentum=_DEFAULT.muon_momentum,
    nesterov=True,
    ns_steps=_DEFAULT.ns_steps,
    ns_dtype=_DEFAULT.ns_dtype,
    weight_decay=_DEFAULT.muon_weight_decay,
    ns_coefficients=_DEFAULT.ns_coefficients,
    muon_eq=_DEFAULT.muon_eq,
    muon_plus=_DEFAULT.muon_plus,
    normuon=_DEFAULT.normuon,
    normuon_beta2=_DEFAULT.normuon_beta2,
    cautious_weight_decay=_DEFAULT.cautious_weight_decay,
)
ADAMW_DEFAULTS = dict(
    betas=tuple(_DEFAULT.betas),
    eps=_DEFAULT.eps,
    weight_decay=_DEFAULT.adamw_weight_decay,
    fp32_math=_DEFAULT.adamw_fp32_math,
)


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
            if kind == "muon" and group["ns_coefficients"] not in NS_SCHEMES:
                raise ValueError(f"ns_coefficients must be one of {NS_SCHEMES}, got {group['ns_coefficients']!r}")
            group.setdefault("initial_lr", group["lr"])  # schedules scale these, so restarts stay exact
            group.setdefault("initial_weight_decay", group["weight_decay"])
            groups.append(group)
        super().__init__(groups, defaults={})

    def apply_schedule(
        self, lr_multiplier: float, muon_momentum: float | None = None, muon_weight_decay_multiplier: float = 1.0
    ) -> None:
        """Set every group's lr to initial_lr x multiplier and, for Muon groups, the momentum (when given) and the
        weight decay to initial_weight_decay x its multiplier."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon":
                group["weight_decay"] = group["initial_weight_decay"] * muon_weight_decay_multiplier
                if muon_momentum is not None:
                    group["momentum"] = muon_momentum

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but a group option the checkpoint predates keeps this run's value instead of going missing."""
        current = [dict(group) for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, mine in zip(self.param_groups, current):
            for key, value in mine.items():
                group.setdefault(key, value)

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
            update = muon_direction(
                p.grad,
                state["momentum_buffer"],
                group["momentum"],
                group["nesterov"],
                group["ns_steps"],
                ns_dtype(group["ns_dtype"], p.device),
                group["ns_coefficients"],
                group["muon_eq"],
            ).to(p.dtype)
            if group["muon_plus"]:
                update = renormalise(update)
            if group["normuon"]:
                if "second_moment" not in state:
                    state["second_moment"] = torch.zeros(normuon_state_shape(p.shape), dtype=p.dtype, device=p.device)
                update = normuon_scale(update, state["second_moment"], group["normuon_beta2"])
            step = lr * muon_lr_scale(p.shape)
            if group["cautious_weight_decay"]:
                # Decay only where the update already pulls the weight towards zero; both terms from the old weight.
                agree = (update * p) >= 0
                p.sub_(step * update + step * wd * p * agree)
                continue
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update, alpha=-step)

    def _adamw_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        # torch's fused kernel (one pass per tensor) on GPUs and CPUs, where it is 4x faster than the foreach path
        # (docs/benchmarks.md); the foreach path elsewhere.
        fused = all(p.device.type in ("cuda", "cpu") for p in params)
        step_device = params[0].device if fused else "cpu"  # where torch's fused / foreach kernels expect the counter
        # fp32 math for low-precision weights: a bf16 `1 - beta2` or moment loses most of its digits.
        upcast = group["fp32_math"] and any(p.dtype != torch.float32 for p in params)
        moment_dtype = torch.float32 if group["fp32_math"] else None
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["step"] = state["step"].to(step_device)  # no-op unless a checkpoint came from another device
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        work = [p.detach().float() for p in params] if upcast else params
        adamw_functional(
            work,
            [p.grad.float() for p in params] if upcast else [p.grad for p in params],
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
        if upcast:
            torch._foreach_copy_(params, work)

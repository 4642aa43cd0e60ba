"""Typed settings, each with the one set of defaults the whole project uses.

The YAML selects them as Hydra schemas (`schema/<name>`, see nanochat.configs) and overrides values; Hydra rejects
unknown keys and wrong types when composing, and each dataclass checks its ranges when it is built, so a bad value
stops a run at the start with one line naming it. Kept free of torch so composing a config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from nanochat.errors import UserError


def _positive(owner: str, **values) -> None:
    for name, value in values.items():
        if not value > 0:
            raise UserError(f"{owner}.{name}={value} must be positive")


@dataclass
class OptimizerConfig:
    """Muon for the matrices inside the blocks, AdamW for the embedding and the output head (nanochat's lrs)."""

    matrix_lr: float = 0.02  # Muon; its orthogonalised update needs no width scaling
    embedding_lr: float = 0.2  # AdamW, x (width/768)^-0.5
    unembedding_lr: float = 0.004  # AdamW, x (width/768)^-0.5
    value_embedding_lr: float = 0.1  # AdamW, x (width/768)^-0.5 (2026 architecture)
    resid_lambda_lr: float = 0.005  # AdamW, per-layer residual scales (2026 architecture)
    x0_lambda_lr: float = 0.5  # AdamW, per-layer embedding scales (2026 architecture)
    smear_backout_lr: float = 0.2  # AdamW, smear gate and lambda, backout lambda (2026 architecture)
    betas: List[float] = field(default_factory=lambda: [0.8, 0.95])  # AdamW
    eps: float = 1e-10
    adamw_weight_decay: float = 0.0
    muon_weight_decay: float = 0.0
    muon_momentum: float = 0.95  # the schedule ramps it up to this (momentum_end)
    ns_steps: int = 5  # Newton-Schulz iterations
    ns_dtype: str = "auto"  # auto | bfloat16 | float32 (train.py sets the run's: bf16 under bf16-mixed)

    def __post_init__(self):
        _positive("optimizer", matrix_lr=self.matrix_lr, embedding_lr=self.embedding_lr,
                  unembedding_lr=self.unembedding_lr, eps=self.eps, ns_steps=self.ns_steps)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1)")
        if self.ns_dtype not in ("auto", "bfloat16", "float32"):
            raise UserError(f"optimizer.ns_dtype={self.ns_dtype!r} is not one of auto, bfloat16, float32")


@dataclass
class ScheduleConfig:
    """lr = initial lr x init_lr_frac x (linear warmup, flat, linear warmdown to final_lr_frac); Muon momentum
    ramps from momentum_start to momentum_end over the first momentum_warmup_steps."""

    init_lr_frac: float = 1.0
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.2
    final_lr_frac: float = 0.0
    momentum_warmup_steps: int = 300
    momentum_start: float = 0.85
    momentum_end: float = 0.95

    def __post_init__(self):
        w, d = self.warmup_ratio, self.warmdown_ratio
        if not (0 <= w <= 1 and 0 <= d <= 1 and w + d <= 1):
            raise UserError(f"schedule ratios warmup={w}, warmdown={d} must lie in [0, 1] and sum to at most 1")
        _positive("schedule", init_lr_frac=self.init_lr_frac)
        if self.final_lr_frac < 0 or self.momentum_warmup_steps < 0:
            raise UserError("schedule.final_lr_frac and schedule.momentum_warmup_steps must not be negative")


@dataclass
class HorizonConfig:
    """How long a stage trains. Precedence: num_iterations > target_flops > param_data_ratio (pretraining),
    num_iterations > epochs (chat stages, whose length follows from their mixture)."""

    num_iterations: int = -1  # > 0: exactly this many optimizer steps
    target_flops: float = -1.0  # > 0: as many steps as this FLOP budget buys
    param_data_ratio: float = 20.0  # tokens per parameter (Chinchilla; nanochat's d20)
    epochs: float = 1.0  # chat stages: passes over the mixture

    def __post_init__(self):
        _positive("horizon", epochs=self.epochs)


@dataclass
class SamplingConfig:
    """What a chat request gets for a setting it leaves out (server, web UI, terminal chat)."""

    temperature: float = 0.6
    top_k: int = 50
    max_tokens: int = 512  # fewer when the context is nearly full

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise UserError(f"sampling.temperature={self.temperature} must be in 0..2")
        _positive("sampling", top_k=self.top_k, max_tokens=self.max_tokens)


@dataclass
class ServerLimits:
    """How much one server takes on: queue, batch, request size and the timeouts that keep a client from holding it."""

    max_waiting: int = 16  # requests accepted beyond one (decoding or waiting for room) before new ones get 503
    max_batch: int = 16  # rows decoded together, one forward per step
    max_body_bytes: int = 1_000_000  # larger request bodies get 413 (a valid request needs ~400 kB at most)
    body_timeout: float = 30.0  # seconds for a request body to arrive (408 after)
    send_timeout: float = 30.0  # seconds a streaming client may stop reading before it is dropped
    stall_timeout: float = 120.0  # seconds without a decoding step before /health reports the worker stuck

    def __post_init__(self):
        _positive("server", max_batch=self.max_batch, max_body_bytes=self.max_body_bytes, body_timeout=self.body_timeout,
                  send_timeout=self.send_timeout, stall_timeout=self.stall_timeout)
        if self.max_waiting < 0:
            raise UserError(f"server.max_waiting={self.max_waiting} must not be negative")

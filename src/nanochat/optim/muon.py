"""Muon: momentum, then orthogonalise the update with a fixed number of polynomial iterations.

For a weight matrix the orthogonalised update U V^T (from G = U S V^T) moves every singular direction by
the same amount, which is what makes Muon train transformer matrices faster than AdamW. The options of nanochat's
2026 Muon act around the iteration: MuonEq evens out the rows before it, Muon+ fixes the result's norm after it,
NorMuon evens out the scale of the result's rows (or columns), and cautious weight decay decays only the weights
the update pushes the same way.
"""

from __future__ import annotations

import torch

from nanochat import precision

# Quintic coefficients chosen to maximise the slope at zero (Keller Jordan's Muon); 5 steps land every
# singular value in roughly [0.7, 1.2], which trains as well as an exact polar factor.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932): one optimised quintic per iteration,
# computed for 5 iterations with safety factor 2e-2 and cushion 2; its input is normalised by 1.01 x the norm.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """'bfloat16', 'float32', or 'auto': what precision=auto gives on this device (bf16 where its matmuls are
    native, unless NANOCHAT_PRECISION says otherwise)."""
    if name == "auto":
        return precision.resolve("auto", device.type).dtype
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _iterate(X: torch.Tensor, schedule) -> torch.Tensor:
    """X <- a X + (b A + c A^2) X with A = X X^T, on the wide orientation so A is the smaller Gram matrix."""
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    for a, b, c in schedule:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def newton_schulz(
    G: torch.Tensor,
    steps: int = 5,
    coefficients=NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Approximate orthogonalisation of the last two dims of G with one fixed quintic.

    The iteration is stable in bf16, which is how nanochat runs it on GPUs; fp32 gives the same result where
    bf16 is slow (CPUs without native bf16).
    """
    X = G.to(dtype)
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    return _iterate(X, [coefficients] * steps)


def polar_express(G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate orthogonalisation with Polar Express's per-iteration quintics (at most 5 iterations)."""
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # the margin its coefficients were computed for
    return _iterate(X, POLAR_EXPRESS_COEFFICIENTS[:steps])


ORTHOGONALISERS = {"quintic": newton_schulz, "polar_express": polar_express}


def equilibrate_rows(X: torch.Tensor) -> torch.Tensor:
    """MuonEq: every row rescaled to the mean row norm (Frobenius norm / sqrt(rows)), so no row dominates the
    spectrum the iteration starts from; statistics in fp32."""
    target = X.float().norm(dim=(-2, -1), keepdim=True) / X.size(-2) ** 0.5
    rows = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return X * (target / rows).to(X.dtype)


def renormalise(U: torch.Tensor) -> torch.Tensor:
    """Muon+: U rescaled to Frobenius norm sqrt(min(rows, cols)), an exactly semi-orthogonal matrix's, correcting
    an iteration that stopped short."""
    target = min(U.size(-2), U.size(-1)) ** 0.5
    return U * (target / U.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)).to(U.dtype)


def normuon_scale(U: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: divide each row (tall or square U) or column (wide U) by the root of an EMA of its mean square,
    then restore U's Frobenius norm; updates `second_moment` ((rows, 1) or (1, cols)) in place."""
    dim = -1 if U.size(-2) >= U.size(-1) else -2
    n = U.size(dim)
    mean_sq = U.float().square().mean(dim=dim, keepdim=True)
    norm = (mean_sq.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(mean_sq.to(second_moment.dtype), 1 - beta2)
    scale = second_moment.clamp_min(1e-10).rsqrt()
    new_norm = (mean_sq * n * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return U * (scale * (norm / new_norm.clamp_min(1e-10))).to(U.dtype)


def normuon_state_shape(shape: torch.Size) -> tuple[int, int]:
    rows, cols = shape[-2], shape[-1]
    return (rows, 1) if rows >= cols else (1, cols)


def muon_direction(
    grad: torch.Tensor,
    buf: torch.Tensor,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    dtype: torch.dtype,
    coefficients: str = "quintic",
    row_equilibration: bool = False,
) -> torch.Tensor:
    """Update the momentum buffer in place and return the orthogonalised step direction (in `dtype`)."""
    buf.lerp_(grad, 1 - momentum)
    direction = grad.lerp(buf, momentum) if nesterov else buf
    X = direction.to(dtype)
    if row_equilibration:
        X = equilibrate_rows(X)
    return ORTHOGONALISERS[coefficients](X, steps=ns_steps, dtype=dtype)


def muon_lr_scale(shape: torch.Size) -> float:
    """lr x max(1, rows/cols)^0.5: tall matrices (rows = fan-out) get a larger step to keep update RMS comparable."""
    rows, cols = shape[-2], shape[-1]
    return max(1.0, rows / cols) ** 0.5

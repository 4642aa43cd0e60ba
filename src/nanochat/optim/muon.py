"""Muon: momentum, then orthogonalise the update with a Newton-Schulz iteration.

For a weight matrix the orthogonalised update U V^T (from G = U S V^T) moves every singular direction by
the same amount, which is what makes Muon train transformer matrices faster than AdamW.
"""

from __future__ import annotations

import torch

from nanochat import precision

# Quintic coefficients chosen to maximise the slope at zero (Keller Jordan's Muon); 5 steps land every
# singular value in roughly [0.7, 1.2], which trains as well as an exact polar factor.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """'bfloat16', 'float32', or 'auto': what precision=auto gives on this device (bf16 where its matmuls are
    native, unless NANOCHAT_PRECISION says otherwise)."""
    if name == "auto":
        return precision.resolve("auto", device.type).dtype
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def newton_schulz(
    G: torch.Tensor, steps: int = 5, coefficients=NS_COEFFICIENTS, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximate orthogonalisation of the last two dims of G.

    The iteration is stable in bf16, which is how nanochat runs it on GPUs; fp32 gives the same result where
    bf16 is slow (CPUs without native bf16).
    """
    a, b, c = coefficients
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation so X @ X^T is the smaller Gram matrix
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def muon_direction(
    grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool, ns_steps: int, dtype: torch.dtype
) -> torch.Tensor:
    """Update the momentum buffer in place and return the orthogonalised step direction."""
    buf.lerp_(grad, 1 - momentum)
    direction = grad.lerp(buf, momentum) if nesterov else buf
    return newton_schulz(direction, steps=ns_steps, dtype=dtype)


def muon_lr_scale(shape: torch.Size) -> float:
    """lr x max(1, rows/cols)^0.5: tall matrices (rows = fan-out) get a larger step to keep update RMS comparable."""
    rows, cols = shape[-2], shape[-1]
    return max(1.0, rows / cols) ** 0.5

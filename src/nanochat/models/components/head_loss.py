"""Output head + logit softcap + cross-entropy as one autograd op, for the large-vocabulary training loss.

Written out by PyTorch ops, `cap * tanh(h @ W.T / cap)` followed by `cross_entropy` keeps four (N, vocab)
fp32 tensors alive for the backward pass (logits, logits/cap, tanh, capped logits) and makes a dozen passes
over them. At vocab 32,768 and 8,192 tokens each is 1 GiB, and on a CPU these passes cost more than the
head's matmuls (docs/benchmarks.md). This op saves only t = tanh(z/cap) and the log-sum-exp per row, and
computes the gradient from them in place:

    d loss / d z = (softmax(cap * t) - onehot(target)) * scale * (1 - t^2)

with scale = 1/count (mean), 1 (sum) or the upstream gradient per row (none). The elementwise work runs
over blocks of rows small enough to stay in cache; the matmuls run once over all rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# fp32 logits per elementwise block. On a CPU, rows that stay in cache (1-8 MiB measured alike, docs/benchmarks.md).
# On a GPU every op is a kernel launch per block and caches buy nothing, so blocks only bound the temporaries.
CPU_BLOCK_BYTES = 1 << 21
GPU_BLOCK_BYTES = 1 << 30


def _blocks(n_rows: int, vocab: int, device: torch.device):
    step = max(1, (CPU_BLOCK_BYTES if device.type == "cpu" else GPU_BLOCK_BYTES) // (4 * vocab))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


class SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str):
        z = F.linear(h, weight)  # under autocast this is the low-precision matmul, as nn.Linear would be
        compute_dtype = z.dtype
        t = z.float()  # z itself in fp32; a fresh copy otherwise - either way ours to overwrite
        valid = targets != -1
        safe_targets = targets.clamp(min=0)
        nll = torch.empty(t.size(0), dtype=torch.float32, device=t.device)
        lse = torch.empty_like(nll)
        for rows in _blocks(t.size(0), t.size(1), t.device):
            block = t[rows].div_(cap).tanh_()
            capped = block * cap
            lse[rows] = torch.logsumexp(capped, dim=-1)
            nll[rows] = lse[rows] - capped.gather(1, safe_targets[rows, None]).squeeze(1)
        nll = nll * valid
        ctx.save_for_backward(h, weight, safe_targets, valid, t, lse)
        ctx.cap, ctx.reduction, ctx.compute_dtype, ctx.consumed = cap, reduction, compute_dtype, False
        if reduction == "none":
            return nll
        return nll.sum() / valid.sum() if reduction == "mean" else nll.sum()

    @staticmethod
    def backward(ctx, grad):
        if ctx.consumed:  # the saved logits were overwritten by the first backward
            raise RuntimeError("softcap_cross_entropy: backward can run only once per forward (retain_graph is not supported)")
        ctx.consumed = True
        h, weight, safe_targets, valid, t, lse = ctx.saved_tensors
        cap = ctx.cap
        if ctx.reduction == "mean":
            scale = valid * (grad / valid.sum())
        else:
            scale = valid * grad  # grad is a scalar (sum) or one value per row (none)
        dz = t  # overwritten block by block: t is not needed after its block's gradient
        rows_idx = torch.arange(t.size(0), device=t.device)
        for rows in _blocks(t.size(0), t.size(1), t.device):
            block = t[rows]
            p = (block * cap).sub_(lse[rows, None]).exp_()
            p[rows_idx[: p.size(0)], safe_targets[rows]] -= 1.0
            p.mul_(scale[rows, None])
            dz[rows] = p.mul_(block.square_().neg_().add_(1.0))
        dz = dz.to(ctx.compute_dtype)
        grad_h = (dz @ weight.to(ctx.compute_dtype)).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (dz.t() @ h.to(ctx.compute_dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def softcap_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, reduction: str = "mean"
) -> torch.Tensor:
    """cross_entropy(cap * tanh(h @ weight.T / cap), targets, ignore_index=-1, reduction) for (N, d) inputs."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return SoftcapCrossEntropy.apply(h, weight, targets, cap, reduction)

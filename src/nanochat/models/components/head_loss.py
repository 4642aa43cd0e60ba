"""Output head + logit softcap + cross-entropy as one autograd op over chunks of rows: no (N, vocab) tensor.

Written out by PyTorch ops, `cap * tanh(h @ W.T / cap)` followed by `cross_entropy` keeps (N, vocab) fp32 tensors
alive for the backward pass (logits, logits/cap, tanh, capped logits; their gradients as large again) and makes a
dozen passes over them: at d20 with 32 x 2,048 tokens per device and vocab 65,536 each is 16 GiB. This op takes the
rows in chunks. For a chunk it computes the logits z = h W^T, its losses and, when a gradient will be needed, at
once the gradient of the loss with respect to z

    d loss / d z = (softmax(cap * t) - onehot(target)) * scale * (1 - t^2),   t = tanh(z / cap)

with scale = 1/count (mean) or 1 (sum), and folds it into d loss / d h and d loss / d W by two matmuls before the
next chunk. Backward then only multiplies those two by the upstream gradient. For reduction='none' the upstream
gradient differs per row and is known only in backward, so backward recomputes each chunk's logits instead (one
more matmul) from the saved log-sum-exp. Memory beyond the inputs: one chunk of logits plus gradients of h and W.

Eager, each chunk's elementwise work runs in place over blocks of rows small enough to stay in a CPU's cache;
under torch.compile the same maths is written as plain ops for inductor to fuse into a few kernels. On a CPU the op
stays eager even inside a compiled model (a graph break): inductor's kernel for it stores two fp32 chunk-sized
intermediates and ran 2.8x slower than the cache-blocked ops at d4 in bf16 (docs/benchmarks.md).
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import torch

# Rows per chunk: the chunk's logits (rows x vocab, in fp32 terms) stay under this many bytes, which bounds the
# op's memory. Fewer, larger chunks are faster on a CPU: d4's head at 8,192 x 32,768 took 0.54 s in one chunk,
# 0.61 s in 4 and 0.76 s in 16 (bf16, 2 threads, docs/benchmarks.md).
CHUNK_BYTES = 1 << 30
# Rows per in-place elementwise block on the eager path: fp32 blocks that stay in cache (1-8 MiB measured alike).
BLOCK_BYTES = 1 << 21
# Devices where the op runs eagerly even when called from a compiled graph (see the module docstring).
EAGER_DEVICES = {"cpu"}
# exp(c) for capped logits c in [-cap, cap] and its row sums over any vocabulary stay finite, normal fp32 numbers.
MAX_CAP = 40.0


def _spans(n_rows: int, vocab: int, budget: int):
    step = max(1, budget // (4 * vocab))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on (bf16-mixed training), else the hidden states'."""
    kind = h.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return h.dtype


def rows_traced(z: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None, cap: float):
    """(nll, lse, dz) of one chunk of logits as plain ops (for torch.compile); dz is None when `scale` is None."""
    t = torch.tanh(z.float() / cap)
    e = torch.exp(t * cap)  # at most exp(cap): finite in fp32 for cap <= MAX_CAP
    total = e.sum(-1)
    lse = torch.log(total)
    nll = lse - cap * t.gather(1, targets[:, None]).squeeze(1)
    if scale is None:
        return nll, lse, None
    hit = torch.arange(z.size(1), device=z.device)[None, :] == targets[:, None]
    dz = (e / total[:, None] - hit.to(e.dtype)) * (1.0 - t * t) * scale[:, None]
    return nll, lse, dz.to(z.dtype)


def rows_in_place(
    z: torch.Tensor,
    targets: torch.Tensor,
    scale: torch.Tensor | None,
    cap: float,
    lse_given: torch.Tensor | None = None,
):
    """As `rows_traced`, block by block in cache, writing dz over z; (nll, lse, z-now-dz or None).

    With `lse_given` (backward of reduction='none'), the log-sum-exp is not recomputed. Nine passes over a block:
    each op below is one, and dz = e * (scale / total) * (1 - t^2) is formed as x - x * t^2 by one addcmul."""
    n = z.size(0)
    nll = torch.empty(n, dtype=torch.float32, device=z.device)
    lse = torch.empty_like(nll) if lse_given is None else lse_given
    arange = torch.arange(n, device=z.device)
    inv_cap = torch.full((1,), 1.0 / cap, dtype=torch.float32, device=z.device)  # 1-D: the product is fp32
    for rows in _spans(n, z.size(1), BLOCK_BYTES):
        t = torch.mul(z[rows], inv_cap).tanh_()
        at = (arange[: t.size(0)], targets[rows])
        t_target = t[at]
        if lse_given is None:
            e = torch.mul(t, cap).exp_()  # at most exp(cap): finite in fp32 for cap <= MAX_CAP
            total = e.sum(-1)
            lse[rows] = total.log()
            nll[rows] = lse[rows] - cap * t_target
            if scale is None:
                continue
            e.mul_((scale[rows] / total)[:, None])
        else:
            e = torch.mul(t, cap).sub_(lse[rows, None]).exp_().mul_(scale[rows, None])
        e.addcmul_(e, t.square_(), value=-1.0)  # * (1 - t^2)
        e[at] -= scale[rows] * (1.0 - t_target.square())
        z[rows] = e
    return nll, lse, (z if scale is not None else None)


def _rows(z, targets, scale, cap, lse_given=None):
    if torch.compiler.is_compiling():
        nll, lse, dz = rows_traced(z, targets, scale, cap)
        return nll, (lse if lse_given is None else lse_given), dz
    return rows_in_place(z, targets, scale, cap, lse_given)


_workspace = threading.local()  # per thread: one flat buffer for chunk logits, reused while it is large enough


def _logits(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """h @ w.T. Eagerly on a CPU into a kept buffer: a fresh one is hundreds of MB of newly mapped pages every
    step, and reusing it made the d4 head 1.3x faster (docs/benchmarks.md)."""
    if torch.compiler.is_compiling() or h.device.type != "cpu":
        return h @ w.t()
    size = h.size(0) * w.size(0)
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < size or buf.dtype != h.dtype:
        _workspace.buf = None  # the old buffer is freed before the new one is made
        buf = _workspace.buf = torch.empty(size, dtype=h.dtype)
    return torch.mm(h, w.t(), out=buf[:size].view(h.size(0), w.size(0)))


class SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, cap: float, reduction: str, need_grad: bool, chunk_bytes: int):
        dtype = compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False) if h.device.type in ("cpu", "cuda") else nullcontext():
            hc, wc = h.to(dtype), weight.to(dtype)  # the weight cast once, not once per chunk
            valid = targets != -1
            safe = targets.clamp(min=0)
            count = valid.sum()
            grads = need_grad and reduction != "none"
            scale = None
            if grads:
                scale = valid / count if reduction == "mean" else valid.to(torch.float32)
                grad_h = torch.empty_like(hc)
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            nll_parts, lse_parts = [], []
            for rows in _spans(h.size(0), weight.size(0), chunk_bytes):
                z = _logits(hc[rows], wc)
                nll, lse, dz = _rows(z, safe[rows], None if scale is None else scale[rows], cap)
                nll_parts.append(nll)
                lse_parts.append(lse)
                if grads:
                    grad_h[rows] = dz @ wc
                    grad_w += (dz.t() @ hc[rows]).float()
            nll = torch.cat(nll_parts) * valid
        ctx.cap, ctx.reduction, ctx.chunk_bytes, ctx.dtype = cap, reduction, chunk_bytes, dtype
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        if grads:
            ctx.save_for_backward(grad_h, grad_w)
        elif need_grad:  # 'none': backward recomputes each chunk's logits with its rows' upstream gradients
            ctx.save_for_backward(h, weight, safe, valid, torch.cat(lse_parts))
        if reduction == "none":
            return nll
        return nll.sum() / count if reduction == "mean" else nll.sum()

    @staticmethod
    def backward(ctx, grad):
        if ctx.reduction != "none":
            grad_h, grad_w = ctx.saved_tensors
            return grad_h.to(ctx.h_dtype) * grad, (grad_w * grad).to(ctx.w_dtype), None, None, None, None, None
        h, weight, safe, valid, lse = ctx.saved_tensors
        scale = grad.float() * valid
        hc, wc = h.to(ctx.dtype), weight.to(ctx.dtype)
        grad_h = torch.empty_like(hc)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _spans(h.size(0), weight.size(0), ctx.chunk_bytes):
            z = _logits(hc[rows], wc)
            _, _, dz = _rows(z, safe[rows], scale[rows], ctx.cap, lse[rows])
            grad_h[rows] = dz @ wc
            grad_w += (dz.t() @ hc[rows]).float()
        return grad_h.to(ctx.h_dtype), grad_w.to(ctx.w_dtype), None, None, None, None, None


def softcap_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    cap: float,
    reduction: str = "mean",
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """cross_entropy(cap * tanh(h @ weight.T / cap), targets, ignore_index=-1, reduction) for (N, d) inputs."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0 < cap <= MAX_CAP:
        raise ValueError(f"softcap must be in (0, {MAX_CAP:g}], got {cap}")
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    apply = _apply_eagerly if h.device.type in EAGER_DEVICES else SoftcapCrossEntropy.apply
    return apply(h, weight, targets, cap, reduction, need_grad, chunk_bytes)


@torch.compiler.disable
def _apply_eagerly(*args):
    return SoftcapCrossEntropy.apply(*args)

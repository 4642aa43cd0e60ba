"""Causal attention, full or over a sliding window: which keys each query sees, and the kernel that computes it.

A query at position p sees the keys at positions p - window .. p (window + 1 keys), or 0 .. p for the full context
(window None). Per case:
- training, or a prompt prefilled into an empty cache (as many queries as keys): full context is SDPA's causal
  kernel; a window is FlexAttention with a block mask on CUDA, which skips the blocks outside the band, and SDPA
  with a boolean mask elsewhere (CPU FlexAttention has no backward);
- one decode step (one query): only the last window + 1 cached keys are passed to SDPA;
- a chunk after a cached prefix: SDPA with an explicit mask;
- rows at different positions (the server's batch cache): SDPA with the caller's per-row key mask, which
  `window_key_mask` narrows to each row's window.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Devices whose windowed training and prefill run FlexAttention (tests add "cpu" to check the path without a GPU).
FLEX_DEVICES = {"cuda"}
_flex_kernel = None  # torch.compile(flex_attention), built on first use: compiling costs seconds


def band_mask(num_queries: int, num_keys: int, window: int | None, device) -> torch.Tensor:
    """(Tq, Tk) bool: the queries are the last Tq of Tk positions; each sees itself, earlier keys, none past window."""
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    k_pos = torch.arange(num_keys, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= q_pos - k_pos <= window
    return mask


def window_key_mask(key_mask: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """Rows at their own positions (B,) with key_mask (B, 1, 1, Tk): also hide the slots before each row's window."""
    if window is None:
        return key_mask
    slots = torch.arange(key_mask.size(-1), device=key_mask.device)
    return key_mask & (slots >= positions[:, None] - window).view(key_mask.shape)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention of q (B, H, Tq, D) over k, v (B, Hkv, Tk, D), the queries being the last Tq positions."""
    gqa = q.size(1) != k.size(1)
    Tq, Tk = q.size(2), k.size(2)
    if key_mask is not None:  # rows of different lengths: each attends to its own filled (and windowed) slots
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, enable_gqa=gqa)
    if window is not None and window + 1 >= Tk:  # every key is inside the window
        window = None
    if Tq == 1:  # one decode step attends to everything cached, or to the window's last keys
        if window is not None:
            k, v = k[:, :, -(window + 1) :], v[:, :, -(window + 1) :]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if Tq == Tk and window is None:  # training, or prefill into an empty cache
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if Tq == Tk and q.device.type in FLEX_DEVICES:
        return flex_windowed(q, k, v, window)
    mask = band_mask(Tq, Tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def flex_windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal sliding-window attention by FlexAttention (compiled), same shapes as SDPA's."""
    global _flex_kernel
    from torch.nn.attention.flex_attention import flex_attention

    if _flex_kernel is None:
        _flex_kernel = torch.compile(flex_attention)  # a second length recompiles it for dynamic lengths
    # Inside a compiled model the mask is traced into the graph; eager calls build it once per (window, length).
    build = band_block_mask if torch.compiler.is_compiling() else sliding_block_mask
    block_mask = build(window, q.size(2), q.device)
    return _flex_kernel(q, k, v, block_mask=block_mask, enable_gqa=q.size(1) != k.size(1))


def band_block_mask(window: int, length: int, device: torch.device):
    """FlexAttention's block mask for a causal band reaching `window` keys back."""
    from torch.nn.attention.flex_attention import create_block_mask

    def band(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx <= window)

    return create_block_mask(band, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)


sliding_block_mask = functools.lru_cache(maxsize=64)(band_block_mask)

"""What the hardware does fast. Decisions such as compute dtype read from here, never from assumptions."""

from __future__ import annotations

from functools import cache

import torch


@cache
def fast_bf16(device_type: str) -> bool:
    """True where bf16 matmuls run natively: CUDA compute capability >= 8.0, or CPUs with AVX-512 BF16 / AMX.

    Elsewhere bf16 is emulated; on an AVX2-only CPU a bf16 matmul was measured ~137x slower than fp32.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    if device_type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False

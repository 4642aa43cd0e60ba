"""What the hardware does fast. Decisions such as compute dtype read from here, never from assumptions."""

from __future__ import annotations

from functools import cache

import torch


@cache
def bf16_support(device_type: str) -> tuple[bool, str]:
    """(native, what the device is): native where bf16 matmuls run in hardware - CUDA compute capability >= 8.0,
    or CPUs with AVX-512 BF16 / AMX. Elsewhere bf16 is emulated; on an AVX2-only CPU a bf16 matmul was measured
    ~137x slower than fp32."""
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "machine (no CUDA device)"
        major, minor = torch.cuda.get_device_capability()
        return (major, minor) >= (8, 0), f"GPU ({torch.cuda.get_device_name()}, compute capability {major}.{minor})"
    if device_type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
        return native, f"CPU ({torch.backends.cpu.get_cpu_capability()})"
    return False, device_type


def fast_bf16(device_type: str) -> bool:
    """True where bf16 matmuls run natively (see `bf16_support`)."""
    return bf16_support(device_type)[0]


# Dense bf16 tensor-core peaks (FLOP/s) by GPU name, as nanochat's MFU table; matched by substring, first hit wins.
GPU_PEAK_BF16 = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


@cache
def peak_flops(device_type: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Peak matmul FLOP/s of one device: the vendor table for known GPUs, else measured once with a matmul.

    The denominator of MFU. A CPU has no meaningful datasheet number, so its peak is what a large
    matmul in `dtype` actually achieves with all threads - MFU there reads as "share of attainable".
    """
    if device_type == "cuda":
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_BF16:
            if key in name:
                return flops
    return measure_matmul_flops(device_type, dtype)


def measure_matmul_flops(
    device_type: str, dtype: torch.dtype, n: int = 1024, repeats: int = 8, max_seconds: float = 0.05
) -> float:
    """FLOP/s of `repeats` n x n matmuls as training runs them (`F.linear` on fp32 tensors, under autocast for a
    lower `dtype`: on CPUs without native bf16 that path is ~6x faster than a plain bf16 matmul), n halved (down to
    128) while one takes longer than `max_seconds`, since this runs at the start of every training process."""
    import time
    from contextlib import nullcontext

    import torch.nn.functional as F

    def timed(size: int, times: int) -> float:
        a = torch.randn(size, size, device=device_type)
        b = torch.randn(size, size, device=device_type)
        autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
        with autocast:
            if device_type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(times):
                F.linear(a, b)
            if device_type == "cuda":
                torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(128, 1)  # warm-up: thread pools, kernels
    while n > 128 and timed(n // 4, 1) * 64 > max_seconds:  # (n/4)^3 x 64 = n^3: one n-matmul's time, estimated
        n //= 2
    return 2 * n**3 * repeats / timed(n, repeats)

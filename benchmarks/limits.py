"""The device's two ceilings, measured in the run: copy bandwidth and matmul rate.

The matmul rate is measured on a large square matmul, and, for the fused-linear
cases, at the case's own shapes (``torch.mm`` of [N, H] × [H, V]: the LM head's
matmul, whose rate can differ much from the square one's; in float32 too for
bfloat16 cases). Each is measured once
per process, device, dtype (and shape) and remembered; :func:`measured` returns
what was measured, for the result files.
"""

from __future__ import annotations

from typing import Callable

import torch

from .timing import time_ms

COPY_BYTES = {"cuda": 2 << 30, "cpu": 512 << 20}  # buffer copied (far larger than the caches)
MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}  # square matmul edge

_copy: dict[torch.device, float] = {}
_matmul: dict[tuple[torch.device, torch.dtype], float] = {}
_mm_at: dict[tuple[torch.device, torch.dtype, int, int, int], float] = {}


def copy_bytes_per_s(device: torch.device) -> float:
    """Device-to-device copy bandwidth (``Tensor.copy_`` of a large buffer), counting bytes read + written."""
    if device not in _copy:
        src = torch.randn(COPY_BYTES[device.type] // 4, device=device)
        dst = torch.empty_like(src)
        timing = time_ms(lambda: dst.copy_(src), device, min_repeats=10, min_total_s=0.5)
        _copy[device] = 2 * src.nbytes / (timing.median_ms / 1e3)
    return _copy[device]


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype) -> float:
    """Rate of a large square matmul in ``dtype`` on random data (torch's default precision settings)."""
    if (device, dtype) not in _matmul:
        n = MATMUL_SIZE[device.type]
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        timing = time_ms(lambda: a @ b, device, min_repeats=5, min_total_s=0.5)
        _matmul[device, dtype] = 2 * n**3 / (timing.median_ms / 1e3)
    return _matmul[device, dtype]


def mm_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, h: int, v: int) -> float:
    """Rate of ``torch.mm`` of [n, h] × [h, v] in ``dtype`` (the LM head's matmul at a case's shapes)."""
    key = (device, dtype, n, h, v)
    if key not in _mm_at:
        timing = time_ms(mm_call(device, dtype, n, h, v), device, min_repeats=3, min_total_s=0.5)
        remember_mm_rate(device, dtype, n, h, v, timing.median_ms)
    return _mm_at[key]


def mm_call(device: torch.device, dtype: torch.dtype, n: int, h: int, v: int) -> Callable[[], torch.Tensor]:
    """``torch.mm`` of random [n, h] × [h, v] in ``dtype`` into a buffer of its own, as a call to time (the
    runner times it on the CPU in the same bursts as a case's implementations)."""
    a = torch.randn(n, h, device=device).to(dtype)
    b = torch.randn(h, v, device=device).to(dtype)
    out = torch.empty(n, v, device=device, dtype=dtype)
    return lambda: torch.mm(a, b, out=out)


def remember_mm_rate(device: torch.device, dtype: torch.dtype, n: int, h: int, v: int, median_ms: float) -> float:
    """The rate of :func:`mm_call` timed at ``median_ms`` a call, remembered as the latest at these shapes."""
    _mm_at[device, dtype, n, h, v] = 2 * n * h * v / (median_ms / 1e3)
    return _mm_at[device, dtype, n, h, v]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measured(device: torch.device) -> dict:
    """``{"copy_gbps", "matmul_tflops": {dtype: rate}, "mm_at_shapes": [{dtype, N, H, V, gflops}]}`` as
    measured so far on ``device``."""
    return {
        "copy_gbps": _copy[device] / 1e9 if device in _copy else None,
        "matmul_tflops": {_name(dt): r / 1e12 for (d, dt), r in _matmul.items() if d == device},
        "mm_at_shapes": [dict(dtype=_name(dt), N=n, H=h, V=v, gflops=r / 1e9)
                         for (d, dt, n, h, v), r in _mm_at.items() if d == device],
    }

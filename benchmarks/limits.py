"""The device's two ceilings, measured in the run: copy bandwidth and matmul rate.

Each is measured once per process and device (and dtype) and remembered;
:func:`measured` returns what was measured, for the result files.
"""

from __future__ import annotations

import torch

from .timing import time_ms

COPY_BYTES = {"cuda": 2 << 30, "cpu": 512 << 20}  # buffer copied (far larger than the caches)
MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}  # square matmul edge

_copy: dict[torch.device, float] = {}
_matmul: dict[tuple[torch.device, torch.dtype], float] = {}


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


def measured(device: torch.device) -> dict:
    """``{"copy_gbps", "matmul_tflops": {dtype: rate}}`` as measured so far on ``device``."""
    return {
        "copy_gbps": _copy[device] / 1e9 if device in _copy else None,
        "matmul_tflops": {str(dt).removeprefix("torch."): r / 1e12 for (d, dt), r in _matmul.items() if d == device},
    }

"""Peak memory a function takes above what is allocated before it runs (its inputs).

CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
minus ``torch.cuda.memory_allocated`` before the call: exact bytes of tensors
from torch's caching allocator.

CPU: the process's peak resident set above its resident set before the call,
read from Linux's ``/proc/self/status`` (``VmHWM`` - ``VmRSS``) after
``grpo_kernels.release_cpu_workspace()`` and ``malloc_trim(0)`` (the buffers
our CPU ops keep between calls and the freed memory glibc holds go back to the
system, so every page the call touches counts, even when an earlier call
allocated it) and after resetting the peak by writing ``5`` to
``/proc/self/clear_refs``. Counts pages, so it can exceed the tensors' bytes by
the allocator's slack. Includes the outputs and the gradients the call returns.
Elsewhere (no /proc, no glibc): not measured (None).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path
from typing import Callable, Optional

import torch

import grpo_kernels

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)  # glibc only


def method(device: torch.device) -> str:
    """How :func:`peak_bytes_above` measures on ``device`` (recorded with the results)."""
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated - memory_allocated before"
    if _CLEAR_REFS.exists() and _MALLOC_TRIM is not None:
        return "peak RSS (VmHWM after release_cpu_workspace, malloc_trim and clear_refs) - RSS before"
    return "not measured"


def _status_bytes(key: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_bytes_above(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes of the highest memory use during one call of ``fn`` above the use before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not _CLEAR_REFS.exists() or _MALLOC_TRIM is None:
        return None
    grpo_kernels.release_cpu_workspace()
    _MALLOC_TRIM(0)
    _CLEAR_REFS.write_text("5")
    before = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - before)

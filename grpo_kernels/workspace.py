"""Memory the CPU fused-linear ops keep between calls: their logits tile and weight-copy buffers.

A ``[chunk_size, V]`` tile is 64 MiB and more at LM vocabularies. Allocated
anew on every call, it is paged in anew on every call (glibc maps blocks that
large and unmaps them when freed): about 90 ms for a 131 MB tile on the
2-core development VM, 7% of a fused-linear step there (docs/design.md); the
same for the float32 copy of a bf16/fp16 weight. So a CPU sweep holds these in
buffers from :func:`cpu_buffer`, which are kept when the sweep ends, up to
``KEEP_LIMIT_BYTES``. On a GPU torch's caching allocator keeps memory already.

:func:`release_cpu_workspace` frees what is kept (like
``torch.cuda.empty_cache``); :func:`keep_cpu_workspace` turns keeping off.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

# At most this many bytes are kept (the largest buffers that fit). The page faults a kept buffer saves are
# O(c·V) against the O(c·V·H) of the products that fill it: worth keeping for small heads, a few percent of the
# step for large ones, whose buffers are then not kept.
KEEP_LIMIT_BYTES = 256 << 20

_lock = threading.Lock()
_kept: list[Tensor] = []  # free uint8 buffers on the CPU (raw bytes, shared by every dtype)
_keep = True


@contextmanager
def cpu_buffer(numel: int, dtype: torch.dtype) -> Iterator[Tensor]:
    """A CPU buffer of ``numel`` elements of ``dtype``, uninitialized, for the ``with`` block (no view of it may
    outlive the block): the smallest kept buffer that is large enough, else a new one; kept afterwards."""
    size = numel * dtype.itemsize
    with _lock:
        fits = [i for i, raw in enumerate(_kept) if raw.numel() >= size]
        raw = _kept.pop(min(fits, key=lambda i: _kept[i].numel())) if fits else None
    if raw is None:
        raw = torch.empty(size, dtype=torch.uint8)
    try:
        yield raw[:size].view(dtype)
    finally:
        with _lock:
            if _keep:
                total, keep = 0, []
                for kept in sorted([*_kept, raw], key=Tensor.numel, reverse=True):
                    if total + kept.numel() <= KEEP_LIMIT_BYTES:
                        total += kept.numel()
                        keep.append(kept)
                _kept[:] = keep


def kept_bytes() -> int:
    """Bytes the CPU ops keep between calls now."""
    with _lock:
        return sum(raw.numel() for raw in _kept)


def release_cpu_workspace() -> int:
    """Free the memory the CPU fused-linear ops keep between calls (at most ``KEEP_LIMIT_BYTES``); returns its
    bytes.

    Nothing is lost: the next call allocates again. Call it after the loss step
    when the memory is wanted elsewhere, or turn keeping off with
    :func:`keep_cpu_workspace`.
    """
    with _lock:
        freed = sum(raw.numel() for raw in _kept)
        _kept.clear()
    return freed


def keep_cpu_workspace(keep: bool) -> bool:
    """Whether the CPU fused-linear ops keep their buffers between calls (default True); returns the previous
    setting. ``False`` also frees what is kept."""
    global _keep
    if not isinstance(keep, bool):
        raise TypeError(f"keep must be a bool, got {type(keep).__name__}")
    with _lock:
        previous, _keep = _keep, keep
    if not keep:
        release_cpu_workspace()
    return previous

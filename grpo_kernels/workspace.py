"""Memory the CPU fused-linear ops keep between calls: their logits tile, weight-copy and accumulator buffers.

A ``[chunk_size, V]`` tile is 64 MiB and more at LM vocabularies. Allocated
anew on every call, it is paged in anew on every call (glibc maps blocks that
large and unmaps them when freed): about 90 ms for a 131 MB tile on the
2-core development VM, 7% of a fused-linear step there (docs/design.md); the
same for the float32 copy of a bf16/fp16 weight and the float32 accumulator of
its gradient. So a CPU sweep holds these in buffers from :func:`cpu_buffer` (the
accumulator, which lives from the forward to the backward, from a
:class:`CpuLease`), kept when they are given back, up to ``KEEP_LIMIT_BYTES``.
On a GPU torch's caching allocator keeps memory already.

:func:`release_cpu_workspace` frees what is kept (like
``torch.cuda.empty_cache``); :func:`keep_cpu_workspace` turns keeping off.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

# At most this many bytes are kept (the largest buffers that fit): a [32000, 1024] bf16 head's float32 tile,
# weight copy and `d weight` accumulator (3 × 125 MiB). A kept buffer saves page faults in proportion to its
# size, against products in proportion to N times it: a few percent of any head's step, so the limit only bounds
# the memory held between calls; a larger head's buffers are allocated per call.
KEEP_LIMIT_BYTES = 512 << 20

_lock = threading.Lock()
_kept: list[Tensor] = []  # free uint8 buffers on the CPU (raw bytes, shared by every dtype)
_keep = True


def _take(size: int) -> Tensor:
    """Raw bytes, at least ``size``: the smallest kept buffer that is large enough and at most twice that (a small
    accumulator must not take the tile's buffer, which the tile then allocates anew), else a new one."""
    with _lock:
        fits = [i for i, raw in enumerate(_kept) if size <= raw.numel() <= 2 * size]
        raw = _kept.pop(min(fits, key=lambda i: _kept[i].numel())) if fits else None
    return torch.empty(size, dtype=torch.uint8) if raw is None else raw


def _give_back(raw: Tensor) -> None:
    """Keep ``raw`` for later calls (when keeping is on), the largest buffers up to ``KEEP_LIMIT_BYTES``."""
    with _lock:
        if _keep:
            total, keep = 0, []
            for kept in sorted([*_kept, raw], key=Tensor.numel, reverse=True):
                if total + kept.numel() <= KEEP_LIMIT_BYTES:
                    total += kept.numel()
                    keep.append(kept)
            _kept[:] = keep


class CpuLease:
    """A CPU buffer of ``numel`` elements of ``dtype``, uninitialized: a kept buffer that fits (:func:`_take`),
    else a new one, held until :meth:`release` (for memory that lives from a forward to its backward). A lease
    never released is freed with it, not kept."""

    def __init__(self, numel: int, dtype: torch.dtype):
        size = numel * dtype.itemsize
        self._raw: Optional[Tensor] = _take(size)
        self.tensor: Optional[Tensor] = self._raw[:size].view(dtype)  # uninitialized

    def release(self) -> None:
        """Give the buffer back (no view of :attr:`tensor` may be used afterwards); a second call does nothing."""
        raw, self._raw, self.tensor = self._raw, None, None
        if raw is not None:
            _give_back(raw)


@contextmanager
def cpu_buffer(numel: int, dtype: torch.dtype) -> Iterator[Tensor]:
    """A :class:`CpuLease`'s buffer for the ``with`` block (no view of it may outlive the block), given back at
    its end."""
    lease = CpuLease(numel, dtype)
    try:
        yield lease.tensor
    finally:
        lease.release()


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

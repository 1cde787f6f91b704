"""``group_advantages`` in Triton: a segmented reduction, one program per tile of groups.

Groups become contiguous segments of rows: rows ``[gG, (g+1)G)`` for ``group_size``
G, or, for ``group_ids``, the runs of a stable sort of the ids (``perm`` lists the
rows group after group, ``offsets[g]:offsets[g+1]`` is group g's run; groups come
out in sorted-id order, as the reference's ``torch.unique`` orders them). A
program takes ``GROUPS`` consecutive segments as the rows of a ``[GROUPS, BLOCK]``
tile and walks them ``BLOCK`` columns at a time, three times: count and sum of the
non-NaN rewards (→ mean), the sum of squared deviations from that mean (→ unbiased
std, numerically like the reference's two-pass formula), then each member's
advantage. Accumulation is in the compute dtype (float64 for float64 rewards,
else float32), with IEEE-rounded division and square root.

Launches per call: one in the common cases (1-D rewards, or ``[B, K]`` with
``sum_then_normalize`` after a small torch weighted row sum); plus one for
``scale="batch"`` (the whole-batch NaN-std, read by pointer, no host sync); the
``normalize_then_sum`` path runs the segment kernel over a ``(tiles, K)`` grid and
finishes with torch ops. Mapping ``group_ids`` to segments (a sort and the run
lengths) uses torch ops and one host read of the number of groups.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

# (largest average group size, BLOCK: segment columns per step, GROUPS: segments per program).
# Tiles hold at most 1024 elements; long segments loop over BLOCK-wide steps.
_TILES = (
    (2, 2, 512),
    (4, 4, 256),
    (8, 8, 128),
    (16, 16, 64),
    (32, 32, 32),
    (64, 64, 16),
    (128, 128, 8),
    (256, 256, 4),
    (512, 512, 2),
    (math.inf, 1024, 1),
)
_BATCH_BLOCK = 1024  # rows per step of the whole-batch NaN-std kernel
_NUM_WARPS = 4

_SCALES = {"group": 0, "batch": 1, "none": 2}


@triton.jit
def _div(a, b):
    # IEEE-rounded division (Triton's `/` on float32 is approximate on GPUs).
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _load_step(r_ptr, stride_rb, perm_ptr, start, length, j, cols, COMPUTE: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """Columns ``j + cols`` of the tile's segments: rewards (compute dtype), validity, rows, in-segment mask."""
    c = j + cols
    in_seg = c[None, :] < length[:, None]
    pos = start[:, None] + c[None, :]
    if CONTIGUOUS:
        row = pos
    else:
        row = tl.load(perm_ptr + pos, mask=in_seg, other=0)
    x = tl.load(r_ptr + row * stride_rb, mask=in_seg, other=0).to(COMPUTE)
    valid = in_seg & (x == x)
    return x, valid, row, in_seg


# Segment kernel. Grid (cdiv(num_groups, GROUPS), K); program (p, k) handles groups
# [p·GROUPS, (p+1)·GROUPS) of column k of r [B] / [B, K] (any stride, any float/int dtype,
# converted to COMPUTE on load). Reads: each segment's rewards 3 times (plus perm 3 times
# for group_ids; the 2nd/3rd reads of a tile that fits one BLOCK come from L1/L2), offsets
# twice per group, eps and the batch std once. Writes: B advantages (column k of adv) when
# WRITE_ADV, and mean/std [num_groups] when WRITE_STATS. FINALIZE applies nan_to_num(nan=0)
# (±inf → ±MAX_FLOAT) like the reference; without it NaN/inf advantages are written as is.
@triton.jit
def _segment_kernel(
    r_ptr, stride_rb, stride_rk,
    adv_ptr, stride_ab, stride_ak,
    mean_ptr, std_ptr,
    perm_ptr, offsets_ptr,
    eps_ptr, batch_std_ptr,
    num_groups, group_size,
    COMPUTE: tl.constexpr, CONTIGUOUS: tl.constexpr, SCALE: tl.constexpr, RLOO: tl.constexpr,
    WRITE_ADV: tl.constexpr, FINALIZE: tl.constexpr, WRITE_STATS: tl.constexpr, MAX_FLOAT: tl.constexpr,
    GROUPS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64)
    r_ptr += k * stride_rk
    adv_ptr += k * stride_ak
    g = pid * GROUPS + tl.arange(0, GROUPS)
    g_mask = g < num_groups
    if CONTIGUOUS:
        start = g * group_size
        length = tl.where(g_mask, group_size, 0)
        steps = group_size
    else:
        start = tl.load(offsets_ptr + g, mask=g_mask, other=0)
        length = tl.load(offsets_ptr + g + 1, mask=g_mask, other=0) - start
        steps = tl.max(length, axis=0)
    cols = tl.arange(0, BLOCK)

    # Pass 1: count and sum of the non-NaN rewards.
    cnt = tl.zeros([GROUPS, BLOCK], dtype=tl.int32)
    tot = tl.zeros([GROUPS, BLOCK], dtype=COMPUTE)
    for j in range(0, steps, BLOCK):
        x, valid, row, in_seg = _load_step(r_ptr, stride_rb, perm_ptr, start, length, j, cols, COMPUTE, CONTIGUOUS)
        cnt += valid.to(tl.int32)
        tot += tl.where(valid, x, 0.0)
    count = tl.sum(cnt, axis=1).to(COMPUTE)
    mean = _div(tl.sum(tot, axis=1), count)  # NaN for a group without a value (0 / 0)

    # Pass 2: sum of squared deviations from the mean.
    ss = tl.zeros([GROUPS, BLOCK], dtype=COMPUTE)
    for j in range(0, steps, BLOCK):
        x, valid, row, in_seg = _load_step(r_ptr, stride_rb, perm_ptr, start, length, j, cols, COMPUTE, CONTIGUOUS)
        d = x - mean[:, None]
        ss += tl.where(valid, d * d, 0.0)
    std = _sqrt(_div(tl.sum(ss, axis=1), count - 1))
    std = tl.where(count > 1, std, float("nan"))
    if WRITE_STATS:
        tl.store(mean_ptr + g, mean, mask=g_mask)
        tl.store(std_ptr + g, std, mask=g_mask)

    # Pass 3: advantages (SCALE: 0 group std, 1 batch std, 2 none).
    tl.static_assert(SCALE == 0 or SCALE == 1 or SCALE == 2, "unknown scale code")
    if WRITE_ADV:
        eps = tl.load(eps_ptr)
        if SCALE == 0:
            den = std + eps
        elif SCALE == 1:
            den = tl.load(batch_std_ptr + k) + eps
        for j in range(0, steps, BLOCK):
            x, valid, row, in_seg = _load_step(r_ptr, stride_rb, perm_ptr, start, length, j, cols, COMPUTE, CONTIGUOUS)
            a = x - mean[:, None]
            if RLOO:
                # leave-one-out baseline: r - (n·mean - r)/(n - 1) = n/(n - 1)·(r - mean); NaN for n < 2
                n = count[:, None]
                a = tl.where(n > 1, _div(a * n, n - 1), float("nan"))
            if SCALE == 0:
                a = _div(a, den[:, None])
            elif SCALE == 1:
                a = _div(a, den)
            if FINALIZE:  # torch.nan_to_num(a, nan=0.0)
                a = tl.where(a != a, 0.0, a)
                a = tl.where(a == float("inf"), MAX_FLOAT, a)
                a = tl.where(a == float("-inf"), -MAX_FLOAT, a)
            tl.store(adv_ptr + row * stride_ab, a.to(adv_ptr.dtype.element_ty), mask=in_seg)


# Whole-batch NaN-ignoring unbiased std of each column. Grid (K,); program k reads column k
# of r [B] / [B, K] twice (count and sum, then squared deviations from the mean) and writes
# std[k] (NaN for fewer than 2 values): 2·B·K reads, K writes.
@triton.jit
def _nan_std_kernel(r_ptr, stride_rb, stride_rk, std_ptr, B, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    r_ptr += k * stride_rk
    cols = tl.arange(0, BLOCK).to(tl.int64)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    tot = tl.zeros([BLOCK], dtype=COMPUTE)
    for j in range(0, B, BLOCK):
        rows = j + cols
        m = rows < B
        x = tl.load(r_ptr + rows * stride_rb, mask=m, other=0).to(COMPUTE)
        valid = m & (x == x)
        cnt += valid.to(tl.int32)
        tot += tl.where(valid, x, 0.0)
    count = tl.sum(cnt, axis=0).to(COMPUTE)
    mean = _div(tl.sum(tot, axis=0), count)
    ss = tl.zeros([BLOCK], dtype=COMPUTE)
    for j in range(0, B, BLOCK):
        rows = j + cols
        m = rows < B
        x = tl.load(r_ptr + rows * stride_rb, mask=m, other=0).to(COMPUTE)
        valid = m & (x == x)
        d = x - mean
        ss += tl.where(valid, d * d, 0.0)
    std = _sqrt(_div(tl.sum(ss, axis=0), count - 1))
    std = tl.where(count > 1, std, float("nan"))
    tl.store(std_ptr + k, std)


def _ieee(device: torch.device):
    """The kernels rely on IEEE 0/0 = NaN, x/0 = ±inf: silence NumPy's warnings under the CPU interpreter."""
    if device.type != "cpu":
        return contextlib.nullcontext()
    import numpy

    return numpy.errstate(divide="ignore", invalid="ignore", over="ignore")


def _triton_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _max_float(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).max


def _segments(n: int, group_size: Optional[int], group_ids: Optional[Tensor], device):
    """(num_groups, perm, offsets): perm/offsets are None for contiguous groups."""
    if group_ids is None:
        return n // group_size, None, None
    sorted_ids, perm = torch.sort(group_ids.detach(), stable=True)
    counts = torch.unique_consecutive(sorted_ids, return_counts=True)[1]
    num_groups = counts.numel()  # host int (the reference's torch.unique has the same sync)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return num_groups, perm, offsets


def _tile(n: int, num_groups: int) -> tuple[int, int]:
    average = n / num_groups
    block, groups = next((b, g) for limit, b, g in _TILES if average <= limit)
    return block, max(1, min(groups, triton.next_power_of_2(num_groups)))


def _nan_std(r: Tensor, dtype: torch.dtype) -> Tensor:
    """NaN-std of each column of ``r`` ([B] → [1], [B, K] → [K]) on device."""
    r2 = r if r.ndim == 2 else r[:, None]
    out = torch.empty(r2.shape[1], dtype=dtype, device=r.device)
    with _ieee(r.device):
        _nan_std_kernel[(r2.shape[1],)](
            r2, r2.stride(0), r2.stride(1), out, r2.shape[0],
            COMPUTE=_triton_dtype(dtype), BLOCK=_BATCH_BLOCK, num_warps=_NUM_WARPS,
        )
    return out


def _run_segments(r: Tensor, dtype: torch.dtype, adv: Optional[Tensor], segments, group_size, eps_t: Tensor,
                  scale: str, estimator: str, finalize: bool, stats: bool):
    """Launch the segment kernel on r [B] / [B, K]; fills adv (same shape) if given; returns (mean, std) or None."""
    num_groups, perm, offsets = segments
    n = r.shape[0]
    r2 = r if r.ndim == 2 else r[:, None]
    a2 = None if adv is None else (adv if adv.ndim == 2 else adv[:, None])
    batch_std = _nan_std(r2, dtype) if (scale == "batch" and a2 is not None) else eps_t
    mean = torch.empty(num_groups, dtype=dtype, device=r.device) if stats else eps_t
    std = torch.empty(num_groups, dtype=dtype, device=r.device) if stats else eps_t
    block, groups = _tile(n, num_groups)
    grid = (triton.cdiv(num_groups, groups), r2.shape[1])
    out = a2 if a2 is not None else mean
    with _ieee(r.device):
        _segment_kernel[grid](
            r2, r2.stride(0), r2.stride(1),
            out, a2.stride(0) if a2 is not None else 0, a2.stride(1) if a2 is not None else 0,
            mean, std,
            perm if perm is not None else eps_t,
            offsets if offsets is not None else eps_t,
            eps_t, batch_std,
            num_groups, group_size if group_size is not None else 0,
            COMPUTE=_triton_dtype(dtype), CONTIGUOUS=perm is None, SCALE=_SCALES[scale], RLOO=estimator == "rloo",
            WRITE_ADV=a2 is not None, FINALIZE=finalize, WRITE_STATS=stats, MAX_FLOAT=_max_float(dtype),
            GROUPS=groups, BLOCK=block, num_warps=_NUM_WARPS,
        )
    return (mean, std) if stats else None


def group_advantages(
    rewards: Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    scale: str = "group",
    estimator: str = "grpo",
    eps: float = 1e-4,
    reward_weights: Optional[Tensor] = None,
    multi_objective: str = "sum_then_normalize",
    return_stats: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Triton :func:`grpo_kernels.reference.group_advantages` (same arguments, numbers, dtypes).

    The outputs are not differentiable (advantages are constants of the loss).
    """
    rewards = rewards.detach()
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    device = rewards.device
    segments = _segments(rewards.shape[0], group_size, group_ids, device)
    eps_t = torch.full((1,), float(eps), dtype=dtype, device=device)  # eps in the compute dtype, by pointer

    r = rewards  # 1-D: converted to the compute dtype inside the kernel
    if rewards.ndim == 2:
        r = rewards.to(dtype)
        if reward_weights is None:
            w = torch.ones(r.shape[1], dtype=dtype, device=device)
        else:
            w = reward_weights.detach().to(r)
        unscorable = torch.isnan(r).all(dim=1)
        nan = torch.full_like(r[:, 0], float("nan"))
        if multi_objective == "sum_then_normalize":
            r = torch.where(unscorable, nan, torch.nansum(r * w, dim=1))
        elif multi_objective == "normalize_then_sum":
            columns = torch.empty_like(r)
            _run_segments(r, dtype, columns, segments, group_size, eps_t, scale, estimator,
                          finalize=False, stats=False)
            s = torch.where(unscorable, nan, torch.nansum(columns * w, dim=1))
            adv = torch.nan_to_num((s - torch.nanmean(s)) / (_nan_std(s, dtype) + eps), nan=0.0)
            if not return_stats:
                return adv
            mean, std = _run_segments(s, dtype, None, segments, group_size, eps_t, "none", estimator,
                                      finalize=False, stats=True)
            return adv, mean, std
        else:
            raise ValueError(f"multi_objective must be 'sum_then_normalize' or 'normalize_then_sum', got "
                             f"{multi_objective!r}")

    adv = torch.empty(rewards.shape[0], dtype=dtype, device=device)
    stats = _run_segments(r, dtype, adv, segments, group_size, eps_t, scale, estimator,
                          finalize=True, stats=return_stats)
    return (adv, *stats) if return_stats else adv

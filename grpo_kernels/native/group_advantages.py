"""``group_advantages`` over the extension's per-group kernel (``group_normalize``).

The groups are segments of a row order: contiguous groups of ``group_size``
rows, or the rows sorted (stably) by ``group_ids``. The kernel forms each
group's NaN-ignoring mean and unbiased std and the advantages of each reward
column; the multi-reward bookkeeping (weighted sums, the final batch
standardization of ``normalize_then_sum``) and ``nan_to_num`` are torch ops
here, as written in :func:`grpo_kernels.reference.group_advantages`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .._extension import _C

_SCALES = {"group": 0, "batch": 1, "none": 2}


def _segments(n: int, group_size: Optional[int], group_ids: Optional[Tensor], device) -> tuple:
    """``(order, offsets)``: group g is rows ``order[offsets[g]:offsets[g + 1]]`` (order None: rows in order)."""
    if group_ids is None:
        return None, torch.arange(0, n + 1, group_size, dtype=torch.int64, device=device)
    sorted_ids, order = torch.sort(group_ids.detach(), stable=True)
    counts = torch.unique_consecutive(sorted_ids, return_counts=True)[1]
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return order, offsets


def _batch_std(r: Tensor) -> Tensor:
    """NaN-ignoring unbiased std of each column of ``r [B, K]`` over the whole batch (``[K]``)."""
    whole = torch.tensor([0, r.shape[0]], dtype=torch.int64, device=r.device)
    return _C.group_normalize(r, None, whole, None, 0.0, _SCALES["none"], False)[2][0]


def _normalize(r: Tensor, segments: tuple, scale: str, estimator: str, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Advantages ``[B, K]`` (NaN where undefined), per-group mean and std ``[G, K]`` of ``r [B, K]``."""
    order, offsets = segments
    if scale not in _SCALES or estimator not in ("grpo", "rloo"):
        raise ValueError(f"scale must be one of {list(_SCALES)} and estimator 'grpo' or 'rloo', got {scale!r}, "
                         f"{estimator!r}")
    batch_std = _batch_std(r) if scale == "batch" else None
    return _C.group_normalize(r, order, offsets, batch_std, float(eps), _SCALES[scale], estimator == "rloo")


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
    """:func:`grpo_kernels.reference.group_advantages` with the extension's kernel (inputs already validated).

    The outputs are not differentiable (advantages are constants of the loss).
    """
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(dtype)
    segments = _segments(r.shape[0], group_size, group_ids, r.device)

    if r.ndim == 2:
        w = torch.ones(r.shape[1], dtype=dtype, device=r.device) if reward_weights is None else reward_weights.to(r)
        unscorable = torch.isnan(r).all(dim=1)
        nan = torch.full_like(r[:, 0], float("nan"))
        if multi_objective == "sum_then_normalize":
            r = torch.where(unscorable, nan, torch.nansum(r * w, dim=1))
        elif multi_objective == "normalize_then_sum":
            columns = _normalize(r, segments, scale, estimator, eps)[0]
            s = torch.where(unscorable, nan, torch.nansum(columns * w, dim=1))
            adv = torch.nan_to_num((s - torch.nanmean(s)) / (_batch_std(s[:, None])[0] + eps), nan=0.0)
            if not return_stats:
                return adv
            _, mean, std = _normalize(s[:, None], segments, "none", "grpo", eps)
            return adv, mean[:, 0], std[:, 0]
        else:
            raise ValueError(f"multi_objective must be 'sum_then_normalize' or 'normalize_then_sum', got "
                             f"{multi_objective!r}")

    adv, mean, std = _normalize(r[:, None], segments, scale, estimator, eps)
    adv = torch.nan_to_num(adv[:, 0], nan=0.0)
    return (adv, mean[:, 0], std[:, 0]) if return_stats else adv

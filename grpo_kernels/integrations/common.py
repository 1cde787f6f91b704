"""What the trainer integrations share: the reduction a trainer's loss maps to, and the metrics' masked mean."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor


class LossAggregation(NamedTuple):
    """A trainer's loss reduction as ours: ``grpo_loss(loss_type=..., **options)`` times ``scale``."""

    loss_type: str
    options: dict
    scale: Union[float, Tensor]


def masked_mean(x: Tensor, mask: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The mean of ``x`` over the positions ``mask`` (bool or 0/1) keeps, 0 when it keeps none, in ``dtype``
    (default: ``x``'s, float32 for a bool ``x``). Dropped positions may hold anything (NaN, ±inf): they are
    selected away, never multiplied by 0."""
    keep = mask if mask.dtype == torch.bool else mask != 0
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.float32
    x = x.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    return torch.where(keep, x, zero).sum() / keep.sum().clamp(min=1).to(dtype)

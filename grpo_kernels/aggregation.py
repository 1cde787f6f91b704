"""The loss aggregation shared by the kernel backends.

Kernels reduce each sequence ``i`` of a ``[B, T]`` batch to a few partial sums
(Σ m·ℓ, Σ m, Σ m·KL, Σ m·low, Σ m·high, Σ m·region) and keep the statistics of
the sequence its tokens' losses used (see the P_* rows); these functions turn them into the scalar loss and metrics of
:func:`grpo_kernels.reference.grpo_loss`, with torch ops on the device (no
host synchronization), and give ``dL/dS_i``, the weight of sequence ``i``'s
masked loss sum in the loss, from which the backward kernels start.

The expressions are written as in the reference, so that a backend's scalars
round like the reference's.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .loss_table import Aggregation, loss_type_row

# Rows of the per-sequence partials [NUM_PARTIALS, B]: the sums, then the sequence statistics (first pass):
# P_SEQ_LOG_RATIO: log of the sequence's ratio (GSPO: mean log-ratio; GMPO: clipped mean log-ratio; VESPO: log w);
# P_SEQ_ADV: GMPO's mean advantage; P_SEQ_IS: the sequence's importance weight (GMPO: geometric mean of the token
# weights; else the sequence-level rollout ratio; 1 without); P_SEQ_KL: mean KL of the off-policy mask.
P_LOSS, P_COUNT, P_KL, P_LOW, P_HIGH, P_REGION, P_SEQ_LOG_RATIO, P_SEQ_ADV, P_SEQ_IS, P_SEQ_KL = range(10)
NUM_PARTIALS = 10


class Aggregate(NamedTuple):
    loss: Tensor
    kl: Tensor
    clip_ratio_low: Tensor
    clip_ratio_high: Tensor
    clip_ratio_region: Tensor


def sequence_weights(
    seq_count: Tensor,
    loss_type: str,
    T: int,
    *,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
) -> Tensor:
    """``dL/dS_i`` (a ``[B]`` tensor, or a 0-d one broadcast over B) from the masked token counts ``[B]``.

    The loss is ``Σ_i dL/dS_i · S_i`` with ``S_i = Σ_t m_{i,t} ℓ_{i,t}``: the
    weights depend on the mask only, so they are known before any log-prob.
    """
    B = seq_count.shape[0]
    dtype, device = seq_count.dtype, seq_count.device
    aggregation = loss_type_row(loss_type).aggregation
    if aggregation is Aggregation.SEQUENCE_MEAN:
        return 1.0 / seq_count.clamp(min=1.0) / B
    if aggregation is Aggregation.BATCH_TOKEN_MEAN:
        return 1.0 / seq_count.sum().clamp(min=1.0)
    if aggregation is Aggregation.FIXED_LENGTH:
        length = T if max_completion_length is None else max_completion_length
        return torch.full((), 1.0 / (B * length), dtype=dtype, device=device)
    if aggregation is Aggregation.TOKEN_SUM:
        return 1.0 / _token_normalizer(seq_count, num_items_in_batch)
    if aggregation is Aggregation.SEQUENCE_SUM:
        return torch.full((), 1.0 / B, dtype=dtype, device=device)
    raise _unknown(aggregation, loss_type)


def _unknown(aggregation: Aggregation, loss_type: str) -> ValueError:
    return ValueError(f"unknown aggregation {aggregation!r} of loss_type {loss_type!r}")


def _token_normalizer(seq_count: Tensor, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        return seq_count.sum().clamp(min=1.0)
    normalizer = torch.as_tensor(num_items_in_batch, dtype=seq_count.dtype)
    return normalizer.to(device=seq_count.device, dtype=seq_count.dtype).reshape(()).clamp(min=1.0)


def aggregate(
    partials: Tensor,
    loss_type: str,
    T: int,
    *,
    has_ref: bool,
    per_seq_metrics: bool,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
) -> Aggregate:
    """The loss and metrics from the per-sequence partials ``[NUM_PARTIALS, B]``.

    ``per_seq_metrics``: the clip partials hold one 0/1 flag per sequence
    (sequence-level ratio with per-sequence advantages), averaged over B.
    """
    B = partials.shape[1]
    seq_loss, seq_count = partials[P_LOSS], partials[P_COUNT]
    token_denom = seq_count.sum().clamp(min=1.0)
    aggregation = loss_type_row(loss_type).aggregation
    if aggregation is Aggregation.SEQUENCE_MEAN:
        loss = (seq_loss / seq_count.clamp(min=1.0)).mean()
    elif aggregation is Aggregation.BATCH_TOKEN_MEAN:
        loss = seq_loss.sum() / token_denom
    elif aggregation is Aggregation.FIXED_LENGTH:
        length = T if max_completion_length is None else max_completion_length
        loss = seq_loss.sum() / (B * length)
    elif aggregation is Aggregation.TOKEN_SUM:
        loss = seq_loss.sum() / _token_normalizer(seq_count, num_items_in_batch)
    elif aggregation is Aggregation.SEQUENCE_SUM:
        loss = seq_loss.mean()
    else:
        raise _unknown(aggregation, loss_type)
    kl = partials[P_KL].sum() / token_denom if has_ref else loss.new_zeros(())
    metric_denom = B if per_seq_metrics else token_denom
    return Aggregate(
        loss=loss,
        kl=kl,
        clip_ratio_low=partials[P_LOW].sum() / metric_denom,
        clip_ratio_high=partials[P_HIGH].sum() / metric_denom,
        clip_ratio_region=partials[P_REGION].sum() / metric_denom,
    )

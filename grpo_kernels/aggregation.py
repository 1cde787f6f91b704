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
NUM_SUMS = P_SEQ_LOG_RATIO  # the rows that are sums over tokens (the loss and metrics add them over sequences)


class Aggregate(NamedTuple):
    loss: Tensor
    kl: Tensor
    clip_ratio_low: Tensor
    clip_ratio_high: Tensor
    clip_ratio_region: Tensor


class Rule(NamedTuple):
    """An aggregation as arithmetic: ``loss = reduce_i(S_i / per_sequence_i) / batch`` (a missing divisor is
    not applied), ``reduce`` the mean over sequences or the sum."""

    per_sequence: Optional[Tensor]  # [B] divisors of the sequences' sums
    mean_over_sequences: bool
    batch: Optional[Union[int, Tensor]]  # divisor of the reduced sum: a Python int or a 0-d tensor


def rule(
    seq_count: Tensor,
    loss_type: str,
    T: int,
    *,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
    total_count: Optional[Tensor] = None,
) -> Rule:
    """The arithmetic of ``loss_type``'s aggregation (the loss table's) for the masked token counts ``[B]``
    (``total_count``: their sum, when the caller has it)."""
    aggregation = loss_type_row(loss_type).aggregation
    if total_count is None and aggregation in (Aggregation.BATCH_TOKEN_MEAN, Aggregation.TOKEN_SUM):
        total_count = seq_count.sum()
    if aggregation is Aggregation.SEQUENCE_MEAN:
        return Rule(seq_count.clamp(min=1.0), mean_over_sequences=True, batch=None)
    if aggregation is Aggregation.BATCH_TOKEN_MEAN:
        return Rule(None, mean_over_sequences=False, batch=total_count.clamp(min=1.0))
    if aggregation is Aggregation.FIXED_LENGTH:
        length = T if max_completion_length is None else max_completion_length
        return Rule(None, mean_over_sequences=False, batch=seq_count.shape[0] * length)
    if aggregation is Aggregation.TOKEN_SUM:
        return Rule(None, mean_over_sequences=False, batch=_token_normalizer(total_count, num_items_in_batch))
    if aggregation is Aggregation.SEQUENCE_SUM:
        return Rule(None, mean_over_sequences=True, batch=None)
    raise ValueError(f"unknown aggregation {aggregation!r} of loss_type {loss_type!r}")


class KernelRule(NamedTuple):
    """:func:`rule` as plain numbers, for an aggregation done by host code (the CPU backend's
    ``_C.LossAggregation``): ``loss = reduce_i(S_i / max(n_i, 1) if count_per_sequence else S_i) / batch`` with
    ``batch = max(N, 1)`` (N masked tokens) when ``batch_tokens``, else ``B · batch_length``, else
    ``max(batch_number, 1)``, else no division."""

    count_per_sequence: bool
    mean_over_sequences: bool
    batch_tokens: bool
    batch_length: Optional[int]
    batch_number: Optional[float]


def kernel_rule(
    loss_type: str,
    T: int,
    *,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
) -> KernelRule:
    """The arithmetic of ``loss_type``'s aggregation as :func:`rule` forms it, in numbers (a tensor
    ``num_items_in_batch`` is read: a host synchronization on an accelerator)."""
    aggregation = loss_type_row(loss_type).aggregation
    if aggregation is Aggregation.SEQUENCE_MEAN:
        return KernelRule(count_per_sequence=True, mean_over_sequences=True, batch_tokens=False, batch_length=None,
                          batch_number=None)
    if aggregation is Aggregation.BATCH_TOKEN_MEAN:
        return KernelRule(count_per_sequence=False, mean_over_sequences=False, batch_tokens=True, batch_length=None,
                          batch_number=None)
    if aggregation is Aggregation.FIXED_LENGTH:
        return KernelRule(count_per_sequence=False, mean_over_sequences=False, batch_tokens=False,
                          batch_length=T if max_completion_length is None else max_completion_length,
                          batch_number=None)
    if aggregation is Aggregation.TOKEN_SUM:
        if num_items_in_batch is None:
            return KernelRule(count_per_sequence=False, mean_over_sequences=False, batch_tokens=True,
                              batch_length=None, batch_number=None)
        return KernelRule(count_per_sequence=False, mean_over_sequences=False, batch_tokens=False, batch_length=None,
                          batch_number=float(num_items_in_batch))
    if aggregation is Aggregation.SEQUENCE_SUM:
        return KernelRule(count_per_sequence=False, mean_over_sequences=True, batch_tokens=False, batch_length=None,
                          batch_number=None)
    raise ValueError(f"unknown aggregation {aggregation!r} of loss_type {loss_type!r}")


def reduce(seq_sums: Tensor, r: Rule, total: Optional[Tensor] = None) -> Tensor:
    """The loss from the sequences' masked loss sums ``[B]`` (as the reference writes it; ``total``: their sum,
    when the caller has it)."""
    if r.per_sequence is not None:
        x = seq_sums / r.per_sequence
        x = x.mean() if r.mean_over_sequences else x.sum()
    elif r.mean_over_sequences:
        x = seq_sums.mean()
    else:
        x = seq_sums.sum() if total is None else total
    return x if r.batch is None else x / r.batch


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
    r = rule(seq_count, loss_type, T, max_completion_length=max_completion_length,
             num_items_in_batch=num_items_in_batch)
    B = seq_count.shape[0]
    if r.per_sequence is not None:
        weights = 1.0 / r.per_sequence / B if r.mean_over_sequences else 1.0 / r.per_sequence
        return weights if r.batch is None else weights / r.batch
    scale = 1.0 / B if r.mean_over_sequences else 1.0
    if isinstance(r.batch, Tensor):
        return scale / r.batch
    total = scale if r.batch is None else scale / r.batch
    return torch.full((), total, dtype=seq_count.dtype, device=seq_count.device)


def _token_normalizer(total_count: Tensor, num_items_in_batch) -> Tensor:
    if num_items_in_batch is None:
        return total_count.clamp(min=1.0)
    normalizer = torch.as_tensor(num_items_in_batch, dtype=total_count.dtype)
    return normalizer.to(device=total_count.device, dtype=total_count.dtype).reshape(()).clamp(min=1.0)


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
    # the sum rows added over the sequences in one op: Σ S_i, Σ n_i, Σ KL, Σ low, Σ high, Σ region
    total_loss, total_count, total_kl, total_low, total_high, total_region = partials[:NUM_SUMS].sum(1).unbind()
    token_denom = total_count.clamp(min=1.0)
    loss = reduce(partials[P_LOSS], rule(partials[P_COUNT], loss_type, T, max_completion_length=max_completion_length,
                                         num_items_in_batch=num_items_in_batch, total_count=total_count),
                  total=total_loss)
    metric_denom = B if per_seq_metrics else token_denom
    return Aggregate(  # each a new tensor (no view of the sums)
        loss=loss,
        kl=total_kl / token_denom if has_ref else loss.new_zeros(()),
        clip_ratio_low=total_low / metric_denom,
        clip_ratio_high=total_high / metric_denom,
        clip_ratio_region=total_region / metric_denom,
    )

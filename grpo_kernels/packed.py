"""The GRPO loss on packed sequences (``cu_seqlens``), without padding.

Layout (flash-attention's): the ``B`` sequences lie one after another in ``[total]`` (or ``[1, total]``)
tensors; sequence ``i`` is ``[cu_seqlens[i], cu_seqlens[i + 1])``. Semantics:
:func:`grpo_kernels.reference.packed_grpo_loss` (the loss of the padded ``[B, max length]`` batch).

Here no ``[B, T]`` tensor is formed. Each token is handed to :func:`grpo_kernels.reference.grpo_loss` as a
sequence of length 1 (``[total, 1]``): a token's loss depends on its own inputs and, at sequence level, on its
sequence's importance ratio only. The sequence-level log-ratio ``w_i = Σ_t m r / max(1, Σ_t m)`` is formed by
segment sums (``index_add``) and enters as the token's old log-prob ``logp − w_i`` (both differentiable), so
the length-1 sequence's ratio is ``exp(w_i)`` and the gradient reaches every token of the sequence through
``w_i``; the KL and cispo terms still see the token's own log-prob. The per-sequence sums ``S_i``, ``n_i`` are
segment sums again, aggregated by :func:`grpo_kernels.aggregation.aggregate`. Clip ratios that are means over
sequences (sequence level with per-sequence advantages) come from one more length-1 call on the ``B``
sequence ratios. Cost: ``O(total)`` torch ops (a few dozen elementwise kernels), no host sync but one read of
the longest length (dr_grpo's default normalizer and the metric rule).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import reference
from .aggregation import NUM_PARTIALS, P_COUNT, P_LOSS, aggregate
from .kernel_options import LOSS_DEFAULTS
from .reference import GRPOLossOutput

# Options that only the aggregation reads (the per-token calls leave them out).
_AGGREGATION_OPTIONS = ("max_completion_length", "num_items_in_batch")


class Segments(NamedTuple):
    """The sequences of a packed batch."""

    index: Tensor  # [total] int64: the sequence of each token
    num_seqs: int
    longest: int  # the padded layout's T


def segments(cu_seqlens: Tensor, total: int) -> Segments:
    """The :class:`Segments` of ``cu_seqlens [B + 1]`` (validated) over ``total`` tokens."""
    lengths = cu_seqlens.diff().to(torch.int64)
    num_seqs = lengths.numel()
    index = torch.repeat_interleave(torch.arange(num_seqs, device=cu_seqlens.device), lengths, output_size=total)
    return Segments(index, num_seqs, int(lengths.max()))


def per_token(t: Optional[Tensor], seg: Segments, dtype: torch.dtype) -> Optional[Tensor]:
    """A per-sequence ``[B]`` or per-token ``[total]`` (any shape of that many elements) tensor as ``[total]``."""
    if t is None:
        return None
    t = t.reshape(-1).to(dtype)
    return t[seg.index] if t.numel() == seg.num_seqs and seg.index.numel() != seg.num_seqs else t


def segment_sum(x: Tensor, seg: Segments) -> Tensor:
    """``[B]``: the sum of ``x [total]`` over each sequence (differentiable)."""
    return x.new_zeros(seg.num_seqs).index_add(0, seg.index, x)


def per_seq_metrics(advantages: Tensor, seg: Segments, importance_sampling_level: str) -> bool:
    """The clip ratios are means over sequences (as the padded reference's ``[B, 1]`` flags)."""
    per_seq_adv = advantages.numel() == seg.num_seqs
    return importance_sampling_level == "sequence" and per_seq_adv and seg.longest != 1


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    cu_seqlens: Tensor,
    **loss_options,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.packed_grpo_loss` without padding (inputs validated); ``loss_options``
    are the keyword options of the reference ``grpo_loss`` (absent ones take its defaults).
    ``per_token_loss`` has the shape of ``logprobs``."""
    o = {**LOSS_DEFAULTS, **loss_options}
    dtype = reference.compute_dtype(logprobs)
    seg = segments(cu_seqlens, logprobs.numel())
    keep = mask.reshape(-1).to(torch.bool)
    m = keep.to(dtype)
    # masked tokens are selected away before any arithmetic (reference.grpo_loss does the same for the rest)
    logp = reference.mask_select(keep, logprobs.reshape(-1).to(dtype), 0.0)
    old = logp.detach() if old_logprobs is None else reference.mask_select(keep, old_logprobs.reshape(-1).to(dtype),
                                                                           0.0)
    adv = per_token(advantages, seg, dtype)
    sequence_level = o["importance_sampling_level"] == "sequence"
    if sequence_level:
        log_w = segment_sum((logp - old) * m, seg) / segment_sum(m, seg).clamp(min=1.0)
        old = logp - log_w[seg.index]

    def column(name: str) -> Optional[Tensor]:
        t = per_token(o[name], seg, dtype)
        return None if t is None else t[:, None]

    options = {k: v for k, v in o.items() if k not in _AGGREGATION_OPTIONS}
    options.update(importance_sampling_level="token", ref_logprobs=column("ref_logprobs"),
                   importance_weights=column("importance_weights"))
    tokens = reference.grpo_loss(logp[:, None], old[:, None], adv[:, None], m[:, None], **options)
    per_token_loss = tokens.per_token_loss[:, 0]
    rows = [m.new_zeros(seg.num_seqs)] * NUM_PARTIALS  # placeholders: only the loss is aggregated here
    rows[P_LOSS], rows[P_COUNT] = segment_sum(per_token_loss * m, seg), segment_sum(m, seg)
    loss = aggregate(torch.stack(rows), o["loss_type"], seg.longest, has_ref=False, per_seq_metrics=False,
                     max_completion_length=o["max_completion_length"],
                     num_items_in_batch=o["num_items_in_batch"]).loss
    low, high, region = tokens.clip_ratio_low, tokens.clip_ratio_high, tokens.clip_ratio_region
    if per_seq_metrics(advantages, seg, o["importance_sampling_level"]):
        # one flag per sequence: its ratio exp(w_i) against its advantage, averaged over the B sequences
        ones = torch.ones(seg.num_seqs, 1, dtype=dtype, device=logp.device)
        options.update(ref_logprobs=None, importance_weights=None, beta=0.0)
        seq_adv = advantages.reshape(-1, 1).to(dtype)
        seq_adv = torch.where(segment_sum(m, seg)[:, None] > 0, seq_adv, torch.zeros_like(seq_adv))
        flags = reference.grpo_loss(log_w.detach()[:, None], torch.zeros_like(ones), seq_adv, ones, **options)
        low, high, region = flags.clip_ratio_low, flags.clip_ratio_high, flags.clip_ratio_region
    return GRPOLossOutput(loss=loss, per_token_loss=per_token_loss.view(logprobs.shape), kl=tokens.kl,
                          clip_ratio_low=low, clip_ratio_high=high, clip_ratio_region=region)

"""Scale-out over ``torch.distributed``: vocabulary-parallel log-probs, data-parallel loss normalization.

Vocabulary (tensor) parallelism, ``vocab_group``
    Rank ``r`` of the group holds the contiguous vocabulary shard ``[start_r, start_r + V_r)`` of the logits (or
    of the LM head's weight rows), shards in group-rank order, any sizes ``V_r >= 1``. The offsets come from
    one ``all_gather`` of the shard sizes per call (:func:`vocab_shards`). Every rank holds the same token ids.

    Forward: each rank runs its backend's row kernel on its shard (``row_statistics`` of the backend's
    ``token_logprobs`` module) and gets, per row, the shard's log-sum-exp ``lse_r`` of ``z = x / T``, the
    shard-local log-prob ``logp_r = z_y − lse_r`` of the target when the shard holds it, and the shard's
    entropy ``H_r``. One ``all_gather`` of these 2 (3 with entropy) numbers per row; every rank then combines
    them in the same order, so all ranks hold the same results:

    .. math::
        \\mathrm{lse} = \\log \\textstyle\\sum_r e^{\\mathrm{lse}_r},\\qquad
        \\mathrm{logp} = \\mathrm{logp}_o + (\\mathrm{lse}_o - \\mathrm{lse}),\\qquad
        H = \\textstyle\\sum_r w_r (H_r - \\log w_r),\\ w_r = e^{\\mathrm{lse}_r - \\mathrm{lse}}

    (``o`` the shard holding the target; ``H`` is the entropy of a mixture of the shards' distributions with
    weights ``w_r``). Every statistic is the kernel's own float32 (float64) result: no one-hot trick, the
    rounding of the single-process kernel plus one of the combination.

    Backward: no communication. Shard ``r``'s gradient is the row kernel's backward with the global ``lse``
    and ``H`` and the (replicated) ``dL/dlogp``, ``dL/dH``: ``(g (onehot_y − p) − g_H p (log p + H)) / T`` with
    ``p = e^{z − lse}``, the one-hot term only on the shard holding the target. For the LM head
    (:mod:`grpo_kernels.linear`), ``d weight`` and ``d bias`` of a shard are local; ``d hidden`` is summed over
    the group by one ``all_reduce`` of ``[N, H]``.

    Communication per call: the sizes (P int64), then per token row 2-3 numbers of the compute dtype from
    each rank (all_gather: each rank receives ``(P − 1) · 8`` to ``12`` bytes per row in float32); the fused
    LM-head ops gather per chunk of tokens and add one all_reduce of ``d hidden`` (``4 H`` bytes per token).

Data parallelism, ``batch_group``
    Rank ``r`` holds a slice of the batch (whole sequences). :func:`batch_normalized` turns the rank's loss
    into its share of the loss of the concatenated batch, scaled by the group size P:
    ``loss_r = P · Σ_{i on r} dL/dS_i · S_i`` with the global weights of the loss type's aggregation
    (``loss_table.Aggregation``: the global token count for the token means and sums, the global number of
    sequences for the sequence means and sums and the fixed length, whose default length is the longest
    completion over the group). The mean of ``loss_r`` over the ranks is the single-process loss, and so is the
    mean of the ranks' gradients: DDP's gradient average gives the single-process gradient (TRL's convention,
    whose dapo normalizer is ``num_items_in_batch / num_processes``). A ``num_items_in_batch`` given for a token
    sum (dapo, cispo) is kept as this rank's normalizer (pass the global count divided by P, as TRL does).
    Metrics (kl, clip ratios, entropy) are the global means. Communication: one ``all_gather`` of 8 numbers per
    rank per call.

All collectives are synchronous ``torch.distributed`` calls on the given groups: the tensors must be on a
device the group's backend serves (CPU for gloo, CUDA for NCCL).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends, linear, reference, validation
from .loss_table import SCALE_OUT_LOSS_TYPES, Aggregation, loss_type_row
from .reference import GRPOLossOutput

# Local ids handed to the row kernels: an ignored row, and (backward) a row whose target another shard holds.
_IGNORED = -1
_ELSEWHERE = -2


def all_gather(t: Tensor, group) -> Tensor:
    """``[P, *t.shape]``: ``t`` of every rank of ``group``, in group-rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


# --------------------------------------------------------------------------- #
# vocabulary shards
# --------------------------------------------------------------------------- #
class VocabShards(NamedTuple):
    """Where this rank's vocabulary shard lies in the whole vocabulary."""

    group: object
    start: int  # first vocabulary id of this rank's shard
    size: int  # V_r
    ends: Tensor  # [P] int64: exclusive end of each rank's shard, on the logits' device
    vocab: int  # the whole vocabulary V = Σ_r V_r


def vocab_shards(group, local_vocab: int, device: torch.device) -> VocabShards:
    """The shards of ``group`` from one ``all_gather`` of the shard sizes (ranks in group order)."""
    sizes = all_gather(torch.tensor([local_vocab], dtype=torch.int64, device=device), group).reshape(-1)
    ends = sizes.cumsum(0)
    host_ends = ends.tolist()
    rank = dist.get_rank(group)
    start = host_ends[rank - 1] if rank else 0
    if min(sizes.tolist()) < 1:
        raise ValueError(f"every rank of vocab_group must hold at least one vocabulary entry, got shard sizes "
                         f"{sizes.tolist()}")
    return VocabShards(group, start, local_vocab, ends, host_ends[-1])


# --------------------------------------------------------------------------- #
# row kernels: statistics of a shard, gradient for given statistics
# --------------------------------------------------------------------------- #
def _flat_temperature(temperature: Union[float, Tensor]) -> Union[float, Tensor]:
    """A temperature per row of the leading shape (see :func:`token_logprobs`) as ``[R]``; a float as it is."""
    return temperature.reshape(-1) if isinstance(temperature, Tensor) else temperature


def _torch_row_statistics(logits: Tensor, ids: Tensor, temperature: Union[float, Tensor], ignore_index: int,
                          return_entropy: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The reference backend's row statistics: :func:`reference.token_logprobs` and the log-sum-exp."""
    flat = logits.reshape(-1, logits.shape[-1])
    temperature = _flat_temperature(temperature)
    out = reference.token_logprobs(flat, ids, temperature=temperature, ignore_index=ignore_index,
                                   return_entropy=return_entropy)
    logp, ent = out if return_entropy else (out, None)
    lse = torch.logsumexp(flat.to(logp.dtype) / reference.row_temperature(temperature, ids == ignore_index,
                                                                          logp.dtype), dim=-1)
    return logp, torch.where(ids == ignore_index, torch.zeros_like(lse), lse), ent


def _torch_row_gradient(logits: Tensor, ids: Tensor, lse: Tensor, ent: Optional[Tensor], g_logp: Optional[Tensor],
                        g_ent: Optional[Tensor], temperature: Union[float, Tensor], ignore_index: int,
                        inplace: bool) -> Tensor:
    """The reference backend's row gradient (see ``row_gradient`` of the kernel backends)."""
    vocab = logits.shape[-1]
    temperature = reference.row_temperature(_flat_temperature(temperature), ids == ignore_index, lse.dtype)
    z = logits.reshape(-1, vocab).to(lse.dtype) / temperature
    log_p = z - lse[:, None]
    p = torch.exp(log_p)
    dz = torch.zeros_like(z)
    if g_logp is not None:
        onehot = (torch.arange(vocab, device=z.device) == ids[:, None]).to(z.dtype)
        dz = dz + g_logp[:, None] * (onehot - p)
    if g_ent is not None:
        dz = dz - g_ent[:, None] * p * torch.where(p > 0, log_p + ent[:, None], torch.zeros_like(p))
    dz = torch.where((ids == ignore_index)[:, None], torch.zeros_like(dz), dz) / temperature
    return dz.to(logits.dtype).view(logits.shape)


def row_ops(backend: str, device: torch.device):
    """``row_statistics`` and ``row_gradient`` of ``backend`` (a resolved name), checked usable on ``device``: the
    kernel backends' from the registry (:func:`grpo_kernels.backends.row_kernels`), the reference's in torch."""
    if backend == "reference":
        backends.implementation(backend, device, "token_logprobs")
        return SimpleNamespace(row_statistics=_torch_row_statistics, row_gradient=_torch_row_gradient)
    return backends.row_kernels(backend, device)


# --------------------------------------------------------------------------- #
# vocabulary-parallel token_logprobs
# --------------------------------------------------------------------------- #
def _combine(gathered: Tensor, ids: Tensor, ignored: Tensor, ends: Tensor,
             return_entropy: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(logp, lse, H)`` per row from the shards' statistics ``gathered [P, 2 or 3, R]``."""
    lse_r, logp_r = gathered[:, 0], gathered[:, 1]
    lse = torch.logsumexp(lse_r, dim=0)
    owner = torch.bucketize(ids, ends, right=True).clamp(max=ends.numel() - 1)[None]
    logp = logp_r.gather(0, owner)[0] + (lse_r.gather(0, owner)[0] - lse)
    zero = torch.zeros_like(lse)
    logp = torch.where(ignored, zero, logp)
    if not return_entropy:
        return logp, lse, None
    w = torch.exp(lse_r - lse)
    terms = torch.where(w > 0, w * (gathered[:, 2] + (lse - lse_r)), torch.zeros_like(w))
    return logp, lse, torch.where(ignored, zero, terms.sum(0))


class _VocabParallelLogprobs(torch.autograd.Function):
    """``(logits shard [..., V_r], token_ids [...], shards, rows, T, ignore_index, return_entropy, inplace)``
    → ``logp [...]`` or ``(logp, H)`` of the whole vocabulary; differentiable w.r.t. the shard, once."""

    @staticmethod
    def forward(ctx, logits, token_ids, shards: VocabShards, rows, temperature, ignore_index, return_entropy,
                inplace):
        ids = token_ids.reshape(-1).to(torch.int64)
        ignored = ids == ignore_index
        local = ids - shards.start
        here = ~ignored & (local >= 0) & (local < shards.size)
        # forward: any valid local id for rows whose target lies elsewhere (their log-prob is not used)
        logp_r, lse_r, ent_r = rows.row_statistics(
            logits, torch.where(ignored, _IGNORED, torch.where(here, local, 0)), temperature, _IGNORED,
            return_entropy,
        )
        stats = [lse_r, torch.where(here, logp_r, torch.zeros_like(logp_r))] + ([ent_r] if return_entropy else [])
        logp, lse, ent = _combine(all_gather(torch.stack(stats), shards.group), ids, ignored, shards.ends,
                                  return_entropy)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, torch.where(ignored, _IGNORED, torch.where(here, local, _ELSEWHERE)), lse, ent)
        ctx.options = (rows, temperature, inplace)
        shape = token_ids.shape
        return (logp.view(shape), ent.view(shape)) if return_entropy else logp.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent=None):
        logits, ids, lse, ent = ctx.saved_tensors
        if ent is None:
            g_ent = None
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return (None,) * 8
        rows, temperature, inplace = ctx.options

        def flat(g: Optional[Tensor]) -> Optional[Tensor]:
            return None if g is None else g.reshape(-1).to(lse.dtype).contiguous()

        grad = rows.row_gradient(logits, ids, lse, ent if g_ent is not None else None, flat(g_logp), flat(g_ent),
                                 temperature, _IGNORED, inplace)
        if grad.data_ptr() == logits.data_ptr():  # the shard now holds its gradient
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None, None, None


def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    vocab_group,
    temperature: Union[float, Tensor] = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str,
    shards: Optional[VocabShards] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`grpo_kernels.reference.token_logprobs` of the whole vocabulary, from this rank's shard
    ``logits [..., V_r]`` (inputs validated; ``backend`` resolved). ``shards``: known offsets (skips the
    size exchange). A temperature tensor reaches the row ops as one per row, of the leading shape
    ``logits.shape[:-1]``."""
    if isinstance(temperature, Tensor):
        temperature = reference.broadcast_temperature(temperature, tuple(token_ids.shape))
    else:
        temperature = float(temperature)
    if shards is None:
        shards = vocab_shards(vocab_group, logits.shape[-1], logits.device)
        validation.check_ids_in_range(token_ids, shards.vocab, ignore_index)
    return _VocabParallelLogprobs.apply(
        logits, token_ids, shards, row_ops(backend, logits.device), temperature, int(ignore_index),
        bool(return_entropy), bool(inplace_backward),
    )


class VocabParallelTiles(linear.RowOpTiles):
    """The fused-linear driver's provider over a vocabulary shard of the LM head (``weight [V_r, H]``): the
    shard's logits tiles, their log-probs over the whole vocabulary by :func:`token_logprobs` (one all_gather per
    chunk of tokens), the shard's gradients; ``d hidden`` summed over the group by one all_reduce."""

    def __init__(self, shards: VocabShards):
        self.shards = shards

    def token_logprobs(self, head: linear.LinearHead, tile: Tensor, rows: slice, return_entropy: bool):
        return token_logprobs(tile, head.token_ids[rows], vocab_group=self.shards.group,
                              temperature=head.row_temperature(rows),
                              ignore_index=head.ignore_index, return_entropy=return_entropy,
                              inplace_backward=head.softcap is None, backend=head.backend, shards=self.shards)

    def reduce_hidden_grad(self, grad: Tensor) -> None:
        dist.all_reduce(grad, group=self.shards.group)


def vocab_parallel_tiles(vocab_group, weight: Tensor, token_ids: Tensor, ignore_index: int) -> VocabParallelTiles:
    """The provider for this rank's LM-head shard ``weight [V_r, H]`` (the shard sizes exchanged, ids checked)."""
    shards = vocab_shards(vocab_group, weight.shape[0], weight.device)
    validation.check_ids_in_range(token_ids, shards.vocab, ignore_index)
    return VocabParallelTiles(shards)


# --------------------------------------------------------------------------- #
# data-parallel normalization
# --------------------------------------------------------------------------- #
# The per-rank numbers batch_normalized gathers.
_TOKENS, _SEQUENCES, _LENGTH, _KL, _LOW, _HIGH, _REGION, _ENTROPY = range(8)


def batch_normalized(result: GRPOLossOutput, keep: Tensor, num_seqs: int, length: int, batch_group, *,
                     per_seq_metrics: bool, loss_type: str, max_completion_length: Optional[int] = None,
                     num_items_in_batch=None) -> GRPOLossOutput:
    """This rank's ``result`` (of its ``num_seqs`` sequences, tokens ``keep``, completion length ``length``)
    as its share of the loss of the whole batch of ``batch_group`` (see the module docstring).

    ``per_seq_metrics``: the clip ratios are means over sequences (sequence-level ratio with per-sequence
    advantages) rather than over tokens.
    """
    if loss_type not in SCALE_OUT_LOSS_TYPES:
        raise ValueError(f"loss_type with batch_group must be one of {', '.join(SCALE_OUT_LOSS_TYPES)}; "
                         f"got {loss_type!r}")
    dtype = result.loss.dtype
    tokens = keep.to(dtype).sum()
    local_tokens = tokens.clamp(min=1.0)
    metric_denom = torch.full((), float(num_seqs), dtype=dtype, device=tokens.device) if per_seq_metrics \
        else local_tokens
    zero = tokens.new_zeros(())
    mine = torch.stack([
        tokens, torch.full_like(tokens, num_seqs), torch.full_like(tokens, length),
        zero if result.kl is None else result.kl.detach() * local_tokens,
        result.clip_ratio_low.detach() * metric_denom, result.clip_ratio_high.detach() * metric_denom,
        result.clip_ratio_region.detach() * metric_denom,
        zero if result.entropy is None else result.entropy.detach() * local_tokens,
    ])
    gathered = all_gather(mine, batch_group)
    total = gathered.sum(0)
    group_size = gathered.shape[0]
    all_tokens = total[_TOKENS].clamp(min=1.0)
    all_seqs = total[_SEQUENCES]
    # In the terms of aggregation.rule, loss = reduce_i(S_i / per_sequence_i) / batch: the per-sequence divisors
    # are the rank's own, so its share scales its loss by its divisor over the group's, D_rank / D_group (D the
    # number of sequences for a mean over sequences, else the batch divisor), formed from the gathered numbers.
    aggregation = loss_type_row(loss_type).aggregation
    if aggregation is Aggregation.SEQUENCE_MEAN or aggregation is Aggregation.SEQUENCE_SUM:  # D = B
        factor = num_seqs / all_seqs
    elif aggregation is Aggregation.FIXED_LENGTH:  # D = B · L, L the longest completion of the group by default
        longest = gathered[:, _LENGTH].max() if max_completion_length is None else max_completion_length
        local_length = length if max_completion_length is None else max_completion_length
        factor = (num_seqs * local_length) / (all_seqs * longest)
    elif aggregation is Aggregation.TOKEN_SUM and num_items_in_batch is not None:  # D = P · the caller's normalizer
        factor = torch.ones((), dtype=dtype, device=tokens.device) / group_size
    elif aggregation is Aggregation.TOKEN_SUM or aggregation is Aggregation.BATCH_TOKEN_MEAN:  # D = the token count
        factor = local_tokens / all_tokens
    else:
        raise ValueError(f"unknown aggregation {aggregation!r} of loss_type {loss_type!r}")
    all_metric = all_seqs if per_seq_metrics else all_tokens
    return result._replace(
        loss=result.loss * (group_size * factor),
        kl=None if result.kl is None else total[_KL] / all_tokens,
        clip_ratio_low=total[_LOW] / all_metric,
        clip_ratio_high=total[_HIGH] / all_metric,
        clip_ratio_region=total[_REGION] / all_metric,
        entropy=None if result.entropy is None else _differentiable_mean(result.entropy, total[_ENTROPY] / all_tokens,
                                                                         local_tokens / all_tokens * group_size),
    )


def _differentiable_mean(local_mean: Tensor, value: Tensor, scale: Tensor) -> Tensor:
    """``value`` (the global mean) with the gradient of ``scale · local_mean`` (this rank's share, scaled as the
    loss is, so that DDP's average gives the gradient of the global mean)."""
    scaled = local_mean * scale
    return scaled + (value - scaled).detach()

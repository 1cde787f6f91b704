"""Triton ``fused_grpo_loss``: logits → log-probs → loss, with the logits gradient formed in the forward.

The loss is a scalar, so its gradient w.r.t. the logits is known as soon as the
forward has run: ``d loss / d logits = w ⊙ (onehot_y − softmax(z)) / T`` with
the per-token weights ``w = d loss / d logp``. Without a sequence pass (token-level
ratios, :func:`grpo_kernels.kernel_options.needs_sequence_pass`) ``w`` of a token depends only on that
token's log-prob and inputs and on its sequence's weight ``dL/dS_b``, which depends on the mask alone
(:func:`grpo_kernels.aggregation.sequence_weights`). So one kernel does it all,
row by row (:func:`_fused_grpo_loss_kernel`): the log-sum-exp sweep, then
``logp`` and ``w``, then the gradient sweep over the same row while it is still
in L2. Logits traffic from DRAM: one read + one write, the floor. The scalar
loss and the metrics then come from the ``[B, T]`` log-probs through the
Triton ``grpo_loss`` forward (a few bytes per token).

A sequence pass (GSPO's shared ratio, VESPO's and GMPO's sequence weights, the
sequence-level rollout ratio, the off-policy mask) needs the whole sequence's
log-probs first: the ``token_logprobs`` forward
kernel, then ``grpo_loss`` forward and backward on ``[B, T]``, then the
``token_logprobs`` gradient kernel (two reads + one write of the logits).

Either way the autograd backward only scales the gradient by the incoming
scalar (in place; not at all when it is 1). ``inplace_backward=True`` writes the
gradient into the logits buffer itself during the forward (no logits-sized
allocation; the logits are overwritten). When the logits do not require grad,
nothing is written. With ``return_entropy=True`` the entropy metric stays
differentiable: its gradient (an entropy bonus) is added in the backward from
the saved per-row statistics, which needs the logits, so not after
``inplace_backward=True``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernel_options import KernelLossOptions, LossScalars, kernel_loss_options
from ..precomputed_gradient import check_backward
from ..reference import GRPOLossOutput, fused_loss_mask, kept_ids, masked_mean_entropy
from .grpo_loss import (check_codes, compute_dtype, dloss_dlogp, grpo_loss, kernel_mask, loss_flags, round_scalars,
                        select_unmasked, token_strides)
from .token_logprobs import (
    Rows,
    backward_rows,
    device_guard,
    forward_rows,
    gradient_rows,
    launch_config,
    row_grad,
    row_layout,
    row_log_softmax_stats,
    row_zero,
    temperature_arguments,
)
from .tuning import knob


# Row `row` = token (b, t) = (row // T, row % T); a persistent grid, each program looping over
# rows pid, pid + P, ... For each row, reads: y, keep, adv, old_logp,
# ref_logp, iw, sampling logp of the token and dL/dS_b (a few bytes); the V logits of its row in
# a first sweep (online log-sum-exp, entropy; loads marked evict_last to keep the
# row in L2), then — with WRITE_GRAD and w = dL/dlogp ≠ 0 — a second sweep from
# the row's end backwards (the chunks read last come first, while still in L2)
# that writes dx = w (onehot_y − p) / T into dx (which may be the logits buffer).
# A row with w = 0 (masked, ignored, fully clipped) gets zeros without a second
# read. Writes logp, lse (and H): 8-12 bytes per row. DRAM traffic: one read of
# the logits + one write of dx when the second sweep hits L2; the second sweep
# costs another read of the rows where it misses.
@triton.jit
def _fused_grpo_loss_kernel(
    x_ptr, y_ptr, keep_ptr, old_ptr, ref_ptr, adv_ptr, iw_ptr, samp_ptr, seq_w_ptr,
    logp_ptr, lse_ptr, ent_ptr, dx_ptr,
    n_rows, T, n_inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner, V,
    s_keep_b, s_keep_t, s_old_b, s_old_t, s_ref_b, s_ref_t, s_adv_b, s_adv_t, s_iw_b, s_iw_t, s_samp_b, s_samp_t,
    s_seq_w, inv_t_hi, inv_t_lo, t_ptr, ignore_index,
    # the numeric options, loss_table.SCALAR_NAMES (passed by name)
    lo: tl.float64, hi: tl.float64, eps_high: tl.float64, delta: tl.float64, clip_c: tl.float64, beta: tl.float64,
    tau_pos: tl.float64, tau_neg: tl.float64, eps_low: tl.float64, is_min: tl.float64, is_max: tl.float64,
    off_policy_threshold: tl.float64, k_pos: tl.float64, lambda_pos: tl.float64, k_neg: tl.float64,
    lambda_neg: tl.float64, log_clamp: tl.float64,
    FAMILY: tl.constexpr, SHARED: tl.constexpr, KL_EST: tl.constexpr, ADD_KL: tl.constexpr, BIAS_KL: tl.constexpr,
    HAS_IW: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr, ROLLOUT: tl.constexpr,
    IS_MASK: tl.constexpr, GATE: tl.constexpr, HAS_OPM: tl.constexpr, LOG_CLAMP: tl.constexpr,
    HAS_SAMP: tl.constexpr, HAS_OLD: tl.constexpr, RETURN_ENTROPY: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, PER_ROW_T: tl.constexpr,
):
    check_codes(FAMILY, KL_EST, ROLLOUT, GATE)
    inv_t = (tl.zeros([], dtype=ACC) + inv_t_hi) + inv_t_lo
    sc = round_scalars(LossScalars(
        lo=lo, hi=hi, eps_high=eps_high, delta=delta, clip_c=clip_c, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg,
        eps_low=eps_low, is_min=is_min, is_max=is_max, off_policy_threshold=off_policy_threshold, k_pos=k_pos,
        lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg, log_clamp=log_clamp), ACC)
    zero = tl.zeros([], dtype=ACC)
    # persistent: each program takes rows pid, pid + P, ... (P programs in all, a few per SM, so that the
    # rows in flight fit in L2 between their two sweeps)
    for r in range(tl.program_id(0), n_rows, tl.num_programs(0)):
        row = r + tl.zeros([], dtype=tl.int64)
        b = row // T
        t = row % T
        x_row = x_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
        dx_row = dx_ptr + (row // n_inner) * dx_stride_outer + (row % n_inner) * dx_stride_inner
        y = tl.load(y_ptr + row).to(tl.int64)

        logp = tl.zeros([], dtype=ACC)
        lse = tl.zeros([], dtype=ACC)
        ent = tl.zeros([], dtype=ACC)
        t_row = tl.zeros([], dtype=ACC) + 1.0  # the row's own temperature (PER_ROW_T), read where it counts
        if y != ignore_index:
            if PER_ROW_T:
                t_row = tl.load(t_ptr + row).to(ACC)
            logp, lse, ent = row_log_softmax_stats(x_row, y, V, inv_t, RETURN_ENTROPY=RETURN_ENTROPY,
                                                   BLOCK_V=BLOCK_V, ACC=ACC, EVICTION="evict_last", t_row=t_row,
                                                   PER_ROW_T=PER_ROW_T)
        tl.store(logp_ptr + row, logp.to(logp_ptr.dtype.element_ty))
        tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))
        if RETURN_ENTROPY:
            tl.store(ent_ptr + row, ent.to(ent_ptr.dtype.element_ty))

        if WRITE_GRAD:
            # w = dL/dS_b · m · dℓ/dlogp, as the grpo_loss backward kernel forms it for an incoming gradient of 1.
            m = tl.load(keep_ptr + b * s_keep_b + t * s_keep_t).to(ACC)
            adv = tl.load(adv_ptr + b * s_adv_b + t * s_adv_t).to(ACC)
            old_logp = logp  # on-policy: old_logp = logp.detach()
            if HAS_OLD:
                old_logp = tl.load(old_ptr + b * s_old_b + t * s_old_t).to(ACC)
            iw = zero + 1.0
            if HAS_IW:
                iw = tl.load(iw_ptr + b * s_iw_b + t * s_iw_t).to(ACC)
            ref_logp = logp
            if ADD_KL:
                ref_logp = tl.load(ref_ptr + b * s_ref_b + t * s_ref_t).to(ACC)
            samp_logp = old_logp
            if HAS_SAMP:
                samp_logp = tl.load(samp_ptr + b * s_samp_b + t * s_samp_t).to(ACC)
            m, logp_k, old_logp, adv, ref_logp, iw, samp_logp = select_unmasked(m, logp, old_logp, adv, ref_logp,
                                                                                iw, samp_logp)
            # no sequence pass here: the sequence statistics keep their neutral values
            dloss = dloss_dlogp(logp_k, old_logp, adv, m, ref_logp, iw, samp_logp, seq_log_ratio=zero, seq_adv=zero,
                                seq_is=zero + 1.0, seq_kl=zero, seq_term=zero, sc=sc, DTYPE=ACC, FAMILY=FAMILY,
                                SHARED=SHARED, KL_EST=KL_EST, ADD_KL=ADD_KL, BIAS_KL=BIAS_KL, HAS_IW=HAS_IW,
                                HAS_DELTA=HAS_DELTA, HAS_C=HAS_C, ROLLOUT=ROLLOUT, IS_MASK=IS_MASK, GATE=GATE,
                                HAS_OPM=HAS_OPM, LOG_CLAMP=LOG_CLAMP)
            seq_w = tl.load(seq_w_ptr + b * s_seq_w).to(ACC)
            w = tl.where(m != 0, seq_w * (m * dloss), 0.0)
            if w == 0:
                row_zero(dx_row, V, BLOCK_V=BLOCK_V)
            else:
                row_grad(x_row, dx_row, y, lse, ent, g_logp=w, g_ent=0.0, V=V, inv_t=inv_t, scale=1.0, softcap=1.0,
                         HAS_G_LOGP=True, HAS_G_ENT=False, ACCUMULATE=False, SOFTCAP=False, BLOCK_V=BLOCK_V, ACC=ACC,
                         REVERSE=True, t_row=t_row, PER_ROW_T=PER_ROW_T)


# Persistent grid of the fused kernel: programs per SM. The rows in flight (about SMs × this) must
# stay in L2 between their two sweeps: 132 SMs × one bf16 row of V = 151936 (297 KiB) is 39 MB of
# the H100's 50 MB. A starting point, to be tuned on a GPU.
_PROGRAMS_PER_SM = 1
# Under the interpreter (CPU tensors): a few programs, so that the tests run the loop over rows.
_INTERPRETER_PROGRAMS = 3


def _num_programs(device: torch.device, n_rows: int) -> int:
    if device.type == "cuda":
        per_sm = knob("fused_grpo_loss.programs_per_sm", _PROGRAMS_PER_SM)
        programs = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    else:
        programs = _INTERPRETER_PROGRAMS
    return max(1, min(n_rows, programs))


def _fused_single_pass(rows: Rows, ids: Tensor, keep: Tensor, old: Optional[Tensor], adv: Tensor,
                       cfg: KernelLossOptions, loss_options: dict, temperature: Union[float, Tensor],
                       ignore_index: int,
                       return_entropy: bool, dx: Optional[Rows]):
    """One launch: ``(logp, lse, entropy or None)`` per row, and the gradient into ``dx`` (unless None)."""
    B, T = keep.shape
    out_dtype = torch.float64 if rows.x.dtype == torch.float64 else torch.float32
    device = rows.x.device
    n_rows = ids.numel()
    logp = torch.empty(n_rows, dtype=out_dtype, device=device)
    lse = torch.empty(n_rows, dtype=out_dtype, device=device)
    ent = torch.empty(n_rows, dtype=out_dtype, device=device) if return_entropy else None
    ref, iw = loss_options.get("ref_logprobs"), loss_options.get("importance_weights")
    samp = loss_options.get("sampling_logprobs")
    seq_w = cfg.sequence_weights(keep.sum(-1).to(out_dtype), T)
    keep_k = kernel_mask(keep)
    block, num_warps = launch_config(rows.vocab, rows.x.dtype, kernel="fused_grpo_loss")
    strides = []
    for tensor in (keep_k, old, ref, adv, iw, samp):
        strides += token_strides(tensor, B, T)
    strides.append(seq_w.stride(0))
    out = dx if dx is not None else rows
    temp = temperature_arguments(temperature, rows.x.shape[:-1], rows.x.dtype)
    with device_guard(rows.x):
        _fused_grpo_loss_kernel[(_num_programs(device, n_rows),)](
            rows.x, ids, keep_k, logp if old is None else old, logp if ref is None else ref, adv,
            logp if iw is None else iw, logp if samp is None else samp, seq_w, logp, lse, lse if ent is None else ent,
            out.x, n_rows, T, *rows.strides, out.stride_outer, out.stride_inner, rows.vocab, *strides,
            temp.inv_t_hi, temp.inv_t_lo, temp.pointer(lse), ignore_index, **cfg.scalars._asdict(), **loss_flags(cfg),
            HAS_OLD=old is not None, RETURN_ENTROPY=return_entropy, WRITE_GRAD=dx is not None, BLOCK_V=block,
            ACC=compute_dtype(rows.x.dtype), PER_ROW_T=temp.PER_ROW_T, num_warps=num_warps,
        )
    return logp, lse, ent


def _logprob_weights(logp: Tensor, old: Optional[Tensor], adv: Tensor, keep: Tensor, loss_options: dict) -> Tensor:
    """``w = d loss / d logp [B, T]`` from the ``grpo_loss`` kernels (the path with a sequence pass)."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_()
        (w,) = torch.autograd.grad(grpo_loss(lp, old, adv, keep, **loss_options).loss, lp)
    return w


class _FusedGRPOLossFunction(torch.autograd.Function):
    """``(logits, token_ids, old_logprobs, advantages, mask, options)`` → loss, metrics; d logits precomputed."""

    @staticmethod
    def forward(ctx, logits, token_ids, old_logprobs, advantages, mask, options):
        temperature, ignore_index, return_entropy, inplace, loss_options = options
        B, T = token_ids.shape
        needs_grad = ctx.needs_input_grad[0]
        rows = row_layout(logits)
        keep = fused_loss_mask(mask, token_ids, ignore_index)
        # masked rows read as ignored: the kernels never read their logits and write zeros as their gradient
        ids = kept_ids(token_ids, keep, ignore_index).reshape(-1)
        cfg = kernel_loss_options(T, advantages, loss_options)
        dx = gradient_rows(rows, inplace) if needs_grad else None
        if cfg.seq_pass:
            logp, lse, ent = forward_rows(rows, ids, temperature, ignore_index, return_entropy)
            if dx is not None:
                w = _logprob_weights(logp.view(B, T), old_logprobs, advantages, keep, loss_options)
                backward_rows(rows, ids, lse, None, w.reshape(-1), None, temperature, ignore_index, dx)
        else:
            logp, lse, ent = _fused_single_pass(rows, ids, keep, old_logprobs, advantages, cfg, loss_options,
                                                temperature, ignore_index, return_entropy, dx)
        if dx is not None and dx.x is logits:  # the logits now hold their gradient: fail loudly if anything
            torch.autograd.graph.increment_version(logits)  # else saved them for its backward
        result = grpo_loss(logp.view(B, T), old_logprobs, advantages, keep, **loss_options)

        entropy_out = result.loss.new_zeros(())
        ctx.entropy_graph = None
        if return_entropy:
            ent_bt = ent.view(B, T).detach().requires_grad_(needs_grad)
            with torch.enable_grad():
                entropy_metric = masked_mean_entropy(ent_bt, keep)
            entropy_out = entropy_metric.detach()
            if needs_grad:
                ctx.entropy_graph = (ent_bt, entropy_metric)
        ctx.set_materialize_grads(False)
        ctx.consumed = False
        ctx.inplace = dx is not None and dx.x is rows.x
        # Saved tensors, not ctx attributes: after a backward without retain_graph autograd releases them before
        # the next node runs, so the gradient passed on is taken over without a copy (e.g. by AccumulateGrad).
        keep_rows = ctx.entropy_graph is not None and not ctx.inplace  # for an entropy bonus
        ctx.save_for_backward(None if dx is None else dx.x, rows.x if keep_rows else None, ids, lse, ent)
        ctx.layouts = (None if dx is None else dx._replace(x=None), rows._replace(x=None))
        ctx.options = (temperature, ignore_index)
        kl = result.kl if result.kl is not None else result.loss.new_zeros(())
        ctx.mark_non_differentiable(result.per_token_loss, kl, result.clip_ratio_low, result.clip_ratio_high,
                                    result.clip_ratio_region)
        return (result.loss.detach(), result.per_token_loss, kl, result.clip_ratio_low, result.clip_ratio_high,
                result.clip_ratio_region, entropy_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _ptl, _kl, _low, _high, _region, grad_entropy):
        if grad_entropy is None or ctx.entropy_graph is None:
            grad_entropy = None
        if not ctx.needs_input_grad[0] or (grad_loss is None and grad_entropy is None):
            return (None,) * 6
        check_backward(consumed=ctx.consumed, inplace=ctx.inplace, entropy_gradient=grad_entropy is not None)
        dx_x, x, ids, lse, ent = ctx.saved_tensors
        dx_layout, rows_layout = ctx.layouts
        dx, rows = dx_layout._replace(x=dx_x), rows_layout._replace(x=x)
        if grad_loss is None:  # only the entropy metric has a gradient: leave the loss gradient untouched
            out, accumulate = gradient_rows(rows, inplace=False), False
        else:
            out, accumulate = dx, True
            if torch.compiler.is_compiling() or not bool(grad_loss == 1):
                dx.x.mul_(grad_loss.to(dx.x.dtype))  # in place: no logits-sized allocation
                ctx.consumed = True
        if grad_entropy is not None:
            ent_bt, entropy_metric = ctx.entropy_graph
            (g_ent,) = torch.autograd.grad(entropy_metric, ent_bt, grad_entropy, retain_graph=True)
            temperature, ignore_index = ctx.options
            backward_rows(rows, ids, lse, ent, None, g_ent.reshape(-1).contiguous(), temperature, ignore_index,
                          out, accumulate=accumulate)
            ctx.consumed = ctx.consumed or out is dx
        return out.x, None, None, None, None, None


def fused_grpo_loss(
    logits: Tensor,
    token_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: Union[float, Tensor] = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    **loss_options,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.fused_grpo_loss` with Triton kernels (inputs already validated).

    ``loss`` is differentiable w.r.t. ``logits`` (its gradient is computed in the
    forward), and so is ``entropy`` with ``return_entropy=True``; ``per_token_loss``,
    ``kl`` and the clip metrics come without gradient. ``inplace_backward=True``
    writes the gradient into ``logits`` during the forward.
    """
    temperature = temperature if isinstance(temperature, Tensor) else float(temperature)
    options = (temperature, int(ignore_index), bool(return_entropy), bool(inplace_backward), loss_options)
    loss, per_token_loss, kl, low, high, region, entropy = _FusedGRPOLossFunction.apply(
        logits, token_ids, old_logprobs, advantages, mask, options
    )
    return GRPOLossOutput(
        loss=loss,
        per_token_loss=per_token_loss,
        kl=kl if loss_options.get("ref_logprobs") is not None else None,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_region=region,
        entropy=entropy if return_entropy else None,
    )

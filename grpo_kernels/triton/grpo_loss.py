"""Triton ``grpo_loss``: the GRPO policy loss with exactly the numbers of
:func:`grpo_kernels.reference.grpo_loss` (the formulas are in its docstring).

Two kernels, one program per sequence (1-D grid over B), each looping over
the completion in blocks of ``BLOCK_T`` tokens:

- ``_grpo_loss_fwd_kernel`` writes ``per_token_loss [B, T]`` and per-sequence
  partial sums (Σ m·ℓ, Σ m, Σ m·KL, Σ m·low, Σ m·high, Σ m·region and, at
  sequence level, the sequence's mean log-ratio). The scalar loss and the
  metrics are formed from these ``[B]`` partials with torch ops on the device
  (no host synchronization).
- ``_grpo_loss_bwd_kernel`` writes ``d loss / d logprobs`` from the
  hand-derived per-token derivatives (see :func:`_policy_terms` and
  :func:`_kl_terms`), using the same tie conventions as PyTorch's autograd on
  the reference (``clamp`` passes the gradient at its bounds, ``torch.min``
  splits a tie 0.5/0.5).

Compute is float32 (float64 for float64 ``logprobs``); inputs of any float
dtype are converted as they are loaded. Numeric options (epsilons, beta,
delta, clip_ratio_c, SAPO temperatures) are float64 runtime scalars rounded to
the compute dtype in the kernel, as PyTorch rounds a Python scalar to the
tensor's dtype; options that select a code path are ``constexpr``.

Gradients: only ``loss`` is differentiable, and only with respect to
``logprobs``. ``per_token_loss``, ``kl`` and the clip metrics from this
backend are returned without gradient (the reference's ``per_token_loss`` and
``kl`` carry gradients); ``old_logprobs``, ``ref_logprobs``, ``advantages`` and
``importance_weights`` are treated as constants.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..aggregation import NUM_PARTIALS, P_COUNT
from ..kernel_options import KernelLossOptions, kernel_loss_options
from ..reference import GRPOLossOutput

# Block of tokens per loop step and warps, by completion length: the smallest
# block holding T (T > 1024 loops over blocks of 1024).
_BLOCK_TABLE = ((16, 1), (32, 1), (64, 1), (128, 1), (256, 2), (512, 4), (1024, 4))
# Tests set this to a small power of two to exercise the loop over blocks.
BLOCK_T_OVERRIDE: Optional[int] = None


def _block_config(T: int) -> tuple[int, int]:
    if BLOCK_T_OVERRIDE is not None:
        return BLOCK_T_OVERRIDE, 1
    for block, warps in _BLOCK_TABLE:
        if T <= block:
            return block, warps
    return _BLOCK_TABLE[-1]


# --------------------------------------------------------------------------- #
# per-token math shared by both kernels
# --------------------------------------------------------------------------- #
@triton.jit
def _options(lo_arg, hi_arg, eps_high_arg, delta_arg, clip_c_arg, beta_arg, tau_pos_arg, tau_neg_arg,
             DTYPE: tl.constexpr):
    """The numeric options (float64 kernel arguments) rounded to the compute dtype, as PyTorch rounds a scalar."""
    return (tl.full((), lo_arg, DTYPE), tl.full((), hi_arg, DTYPE), tl.full((), eps_high_arg, DTYPE),
            tl.full((), delta_arg, DTYPE), tl.full((), clip_c_arg, DTYPE), tl.full((), beta_arg, DTYPE),
            tl.full((), tau_pos_arg, DTYPE), tl.full((), tau_neg_arg, DTYPE))


@triton.jit
def _load_tokens(mask_row, logp_row, adv_row, old_row, s_mask_t, s_logp_t, s_adv_t, s_old_t, cols, inb,
                 seq_coef_1, SEQ_LEVEL: tl.constexpr, DTYPE: tl.constexpr, BLOCK_T: tl.constexpr):
    """One block of a sequence: mask m, logp, adv and the ratio c1 (the sequence's c1 at sequence level)."""
    m = tl.load(mask_row + cols * s_mask_t, mask=inb, other=0).to(DTYPE)
    logp = tl.load(logp_row + cols * s_logp_t, mask=inb, other=0).to(DTYPE)
    adv = tl.load(adv_row + cols * s_adv_t, mask=inb, other=0).to(DTYPE)
    if SEQ_LEVEL:
        coef_1 = tl.zeros((BLOCK_T,), DTYPE) + seq_coef_1
    else:
        old_logp = tl.load(old_row + cols * s_old_t, mask=inb, other=0).to(DTYPE)
        coef_1 = tl.exp(logp - old_logp)
    return m, logp, adv, coef_1


@triton.jit
def _kl_terms(logp, ref_logp, KL_EST: tl.constexpr):
    """Per-token KL estimate of d = ref_logp - logp and its derivative d KL / d logp."""
    d = ref_logp - logp
    if KL_EST == 1:  # k1 = -d
        kl = -d
        dkl_dlogp = tl.zeros_like(d) + 1.0
    elif KL_EST == 2:  # k2 = d²/2
        kl = 0.5 * d * d
        dkl_dlogp = -d
    elif KL_EST == 3:  # low_var_kl: k3 of clamp(d, ±20), clamped to ±10
        dc = tl.minimum(tl.maximum(d, -20.0), 20.0)
        e = tl.exp(dc)
        v = e - dc - 1.0
        kl = tl.minimum(tl.maximum(v, -10.0), 10.0)
        inside = (d >= -20.0) & (d <= 20.0) & (v >= -10.0) & (v <= 10.0)
        dkl_dlogp = tl.where(inside, 1.0 - e, 0.0)
    else:  # k3 = e^d - d - 1
        e = tl.exp(d)
        kl = e - d - 1.0
        dkl_dlogp = 1.0 - e
    return kl, dkl_dlogp


@triton.jit
def _policy_terms(coef_1, adv, logp, lo, hi, eps_high, delta, clip_c, tau_pos, tau_neg,
                  FAMILY: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr):
    """Policy part of the per-token loss (before importance weights and KL).

    Returns (loss, is_low, is_high, d loss / d coef_1, d loss / d logp at fixed coef_1).
    lo = 1 - eps_low and hi = 1 + eps_high in the compute dtype.
    """
    if FAMILY == 1:  # cispo: -sg[min(c1, eps_high)] · A · logp
        capped = tl.minimum(coef_1, eps_high)
        loss = -capped * adv * logp
        dloss_dlogp = -capped * adv
        dloss_dcoef = tl.zeros_like(loss)
        is_high = (coef_1 > eps_high) & (adv > 0)
        is_low = is_high & (adv < 0)  # all False
    elif FAMILY == 2:  # sapo: -σ(τ(c1 - 1)) · 4/τ · A
        tau = tl.where(adv > 0, tau_pos, tau_neg)
        sig = 1.0 / (1.0 + tl.exp(-(tau * (coef_1 - 1.0))))
        loss = -sig * 4.0 / tau * adv
        dloss_dcoef = -(sig * (1.0 - sig)) * 4.0 * adv  # σ' · τ · 4/τ · A
        dloss_dlogp = tl.zeros_like(loss)
        is_low = (coef_1 < lo) & (adv < 0)
        is_high = (coef_1 > hi) & (adv > 0)
    else:  # clipped: -min(c1·A, clip(c1, lo, hi)·A), delta clamp of c1, dual clip
        coef_2 = tl.minimum(tl.maximum(coef_1, lo), hi)
        dcoef_2 = tl.where((coef_1 >= lo) & (coef_1 <= hi), 1.0, 0.0)
        if HAS_DELTA:
            coef_1d = tl.minimum(coef_1, delta)
            dcoef_1d = tl.where(coef_1 <= delta, 1.0, 0.0)
        else:
            coef_1d = coef_1
            dcoef_1d = 1.0
        x1 = coef_1d * adv
        x2 = coef_2 * adv
        loss = -tl.minimum(x1, x2)
        g1 = tl.where(x1 < x2, 1.0, tl.where(x1 == x2, 0.5, 0.0))  # torch.min splits ties
        dloss_dcoef = -(adv * (g1 * dcoef_1d + (1.0 - g1) * dcoef_2))
        if HAS_C:
            cap = -adv * clip_c
            g_dual = tl.where(loss < cap, 1.0, tl.where(loss == cap, 0.5, 0.0))
            negative = adv < 0
            loss = tl.where(negative, tl.minimum(loss, cap), loss)
            dloss_dcoef = tl.where(negative, g_dual * dloss_dcoef, dloss_dcoef)
        dloss_dlogp = tl.zeros_like(loss)
        is_low = (coef_1d < lo) & (adv < 0)
        is_high = (coef_1d > hi) & (adv > 0)
    return loss, is_low, is_high, dloss_dcoef, dloss_dlogp


@triton.jit
def _dloss_dlogp(coef_1, adv, logp, iw, ref_logp, seq_term, lo, hi, eps_high, delta, clip_c, beta, tau_pos, tau_neg,
                 FAMILY: tl.constexpr, SEQ_LEVEL: tl.constexpr, KL_EST: tl.constexpr, ADD_KL: tl.constexpr,
                 BIAS_KL: tl.constexpr, HAS_IW: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr):
    """dℓ_t/dlogp_t of a token (or a block of tokens), before the mask and the sequence weight.

    Token level: ∂ℓ/∂logp + ∂ℓ/∂c1 · c1. Sequence level: ∂ℓ/∂logp + ``seq_term``
    (the shared ratio's part, G_i · c1 / max(1, n_i), summed over the sequence first).
    ``iw`` and ``ref_logp`` are read only with HAS_IW and ADD_KL.
    """
    _l, _lo, _hi, dloss_dcoef, dloss_dlogp = _policy_terms(
        coef_1, adv, logp, lo, hi, eps_high, delta, clip_c, tau_pos, tau_neg, FAMILY, HAS_DELTA, HAS_C)
    if HAS_IW:
        dloss_dcoef = dloss_dcoef * iw
        dloss_dlogp = dloss_dlogp * iw
    if ADD_KL:
        kl, dkl_dlogp = _kl_terms(logp, ref_logp, KL_EST)
        if BIAS_KL:
            dloss_dlogp = dloss_dlogp + beta * (dkl_dlogp * coef_1)
            dloss_dcoef = dloss_dcoef + beta * kl
        else:
            dloss_dlogp = dloss_dlogp + beta * dkl_dlogp
    if SEQ_LEVEL:
        dloss = dloss_dlogp + seq_term
    else:
        dloss = dloss_dlogp + dloss_dcoef * coef_1
    return dloss


# --------------------------------------------------------------------------- #
# forward
# --------------------------------------------------------------------------- #
# Reads per sequence i: logp, old_logp, mask (and ref_logp, adv, iw when
# per-token) over T; sequence level reads logp, old_logp, mask twice (first
# loop: the masked mean log-ratio). Writes per_token_loss [B, T] in the compute
# dtype and NUM_PARTIALS values per sequence. Traffic ≈ B·T·(3..6 loads +
# 1 store) elements, + B·T·3 more loads at sequence level.
@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr, old_logp_ptr, ref_logp_ptr, adv_ptr, mask_ptr, iw_ptr,
    per_token_loss_ptr, partials_ptr,
    B, T,
    s_logp_b, s_logp_t, s_old_b, s_old_t, s_ref_b, s_ref_t,
    s_adv_b, s_adv_t, s_mask_b, s_mask_t, s_iw_b, s_iw_t,
    lo_arg: tl.float64, hi_arg: tl.float64, eps_high_arg: tl.float64, delta_arg: tl.float64,
    clip_c_arg: tl.float64, beta_arg: tl.float64, tau_pos_arg: tl.float64, tau_neg_arg: tl.float64,
    FAMILY: tl.constexpr, SEQ_LEVEL: tl.constexpr, KL_EST: tl.constexpr,
    HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_IW: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr, PER_SEQ_METRICS: tl.constexpr,
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    lo, hi, eps_high, delta, clip_c, beta, tau_pos, tau_neg = _options(
        lo_arg, hi_arg, eps_high_arg, delta_arg, clip_c_arg, beta_arg, tau_pos_arg, tau_neg_arg, DTYPE)

    offs = tl.arange(0, BLOCK_T)
    logp_row = logp_ptr + i * s_logp_b
    old_row = old_logp_ptr + i * s_old_b
    ref_row = ref_logp_ptr + i * s_ref_b
    adv_row = adv_ptr + i * s_adv_b
    mask_row = mask_ptr + i * s_mask_b
    iw_row = iw_ptr + i * s_iw_b
    out_row = per_token_loss_ptr + i * T

    seq_log_ratio = tl.zeros((), DTYPE)
    if SEQ_LEVEL:  # w_i = Σ m·(logp - old) / max(1, Σ m)
        acc_lr = tl.zeros((BLOCK_T,), DTYPE)
        acc_m = tl.zeros((BLOCK_T,), DTYPE)
        for t0 in range(0, T, BLOCK_T):
            cols = (t0 + offs).to(tl.int64)
            inb = cols < T
            m = tl.load(mask_row + cols * s_mask_t, mask=inb, other=0).to(DTYPE)
            logp = tl.load(logp_row + cols * s_logp_t, mask=inb, other=0).to(DTYPE)
            old_logp = tl.load(old_row + cols * s_old_t, mask=inb, other=0).to(DTYPE)
            acc_lr += (logp - old_logp) * m
            acc_m += m
        seq_log_ratio = tl.sum(acc_lr, axis=0) / tl.maximum(tl.sum(acc_m, axis=0), 1.0)
    seq_coef_1 = tl.exp(seq_log_ratio)

    acc_loss = tl.zeros((BLOCK_T,), DTYPE)
    acc_n = tl.zeros((BLOCK_T,), DTYPE)
    acc_kl = tl.zeros((BLOCK_T,), DTYPE)
    acc_low = tl.zeros((BLOCK_T,), DTYPE)
    acc_high = tl.zeros((BLOCK_T,), DTYPE)
    acc_region = tl.zeros((BLOCK_T,), DTYPE)
    for t0 in range(0, T, BLOCK_T):
        cols = (t0 + offs).to(tl.int64)
        inb = cols < T
        m, logp, adv, coef_1 = _load_tokens(
            mask_row, logp_row, adv_row, old_row, s_mask_t, s_logp_t, s_adv_t, s_old_t, cols, inb, seq_coef_1,
            SEQ_LEVEL, DTYPE, BLOCK_T)
        loss, is_low, is_high, _dc, _dl = _policy_terms(
            coef_1, adv, logp, lo, hi, eps_high, delta, clip_c, tau_pos, tau_neg, FAMILY, HAS_DELTA, HAS_C)
        if HAS_IW:
            iw = tl.load(iw_row + cols * s_iw_t, mask=inb, other=0).to(DTYPE)
            loss = loss * iw
        if HAS_REF:
            ref_logp = tl.load(ref_row + cols * s_ref_t, mask=inb, other=0).to(DTYPE)
            kl, _dkl = _kl_terms(logp, ref_logp, KL_EST)
            if BIAS_KL:
                kl = kl * coef_1
            if ADD_KL:
                loss = loss + beta * kl
            acc_kl += kl * m
        tl.store(out_row + cols, loss, mask=inb)
        acc_loss += loss * m
        acc_n += m
        acc_low += is_low.to(DTYPE) * m
        acc_high += is_high.to(DTYPE) * m
        acc_region += (is_low | is_high).to(DTYPE) * m

    tl.store(partials_ptr + 0 * B + i, tl.sum(acc_loss, axis=0))
    tl.store(partials_ptr + 1 * B + i, tl.sum(acc_n, axis=0))
    tl.store(partials_ptr + 2 * B + i, tl.sum(acc_kl, axis=0))
    if PER_SEQ_METRICS:  # one ratio and one advantage per sequence: a 0/1 flag per sequence
        adv_i = tl.load(adv_row).to(DTYPE)
        _l, low_i, high_i, _dc, _dl = _policy_terms(
            seq_coef_1, adv_i, seq_coef_1, lo, hi, eps_high, delta, clip_c, tau_pos, tau_neg,
            FAMILY, HAS_DELTA, HAS_C)
        tl.store(partials_ptr + 3 * B + i, low_i.to(DTYPE))
        tl.store(partials_ptr + 4 * B + i, high_i.to(DTYPE))
        tl.store(partials_ptr + 5 * B + i, (low_i | high_i).to(DTYPE))
    else:
        tl.store(partials_ptr + 3 * B + i, tl.sum(acc_low, axis=0))
        tl.store(partials_ptr + 4 * B + i, tl.sum(acc_high, axis=0))
        tl.store(partials_ptr + 5 * B + i, tl.sum(acc_region, axis=0))
    tl.store(partials_ptr + 6 * B + i, seq_log_ratio)


# --------------------------------------------------------------------------- #
# backward
# --------------------------------------------------------------------------- #
# d loss / d logp_{i,t} = dL/dS_i · m_t · dℓ_t/dlogp_t, with dL/dS_i (seq_grad
# [B]) formed by torch from grad_output and the normalizer. Token level:
# dℓ_t/dlogp_t = ∂ℓ_t/∂logp_t + ∂ℓ_t/∂c1_t · c1_t. Sequence level, c1 is shared
# and d c1 / d logp_s = c1 · m_s / max(1, n_i): a first loop sums
# G_i = Σ_t m_t ∂ℓ_t/∂c1, then dℓ/dlogp_s = ∂ℓ_s/∂logp_s + G_i · c1 / max(1, n_i).
# Reads per sequence i: logp, old_logp (token level), mask, adv, ref_logp, iw
# over T (twice at sequence level) and 3 partials; writes d logp [B, T] in the
# dtype of logprobs. Traffic ≈ B·T·(3..6 loads + 1 store), ×~2 loads at
# sequence level.
@triton.jit
def _grpo_loss_bwd_kernel(
    logp_ptr, old_logp_ptr, ref_logp_ptr, adv_ptr, mask_ptr, iw_ptr,
    partials_ptr, seq_grad_ptr, grad_logp_ptr,
    B, T,
    s_logp_b, s_logp_t, s_old_b, s_old_t, s_ref_b, s_ref_t,
    s_adv_b, s_adv_t, s_mask_b, s_mask_t, s_iw_b, s_iw_t,
    lo_arg: tl.float64, hi_arg: tl.float64, eps_high_arg: tl.float64, delta_arg: tl.float64,
    clip_c_arg: tl.float64, beta_arg: tl.float64, tau_pos_arg: tl.float64, tau_neg_arg: tl.float64,
    FAMILY: tl.constexpr, SEQ_LEVEL: tl.constexpr, KL_EST: tl.constexpr,
    ADD_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_IW: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr,
    DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    lo, hi, eps_high, delta, clip_c, beta, tau_pos, tau_neg = _options(
        lo_arg, hi_arg, eps_high_arg, delta_arg, clip_c_arg, beta_arg, tau_pos_arg, tau_neg_arg, DTYPE)

    offs = tl.arange(0, BLOCK_T)
    logp_row = logp_ptr + i * s_logp_b
    old_row = old_logp_ptr + i * s_old_b
    ref_row = ref_logp_ptr + i * s_ref_b
    adv_row = adv_ptr + i * s_adv_b
    mask_row = mask_ptr + i * s_mask_b
    iw_row = iw_ptr + i * s_iw_b
    grad_row = grad_logp_ptr + i * T
    seq_grad = tl.load(seq_grad_ptr + i).to(DTYPE)

    seq_coef_1 = tl.zeros((), DTYPE) + 1.0
    seq_term = tl.zeros((), DTYPE)
    if SEQ_LEVEL:
        seq_coef_1 = tl.exp(tl.load(partials_ptr + 6 * B + i))
        n_i = tl.load(partials_ptr + 1 * B + i)
        acc_g = tl.zeros((BLOCK_T,), DTYPE)
        for t0 in range(0, T, BLOCK_T):
            cols = (t0 + offs).to(tl.int64)
            inb = cols < T
            m, logp, adv, coef_1 = _load_tokens(
                mask_row, logp_row, adv_row, old_row, s_mask_t, s_logp_t, s_adv_t, s_old_t, cols, inb, seq_coef_1,
                True, DTYPE, BLOCK_T)
            _l, _lo, _hi, dloss_dcoef, _dl = _policy_terms(
                coef_1, adv, logp, lo, hi, eps_high, delta, clip_c, tau_pos, tau_neg, FAMILY, HAS_DELTA, HAS_C)
            if HAS_IW:
                iw = tl.load(iw_row + cols * s_iw_t, mask=inb, other=0).to(DTYPE)
                dloss_dcoef = dloss_dcoef * iw
            if ADD_KL and BIAS_KL:
                ref_logp = tl.load(ref_row + cols * s_ref_t, mask=inb, other=0).to(DTYPE)
                kl, _dkl = _kl_terms(logp, ref_logp, KL_EST)
                dloss_dcoef = dloss_dcoef + beta * kl
            acc_g += dloss_dcoef * m
        seq_term = tl.sum(acc_g, axis=0) * seq_coef_1 / tl.maximum(n_i, 1.0)

    for t0 in range(0, T, BLOCK_T):
        cols = (t0 + offs).to(tl.int64)
        inb = cols < T
        m, logp, adv, coef_1 = _load_tokens(
            mask_row, logp_row, adv_row, old_row, s_mask_t, s_logp_t, s_adv_t, s_old_t, cols, inb, seq_coef_1,
            SEQ_LEVEL, DTYPE, BLOCK_T)
        iw = 1.0
        if HAS_IW:
            iw = tl.load(iw_row + cols * s_iw_t, mask=inb, other=0).to(DTYPE)
        ref_logp = logp
        if ADD_KL:
            ref_logp = tl.load(ref_row + cols * s_ref_t, mask=inb, other=0).to(DTYPE)
        dloss = _dloss_dlogp(coef_1, adv, logp, iw, ref_logp, seq_term, lo, hi, eps_high, delta, clip_c, beta,
                             tau_pos, tau_neg, FAMILY, SEQ_LEVEL, KL_EST, ADD_KL, BIAS_KL, HAS_IW, HAS_DELTA, HAS_C)
        tl.store(grad_row + cols, seq_grad * (m * dloss), mask=inb)


# --------------------------------------------------------------------------- #
# host side
# --------------------------------------------------------------------------- #
def token_strides(t: Optional[Tensor], B: int, T: int) -> tuple[int, int]:
    """(stride over B, stride over T) of a [B], [B, 1] or [B, T] tensor; 0 where broadcast."""
    if t is None:
        return 0, 0
    if t.ndim == 1:
        return t.stride(0), 0
    return t.stride(0), (t.stride(1) if t.shape[1] == T and T != 1 else 0)


def compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_args(logp, old, ref, adv, mask, iw):
    B, T = logp.shape
    args = []
    for t in (logp, old, ref, adv, mask, iw):
        args += token_strides(t, B, T)
    return args


def kernel_mask(mask: Tensor) -> Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, iw, cfg: KernelLossOptions):
        B, T = logp.shape
        dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
        old_k = logp if old is None else old  # old = logp.detach(): log-ratio logp - logp = 0
        ref_k = logp if ref is None else ref
        iw_k = logp if iw is None else iw
        mask_k = kernel_mask(mask)
        per_token_loss = torch.empty((B, T), dtype=dtype, device=logp.device)
        partials = torch.empty((NUM_PARTIALS, B), dtype=dtype, device=logp.device)
        block, warps = _block_config(T)
        _grpo_loss_fwd_kernel[(B,)](
            logp, old_k, ref_k, adv, mask_k, iw_k, per_token_loss, partials, B, T,
            *_launch_args(logp, old_k, ref, adv, mask_k, iw), *cfg.scalars,
            FAMILY=cfg.family, SEQ_LEVEL=cfg.seq_level, KL_EST=cfg.kl_estimator, HAS_REF=cfg.has_ref,
            ADD_KL=cfg.add_kl, BIAS_KL=cfg.bias_kl, HAS_IW=cfg.has_iw, HAS_DELTA=cfg.has_delta,
            HAS_C=cfg.has_clip_c, PER_SEQ_METRICS=cfg.per_seq_metrics, DTYPE=compute_dtype(dtype), BLOCK_T=block,
            num_warps=warps,
        )

        loss, kl, low, high, region = cfg.aggregate(partials, T)
        seq_weight = cfg.sequence_weights(partials[P_COUNT], T)

        ctx.cfg = cfg
        ctx.logp_dtype = logp.dtype
        ctx.save_for_backward(logp, old, ref, adv, mask, iw, partials, seq_weight)
        ctx.mark_non_differentiable(per_token_loss, kl, low, high, region)
        return loss, per_token_loss, kl, low, high, region

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):
        logp, old, ref, adv, mask, iw, partials, seq_weight = ctx.saved_tensors
        cfg: KernelLossOptions = ctx.cfg
        grad_logp = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            B, T = logp.shape
            dtype = partials.dtype
            seq_grad = grad_loss.to(dtype) * seq_weight
            old_k = logp if old is None else old
            ref_k = logp if ref is None else ref
            iw_k = logp if iw is None else iw
            mask_k = kernel_mask(mask)
            grad_logp = torch.empty((B, T), dtype=ctx.logp_dtype, device=logp.device)
            block, warps = _block_config(T)
            _grpo_loss_bwd_kernel[(B,)](
                logp, old_k, ref_k, adv, mask_k, iw_k, partials, seq_grad, grad_logp, B, T,
                *_launch_args(logp, old_k, ref, adv, mask_k, iw), *cfg.scalars,
                FAMILY=cfg.family, SEQ_LEVEL=cfg.seq_level, KL_EST=cfg.kl_estimator, ADD_KL=cfg.add_kl,
                BIAS_KL=cfg.bias_kl, HAS_IW=cfg.has_iw, HAS_DELTA=cfg.has_delta, HAS_C=cfg.has_clip_c,
                DTYPE=compute_dtype(dtype), BLOCK_T=block, num_warps=warps,
            )
        return grad_logp, None, None, None, None, None, None


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    **loss_options,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.grpo_loss` with Triton kernels (inputs already validated); ``loss_options``
    are its keyword options (absent ones take its defaults).

    Only ``loss`` is differentiable (w.r.t. ``logprobs``); ``per_token_loss``,
    ``kl`` and the clip metrics are returned without gradient.
    """
    cfg = kernel_loss_options(logprobs.shape[1], advantages, loss_options)
    loss, per_token_loss, kl, low, high, region = _GRPOLossFunction.apply(
        logprobs, old_logprobs, loss_options.get("ref_logprobs"), advantages, mask,
        loss_options.get("importance_weights"), cfg)
    return GRPOLossOutput(
        loss=loss,
        per_token_loss=per_token_loss,
        kl=kl if cfg.has_ref else None,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_region=region,
    )

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
dtype are converted as they are loaded. The numeric options
(``loss_table.KERNEL_SCALARS``) are float64 runtime arguments named as
``SCALAR_NAMES`` and passed by name; each kernel rounds them to the compute
dtype, as PyTorch rounds a Python scalar to the tensor's dtype, into one
``LossScalars`` (:func:`round_scalars`) that the per-token math reads as
``sc.<name>``. Options that select a code path are ``constexpr``: the loss
table's enum values as ints, compared with this module's named codes
(``CLIPPED``, ``KL_K3``, ``ROLLOUT_TOKEN``, ...); an unknown code fails the
compile (:func:`check_codes`).

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
from ..kernel_options import KernelLossOptions, LossScalars, kernel_loss_options
from ..loss_table import (FOLDS_IMPORTANCE_WEIGHTS, LOSS_TYPE_TABLE, ROLLOUT_GATE_PROB_CLAMP, VESPO_LOG_MAX,
                          VESPO_LOG_MIN, Family, KlEstimator, RolloutGate, RolloutLevel)
from ..reference import GRPOLossOutput

# The kernels' codes: one constexpr per member of the loss table's enums (the kernels take the enum values as
# constexpr ints and compare them with these by name).
CLIPPED = tl.constexpr(int(Family.CLIPPED))
CISPO = tl.constexpr(int(Family.CISPO))
SAPO = tl.constexpr(int(Family.SAPO))
VESPO = tl.constexpr(int(Family.VESPO))
GMPO = tl.constexpr(int(Family.GMPO))
GPG = tl.constexpr(int(Family.GPG))
KL_K3 = tl.constexpr(int(KlEstimator.K3))
KL_K1 = tl.constexpr(int(KlEstimator.K1))
KL_K2 = tl.constexpr(int(KlEstimator.K2))
KL_LOW_VAR_KL = tl.constexpr(int(KlEstimator.LOW_VAR_KL))
ROLLOUT_NONE = tl.constexpr(int(RolloutLevel.NONE))
ROLLOUT_TOKEN = tl.constexpr(int(RolloutLevel.TOKEN))
ROLLOUT_SEQUENCE = tl.constexpr(int(RolloutLevel.SEQUENCE))
GATE_RATIO = tl.constexpr(int(RolloutGate.RATIO))
GATE_GEOMETRIC_MEAN = tl.constexpr(int(RolloutGate.GEOMETRIC_MEAN))
GATE_BINARY_KL = tl.constexpr(int(RolloutGate.BINARY_KL))
GATE_TV = tl.constexpr(int(RolloutGate.TV))
_GATE_PROB_MIN = tl.constexpr(ROLLOUT_GATE_PROB_CLAMP)
_GATE_PROB_MAX = tl.constexpr(1 - ROLLOUT_GATE_PROB_CLAMP)  # rounded once from float64, as the reference's clamp
_VESPO_LOG_MIN = tl.constexpr(VESPO_LOG_MIN)
_VESPO_LOG_MAX = tl.constexpr(VESPO_LOG_MAX)
# The same codes as sets, and the families' properties from the table (read by the constexpr functions below).
_FAMILY_CODES = frozenset(int(member) for member in Family)
_KL_ESTIMATOR_CODES = frozenset(int(member) for member in KlEstimator)
_ROLLOUT_LEVEL_CODES = frozenset(int(member) for member in RolloutLevel)
_ROLLOUT_GATE_CODES = frozenset(int(member) for member in RolloutGate)
_FOLDING_FAMILIES = frozenset(int(family) for family in FOLDS_IMPORTANCE_WEIGHTS)
_SEQUENCE_PASS_FAMILIES = frozenset(int(row.family) for row in LOSS_TYPE_TABLE.values() if row.sequence_pass)

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
# per-token math shared by the kernels (as csrc/cpu/loss_terms.h)
# --------------------------------------------------------------------------- #
@triton.jit
def round_scalars(raw, DTYPE: tl.constexpr):
    """The numeric options (a ``LossScalars`` of the float64 kernel arguments) rounded to the compute dtype, as
    PyTorch rounds a scalar: a ``LossScalars`` that the per-token math reads by field name (``sc.beta``)."""
    rounded = ()
    for k in tl.static_range(len(raw)):
        rounded = rounded + (tl.full((), raw[k], DTYPE),)
    return LossScalars(*rounded)


@triton.constexpr_function
def is_family(code) -> bool:
    return code in _FAMILY_CODES


@triton.constexpr_function
def is_kl_estimator(code) -> bool:
    return code in _KL_ESTIMATOR_CODES


@triton.constexpr_function
def is_rollout_level(code) -> bool:
    return code in _ROLLOUT_LEVEL_CODES


@triton.constexpr_function
def is_rollout_gate(code) -> bool:
    return code in _ROLLOUT_GATE_CODES


@triton.constexpr_function
def folds_importance_weights(family) -> bool:
    """The family folds the token importance weights into its sequence weight (loss_table)."""
    return family in _FOLDING_FAMILIES


@triton.constexpr_function
def family_sequence_pass(family) -> bool:
    """The family's loss types always take a first pass over each sequence (loss_table ``sequence_pass``): it
    forms its own sequence statistics."""
    return family in _SEQUENCE_PASS_FAMILIES


@triton.jit
def _min(a, b):
    """torch.min / clamp semantics: NaN propagates (tl.minimum alone would drop it)."""
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_tokens(row, cols, inb, s_t, DTYPE: tl.constexpr, LOAD: tl.constexpr, default):
    """One block of a [B, T] input of the loss (strides s_t over T), or ``default`` when not LOAD."""
    if LOAD:
        return tl.load(row + cols * s_t, mask=inb, other=0).to(DTYPE)
    else:
        return default


@triton.jit
def _nan_to_num(x, DTYPE: tl.constexpr):
    """torch.nan_to_num(x, nan=0): NaN → 0, ±inf → the largest finite values."""
    big = tl.full((), 3.4028234663852886e38, DTYPE)
    if DTYPE == tl.float64:
        big = tl.full((), 1.7976931348623157e308, DTYPE)
    return tl.where(x != x, 0.0, tl.minimum(tl.maximum(x, -big), big))


@triton.jit
def _log_ratio(logp, old_logp, log_clamp, LOG_CLAMP: tl.constexpr):
    """r = logp - old_logp, clamped to ±log_clamp with LOG_CLAMP, and dr/dlogp (clamp passes at its bounds)."""
    r = logp - old_logp
    dr = tl.zeros_like(r) + 1.0
    if LOG_CLAMP:
        dr = tl.where((r >= -log_clamp) & (r <= log_clamp), 1.0, 0.0)
        r = _min(_max(r, -log_clamp), log_clamp)
    return r, dr


@triton.jit
def _rollout_ratio(d, is_min, is_max, log_clamp, IS_MASK: tl.constexpr, LOG_CLAMP: tl.constexpr):
    """The rollout ratio e^d of a (token or summed sequence) log-ratio, truncated to or masked outside
    [is_min, is_max]."""
    if LOG_CLAMP:
        d = _min(_max(d, -log_clamp), log_clamp)
    rho = tl.exp(d)
    if IS_MASK:
        rho = tl.where((rho < is_min) | (rho > is_max), 0.0, rho)
    else:
        rho = _min(_max(rho, is_min), is_max)
    return rho


@triton.jit
def _token_ratio(d, log_clamp, LOG_CLAMP: tl.constexpr):
    """ρ = e^d of a token's rollout log-ratio d (clamped to ±log_clamp with LOG_CLAMP), no bounds."""
    if LOG_CLAMP:
        d = _min(_max(d, -log_clamp), log_clamp)
    return tl.exp(d)


@triton.jit
def _gate_statistic(old_logp, samp_logp, DTYPE: tl.constexpr, GATE: tl.constexpr):
    """A divergence gate's statistic of a token (reference.rollout_gate_statistic): binary KL or |p - q| of
    p = e^sampling, q = e^old clamped to [c, 1 - c]; 0 where the sampling log-prob is NaN."""
    p = _min(_max(tl.exp(samp_logp), tl.full((), _GATE_PROB_MIN, DTYPE)), tl.full((), _GATE_PROB_MAX, DTYPE))
    q = _min(_max(tl.exp(old_logp), tl.full((), _GATE_PROB_MIN, DTYPE)), tl.full((), _GATE_PROB_MAX, DTYPE))
    if GATE == GATE_BINARY_KL:
        g = p * tl.log(p / q) + (1.0 - p) * tl.log((1.0 - p) / (1.0 - q))
    elif GATE == GATE_TV:
        g = tl.abs(p - q)
    else:
        tl.static_assert(False, "a token statistic exists for the divergence gates only (loss_table.RolloutGate)")
    return tl.where(samp_logp != samp_logp, 0.0, g)


@triton.jit
def _in_band(g, is_min, is_max):
    return (g >= is_min) & (g <= is_max)


@triton.jit
def _token_rollout_weight(old_logp, samp_logp, m, sc, DTYPE: tl.constexpr, IS_MASK: tl.constexpr,
                          GATE: tl.constexpr, LOG_CLAMP: tl.constexpr):
    """The token-level rollout weight: the ratio truncated to or masked outside [is_min, is_max] (GATE_RATIO),
    or the ratio where the token's divergence lies in [is_min, is_max], else 0."""
    d = _nan_to_num((old_logp - samp_logp) * m, DTYPE)
    if GATE == GATE_RATIO:
        w = _rollout_ratio(d, sc.is_min, sc.is_max, sc.log_clamp, IS_MASK=IS_MASK, LOG_CLAMP=LOG_CLAMP)
    elif GATE == GATE_BINARY_KL or GATE == GATE_TV:
        g = _gate_statistic(old_logp, samp_logp, DTYPE, GATE=GATE)
        w = tl.where(_in_band(g, sc.is_min, sc.is_max), _token_ratio(d, sc.log_clamp, LOG_CLAMP=LOG_CLAMP), 0.0)
    else:
        tl.static_assert(False, "a sequence gate at token level (the host rejects it: loss_table.RolloutGate)")
    return w


@triton.jit
def _sequence_rollout_weight(old_logp, samp_logp, m, seq_is, sc, DTYPE: tl.constexpr, GATE: tl.constexpr,
                             LOG_CLAMP: tl.constexpr):
    """The sequence-level rollout weight of a token: the sequence's ratio (GATE_RATIO), or the token's ratio
    where its sequence's statistic lies in the bounds (seq_is, the sequence pass's 0/1 gate), else 0."""
    if GATE == GATE_RATIO:
        w = seq_is + tl.zeros_like(m)
    else:
        tl.static_assert(is_rollout_gate(GATE), "unknown rollout gate code (loss_table.RolloutGate)")
        d = _nan_to_num((old_logp - samp_logp) * m, DTYPE)
        w = tl.where(seq_is != 0, _token_ratio(d, sc.log_clamp, LOG_CLAMP=LOG_CLAMP), 0.0)
    return w


@triton.jit
def _token_is(old_logp, samp_logp, m, iw, sc, DTYPE: tl.constexpr, ROLLOUT: tl.constexpr, IS_MASK: tl.constexpr,
              GATE: tl.constexpr, HAS_IW: tl.constexpr, LOG_CLAMP: tl.constexpr):
    """The token importance weight VESPO and GMPO fold in: token-level rollout weight times iw."""
    if ROLLOUT == ROLLOUT_TOKEN:
        rho = _token_rollout_weight(old_logp, samp_logp, m, sc, DTYPE, IS_MASK=IS_MASK, GATE=GATE,
                                    LOG_CLAMP=LOG_CLAMP)
        if HAS_IW:
            rho = rho * iw
        return rho
    else:  # none, or the sequence's ratio (the sequence pass forms it)
        tl.static_assert(ROLLOUT == ROLLOUT_NONE or ROLLOUT == ROLLOUT_SEQUENCE,
                         "unknown rollout level code (loss_table.RolloutLevel)")
        return iw


@triton.jit
def _gmpo_log_ratio(r, adv, eps_low, eps_high):
    """GMPO's s·min(s·r, s·clamp(r, -eps_low, eps_high)), s = sign(A), and its derivative w.r.t. r."""
    sign = tl.where(adv > 0, 1.0, tl.where(adv < 0, -1.0, 0.0))
    clipped = _min(_max(r, -eps_low), eps_high)
    dclipped = tl.where((r >= -eps_low) & (r <= eps_high), 1.0, 0.0)
    a = sign * r
    b = sign * clipped
    share = tl.where(a < b, 1.0, tl.where(a == b, 0.5, 0.0))  # torch.min splits ties
    dr = sign * (share * sign + (1.0 - share) * sign * dclipped)
    return sign * _min(a, b), dr


@triton.jit
def _vespo_phi(log_w, adv, k_pos, lambda_pos, k_neg, lambda_neg, DTYPE: tl.constexpr):
    """VESPO's φ = exp(λ + k log w - λ w), (k, λ) by the sign of A; NaN and inf → 0."""
    nonneg = adv >= 0
    k = tl.where(nonneg, k_pos, k_neg)
    lam = tl.where(nonneg, lambda_pos, lambda_neg)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    big = tl.full((), 3.4028234663852886e38, DTYPE)
    if DTYPE == tl.float64:
        big = tl.full((), 1.7976931348623157e308, DTYPE)
    return tl.where(phi <= big, phi, 0.0)


@triton.jit
def _sequence_terms(logp, old_logp, adv, m, iw, samp_logp, sc, DTYPE: tl.constexpr, FAMILY: tl.constexpr,
                    SEQ_LEVEL: tl.constexpr, ROLLOUT: tl.constexpr, IS_MASK: tl.constexpr, GATE: tl.constexpr,
                    HAS_IW: tl.constexpr, HAS_OPM: tl.constexpr, LOG_CLAMP: tl.constexpr):
    """A block's terms of the sequence pass: m, m·(log-ratio term), m·A, m·(log importance weight term),
    rollout term (d, or m·g of a divergence gate), m·KL (summed by the caller, turned into statistics by
    _sequence_stats)."""
    r, _dr = _log_ratio(logp, old_logp, sc.log_clamp, LOG_CLAMP=LOG_CLAMP)
    zero = tl.zeros_like(r)
    t_ratio = zero
    t_adv = zero
    t_is = zero
    t_rollout = zero
    t_kl = zero
    HAS_TOKEN_IS: tl.constexpr = ROLLOUT == ROLLOUT_TOKEN or HAS_IW
    if FAMILY == GMPO:
        r_min, _dg = _gmpo_log_ratio(r, adv, sc.eps_low, sc.eps_high)
        t_ratio = r_min * m
        t_adv = adv * m
        if HAS_TOKEN_IS:
            tau = _token_is(old_logp, samp_logp, m, iw, sc, DTYPE, ROLLOUT=ROLLOUT, IS_MASK=IS_MASK, GATE=GATE,
                            HAS_IW=HAS_IW, LOG_CLAMP=LOG_CLAMP)
            t_is = tl.log(tau + tl.full((), 1e-10, DTYPE)) * m
    elif FAMILY == VESPO:
        t_ratio = _min(_max(r, -_VESPO_LOG_MAX), _VESPO_LOG_MAX) * m
        if HAS_TOKEN_IS:
            tau = _token_is(old_logp, samp_logp, m, iw, sc, DTYPE, ROLLOUT=ROLLOUT, IS_MASK=IS_MASK, GATE=GATE,
                            HAS_IW=HAS_IW, LOG_CLAMP=LOG_CLAMP)
            t_is = _min(_max(tl.log(tau), tl.full((), _VESPO_LOG_MIN, DTYPE)), _VESPO_LOG_MAX) * m
    elif not family_sequence_pass(FAMILY):  # a ratio per token
        if SEQ_LEVEL:  # GSPO: the sequence's mean log-ratio
            t_ratio = r * m
    else:
        tl.static_assert(False, "a family with a sequence pass needs its sequence terms here")
    if ROLLOUT == ROLLOUT_SEQUENCE:
        if GATE == GATE_RATIO or GATE == GATE_GEOMETRIC_MEAN:  # Σ d
            t_rollout = _nan_to_num((old_logp - samp_logp) * m, DTYPE)
        else:  # Σ m·g
            t_rollout = _gate_statistic(old_logp, samp_logp, DTYPE, GATE=GATE) * m
    if HAS_OPM:
        t_kl = _nan_to_num(samp_logp - logp, DTYPE) * m
    return m, t_ratio, t_adv, t_is, t_rollout, t_kl


@triton.jit
def _sequence_stats(n, s_ratio, s_adv, s_is, s_rollout, s_kl, sc, DTYPE: tl.constexpr, FAMILY: tl.constexpr,
                    SEQ_LEVEL: tl.constexpr, ROLLOUT: tl.constexpr, IS_MASK: tl.constexpr, GATE: tl.constexpr,
                    HAS_IW: tl.constexpr, HAS_OPM: tl.constexpr, LOG_CLAMP: tl.constexpr):
    """A sequence's statistics from its sums: (log-ratio, GMPO's mean advantage, importance weight — the
    sequence's rollout ratio, or its 0/1 gate with a gate other than the ratio —, mean KL)."""
    HAS_TOKEN_IS: tl.constexpr = ROLLOUT == ROLLOUT_TOKEN or HAS_IW
    log_ratio = tl.zeros((), DTYPE)
    seq_adv = tl.zeros((), DTYPE)
    is_weight = tl.zeros((), DTYPE) + 1.0
    kl = tl.zeros((), DTYPE)
    if FAMILY == GMPO:  # means over n + 1e-8 (verl)
        denom = n + tl.full((), 1e-8, DTYPE)
        log_ratio = s_ratio / denom
        seq_adv = s_adv / denom
        if HAS_TOKEN_IS:
            is_weight = tl.exp(s_is / denom)
    elif FAMILY == VESPO:
        log_w = s_ratio
        if HAS_TOKEN_IS:
            log_w = s_ratio + s_is
        log_ratio = _min(_max(log_w, tl.full((), _VESPO_LOG_MIN, DTYPE)), _VESPO_LOG_MAX)
    elif not family_sequence_pass(FAMILY):  # a ratio per token
        if SEQ_LEVEL:  # GSPO: the sequence's mean log-ratio
            log_ratio = s_ratio / _max(n, 1.0)
    else:
        tl.static_assert(False, "a family with a sequence pass needs its sequence statistics here")
    if ROLLOUT == ROLLOUT_SEQUENCE:
        if GATE == GATE_RATIO:  # the sequence's ratio e^{Σ d}
            is_weight = _rollout_ratio(s_rollout, sc.is_min, sc.is_max, sc.log_clamp, IS_MASK=IS_MASK,
                                       LOG_CLAMP=LOG_CLAMP)
        else:  # the gate: 1 where the sequence's statistic lies in the bounds, else 0
            if GATE == GATE_GEOMETRIC_MEAN:  # e^{mean d}
                stat = _token_ratio(s_rollout / _max(n, 1.0), sc.log_clamp, LOG_CLAMP=LOG_CLAMP)
            else:
                tl.static_assert(GATE == GATE_BINARY_KL or GATE == GATE_TV,
                                 "unknown rollout gate code (loss_table.RolloutGate)")
                stat = s_rollout / _max(n, 1.0)
            is_weight = tl.where(_in_band(stat, sc.is_min, sc.is_max), 1.0, 0.0) + tl.zeros((), DTYPE)
    if HAS_OPM:
        kl = s_kl / _max(n, 1.0)
    return log_ratio, seq_adv, is_weight, kl


@triton.jit
def _kl_terms(logp, ref_logp, KL_EST: tl.constexpr):
    """Per-token KL estimate of d = ref_logp - logp and its derivative d KL / d logp."""
    d = ref_logp - logp
    if KL_EST == KL_K1:  # -d
        kl = -d
        dkl_dlogp = tl.zeros_like(d) + 1.0
    elif KL_EST == KL_K2:  # d²/2
        kl = 0.5 * d * d
        dkl_dlogp = -d
    elif KL_EST == KL_LOW_VAR_KL:  # k3 of clamp(d, ±20), clamped to ±10
        dc = _min(_max(d, -20.0), 20.0)
        e = tl.exp(dc)
        v = e - dc - 1.0
        kl = _min(_max(v, -10.0), 10.0)
        inside = (d >= -20.0) & (d <= 20.0) & (v >= -10.0) & (v <= 10.0)
        dkl_dlogp = tl.where(inside, 1.0 - e, 0.0)
    elif KL_EST == KL_K3:  # e^d - d - 1
        e = tl.exp(d)
        kl = e - d - 1.0
        dkl_dlogp = 1.0 - e
    else:
        tl.static_assert(False, "unknown KL estimator code (loss_table.KlEstimator)")
    return kl, dkl_dlogp


@triton.jit
def _policy_terms(coef_1, adv, logp, r, seq_log_ratio, seq_adv, seq_is, sc, DTYPE: tl.constexpr,
                  FAMILY: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr, HAS_TOKEN_IS: tl.constexpr):
    """Policy part of the per-token loss (before the masks, importance weights and KL).

    coef_1: the ratio (the sequence's shared ratio for GSPO and GMPO); r: the token's log-ratio.
    Returns (loss, is_low, is_high, d loss / d coef_1, d loss / d logp at fixed coef_1).
    """
    zero = tl.zeros_like(coef_1 * adv)
    if FAMILY == CISPO:  # -sg[min(c1, eps_high)] · A · logp
        capped = _min(coef_1, sc.eps_high)
        loss = -capped * adv * logp
        dloss_dlogp = -capped * adv
        dloss_dcoef = zero
        is_high = (coef_1 > sc.eps_high) & (adv > 0)
        is_low = is_high & (adv < 0)  # all False
    elif FAMILY == SAPO:  # -σ(τ(c1 - 1)) · 4/τ · A
        tau = tl.where(adv > 0, sc.tau_pos, sc.tau_neg)
        sig = 1.0 / (1.0 + tl.exp(-(tau * (coef_1 - 1.0))))
        loss = -sig * 4.0 / tau * adv
        dloss_dcoef = -(sig * (1.0 - sig)) * 4.0 * adv  # σ' · τ · 4/τ · A
        dloss_dlogp = zero
        is_low = (coef_1 < sc.lo) & (adv < 0)
        is_high = (coef_1 > sc.hi) & (adv > 0)
    elif FAMILY == VESPO:  # -sg[φ] · A · logp
        phi = _vespo_phi(seq_log_ratio, adv, sc.k_pos, sc.lambda_pos, sc.k_neg, sc.lambda_neg, DTYPE)
        loss = -phi * adv * logp
        dloss_dlogp = -phi * adv
        dloss_dcoef = zero
        is_low = zero != zero
        is_high = is_low
    elif FAMILY == GMPO:  # -Ā · R · ψ, R = coef_1 the sequence's ratio
        psi = seq_is
        if not HAS_TOKEN_IS:
            psi = tl.zeros_like(seq_is) + 1.0
        loss = -seq_adv * coef_1 * psi + zero
        dloss_dcoef = -seq_adv * psi + zero
        dloss_dlogp = zero
        clipped = (r < -sc.eps_low) | (r > sc.eps_high)
        is_low = clipped & (adv < 0)
        is_high = clipped & (adv > 0)
    elif FAMILY == GPG:  # -logp · A
        loss = -logp * adv
        dloss_dlogp = -adv + zero
        dloss_dcoef = zero
        is_low = zero != zero
        is_high = is_low
    elif FAMILY == CLIPPED:  # -min(c1·A, clip(c1, lo, hi)·A), delta clamp of c1, dual clip
        coef_2 = _min(_max(coef_1, sc.lo), sc.hi)
        dcoef_2 = tl.where((coef_1 >= sc.lo) & (coef_1 <= sc.hi), 1.0, 0.0)
        if HAS_DELTA:
            coef_1d = _min(coef_1, sc.delta)
            dcoef_1d = tl.where(coef_1 <= sc.delta, 1.0, 0.0)
        else:
            coef_1d = coef_1
            dcoef_1d = 1.0
        x1 = coef_1d * adv
        x2 = coef_2 * adv
        loss = -_min(x1, x2)
        g1 = tl.where(x1 < x2, 1.0, tl.where(x1 == x2, 0.5, 0.0))  # torch.min splits ties
        dloss_dcoef = -(adv * (g1 * dcoef_1d + (1.0 - g1) * dcoef_2))
        if HAS_C:
            cap = -adv * sc.clip_c
            g_dual = tl.where(loss < cap, 1.0, tl.where(loss == cap, 0.5, 0.0))
            negative = adv < 0
            loss = tl.where(negative, _min(loss, cap), loss)
            dloss_dcoef = tl.where(negative, g_dual * dloss_dcoef, dloss_dcoef)
        dloss_dlogp = zero
        is_low = (coef_1d < sc.lo) & (adv < 0)
        is_high = (coef_1d > sc.hi) & (adv > 0)
    else:
        tl.static_assert(False, "unknown loss family code (loss_table.Family)")
    return loss, is_low, is_high, dloss_dcoef, dloss_dlogp


@triton.jit
def _token_terms(logp, old_logp, adv, m, ref_logp, iw, samp_logp, seq_log_ratio, seq_adv, seq_is, seq_kl, sc,
                 DTYPE: tl.constexpr, FAMILY: tl.constexpr, SHARED: tl.constexpr, KL_EST: tl.constexpr,
                 HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_IW: tl.constexpr,
                 HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr, ROLLOUT: tl.constexpr, IS_MASK: tl.constexpr,
                 GATE: tl.constexpr, HAS_OPM: tl.constexpr, LOG_CLAMP: tl.constexpr):
    """The whole per-token loss (policy term; times the off-policy mask, the rollout ratio and iw — the last two
    folded into the sequence weight instead for vespo and gmpo; plus beta · KL).

    Returns (loss, kl, is_low, is_high, ∂ℓ/∂c1, ∂ℓ/∂logp, ratio_grad): ratio_grad is d c1 / d logp at token
    level; with a shared ratio, d (the token's term of the sequence log-ratio) / d logp.
    """
    HAS_TOKEN_IS: tl.constexpr = ROLLOUT == ROLLOUT_TOKEN or HAS_IW
    r, dr = _log_ratio(logp, old_logp, sc.log_clamp, LOG_CLAMP=LOG_CLAMP)
    if SHARED:
        coef_1 = tl.exp(seq_log_ratio + tl.zeros_like(r))
    else:
        coef_1 = tl.exp(r)
    loss, is_low, is_high, dloss_dcoef, dloss_dlogp = _policy_terms(
        coef_1, adv, logp, r, seq_log_ratio, seq_adv, seq_is, sc, DTYPE, FAMILY=FAMILY, HAS_DELTA=HAS_DELTA,
        HAS_C=HAS_C, HAS_TOKEN_IS=HAS_TOKEN_IS)
    if SHARED:  # d (the token's term of the sequence's log-ratio) / d logp
        if FAMILY == GMPO:  # its clipped log-ratio
            _r_min, dg = _gmpo_log_ratio(r, adv, sc.eps_low, sc.eps_high)
            ratio_grad = dr * dg
        elif not family_sequence_pass(FAMILY):  # GSPO: the log-ratio
            ratio_grad = dr
        else:
            tl.static_assert(False, "a family with a shared ratio needs its ratio gradient here")
    else:
        ratio_grad = coef_1 * dr
    if HAS_OPM:  # keep unless A < 0 and the sequence's mean KL exceeds the threshold
        factor = tl.where(adv >= 0, 1.0, tl.where(seq_kl <= sc.off_policy_threshold, 1.0, 0.0)) + tl.zeros_like(loss)
        loss = loss * factor
        dloss_dcoef = dloss_dcoef * factor
        dloss_dlogp = dloss_dlogp * factor
    if not folds_importance_weights(FAMILY):
        if ROLLOUT == ROLLOUT_TOKEN:
            rho = _token_rollout_weight(old_logp, samp_logp, m, sc, DTYPE, IS_MASK=IS_MASK, GATE=GATE,
                                        LOG_CLAMP=LOG_CLAMP)
            loss = loss * rho
            dloss_dcoef = dloss_dcoef * rho
            dloss_dlogp = dloss_dlogp * rho
        elif ROLLOUT == ROLLOUT_SEQUENCE:  # from the sequence pass: its ratio, or its gate times the token's ratio
            rho = _sequence_rollout_weight(old_logp, samp_logp, m, seq_is, sc, DTYPE, GATE=GATE, LOG_CLAMP=LOG_CLAMP)
            loss = loss * rho
            dloss_dcoef = dloss_dcoef * rho
            dloss_dlogp = dloss_dlogp * rho
        else:
            tl.static_assert(ROLLOUT == ROLLOUT_NONE, "unknown rollout level code (loss_table.RolloutLevel)")
        if HAS_IW:
            loss = loss * iw
            dloss_dcoef = dloss_dcoef * iw
            dloss_dlogp = dloss_dlogp * iw
    kl = tl.zeros_like(loss)
    if HAS_REF:
        kl, dkl_dlogp = _kl_terms(logp, ref_logp, KL_EST=KL_EST)
        if BIAS_KL:  # KL · c1
            if ADD_KL:
                dloss_dcoef = dloss_dcoef + sc.beta * kl
            kl = kl * coef_1
            dkl_dlogp = dkl_dlogp * coef_1
        if ADD_KL:
            loss = loss + sc.beta * kl
            dloss_dlogp = dloss_dlogp + sc.beta * dkl_dlogp
    return loss, kl, is_low, is_high, dloss_dcoef, dloss_dlogp, ratio_grad


@triton.jit
def _load_block(mask_row, logp_row, old_row, ref_row, adv_row, iw_row, samp_row, s_mask_t, s_logp_t, s_old_t,
                s_ref_t, s_adv_t, s_iw_t, s_samp_t, cols, inb, DTYPE: tl.constexpr, HAS_REF: tl.constexpr,
                HAS_IW: tl.constexpr, HAS_SAMP: tl.constexpr):
    """One block of a sequence's inputs: m, logp, old_logp, adv, ref_logp (= logp without), iw (1 without),
    sampling log-probs (= old_logp without)."""
    m = tl.load(mask_row + cols * s_mask_t, mask=inb, other=0).to(DTYPE)
    logp = tl.load(logp_row + cols * s_logp_t, mask=inb, other=0).to(DTYPE)
    old_logp = tl.load(old_row + cols * s_old_t, mask=inb, other=0).to(DTYPE)
    adv = tl.load(adv_row + cols * s_adv_t, mask=inb, other=0).to(DTYPE)
    ref_logp = _load_tokens(ref_row, cols, inb, s_ref_t, DTYPE, LOAD=HAS_REF, default=logp)
    iw = _load_tokens(iw_row, cols, inb, s_iw_t, DTYPE, LOAD=HAS_IW, default=tl.zeros_like(logp) + 1.0)
    samp_logp = _load_tokens(samp_row, cols, inb, s_samp_t, DTYPE, LOAD=HAS_SAMP, default=old_logp)
    return select_unmasked(m, logp, old_logp, adv, ref_logp, iw, samp_logp)


@triton.jit
def select_unmasked(m, logp, old_logp, adv, ref_logp, iw, samp_logp):
    """The inputs with neutral values (log-probs 0, advantage 0, importance weight 1) where ``m == 0``:
    selection, not multiplication by the mask, so that NaN or ±inf at masked positions reach no sum and no
    gradient (loss_terms.h select_unmasked)."""
    keep = m != 0
    return (m, tl.where(keep, logp, 0.0), tl.where(keep, old_logp, 0.0), tl.where(keep, adv, 0.0),
            tl.where(keep, ref_logp, 0.0), tl.where(keep, iw, 1.0), tl.where(keep, samp_logp, 0.0))


@triton.jit
def check_codes(FAMILY: tl.constexpr, KL_EST: tl.constexpr, ROLLOUT: tl.constexpr, GATE: tl.constexpr):
    """The option codes are members of the loss table's enums (a compile-time error otherwise)."""
    tl.static_assert(is_family(FAMILY), "unknown loss family code (loss_table.Family)")
    tl.static_assert(is_kl_estimator(KL_EST), "unknown KL estimator code (loss_table.KlEstimator)")
    tl.static_assert(is_rollout_level(ROLLOUT), "unknown rollout level code (loss_table.RolloutLevel)")
    tl.static_assert(is_rollout_gate(GATE), "unknown rollout gate code (loss_table.RolloutGate)")


# --------------------------------------------------------------------------- #
# forward
# --------------------------------------------------------------------------- #
# Reads per sequence i: logp, old_logp, mask, adv (and ref_logp, iw, sampling log-probs when given) over T;
# with a sequence pass (SEQ_PASS) twice: its statistics first. Writes per_token_loss [B, T] in the compute
# dtype and NUM_PARTIALS values per sequence. Traffic ≈ B·T·(4..7 loads + 1 store), ×~2 loads with a
# sequence pass.
@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr, old_logp_ptr, ref_logp_ptr, adv_ptr, mask_ptr, iw_ptr, samp_ptr,
    per_token_loss_ptr, partials_ptr,
    B, T,
    s_logp_b, s_logp_t, s_old_b, s_old_t, s_ref_b, s_ref_t,
    s_adv_b, s_adv_t, s_mask_b, s_mask_t, s_iw_b, s_iw_t, s_samp_b, s_samp_t,
    # the numeric options, loss_table.SCALAR_NAMES (passed by name)
    lo: tl.float64, hi: tl.float64, eps_high: tl.float64, delta: tl.float64, clip_c: tl.float64, beta: tl.float64,
    tau_pos: tl.float64, tau_neg: tl.float64, eps_low: tl.float64, is_min: tl.float64, is_max: tl.float64,
    off_policy_threshold: tl.float64, k_pos: tl.float64, lambda_pos: tl.float64, k_neg: tl.float64,
    lambda_neg: tl.float64, log_clamp: tl.float64,
    FAMILY: tl.constexpr, SEQ_LEVEL: tl.constexpr, SEQ_PASS: tl.constexpr, SHARED: tl.constexpr,
    KL_EST: tl.constexpr, HAS_REF: tl.constexpr, ADD_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_IW: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr, PER_SEQ_METRICS: tl.constexpr, ROLLOUT: tl.constexpr,
    IS_MASK: tl.constexpr, GATE: tl.constexpr, HAS_OPM: tl.constexpr, LOG_CLAMP: tl.constexpr,
    HAS_SAMP: tl.constexpr, DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    check_codes(FAMILY, KL_EST, ROLLOUT, GATE)
    i = tl.program_id(0).to(tl.int64)
    sc = round_scalars(LossScalars(
        lo=lo, hi=hi, eps_high=eps_high, delta=delta, clip_c=clip_c, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg,
        eps_low=eps_low, is_min=is_min, is_max=is_max, off_policy_threshold=off_policy_threshold, k_pos=k_pos,
        lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg, log_clamp=log_clamp), DTYPE)

    offs = tl.arange(0, BLOCK_T)
    logp_row = logp_ptr + i * s_logp_b
    old_row = old_logp_ptr + i * s_old_b
    ref_row = ref_logp_ptr + i * s_ref_b
    adv_row = adv_ptr + i * s_adv_b
    mask_row = mask_ptr + i * s_mask_b
    iw_row = iw_ptr + i * s_iw_b
    samp_row = samp_ptr + i * s_samp_b
    out_row = per_token_loss_ptr + i * T

    seq_log_ratio = tl.zeros((), DTYPE)
    seq_adv = tl.zeros((), DTYPE)
    seq_is = tl.zeros((), DTYPE) + 1.0
    seq_kl = tl.zeros((), DTYPE)
    if SEQ_PASS:  # the sequence's statistics (loss_terms.h add_sequence_terms / sequence_stats)
        acc_n = tl.zeros((BLOCK_T,), DTYPE)
        acc_ratio = tl.zeros((BLOCK_T,), DTYPE)
        acc_adv = tl.zeros((BLOCK_T,), DTYPE)
        acc_is = tl.zeros((BLOCK_T,), DTYPE)
        acc_rollout = tl.zeros((BLOCK_T,), DTYPE)
        acc_kl = tl.zeros((BLOCK_T,), DTYPE)
        for t0 in range(0, T, BLOCK_T):
            cols = (t0 + offs).to(tl.int64)
            inb = cols < T
            m, logp, old_logp, adv, _ref, iw, samp_logp = _load_block(
                mask_row, logp_row, old_row, ref_row, adv_row, iw_row, samp_row, s_mask_t, s_logp_t, s_old_t,
                s_ref_t, s_adv_t, s_iw_t, s_samp_t, cols, inb, DTYPE, HAS_REF=False, HAS_IW=HAS_IW,
                HAS_SAMP=HAS_SAMP)
            t_n, t_ratio, t_adv, t_is, t_rollout, t_kl = _sequence_terms(
                logp, old_logp, adv, m, iw, samp_logp, sc, DTYPE, FAMILY=FAMILY, SEQ_LEVEL=SEQ_LEVEL,
                ROLLOUT=ROLLOUT, IS_MASK=IS_MASK, GATE=GATE, HAS_IW=HAS_IW, HAS_OPM=HAS_OPM, LOG_CLAMP=LOG_CLAMP)
            acc_n += t_n
            acc_ratio += t_ratio
            acc_adv += t_adv
            acc_is += t_is
            acc_rollout += t_rollout
            acc_kl += t_kl
        seq_log_ratio, seq_adv, seq_is, seq_kl = _sequence_stats(
            tl.sum(acc_n, axis=0), tl.sum(acc_ratio, axis=0), tl.sum(acc_adv, axis=0), tl.sum(acc_is, axis=0),
            tl.sum(acc_rollout, axis=0), tl.sum(acc_kl, axis=0), sc, DTYPE, FAMILY=FAMILY, SEQ_LEVEL=SEQ_LEVEL,
            ROLLOUT=ROLLOUT, IS_MASK=IS_MASK, GATE=GATE, HAS_IW=HAS_IW, HAS_OPM=HAS_OPM, LOG_CLAMP=LOG_CLAMP)

    acc_loss = tl.zeros((BLOCK_T,), DTYPE)
    acc_m = tl.zeros((BLOCK_T,), DTYPE)
    acc_kl = tl.zeros((BLOCK_T,), DTYPE)
    acc_low = tl.zeros((BLOCK_T,), DTYPE)
    acc_high = tl.zeros((BLOCK_T,), DTYPE)
    acc_region = tl.zeros((BLOCK_T,), DTYPE)
    for t0 in range(0, T, BLOCK_T):
        cols = (t0 + offs).to(tl.int64)
        inb = cols < T
        m, logp, old_logp, adv, ref_logp, iw, samp_logp = _load_block(
            mask_row, logp_row, old_row, ref_row, adv_row, iw_row, samp_row, s_mask_t, s_logp_t, s_old_t, s_ref_t,
            s_adv_t, s_iw_t, s_samp_t, cols, inb, DTYPE, HAS_REF=HAS_REF, HAS_IW=HAS_IW, HAS_SAMP=HAS_SAMP)
        loss, kl, is_low, is_high, _dc, _dl, _rg = _token_terms(
            logp, old_logp, adv, m, ref_logp, iw, samp_logp, seq_log_ratio, seq_adv, seq_is, seq_kl, sc, DTYPE,
            FAMILY=FAMILY, SHARED=SHARED, KL_EST=KL_EST, HAS_REF=HAS_REF, ADD_KL=ADD_KL, BIAS_KL=BIAS_KL,
            HAS_IW=HAS_IW, HAS_DELTA=HAS_DELTA, HAS_C=HAS_C, ROLLOUT=ROLLOUT, IS_MASK=IS_MASK, GATE=GATE,
            HAS_OPM=HAS_OPM, LOG_CLAMP=LOG_CLAMP)
        loss = tl.where(m != 0, loss, 0.0)  # 0 at masked tokens, by selection
        tl.store(out_row + cols, loss, mask=inb)
        acc_loss += loss
        acc_m += m
        acc_kl += kl * m
        acc_low += is_low.to(DTYPE) * m
        acc_high += is_high.to(DTYPE) * m
        acc_region += (is_low | is_high).to(DTYPE) * m

    tl.store(partials_ptr + 0 * B + i, tl.sum(acc_loss, axis=0))
    tl.store(partials_ptr + 1 * B + i, tl.sum(acc_m, axis=0))
    tl.store(partials_ptr + 2 * B + i, tl.sum(acc_kl, axis=0))
    if PER_SEQ_METRICS:  # one ratio and one advantage per sequence: a 0/1 flag per sequence
        adv_i = tl.where(tl.sum(acc_m, axis=0) != 0, tl.load(adv_row).to(DTYPE), 0.0)  # fully masked: neutral
        seq_coef_1 = tl.exp(seq_log_ratio)
        _l, low_i, high_i, _dc, _dl = _policy_terms(
            seq_coef_1, adv_i, seq_coef_1, tl.zeros((), DTYPE), seq_log_ratio, seq_adv, seq_is, sc, DTYPE,
            FAMILY=FAMILY, HAS_DELTA=HAS_DELTA, HAS_C=HAS_C, HAS_TOKEN_IS=False)
        tl.store(partials_ptr + 3 * B + i, low_i.to(DTYPE))
        tl.store(partials_ptr + 4 * B + i, high_i.to(DTYPE))
        tl.store(partials_ptr + 5 * B + i, (low_i | high_i).to(DTYPE))
    else:
        tl.store(partials_ptr + 3 * B + i, tl.sum(acc_low, axis=0))
        tl.store(partials_ptr + 4 * B + i, tl.sum(acc_high, axis=0))
        tl.store(partials_ptr + 5 * B + i, tl.sum(acc_region, axis=0))
    tl.store(partials_ptr + 6 * B + i, seq_log_ratio)
    tl.store(partials_ptr + 7 * B + i, seq_adv)
    tl.store(partials_ptr + 8 * B + i, seq_is)
    tl.store(partials_ptr + 9 * B + i, seq_kl)


# --------------------------------------------------------------------------- #
# backward
# --------------------------------------------------------------------------- #
# d loss / d logp_{i,t} = dL/dS_i · m_t · dℓ_t/dlogp_t, with dL/dS_i (seq_grad [B]) formed by torch from
# grad_output and the normalizer. Token level: dℓ_t/dlogp_t = ∂ℓ_t/∂logp_t + ∂ℓ_t/∂c1_t · d c1_t/d logp_t.
# Shared ratio (GSPO's c1, GMPO's R = e^w): d c1 / d logp_s = c1 · m_s · ratio_grad_s / denominator (max(1, n_i);
# GMPO n_i + 1e-8): a first loop sums G_i = Σ_t m_t ∂ℓ_t/∂c1, then dℓ/dlogp_s = ∂ℓ_s/∂logp_s + G_i · c1 ·
# ratio_grad_s / denominator. The sequence statistics come from the forward's partials. Reads per sequence i
# its inputs over T (twice with a shared ratio) and its partials; writes d logp [B, T] in the dtype of logprobs.
# Traffic ≈ B·T·(4..7 loads + 1 store), ×~2 loads with a shared ratio.
@triton.jit
def _grpo_loss_bwd_kernel(
    logp_ptr, old_logp_ptr, ref_logp_ptr, adv_ptr, mask_ptr, iw_ptr, samp_ptr,
    partials_ptr, seq_grad_ptr, grad_logp_ptr,
    B, T,
    s_logp_b, s_logp_t, s_old_b, s_old_t, s_ref_b, s_ref_t,
    s_adv_b, s_adv_t, s_mask_b, s_mask_t, s_iw_b, s_iw_t, s_samp_b, s_samp_t,
    # the numeric options, loss_table.SCALAR_NAMES (passed by name)
    lo: tl.float64, hi: tl.float64, eps_high: tl.float64, delta: tl.float64, clip_c: tl.float64, beta: tl.float64,
    tau_pos: tl.float64, tau_neg: tl.float64, eps_low: tl.float64, is_min: tl.float64, is_max: tl.float64,
    off_policy_threshold: tl.float64, k_pos: tl.float64, lambda_pos: tl.float64, k_neg: tl.float64,
    lambda_neg: tl.float64, log_clamp: tl.float64,
    FAMILY: tl.constexpr, SHARED: tl.constexpr, KL_EST: tl.constexpr, ADD_KL: tl.constexpr,
    BIAS_KL: tl.constexpr, HAS_IW: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_C: tl.constexpr,
    ROLLOUT: tl.constexpr, IS_MASK: tl.constexpr, GATE: tl.constexpr, HAS_OPM: tl.constexpr,
    LOG_CLAMP: tl.constexpr, HAS_SAMP: tl.constexpr, DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    check_codes(FAMILY, KL_EST, ROLLOUT, GATE)
    i = tl.program_id(0).to(tl.int64)
    sc = round_scalars(LossScalars(
        lo=lo, hi=hi, eps_high=eps_high, delta=delta, clip_c=clip_c, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg,
        eps_low=eps_low, is_min=is_min, is_max=is_max, off_policy_threshold=off_policy_threshold, k_pos=k_pos,
        lambda_pos=lambda_pos, k_neg=k_neg, lambda_neg=lambda_neg, log_clamp=log_clamp), DTYPE)

    offs = tl.arange(0, BLOCK_T)
    logp_row = logp_ptr + i * s_logp_b
    old_row = old_logp_ptr + i * s_old_b
    ref_row = ref_logp_ptr + i * s_ref_b
    adv_row = adv_ptr + i * s_adv_b
    mask_row = mask_ptr + i * s_mask_b
    iw_row = iw_ptr + i * s_iw_b
    samp_row = samp_ptr + i * s_samp_b
    grad_row = grad_logp_ptr + i * T
    seq_grad = tl.load(seq_grad_ptr + i).to(DTYPE)
    seq_log_ratio = tl.load(partials_ptr + 6 * B + i).to(DTYPE)
    seq_adv = tl.load(partials_ptr + 7 * B + i).to(DTYPE)
    seq_is = tl.load(partials_ptr + 8 * B + i).to(DTYPE)
    seq_kl = tl.load(partials_ptr + 9 * B + i).to(DTYPE)

    seq_term = tl.zeros((), DTYPE)
    if SHARED:
        n_i = tl.load(partials_ptr + 1 * B + i).to(DTYPE)
        acc_g = tl.zeros((BLOCK_T,), DTYPE)
        for t0 in range(0, T, BLOCK_T):
            cols = (t0 + offs).to(tl.int64)
            inb = cols < T
            m, logp, old_logp, adv, ref_logp, iw, samp_logp = _load_block(
                mask_row, logp_row, old_row, ref_row, adv_row, iw_row, samp_row, s_mask_t, s_logp_t, s_old_t,
                s_ref_t, s_adv_t, s_iw_t, s_samp_t, cols, inb, DTYPE, HAS_REF=ADD_KL, HAS_IW=HAS_IW,
                HAS_SAMP=HAS_SAMP)
            _l, _kl, _low, _high, dloss_dcoef, _dl, _rg = _token_terms(
                logp, old_logp, adv, m, ref_logp, iw, samp_logp, seq_log_ratio, seq_adv, seq_is, seq_kl, sc, DTYPE,
                FAMILY=FAMILY, SHARED=SHARED, KL_EST=KL_EST, HAS_REF=ADD_KL, ADD_KL=ADD_KL, BIAS_KL=BIAS_KL,
                HAS_IW=HAS_IW, HAS_DELTA=HAS_DELTA, HAS_C=HAS_C, ROLLOUT=ROLLOUT, IS_MASK=IS_MASK, GATE=GATE,
                HAS_OPM=HAS_OPM, LOG_CLAMP=LOG_CLAMP)
            acc_g += dloss_dcoef * m
        if FAMILY == GMPO:  # R = e^(mean over n + 1e-8)
            denom = n_i + tl.full((), 1e-8, DTYPE)
        elif not family_sequence_pass(FAMILY):  # GSPO: c1 = e^(mean over max(1, n))
            denom = _max(n_i, 1.0)
        else:
            tl.static_assert(False, "a family with a shared ratio needs its denominator here")
        seq_term = tl.sum(acc_g, axis=0) * tl.exp(seq_log_ratio) / denom

    for t0 in range(0, T, BLOCK_T):
        cols = (t0 + offs).to(tl.int64)
        inb = cols < T
        m, logp, old_logp, adv, ref_logp, iw, samp_logp = _load_block(
            mask_row, logp_row, old_row, ref_row, adv_row, iw_row, samp_row, s_mask_t, s_logp_t, s_old_t, s_ref_t,
            s_adv_t, s_iw_t, s_samp_t, cols, inb, DTYPE, HAS_REF=ADD_KL, HAS_IW=HAS_IW, HAS_SAMP=HAS_SAMP)
        dloss = dloss_dlogp(logp, old_logp, adv, m, ref_logp, iw, samp_logp, seq_log_ratio, seq_adv, seq_is, seq_kl,
                            seq_term, sc, DTYPE, FAMILY=FAMILY, SHARED=SHARED, KL_EST=KL_EST, ADD_KL=ADD_KL,
                            BIAS_KL=BIAS_KL, HAS_IW=HAS_IW, HAS_DELTA=HAS_DELTA, HAS_C=HAS_C, ROLLOUT=ROLLOUT,
                            IS_MASK=IS_MASK, GATE=GATE, HAS_OPM=HAS_OPM, LOG_CLAMP=LOG_CLAMP)
        tl.store(grad_row + cols, tl.where(m != 0, seq_grad * (m * dloss), 0.0), mask=inb)


@triton.jit
def dloss_dlogp(logp, old_logp, adv, m, ref_logp, iw, samp_logp, seq_log_ratio, seq_adv, seq_is, seq_kl, seq_term,
                sc, DTYPE: tl.constexpr, FAMILY: tl.constexpr, SHARED: tl.constexpr, KL_EST: tl.constexpr,
                ADD_KL: tl.constexpr, BIAS_KL: tl.constexpr, HAS_IW: tl.constexpr, HAS_DELTA: tl.constexpr,
                HAS_C: tl.constexpr, ROLLOUT: tl.constexpr, IS_MASK: tl.constexpr, GATE: tl.constexpr,
                HAS_OPM: tl.constexpr, LOG_CLAMP: tl.constexpr):
    """dℓ_t/dlogp_t of a token (or a block of tokens), before the mask and the sequence weight: ∂ℓ/∂logp plus,
    at token level, ∂ℓ/∂c1 · d c1/d logp; with a shared ratio, ``seq_term`` (G_i · c1 / denominator) times the
    token's ratio_grad."""
    _l, _kl, _low, _high, d_coef, d_logp, ratio_grad = _token_terms(
        logp, old_logp, adv, m, ref_logp, iw, samp_logp, seq_log_ratio, seq_adv, seq_is, seq_kl, sc, DTYPE,
        FAMILY=FAMILY, SHARED=SHARED, KL_EST=KL_EST, HAS_REF=ADD_KL, ADD_KL=ADD_KL, BIAS_KL=BIAS_KL, HAS_IW=HAS_IW,
        HAS_DELTA=HAS_DELTA, HAS_C=HAS_C, ROLLOUT=ROLLOUT, IS_MASK=IS_MASK, GATE=GATE, HAS_OPM=HAS_OPM,
        LOG_CLAMP=LOG_CLAMP)
    if SHARED:
        return d_logp + seq_term * ratio_grad
    else:
        return d_logp + d_coef * ratio_grad


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


def loss_flags(cfg: KernelLossOptions) -> dict:
    """The constexprs of the per-token math (:func:`_token_terms`) for ``cfg``; the enums' codes as plain ints
    (a stable cache key)."""
    return dict(FAMILY=int(cfg.family), SHARED=cfg.shared_ratio, KL_EST=int(cfg.kl_estimator), ADD_KL=cfg.add_kl,
                BIAS_KL=cfg.bias_kl, HAS_IW=cfg.has_iw, HAS_DELTA=cfg.has_delta, HAS_C=cfg.has_clip_c,
                ROLLOUT=int(cfg.rollout_is), IS_MASK=cfg.rollout_is_mask, GATE=int(cfg.rollout_is_gate),
                HAS_OPM=cfg.has_off_policy_mask, LOG_CLAMP=cfg.has_log_clamp, HAS_SAMP=cfg.has_sampling)


def kernel_mask(mask: Tensor) -> Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _kernel_inputs(logp, old, ref, adv, mask, iw, samp) -> tuple[list, list]:
    """The kernels' pointers (an absent old_logp reads logp: ratio 1; other absent inputs are never read) and
    their strides."""
    B, T = logp.shape
    tensors = (logp, logp if old is None else old, ref, adv, kernel_mask(mask), iw, samp)
    strides = []
    for t in tensors:
        strides += token_strides(t, B, T)
    return [logp if t is None else t for t in tensors], strides


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, iw, samp, cfg: KernelLossOptions):
        B, T = logp.shape
        dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
        per_token_loss = torch.empty((B, T), dtype=dtype, device=logp.device)
        partials = torch.empty((NUM_PARTIALS, B), dtype=dtype, device=logp.device)
        block, warps = _block_config(T)
        pointers, strides = _kernel_inputs(logp, old, ref, adv, mask, iw, samp)
        _grpo_loss_fwd_kernel[(B,)](
            *pointers, per_token_loss, partials, B, T, *strides, **cfg.scalars._asdict(), **loss_flags(cfg),
            SEQ_LEVEL=cfg.seq_level, SEQ_PASS=cfg.seq_pass, HAS_REF=cfg.has_ref, PER_SEQ_METRICS=cfg.per_seq_metrics,
            DTYPE=compute_dtype(dtype), BLOCK_T=block, num_warps=warps,
        )

        loss, kl, low, high, region = cfg.aggregate(partials, T)
        seq_weight = cfg.sequence_weights(partials[P_COUNT], T)

        ctx.cfg = cfg
        ctx.logp_dtype = logp.dtype
        ctx.save_for_backward(logp, old, ref, adv, mask, iw, samp, partials, seq_weight)
        ctx.mark_non_differentiable(per_token_loss, kl, low, high, region)
        return loss, per_token_loss, kl, low, high, region

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):
        logp, old, ref, adv, mask, iw, samp, partials, seq_weight = ctx.saved_tensors
        cfg: KernelLossOptions = ctx.cfg
        grad_logp = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            B, T = logp.shape
            dtype = partials.dtype
            seq_grad = grad_loss.to(dtype) * seq_weight
            grad_logp = torch.empty((B, T), dtype=ctx.logp_dtype, device=logp.device)
            block, warps = _block_config(T)
            pointers, strides = _kernel_inputs(logp, old, ref, adv, mask, iw, samp)
            _grpo_loss_bwd_kernel[(B,)](
                *pointers, partials, seq_grad, grad_logp, B, T, *strides, **cfg.scalars._asdict(), **loss_flags(cfg),
                DTYPE=compute_dtype(dtype), BLOCK_T=block, num_warps=warps,
            )
        return grad_logp, None, None, None, None, None, None, None


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
        loss_options.get("importance_weights"), loss_options.get("sampling_logprobs"), cfg)
    return GRPOLossOutput(
        loss=loss,
        per_token_loss=per_token_loss,
        kl=kl if cfg.has_ref else None,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_region=region,
    )

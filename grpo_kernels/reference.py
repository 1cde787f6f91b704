"""The specification: pure-PyTorch reference implementations of every op.

Written for clarity, not speed. Every function is dtype-generic: it computes in
float32 (float64 when its main input is float64), runs on any device, and is
differentiable through plain autograd. Every fast backend is tested against
these functions.

Semantics follow TRL's ``GRPOTrainer._compute_loss`` (TRL 1.16) and, for the
extras (dual clip, k1/k2/low_var_kl estimators, RLOO, arbitrary group ids),
verl's ``core_algos``. ``docs/semantics.md`` maps every option name.

Two rules hold for every op and every backend:

- **Masked and ignored positions never influence anything.** Positions with
  mask 0, or whose token id equals ``ignore_index`` (in the fused losses a
  token id equal to ``ignore_index`` counts as masked even where the mask is
  1: its log-prob is undefined), may hold anything (NaN, ±inf, huge values)
  in logits, log-probs, old/ref/sampling log-probs, advantages and importance
  weights: they are *selected* away (``torch.where``) before any arithmetic,
  never multiplied by 0, so the loss, metrics and gradients equal those of the
  same batch with finite padding, their gradient is exactly 0 and their
  ``per_token_loss`` is 0. A per-sequence value (advantages ``[B]``) of a
  sequence without a counted token is padding too.
- **Non-finite values at unmasked positions propagate**: a NaN or ``+inf``
  logit or log-prob where it counts gives a NaN (or infinite) loss, on every
  backend alike. Advantages must be finite where they count (a ``ValueError``
  when value checks are on).

This module imports only torch and the spec's tables (:mod:`grpo_kernels.loss_table`, standard library only).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .loss_table import (
    FOLDS_IMPORTANCE_WEIGHTS,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    ROLLOUT_GATE_PROB_CLAMP,
    ROLLOUT_IS_GATES,
    ROLLOUT_IS_MODES,
    VESPO_LOG_MAX,
    VESPO_LOG_MIN,
    VESPO_MIN_LAMBDA,
    Aggregation,
    Family,
    KlEstimator,
    RolloutGate,
    RolloutLevel,
    loss_type_row,
)

# The loss types, the KL estimators, the rollout modes and the kernels' numeric options: grpo_kernels.loss_table.
SCALES = ("group", "batch", "none")
ESTIMATORS = ("grpo", "rloo")
MULTI_OBJECTIVES = ("sum_then_normalize", "normalize_then_sum")


class GRPOLossOutput(NamedTuple):
    """Result of :func:`grpo_loss` / :func:`fused_grpo_loss`.

    All fields are tensors on the inputs' device (no host synchronization).

    - ``loss``: 0-d, the aggregated loss to call ``backward()`` on.
    - ``per_token_loss``: ``[B, T]``, the per-token loss before aggregation
      (TRL's ``per_token_loss``, including ``beta * KL``), 0 at masked positions.
    - ``kl``: 0-d masked mean of the per-token KL estimate, or ``None`` when no
      ``ref_logprobs`` were given.
    - ``clip_ratio_low`` / ``clip_ratio_high`` / ``clip_ratio_region``: 0-d
      fractions of clipped tokens (TRL's ``clip_ratio/*_mean`` definitions).
    - ``entropy``: 0-d masked mean entropy (only from ``fused_grpo_loss`` with
      ``return_entropy=True``), else ``None``.
    """

    loss: Tensor
    per_token_loss: Tensor
    kl: Optional[Tensor]
    clip_ratio_low: Tensor
    clip_ratio_high: Tensor
    clip_ratio_region: Tensor
    entropy: Optional[Tensor] = None


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 for float64 ``t``, else float32: the dtype every op computes in."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


Temperature = Union[float, Tensor]


def broadcast_temperature(temperature: Tensor, row_shape: tuple[int, ...]) -> Tensor:
    """A temperature tensor of shape ``row_shape[:k]`` expanded to ``row_shape`` (one value per row), detached."""
    t = temperature.detach()
    return t.reshape(tuple(t.shape) + (1,) * (len(row_shape) - t.ndim)).expand(tuple(row_shape))


def row_temperature(temperature: Temperature, ignored: Tensor, dtype: torch.dtype) -> Temperature:
    r"""The temperature :math:`T_r` of each row, ready to divide the logits ``[..., V]`` by.

    A float is every row's temperature. A tensor of shape ``rows.shape[:k]`` (``rows.shape = ignored.shape``:
    ``[B]`` or ``[B, T]`` for ``[B, T, V]`` logits, ``[N]`` for ``[N, V]``) holds each row's own temperature,
    broadcast over the trailing row dimensions; it is cast to ``dtype`` (the compute dtype), is data (no
    gradient flows to it), and at ``ignored`` rows it is selected to 1: a masked or ignored row may hold any
    temperature (NaN, 0, -inf). Returns the float, or a ``[..., 1]`` tensor.
    """
    if not isinstance(temperature, Tensor):
        return temperature
    t = broadcast_temperature(temperature, tuple(ignored.shape)).to(dtype)
    return torch.where(ignored, torch.ones((), dtype=dtype, device=t.device), t).unsqueeze(-1)


# --------------------------------------------------------------------------- #
# token_logprobs
# --------------------------------------------------------------------------- #
def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: Temperature = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Log-probability of each sampled token under ``softmax(logits / T)``.

    For row :math:`r` of logits :math:`x \in \mathbb{R}^V`, its temperature :math:`T_r` and
    token id :math:`y`:

    .. math::
        z = x / T_r,\quad
        \mathrm{logp} = z_y - \log \textstyle\sum_v e^{z_v},\quad
        H = -\textstyle\sum_v p_v \log p_v,\ p = \mathrm{softmax}(z),\quad
        \frac{\partial\,\mathrm{logp}}{\partial x} = \frac{\mathrm{onehot}_y - p}{T_r}

    (terms with :math:`p_v = 0`, e.g. from ``-inf`` logits, contribute 0 to H). :math:`T_r` is one float
    for every row, or a tensor with a temperature per sequence or per token (:func:`row_temperature`).
    Rows whose id equals ``ignore_index`` get ``logp = 0``, ``H = 0`` and a zero
    gradient, whatever their logits hold (NaN, ±inf: selected away, never
    multiplied by 0). Non-finite logits in any other row propagate: ``+inf`` or
    NaN gives a NaN ``logp`` there.

    Args:
        logits: ``[..., V]`` floating point.
        token_ids: ``[...]`` integer, values in ``[0, V)`` or ``ignore_index``.
        temperature: positive finite float, or a floating tensor of shape ``logits.shape[:k]`` (``[B]`` or
            ``[B, T]`` for ``[B, T, V]`` logits, ``[N]`` for ``[N, V]``), positive and finite at the rows that
            count; it is divided in the compute dtype and gets no gradient.
        ignore_index: id marking positions to skip.
        return_entropy: also return the entropy of each row's distribution.
        inplace_backward: allow the backward to write the logits gradient into
            the logits' own buffer (their values are then unspecified after the
            backward). A memory option of the kernel backends; it changes no
            number, and the reference (plain autograd) does not use it.

    Returns:
        ``logp`` of shape ``[...]`` in float32 (float64 for float64 logits), or
        ``(logp, entropy)`` when ``return_entropy``.
    """
    ignored = token_ids == ignore_index
    dtype = compute_dtype(logits)
    z = logits.to(dtype) / row_temperature(temperature, ignored, dtype)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    # Ignored rows are selected away before any arithmetic: whatever they hold (NaN, ±inf) reaches no value
    # and no gradient (their gradient is exactly 0).
    z = torch.where(ignored.unsqueeze(-1), zero, z)
    logp_all = torch.log_softmax(z, dim=-1)

    safe_ids = torch.where(ignored, torch.zeros_like(token_ids), token_ids)
    logp = logp_all.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ignored, zero, logp)
    if not return_entropy:
        return logp

    # p·log p with the convention 0·log 0 = 0, written so that autograd sees
    # no 0·inf either.
    finite_logp = torch.where(torch.isneginf(logp_all), zero, logp_all)
    entropy = -(logp_all.exp() * finite_logp).sum(-1)
    entropy = torch.where(ignored, zero, entropy)
    return logp, entropy


# --------------------------------------------------------------------------- #
# group_advantages
# --------------------------------------------------------------------------- #
def _group_index(n: int, group_size: Optional[int], group_ids: Optional[Tensor], device) -> tuple[Tensor, int]:
    """Dense group index in ``[0, num_groups)`` for each of ``n`` rows."""
    if group_ids is None:
        return torch.arange(n, device=device) // group_size, n // group_size
    unique, inverse = torch.unique(group_ids, sorted=True, return_inverse=True)
    return inverse, unique.numel()


def _nan_group_stats(r: Tensor, index: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group count of non-NaN values, NaN-ignoring mean and unbiased std.

    mean is NaN for a group with no value; std is NaN for fewer than 2 values.
    """
    valid = ~torch.isnan(r)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    count = torch.zeros(num_groups, dtype=r.dtype, device=r.device).index_add_(0, index, valid.to(r.dtype))
    total = torch.zeros_like(count).index_add_(0, index, r0)
    mean = total / count  # NaN for empty groups (0 / 0)
    dev2 = torch.where(valid, (r - mean[index]) ** 2, torch.zeros_like(r))
    ss = torch.zeros_like(count).index_add_(0, index, dev2)
    std = torch.sqrt(ss / (count - 1))
    std = torch.where(count > 1, std, torch.full_like(std, float("nan")))
    return count, mean, std


def _nan_std(r: Tensor) -> Tensor:
    """Unbiased std over all non-NaN values (NaN for fewer than 2)."""
    index = torch.zeros(r.shape[0], dtype=torch.long, device=r.device)
    return _nan_group_stats(r, index, 1)[2][0]


def _normalize(r: Tensor, index: Tensor, num_groups: int, scale: str, estimator: str, eps: float):
    """Advantages of scalar rewards ``r [B]`` (NaN = missing); NaN results stay NaN."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {list(SCALES)}, got {scale!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
    count, mean, std = _nan_group_stats(r, index, num_groups)
    adv = r - mean[index]
    if estimator == "rloo":
        # baseline = mean of the other n-1 valid rewards of the group:
        # r - (n·mean - r)/(n - 1) = n/(n - 1) · (r - mean); NaN when n < 2.
        n = count[index]
        adv = torch.where(n > 1, adv * n / (n - 1), torch.full_like(adv, float("nan")))
    if scale == "group":
        adv = adv / (std[index] + eps)
    elif scale == "batch":
        adv = adv / (_nan_std(r) + eps)
    return adv, mean, std


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
    r"""Group-relative advantages of the completions' rewards.

    Rows are grouped either contiguously (``group_size`` G: rows
    ``[kG, (k+1)G)`` share a prompt, TRL's layout) or by arbitrary integer
    ``group_ids`` (verl's ``uid``). Within group g, with the non-NaN rewards
    :math:`r_1..r_n`, :math:`\mu_g` their mean and :math:`\sigma_g` their
    unbiased std:

    .. math::
        A_i = \frac{r_i - b_i}{s + \varepsilon},\qquad
        b_i = \begin{cases}\mu_g & \text{grpo}\\
              \frac{1}{n-1}\sum_{j\ne i} r_j & \text{rloo}\end{cases},\qquad
        s = \begin{cases}\sigma_g & \text{scale="group"}\\
              \sigma_{\text{batch}} & \text{scale="batch"}\\
              \text{(no division)} & \text{scale="none"}\end{cases}

    NaN rewards are left out of every statistic and get advantage 0; so does
    every advantage that is undefined (a group with fewer than 2 rewards when
    dividing by its std, or with rloo). A singleton group therefore gets 0.

    Several rewards per completion (``rewards [B, K]``, weights ``w [K]``,
    default all ones):

    - ``"sum_then_normalize"`` (TRL's default): :math:`r = \sum_k w_k r_k`
      ignoring NaN entries (a row whose K rewards are all NaN is NaN), then as
      above.
    - ``"normalize_then_sum"`` (GDPO): each column is turned into advantages
      as above, the weighted sum (ignoring NaN) is formed, and the result is
      standardized over the whole batch:
      :math:`(s - \text{mean}(s)) / (\text{std}(s) + \varepsilon)`.

    Args:
        rewards: ``[B]`` or ``[B, K]`` floating/integer; NaN marks a missing reward.
        group_size: G, must divide B. Exactly one of ``group_size`` / ``group_ids``.
        group_ids: ``[B]`` integer group labels, any values, any order.
        scale: ``"group"`` | ``"batch"`` | ``"none"``.
        estimator: ``"grpo"`` (baseline = group mean) | ``"rloo"`` (leave-one-out mean).
        eps: added to the std before dividing (TRL: 1e-4, verl: 1e-6).
        reward_weights: ``[K]`` weights for 2-D rewards.
        multi_objective: ``"sum_then_normalize"`` | ``"normalize_then_sum"``.
        return_stats: also return per-group mean and std.

    Returns:
        advantages ``[B]`` (float32, or float64 for float64 rewards); with
        ``return_stats``, also ``mean [num_groups]`` and ``std [num_groups]`` of
        the (weighted-summed) rewards, groups ordered by position
        (``group_size``) or by sorted id (``group_ids``); NaN where undefined.
    """
    r = rewards.to(compute_dtype(rewards))
    index, num_groups = _group_index(r.shape[0], group_size, group_ids, r.device)

    if r.ndim == 2:
        w = torch.ones(r.shape[1], dtype=r.dtype, device=r.device) if reward_weights is None else reward_weights.to(r)
        unscorable = torch.isnan(r).all(dim=1)
        nan = torch.full_like(r[:, 0], float("nan"))
        if multi_objective == "sum_then_normalize":
            r = torch.where(unscorable, nan, torch.nansum(r * w, dim=1))
        elif multi_objective == "normalize_then_sum":
            per_reward = [_normalize(r[:, k], index, num_groups, scale, estimator, eps)[0] for k in range(r.shape[1])]
            s = torch.where(unscorable, nan, torch.nansum(torch.stack(per_reward, dim=1) * w, dim=1))
            adv = (s - torch.nanmean(s)) / (_nan_std(s) + eps)
            adv = torch.nan_to_num(adv, nan=0.0)
            if not return_stats:
                return adv
            _, mean, std = _nan_group_stats(s, index, num_groups)
            return adv, mean, std
        else:
            raise ValueError(f"multi_objective must be one of {list(MULTI_OBJECTIVES)}, got {multi_objective!r}")

    adv, mean, std = _normalize(r, index, num_groups, scale, estimator, eps)
    adv = torch.nan_to_num(adv, nan=0.0)
    return (adv, mean, std) if return_stats else adv


# --------------------------------------------------------------------------- #
# grpo_loss
# --------------------------------------------------------------------------- #
def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    r"""Per-token estimate of KL(π_θ ‖ π_ref) from log-probs of sampled tokens.

    With :math:`d = \mathrm{ref\_logp} - \mathrm{logp}`:
    k1 :math:`= -d`; k2 :math:`= d^2/2`; k3 :math:`= e^{d} - d - 1`;
    low_var_kl (verl) = k3 with :math:`d` clamped to [-20, 20] and the result to [-10, 10].
    """
    d = ref_logp - logp
    code = KL_ESTIMATORS.get(estimator) if isinstance(estimator, str) else None
    if code is KlEstimator.K1:
        return -d
    if code is KlEstimator.K2:
        return 0.5 * d * d
    if code is KlEstimator.LOW_VAR_KL:
        d = d.clamp(-20.0, 20.0)
        return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)
    if code is KlEstimator.K3:
        return torch.exp(d) - d - 1
    raise ValueError(f"kl_estimator must be one of {list(KL_ESTIMATORS)}, got {estimator!r}")


def _as_column(t: Tensor) -> Tensor:
    """``[B]`` → ``[B, 1]``; ``[B, 1]`` / ``[B, T]`` unchanged."""
    return t.unsqueeze(1) if t.ndim == 1 else t


def mask_select(keep: Tensor, t: Tensor, neutral: float) -> Tensor:
    """``t`` (``[B, T]``, or one value per sequence ``[B, 1]``) with ``neutral`` where ``keep [B, T]`` is False
    (for ``[B, 1]``: where the sequence keeps no token), by selection: NaN or ±inf there never propagate."""
    k = keep.any(-1, keepdim=True) if t.shape[-1] == 1 and keep.shape[-1] != 1 else keep
    return torch.where(k, t, torch.full((), neutral, dtype=t.dtype, device=t.device))


def clamp_log_ratio(log_ratio: Tensor, log_ratio_clamp: Optional[float]) -> Tensor:
    """``log_ratio`` clamped to ``[-c, c]`` (verl's and OpenRLHF's ±20 before ``exp``), or as is for ``None``."""
    return log_ratio if log_ratio_clamp is None else log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)


def rollout_gate_statistic(old_logprobs: Tensor, sampling_logprobs: Tensor, gate: str) -> Tensor:
    r"""The per-token statistic of a divergence gate (``rollout_is_gate`` ``"binary_kl"`` or ``"tv"``).

    With :math:`p = e^{\mathrm{sampling}}`, :math:`q = e^{\mathrm{old}}`, each clamped to :math:`[c, 1 - c]`
    (:math:`c` = ``loss_table.ROLLOUT_GATE_PROB_CLAMP``, 1e-6): binary_kl
    :math:`p \log\frac{p}{q} + (1-p) \log\frac{1-p}{1-q}`, tv :math:`|p - q|`; 0 where the sampling log-prob is
    NaN (unknown, as TRL's ``nan_to_num`` makes its log-ratio 0). ``[B, T]``, no gradient.
    """
    code = ROLLOUT_IS_GATES.get(gate) if isinstance(gate, str) else None
    sampling = sampling_logprobs.to(old_logprobs.dtype)
    p = sampling.exp().clamp(ROLLOUT_GATE_PROB_CLAMP, 1 - ROLLOUT_GATE_PROB_CLAMP)
    q = old_logprobs.detach().exp().clamp(ROLLOUT_GATE_PROB_CLAMP, 1 - ROLLOUT_GATE_PROB_CLAMP)
    if code is RolloutGate.BINARY_KL:
        g = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    elif code is RolloutGate.TV:
        g = (p - q).abs()
    else:
        raise ValueError(f"rollout_is_gate must be 'binary_kl' or 'tv' here, got {gate!r}")
    return torch.where(torch.isnan(sampling), torch.zeros((), dtype=g.dtype, device=g.device), g)


def rollout_importance_ratio(
    old_logprobs: Tensor,
    sampling_logprobs: Tensor,
    mask: Tensor,
    mode: str,
    rollout_is_min: Optional[float],
    rollout_is_max: Optional[float],
    log_ratio_clamp: Optional[float] = None,
    gate: str = "ratio",
) -> Tensor:
    r"""The rollout importance-sampling ratio :math:`\rho = \pi_{old} / \pi_{sampling}` (TRL's vLLM correction).

    With :math:`d_t = \mathrm{nan\_to\_num}((\mathrm{old}_t - \mathrm{sampling}_t)\, m_t)` (NaN → 0, ±inf →
    the largest finite values, as TRL), :math:`\rho_t = e^{d_t}` (every log-ratio clamped to ``±log_ratio_clamp``
    before ``exp`` when given: verl's safety bound) and the bounds :math:`[C_{min}, C_{max}]` (``None`` =
    unbounded), by ``gate``:

    - ``"ratio"``: ``token_*``: :math:`\rho_t`, ``[B, T]``; ``sequence_*``: :math:`\rho_i = e^{\sum_t d_t}`,
      ``[B, 1]``; ``*_truncate`` (TIS): :math:`\mathrm{clamp}(\rho, C_{min}, C_{max})`; ``*_mask`` (MIS,
      IcePop): :math:`\rho` where :math:`C_{min} \le \rho \le C_{max}`, else 0.
    - the other gates (``*_mask`` only; OpenRLHF's ``is_correction_gating``): a statistic :math:`g` per token,
      :func:`rollout_gate_statistic` (``"binary_kl"``, ``"tv"``); at ``sequence_mask`` its mean over the
      sequence's kept tokens :math:`\sum_t m_t g_t / \max(1, \sum_t m_t)`, and for ``"geometric_mean"``
      (sequence level only: at token level it is the ratio) :math:`e^{\sum_t d_t / \max(1, \sum_t m_t)}`.
      The weight is per token, ``[B, T]``: :math:`\rho_t` where the unit's statistic lies in
      :math:`[C_{min}, C_{max}]`, else 0.

    Returns a constant (no gradient) in the dtype of ``old_logprobs``.
    """
    modes = [m for m in ROLLOUT_IS_MODES if m is not None]
    if mode not in modes:
        raise ValueError(f"rollout_is_mode must be one of {modes}, got {mode!r}")
    gate_code = ROLLOUT_IS_GATES.get(gate) if isinstance(gate, str) else None
    if gate_code is None:
        raise ValueError(f"rollout_is_gate must be one of {list(ROLLOUT_IS_GATES)}, got {gate!r}")
    level, masked = ROLLOUT_IS_MODES[mode]
    d = torch.nan_to_num((old_logprobs.detach() - sampling_logprobs.to(old_logprobs.dtype)) * mask, nan=0.0)
    low = -float("inf") if rollout_is_min is None else rollout_is_min
    high = float("inf") if rollout_is_max is None else rollout_is_max
    if gate_code is RolloutGate.RATIO:
        if level == RolloutLevel.SEQUENCE:
            d = d.sum(-1, keepdim=True)
        ratio = torch.exp(clamp_log_ratio(d, log_ratio_clamp))
        if not masked:
            return torch.clamp(ratio, min=rollout_is_min, max=rollout_is_max)
        return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    if not masked:
        raise ValueError(f"rollout_is_gate={gate!r} masks: rollout_is_mode must be 'token_mask' or 'sequence_mask', "
                         f"got {mode!r}")
    kept = mask != 0
    count = kept.sum(-1, keepdim=True).clamp(min=1).to(d.dtype)
    if gate_code is RolloutGate.GEOMETRIC_MEAN:
        if level != RolloutLevel.SEQUENCE:
            raise ValueError("rollout_is_gate='geometric_mean' is a sequence statistic (at token level it is the "
                             "ratio: rollout_is_gate='ratio'): rollout_is_mode must be 'sequence_mask'")
        stat = torch.exp(clamp_log_ratio(d.sum(-1, keepdim=True) / count, log_ratio_clamp))
    else:
        g = rollout_gate_statistic(old_logprobs, sampling_logprobs, gate)
        if level == RolloutLevel.SEQUENCE:
            stat = torch.where(kept, g, torch.zeros((), dtype=g.dtype, device=g.device)).sum(-1, keepdim=True) / count
        else:
            stat = g
    ratio = torch.exp(clamp_log_ratio(d, log_ratio_clamp))
    return torch.where((stat >= low) & (stat <= high), ratio, torch.zeros((), dtype=ratio.dtype, device=ratio.device))


def off_policy_mask(logprobs: Tensor, sampling_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                    threshold: float) -> Tensor:
    r"""TRL's off-policy sequence mask (DeepSeek-V3.2): keep a token unless its advantage is negative and its
    sequence drifted: :math:`\mathbb{1}[A \ge 0 \ \vee\ \overline{KL}_i \le \delta]` with
    :math:`\overline{KL}_i = \sum_t m\, \mathrm{nan\_to\_num}(\mathrm{sampling} - \mathrm{sg}[\mathrm{logp}])
    / \max(1, \sum_t m)`. ``[B, 1]`` for per-sequence advantages (``[B, 1]``), else ``[B, T]``; no gradient."""
    kl = torch.nan_to_num(sampling_logprobs.to(logprobs.dtype) - logprobs.detach(), nan=0.0)
    mean_kl = (kl * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(logprobs.dtype)


def vespo_phi(log_w: Tensor, advantages: Tensor, k_pos: float, lambda_pos: float, k_neg: float,
              lambda_neg: float) -> Tensor:
    r"""VESPO's gamma weight :math:`\phi(w) = e^{\lambda} w^{k} e^{-\lambda w}` (so :math:`\phi(1) = 1`), in log
    space from :math:`\log w`; :math:`(k, \lambda) = (k_+, \lambda_+)` where :math:`A \ge 0`, else
    :math:`(k_-, \lambda_-)`, :math:`\lambda` at least 1e-4; NaN and ±inf → 0 (TRL's ``get_gamma_weights``)."""
    nonneg = advantages >= 0
    k = torch.where(nonneg, torch.full_like(advantages, k_pos), torch.full_like(advantages, k_neg))
    lam = torch.where(nonneg, torch.full_like(advantages, lambda_pos), torch.full_like(advantages, lambda_neg))
    lam = lam.clamp(min=VESPO_MIN_LAMBDA)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logprobs: Optional[Tensor] = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: Optional[float] = None,
    delta: Optional[float] = None,
    clip_ratio_c: Optional[float] = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    kl_estimator: str = "k3",
    use_bias_correction_kl: bool = False,
    importance_weights: Optional[Tensor] = None,
    max_completion_length: Optional[int] = None,
    num_items_in_batch: Optional[Union[int, float, Tensor]] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    sampling_logprobs: Optional[Tensor] = None,
    rollout_is_mode: Optional[str] = None,
    rollout_is_min: Optional[float] = None,
    rollout_is_max: Optional[float] = 3.0,
    rollout_is_gate: str = "ratio",
    off_policy_mask_threshold: Optional[float] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    log_ratio_clamp: Optional[float] = None,
) -> GRPOLossOutput:
    r"""The GRPO policy loss on per-token log-probs (TRL ``_compute_loss``, verl's ``compute_policy_loss_*``).

    For completion i, token t, mask :math:`m`, advantage :math:`A_i` (or
    :math:`A_{i,t}`), :math:`\epsilon_l, \epsilon_h` = ``epsilon_low/high``:

    .. math::
        r_{i,t} = \mathrm{clamp}(\mathrm{logp}_{i,t} - \mathrm{old}_{i,t}, \pm c),\qquad
        w = \begin{cases} r_{i,t} & \text{token level}\\
            \sum_t m_{i,t} r_{i,t} / \max(1, \sum_t m_{i,t}) & \text{sequence level (GSPO)}\end{cases},
        \qquad c_1 = e^{w}

    (:math:`c` = ``log_ratio_clamp``, no clamp when ``None``, as TRL). Per-token loss :math:`\ell`, by ``loss_type``:

    - grpo, bnpo, dr_grpo, dapo, luspo: :math:`c_2 = \mathrm{clip}(c_1, 1-\epsilon_l, 1+\epsilon_h)`;
      with ``delta``, :math:`c_1 \leftarrow \min(c_1, \delta)` (after forming
      :math:`c_2`); :math:`\ell = -\min(c_1 A, c_2 A)`. With ``clip_ratio_c``
      (verl dual clip), for :math:`A < 0`: :math:`\ell \leftarrow \min(\ell, -c A)`.
    - cispo: :math:`\ell = -\mathrm{sg}[\min(c_1, \epsilon_h)]\, A\, \mathrm{logp}`.
    - sapo: :math:`\tau = \tau_+` if :math:`A > 0` else :math:`\tau_-`;
      :math:`\ell = -\sigma(\tau (c_1 - 1))\, \tfrac{4}{\tau}\, A`.
    - vespo (TRL): :math:`\ell = -\mathrm{sg}[\phi_i]\, A\, \mathrm{logp}` with
      :math:`\phi_i` = :func:`vespo_phi` of
      :math:`\log w_i = \mathrm{clamp}(\sum_t m\, \mathrm{clamp}(r, \pm 20) + \sum_t m\,
      \mathrm{clamp}(\log \rho_t, \log 10^{-8}, 20),\ \log 10^{-8}, 20)`, :math:`\rho_t` the token-level
      importance weight (rollout ratio times ``importance_weights``; the second sum only when one is given),
      which VESPO folds in here instead of multiplying :math:`\ell`.
    - gmpo (verl ``geo_mean``): with :math:`s = \mathrm{sign}(A)`,
      :math:`\tilde r = s \min(s\, r, s\, \mathrm{clamp}(r, -\epsilon_l, \epsilon_h))` (log-space clipping),
      one loss per sequence :math:`\ell_i = -\bar A_i\, e^{\sum_t m \tilde r / (n_i + 10^{-8})}\, \psi_i` with
      :math:`\bar A_i = \sum_t m A / (n_i + 10^{-8})` and
      :math:`\psi_i = e^{\sum_t m \log(\rho_t + 10^{-10}) / (n_i + 10^{-8})}` (the geometric mean of the
      token importance weights, 1 without any), broadcast over the sequence's tokens.
    - gpg (verl): :math:`\ell = -\mathrm{logp}\, A`.

    then, in this order (TRL's): :math:`\ell \leftarrow \ell \cdot \mathrm{keep}` with ``off_policy_mask_threshold``
    (:func:`off_policy_mask` of ``sampling_logprobs``, else of ``old_logprobs``);
    :math:`\ell \leftarrow \ell \cdot \rho` with ``rollout_is_mode`` (:func:`rollout_importance_ratio` of
    ``old_logprobs`` — ``logprobs.detach()`` when ``None`` — and ``sampling_logprobs``);
    :math:`\ell \leftarrow \ell \cdot \mathrm{iw}` (``importance_weights``); the last two not for vespo and
    gmpo, which fold them in as above; finally :math:`\ell \leftarrow \ell + \beta\, \mathrm{KL}` with
    :math:`\mathrm{KL} = \mathrm{kl\_estimate}(\mathrm{logp}, \mathrm{ref})` (times :math:`c_1` when
    ``use_bias_correction_kl``).

    Aggregation, with :math:`S_i = \sum_t m_{i,t} \ell_{i,t}`, :math:`n_i = \sum_t m_{i,t}`:

    - grpo, sapo, gmpo: :math:`\frac{1}{B}\sum_i S_i / \max(1, n_i)` (for gmpo: verl's mean of :math:`\ell_i`)
    - bnpo: :math:`\sum_i S_i / \max(1, \sum_i n_i)`
    - dr_grpo: :math:`\sum_i S_i / (B \cdot L)`, L = ``max_completion_length`` (default T)
    - dapo, cispo, vespo, gpg: :math:`\sum_i S_i / \max(1, N)`, N = ``num_items_in_batch``
      (default :math:`\sum_i n_i`; TRL passes the generation batch's token
      count divided by the number of processes; verl's token-mean for gpg)
    - luspo: :math:`\frac{1}{B}\sum_i S_i`

    Masked positions (mask 0) are replaced by neutral values (log-probs 0, advantage 0, importance weight 1)
    before anything is computed (selection, see the module docstring): whatever they hold changes no output
    and gets a zero gradient, and their ``per_token_loss`` is 0. Non-finite values at unmasked positions
    propagate into the loss.

    Metrics: ``kl`` is the masked mean of the per-token KL; clip ratios are
    masked means (per-sequence means at sequence level with per-sequence
    advantages) of low: :math:`c_1 < 1-\epsilon_l \wedge A < 0`, high:
    :math:`c_1 > 1+\epsilon_h \wedge A > 0`, region: either (with
    :math:`c_1` after the ``delta`` clamp, as TRL). For cispo, high = region =
    :math:`c_1 > \epsilon_h \wedge A > 0` and low = 0. For gmpo (verl's ``pg_clipfrac_lower`` /
    ``pg_clipfrac``): :math:`r \notin [-\epsilon_l, \epsilon_h]` with :math:`A < 0` / :math:`A > 0`.
    vespo and gpg clip nothing: 0.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy.
        old_logprobs: ``[B, T]`` under the policy that sampled (TRL's ``old_per_token_logps``), or ``None``
            (→ ``logprobs.detach()``).
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``.
        mask: ``[B, T]`` bool or 0/1 of any dtype.
        ref_logprobs: ``[B, T]`` under the reference policy (required if ``beta != 0``).
        beta: KL coefficient.
        epsilon_low, epsilon_high: clip range (``epsilon_high`` defaults to
            ``epsilon_low``; for cispo it is the absolute cap, e.g. 5.0; for gmpo the log-space range).
        delta: upper clamp of :math:`c_1` (INTELLECT-2 two-sided clipping).
        clip_ratio_c: dual-clip bound (> 1) for negative advantages.
        loss_type: one of grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo, gmpo, gpg.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (not for vespo, gmpo, gpg).
        kl_estimator: ``"k3"`` (TRL), ``"k1"``, ``"k2"``, ``"low_var_kl"`` (verl's clamped k3).
        use_bias_correction_kl: multiply the KL by :math:`c_1` (not for gmpo).
        importance_weights: ``[B, T]``, ``[B, 1]`` or ``[B]`` multipliers of the per-token loss (``[B, T]`` for
            vespo).
        max_completion_length: L for dr_grpo.
        num_items_in_batch: N for dapo/cispo/vespo/gpg (int, float or 0-d tensor).
        sapo_temperature_pos, sapo_temperature_neg: SAPO temperatures.
        sampling_logprobs: ``[B, T]`` log-probs under the sampling engine (vLLM; TRL's
            ``sampling_per_token_logps``), NaN where unknown; used by ``rollout_is_mode`` (required then) and
            ``off_policy_mask_threshold``.
        rollout_is_mode: ``None`` or ``"token_truncate"``, ``"token_mask"``, ``"sequence_truncate"``,
            ``"sequence_mask"`` (TRL's ``vllm_importance_sampling_mode``; not ``sequence_*`` for vespo and gmpo).
        rollout_is_min, rollout_is_max: the bounds :math:`C_{min}, C_{max}` of the rollout ratio, or of the gate's
            statistic (``None`` = unbounded; TRL's ``vllm_importance_sampling_clip_min/max``).
        rollout_is_gate: the statistic ``rollout_is_mode`` bounds (:func:`rollout_importance_ratio`): ``"ratio"``
            (TRL, verl), or, masking only, ``"geometric_mean"`` (sequence level), ``"binary_kl"``, ``"tv"``
            (OpenRLHF's ``is_correction_gating``); with a gate other than ``"ratio"`` the weight is per token, and
            vespo and gmpo fold it in as a token-level rollout weight.
        off_policy_mask_threshold: :math:`\delta` of the off-policy sequence mask, ``None`` = off.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma-weight parameters.
        log_ratio_clamp: clamp every log-ratio that is exponentiated to ``±log_ratio_clamp`` (verl: 20.0).

    Returns:
        :class:`GRPOLossOutput` (float32, float64 for float64 ``logprobs``).
    """
    row = loss_type_row(loss_type)
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {list(IMPORTANCE_SAMPLING_LEVELS)}, got "
                         f"{importance_sampling_level!r}")
    dtype = compute_dtype(logprobs)
    keep = mask.to(torch.bool)
    m = keep.to(dtype)
    n_seq = m.sum(-1, keepdim=True)
    # Masked positions are replaced by neutral values before any arithmetic (selection, not multiplication by
    # the mask): whatever they hold (NaN, ±inf, huge) changes no value, metric or gradient, and their
    # gradient is exactly 0. A per-sequence value ([B], [B, 1]) is masked where its sequence has no token.
    logp = mask_select(keep, logprobs.to(dtype), 0.0)
    old = logp.detach() if old_logprobs is None else mask_select(keep, old_logprobs.to(dtype), 0.0)
    adv = mask_select(keep, _as_column(advantages.to(dtype)), 0.0)
    if ref_logprobs is not None:
        ref_logprobs = mask_select(keep, ref_logprobs.to(dtype), 0.0)
    if sampling_logprobs is not None:
        sampling_logprobs = mask_select(keep, sampling_logprobs.to(dtype), 0.0)
    if importance_weights is not None:
        importance_weights = mask_select(keep, _as_column(importance_weights.to(dtype)), 1.0)
    eps_low = epsilon_low
    eps_high = epsilon_low if epsilon_high is None else epsilon_high

    log_ratio = clamp_log_ratio(logp - old, log_ratio_clamp)
    if importance_sampling_level == "sequence":
        log_w = (log_ratio * m).sum(-1, keepdim=True) / n_seq.clamp(min=1.0)
    elif importance_sampling_level == "token":
        log_w = log_ratio
    else:
        raise ValueError(f"importance_sampling_level must be one of {list(IMPORTANCE_SAMPLING_LEVELS)}, got "
                         f"{importance_sampling_level!r}")
    coef_1 = torch.exp(log_w)

    rollout_ratio = None
    if rollout_is_mode is not None:
        rollout_ratio = rollout_importance_ratio(old, sampling_logprobs, m, rollout_is_mode, rollout_is_min,
                                                 rollout_is_max, log_ratio_clamp, rollout_is_gate)
    iw = None if importance_weights is None else _as_column(importance_weights.to(dtype))
    token_is = rollout_ratio if iw is None else (iw if rollout_ratio is None else rollout_ratio * iw)

    per_token_kl = None
    if ref_logprobs is not None:
        per_token_kl = kl_estimate(logp, ref_logprobs.to(dtype), kl_estimator)
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    no_clip = torch.zeros_like(coef_1 * adv, dtype=torch.bool)
    family = row.family
    if family is Family.CISPO:
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * adv * logp
        is_high = (coef_1 > eps_high) & (adv > 0)
        is_low = torch.zeros_like(is_high)
    elif family is Family.SAPO:
        tau_pos, tau_neg = torch.full_like(adv, sapo_temperature_pos), torch.full_like(adv, sapo_temperature_neg)
        tau = torch.where(adv > 0, tau_pos, tau_neg)
        per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
        is_low = (coef_1 < 1 - eps_low) & (adv < 0)
        is_high = (coef_1 > 1 + eps_high) & (adv > 0)
    elif family is Family.VESPO:
        with torch.no_grad():
            seq_log_w = (log_ratio.clamp(-VESPO_LOG_MAX, VESPO_LOG_MAX) * m).sum(-1, keepdim=True)
            if token_is is not None:
                log_is = torch.log(token_is).clamp(VESPO_LOG_MIN, VESPO_LOG_MAX)
                seq_log_w = seq_log_w + (log_is * m).sum(-1, keepdim=True)
            seq_log_w = seq_log_w.clamp(VESPO_LOG_MIN, VESPO_LOG_MAX)
            phi = vespo_phi(seq_log_w, adv, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        per_token_loss = -phi * adv * logp
        is_low = is_high = no_clip
    elif family is Family.GMPO:
        sign = torch.sign(adv)
        clipped_log_ratio = torch.clamp(log_ratio, -eps_low, eps_high)
        log_ratio_min = sign * torch.min(sign * log_ratio, sign * clipped_log_ratio)
        denom = n_seq + 1e-8
        seq_ratio = torch.exp((log_ratio_min * m).sum(-1, keepdim=True) / denom)
        seq_adv = (adv * m).sum(-1, keepdim=True) / denom
        per_token_loss = -seq_adv * seq_ratio
        if token_is is not None:
            per_token_loss = per_token_loss * torch.exp((torch.log(token_is + 1e-10) * m).sum(-1, keepdim=True)
                                                        / denom)
        clipped = log_ratio != clipped_log_ratio
        is_low = clipped & (adv < 0)
        is_high = clipped & (adv > 0)
    elif family is Family.GPG:
        per_token_loss = -logp * adv
        is_low = is_high = no_clip
    elif family is Family.CLIPPED:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)
        if clip_ratio_c is not None:
            per_token_loss = torch.where(adv < 0, torch.min(per_token_loss, -adv * clip_ratio_c), per_token_loss)
        is_low = (coef_1 < 1 - eps_low) & (adv < 0)
        is_high = (coef_1 > 1 + eps_high) & (adv > 0)
    else:
        raise ValueError(f"unknown loss family {family!r} of loss_type {loss_type!r}")

    if off_policy_mask_threshold is not None:
        sampled = old if sampling_logprobs is None else sampling_logprobs
        per_token_loss = per_token_loss * off_policy_mask(logp, sampled, adv, m, off_policy_mask_threshold)
    if family not in FOLDS_IMPORTANCE_WEIGHTS:
        if rollout_ratio is not None:
            per_token_loss = per_token_loss * rollout_ratio
        if iw is not None:
            per_token_loss = per_token_loss * iw
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    per_token_loss = torch.where(keep, per_token_loss.expand(m.shape), torch.zeros((), dtype=dtype,
                                                                                    device=m.device))

    # aggregation (per_token_loss is 0 at masked positions)
    seq_sum = per_token_loss.sum(-1)
    n_tokens = m.sum()
    batch = m.shape[0]
    aggregation = row.aggregation
    if aggregation is Aggregation.SEQUENCE_MEAN:
        loss = (seq_sum / m.sum(-1).clamp(min=1.0)).mean()
    elif aggregation is Aggregation.BATCH_TOKEN_MEAN:
        loss = seq_sum.sum() / n_tokens.clamp(min=1.0)
    elif aggregation is Aggregation.FIXED_LENGTH:
        length = m.shape[1] if max_completion_length is None else max_completion_length
        loss = seq_sum.sum() / (batch * length)
    elif aggregation is Aggregation.TOKEN_SUM:
        if num_items_in_batch is None:
            normalizer = n_tokens
        else:
            normalizer = torch.as_tensor(num_items_in_batch, dtype=dtype).reshape(()).to(m.device)
        loss = seq_sum.sum() / normalizer.clamp(min=1.0)
    elif aggregation is Aggregation.SEQUENCE_SUM:
        loss = seq_sum.mean()
    else:
        raise ValueError(f"unknown aggregation {aggregation!r} of loss_type {loss_type!r}")

    def masked_mean(x: Tensor) -> Tensor:
        x = x.to(dtype)
        if x.shape[-1] == 1 and m.shape[-1] != 1:  # one value per sequence: mean over sequences
            return x.sum() / batch
        return torch.where(keep, x, torch.zeros((), dtype=dtype, device=x.device)).sum() / n_tokens.clamp(min=1.0)

    return GRPOLossOutput(
        loss=loss,
        per_token_loss=per_token_loss,
        kl=None if per_token_kl is None else masked_mean(per_token_kl),
        clip_ratio_low=masked_mean(is_low),
        clip_ratio_high=masked_mean(is_high),
        clip_ratio_region=masked_mean(is_low | is_high),
    )


# --------------------------------------------------------------------------- #
# fused_grpo_loss
# --------------------------------------------------------------------------- #
def fused_grpo_loss(
    logits: Tensor,
    token_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: Temperature = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    **loss_options,
) -> GRPOLossOutput:
    r"""Logits → GRPO loss: :func:`token_logprobs` composed with :func:`grpo_loss`.

    .. math::
        \mathrm{logp}_{i,t} = \log\mathrm{softmax}(x_{i,t} / T)_{y_{i,t}},\qquad
        \mathcal{L} = \mathrm{grpo\_loss}(\mathrm{logp}, \mathrm{old}, A, m')

    with :math:`m' = m \wedge (y \ne \text{ignore\_index})`: positions whose id
    is ``ignore_index`` are excluded as if masked, even where the mask is 1.
    The logits of rows outside :math:`m'` are never read (they are computed as
    ignored rows of :func:`token_logprobs`), so they may hold anything. With ``return_entropy``,
    the result's ``entropy`` is the masked mean entropy of
    :math:`\mathrm{softmax}(x/T)` over :math:`m'`.

    Args:
        logits: ``[B, T, V]`` floating point.
        token_ids: ``[B, T]`` integer.
        old_logprobs, advantages, mask: as in :func:`grpo_loss`.
        temperature, ignore_index: as in :func:`token_logprobs` (a tensor temperature: ``[B]`` or ``[B, T]``;
            masked positions may hold any temperature).
        return_entropy: fill ``GRPOLossOutput.entropy``.
        inplace_backward: allow the logits gradient to be written into the
            logits' own buffer, as early as the forward (their values are then
            unspecified); see :func:`token_logprobs`.
        **loss_options: keyword options of :func:`grpo_loss`.
    """
    keep = fused_loss_mask(mask, token_ids, ignore_index)
    out = token_logprobs(
        logits, kept_ids(token_ids, keep, ignore_index), temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy,
    )
    logp, entropy = out if return_entropy else (out, None)
    result = grpo_loss(logp, old_logprobs, advantages, keep, **loss_options)
    if entropy is not None:
        result = result._replace(entropy=masked_mean_entropy(entropy, keep))
    return result


def fused_loss_mask(mask: Tensor, token_ids: Tensor, ignore_index: int) -> Tensor:
    """The tokens :func:`fused_grpo_loss` counts: ``mask`` and ``token_ids != ignore_index`` (bool)."""
    return mask.to(torch.bool) & (token_ids != ignore_index)


def kept_ids(token_ids: Tensor, keep: Tensor, ignore_index: int) -> Tensor:
    """``token_ids`` (int64) with ``ignore_index`` where ``keep`` is False: the rows the fused losses never read."""
    ids = token_ids.to(torch.int64)
    return torch.where(keep, ids, torch.full((), ignore_index, dtype=torch.int64, device=ids.device))


def masked_mean_entropy(entropy: Tensor, keep: Tensor) -> Tensor:
    """The ``entropy`` metric of :func:`fused_grpo_loss`: mean of ``entropy`` over ``keep`` (0 when empty)."""
    k = keep.to(entropy.dtype)
    zero = torch.zeros((), dtype=entropy.dtype, device=entropy.device)
    return torch.where(keep.to(torch.bool), entropy, zero).sum() / k.sum().clamp(min=1.0)


# --------------------------------------------------------------------------- #
# fused linear: hidden states and the LM-head weight → log-probs, loss
# --------------------------------------------------------------------------- #
def linear_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> Tensor:
    r"""The LM head's logits as the fused-linear ops see them (before the temperature).

    For a hidden state :math:`h \in \mathbb{R}^H`, weight :math:`W \in \mathbb{R}^{V \times H}`,
    bias :math:`b`, scale :math:`s` = ``logit_scale`` and cap :math:`c` = ``softcap``:

    .. math::
        y = s\,(W h + b),\qquad
        x = \begin{cases} c \tanh(y / c) & \text{with softcap}\\ y & \text{without}\end{cases}

    The product is computed in float32 (float64 for float64 ``hidden``) from the
    inputs cast to that dtype: never rounded to bfloat16 in between.

    Returns:
        ``x`` of shape ``[..., V]`` in float32 (float64 for float64 ``hidden``).
    """
    dtype = compute_dtype(hidden)
    y = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    y = y * logit_scale
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    return y


def _counted_rows(hidden: Tensor, counted: Tensor) -> Tensor:
    """``hidden`` with the rows of uncounted tokens (ignored ids; for the loss also masked ones) selected to 0:
    garbage there reaches no output and no gradient (0 · NaN in ``d weight`` otherwise)."""
    return torch.where(counted[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: Temperature = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Log-probs (and entropy) of the sampled tokens straight from the hidden states.

    .. math::
        \mathrm{logp} = \mathrm{token\_logprobs}(x, y;\ T),\qquad x = \mathrm{linear\_logits}(h, W, b;\ s, c)

    i.e. :math:`\mathrm{logp} = x_y / T - \log\sum_v e^{x_v / T}` (:func:`linear_logits`,
    :func:`token_logprobs`). The hidden states of ignored tokens are selected away before
    the product (garbage there changes nothing). ``chunk_size`` is a memory option of the chunked
    implementation (tokens per logits tile); it changes no number and the
    reference ignores it.

    Args:
        hidden: ``[..., H]`` floating point.
        weight: ``[V, H]``, the dtype of ``hidden``.
        token_ids: ``[...]`` integer in ``[0, V)`` or ``ignore_index``.
        bias: ``[V]`` or ``None``.
        temperature, ignore_index, return_entropy: as in :func:`token_logprobs` (a tensor temperature has
            shape ``hidden.shape[:k]``).
        logit_scale, softcap: as in :func:`linear_logits`.

    Returns:
        ``logp [...]`` float32 (float64 for float64 ``hidden``), or ``(logp, entropy)``.
    """
    hidden = _counted_rows(hidden, token_ids != ignore_index)
    logits = linear_logits(hidden, weight, bias, logit_scale=logit_scale, softcap=softcap)
    return token_logprobs(logits, token_ids, temperature=temperature, ignore_index=ignore_index,
                          return_entropy=return_entropy)


def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: Temperature = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    **loss_options,
) -> GRPOLossOutput:
    r"""Hidden states → GRPO loss: :func:`linear_logits` composed with :func:`fused_grpo_loss`.

    .. math::
        \mathcal{L} = \mathrm{fused\_grpo\_loss}(\mathrm{linear\_logits}(h, W, b;\ s, c), y, \mathrm{old}, A, m;\ T)

    The hidden states of tokens that do not count (mask 0 or an ignored id) are selected away before
    the product: garbage there changes no output and no gradient.

    Args:
        hidden: ``[B, T, H]`` floating point.
        weight, bias, logit_scale, softcap, chunk_size: as in :func:`linear_token_logprobs`.
        token_ids: ``[B, T]`` integer.
        old_logprobs, advantages, mask, temperature, ignore_index, return_entropy, **loss_options:
            as in :func:`fused_grpo_loss`.
    """
    hidden = _counted_rows(hidden, fused_loss_mask(mask, token_ids, ignore_index))
    logits = linear_logits(hidden, weight, bias, logit_scale=logit_scale, softcap=softcap)
    return fused_grpo_loss(logits, token_ids, old_logprobs, advantages, mask, temperature=temperature,
                           ignore_index=ignore_index, return_entropy=return_entropy, **loss_options)


# --------------------------------------------------------------------------- #
# packed sequences
# --------------------------------------------------------------------------- #
def packed_grpo_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    cu_seqlens: Tensor,
    **loss_options,
) -> GRPOLossOutput:
    r""":func:`grpo_loss` of packed sequences (flash-attention's ``cu_seqlens`` layout).

    The ``B = len(cu_seqlens) - 1`` sequences lie one after another: sequence
    ``i`` is the tokens ``[cu_seqlens[i], cu_seqlens[i + 1])`` of the
    ``[total]`` (or ``[1, total]``) tensors ``logprobs``, ``old_logprobs``,
    ``mask``, ``ref_logprobs``; ``advantages`` and ``importance_weights`` are
    per sequence ``[B]`` or per token. The result is :func:`grpo_loss` of the
    padded batch ``[B, T]``, ``T`` the longest sequence, padding masked out
    (so dr_grpo's default length is ``T``), with ``per_token_loss`` read back
    at the packed positions (shape of ``logprobs``).
    """
    lengths = cu_seqlens.diff().to(torch.int64)
    B, T = lengths.numel(), int(lengths.max())
    total = logprobs.numel()
    seq = torch.repeat_interleave(torch.arange(B, device=logprobs.device), lengths)
    pos = torch.arange(total, device=logprobs.device) - cu_seqlens.to(torch.int64)[seq]

    def pad(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.reshape(-1)
        if t.numel() == B and total != B:  # one value per sequence
            return t
        return t.new_zeros(B, T).index_put((seq, pos), t)

    options = dict(loss_options)
    for name in ("ref_logprobs", "importance_weights"):
        options[name] = pad(options.get(name))
    result = grpo_loss(pad(logprobs), pad(old_logprobs), pad(advantages), pad(mask), **options)
    return result._replace(per_token_loss=result.per_token_loss[seq, pos].view(logprobs.shape))

"""OpenRLHF integration: OpenRLHF 0.11.2's ``PolicyLoss``, KL estimators and GRPO reward shaping, by grpo_kernels.

- :class:`PolicyLoss` has the constructor, ``forward`` signature and the five return values of
  ``openrlhf.models.loss.PolicyLoss`` (``loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio``); the loss is
  :func:`grpo_kernels.grpo_loss`.
- :func:`patch_openrlhf` makes OpenRLHF's trainer build ours instead. It imports nothing of OpenRLHF (an
  import hook patches ``openrlhf.models.loss`` when it is imported), so it can run in every Ray worker, as
  Ray's setup hook::

      ray job submit --runtime-env-json='{"worker_process_setup_hook":
          "grpo_kernels.integrations.openrlhf.patch_openrlhf"}' -- python3 -m openrlhf.cli.train_ppo_ray ...

  or ``ray.init(runtime_env={"worker_process_setup_hook": "grpo_kernels.integrations.openrlhf.patch_openrlhf"})``
  before ``openrlhf.cli.train_ppo_ray``'s ``train(args)`` (which calls ``ray.init`` only when Ray is not started).
- :func:`compute_approx_kl` (``openrlhf.models.utils.compute_approx_kl``): k1/k2/k3, ``unbiased_gradient``.
- :func:`normalize_rewards` / :func:`outcome_advantages`: the reward shaping of OpenRLHF's advantage
  estimators ``group_norm``, ``dr_grpo``, ``reinforce_baseline``, ``rloo``, ``flash_reinforce``
  (``RemoteExperienceMaker.compute_advantages_and_returns``) by :func:`grpo_kernels.group_advantages`.

Where each part of the loss runs:

- in the kernels (``grpo_loss``): the PPO/GSPO clipped loss, the dual clip, the ±20 log-ratio clamp (ppo), the
  aggregation (``token_level_loss``: a token sum over ``batch_num_tokens``; else the mean of the sequences'
  token means), the IS correction's gates (``rollout_is_mode`` / ``rollout_is_gate`` from ``old_log_probs`` and
  ``rollout_log_probs``, the threshold as bounds: the token ratio gate as ``token_mask`` / ``token_truncate``;
  the sequence ratio gate as ``sequence_mask`` with the ``geometric_mean`` gate; the binary-KL and
  total-variation gates, token or sequence level, as ``token_mask`` / ``sequence_mask`` with their gate),
  ``clip_ratio`` (its ``clip_ratio_region``: ``surr2 < surr1`` is "ratio above ``1 + eps_high`` with A > 0 or
  below ``1 - eps_low`` with A < 0"), ``ppo_kl`` (minus its k1 ``kl`` metric against ``old_log_probs``, with
  ``beta = 0``);
- by torch ops here (:func:`is_correction`, passed as ``importance_weights``): a ratio gate whose band reaches
  ``e^±20`` (``low <= e^-20`` or ``high >= e^20``: the kernels clamp the rollout log-ratios and the sequence's
  mean log-ratio to ±20 before the comparison, which inside that band changes no decision). Also by torch ops:
  ``vllm_kl``, ``is_filter_ratio`` and the scale that applies ``dp_size`` / ``global_batch_size``.

Differences from OpenRLHF, all outside ordinary inputs:

- a fully masked batch (or, with ``global_batch_size=None``, all rows empty) gives loss and metrics 0, where
  OpenRLHF's ``masked_mean`` divides 0 by 0 (NaN); a row with no token gives no NaN anywhere;
- the sequence mean divides a sequence's sum by its token count, OpenRLHF's by ``count + 1e-8`` (relative 1e-8);
- ``batch_num_tokens`` below 1 counts as 1 (it is a token count);
- masked positions may hold anything (NaN, ±inf): they change nothing (OpenRLHF multiplies them by the mask);
- the loss is float32 for bfloat16/float16 inputs (float64 for float64), computed in that precision;
- with a binary-KL or TV gate, a kept token's weight is its ratio ``e^{old - rollout}`` clamped to ``e^±20`` (the
  ppo loss's clamp); OpenRLHF does not clamp it: only a kept token whose rollout engine's log-prob differs from
  ``old_log_probs`` by more than 20 is affected;
- a NaN ``rollout_log_probs`` at a token that counts (an unknown rollout log-prob): the correction computed in
  the kernels gives that token the rollout ratio 1 (TRL's convention) and keeps it; OpenRLHF's ratio is NaN,
  so its mask modes drop the token (the sequence, at ``seq`` level) and its clip mode makes the loss NaN.
  ``is_filter_ratio`` (OpenRLHF's formula, torch ops) counts the unit as filtered in both;
- ``dual_clip <= 1`` raises ``ValueError`` (OpenRLHF: ``AssertionError``); an unknown ``policy_loss_type``
  raises at construction (OpenRLHF: in ``forward``); a correction without ``rollout_log_probs`` raises
  ``ValueError`` (OpenRLHF: ``TypeError`` from ``None``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import sys
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..reference import compute_dtype, kl_estimate, rollout_gate_statistic
from .common import LossAggregation, masked_mean

POLICY_LOSS_TYPES = ("ppo", "gspo")
IS_CORRECTION_LEVELS = ("off", "token", "seq")
IS_CORRECTION_MODES = ("mask", "clip")
IS_CORRECTION_GATINGS = ("ratio", "binary_kl", "tv")
LOG_RATIO_CLAMP = 20.0  # OpenRLHF's ppo clamps the log-ratio to ±20 before exp
KL_ESTIMATORS = ("k1", "k2", "k3")
KL_VALUE_CLAMP = 10.0  # compute_approx_kl clamps every estimate to ±10
KL_IS_WEIGHT_CLIP = 10.0  # upper bound of the unbiased-gradient importance weight
REWARD_ESTIMATORS = ("group_norm", "dr_grpo", "reinforce_baseline", "rloo", "flash_reinforce")
GROUP_NORM_EPS = 1e-9
WHITENING_MIN_VAR = 1e-8  # reinforce_baseline's token whitening: var.clamp(min=1e-8).rsqrt()
# Where OpenRLHF's trainer finds PolicyLoss: its module, the package that re-exports it, and the Ray actor that
# imports it by name.
PATCH_TARGETS = ("openrlhf.models.loss", "openrlhf.models", "openrlhf.trainer.ray.ppo_actor")
Number = Union[int, float]


# --------------------------------------------------------------------------- #
# the IS correction (train / rollout log-prob mismatch)
# --------------------------------------------------------------------------- #
class ISCorrection(NamedTuple):
    """A gate's per-token loss multiplier and which units it filtered."""

    weights: Optional[Tensor]  # [B, T], no gradient; None when not asked for
    filtered: Tensor  # bool: [B, T] at token level, [B, 1] at sequence level (an empty row counts as filtered)


def _check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be {'/'.join(choices)}, got {value}")


def check_is_correction(level: str, mode: str, gating: str, threshold: Sequence[Number]) -> tuple[float, float]:
    """OpenRLHF's checks of the IS-correction options (same messages); returns ``(low, high)``."""
    _check_choice("is_correction_level", level, IS_CORRECTION_LEVELS)
    _check_choice("is_correction_mode", mode, IS_CORRECTION_MODES)
    _check_choice("is_correction_gating", gating, IS_CORRECTION_GATINGS)
    if mode == "clip" and (level == "seq" or gating != "ratio"):
        raise ValueError("is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio")
    if len(threshold) != 2:
        raise ValueError(f"is_correction_threshold must be (low, high), got {threshold!r}")
    low, high = (float(t) for t in threshold)
    if gating != "ratio" and level != "off" and low > 0:
        raise ValueError(f"is_correction_gating={gating} takes an upper bound only (a single delta)")
    return low, high


def _sequence_mean(x: Tensor, m: Tensor) -> Tensor:
    """``[B, T]`` → ``[B, 1]`` mean over each row's kept tokens (0 for an empty row)."""
    return (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)


def is_correction(
    old_log_probs: Tensor,
    rollout_log_probs: Tensor,
    action_mask: Tensor,
    *,
    level: str = "token",
    mode: str = "mask",
    gating: str = "ratio",
    threshold: Sequence[Number] = (0.5, 5.0),
    weights: bool = True,
) -> ISCorrection:
    r"""OpenRLHF's train/rollout IS correction as a per-token multiplier of the policy loss, by torch ops (the loss
    uses it only for what the kernels would compute differently, :func:`_kernel_gate`; always for the filter).

    With :math:`\log\rho_t = \mathrm{old}_t - \mathrm{rollout}_t`, a statistic per unit (a token, or a
    sequence at ``level="seq"``): ``ratio`` :math:`\rho_t` (sequence: :math:`e^{\mathrm{mean}_t \log\rho_t}`),
    ``binary_kl`` :math:`p \log\frac{p}{q} + (1-p)\log\frac{1-p}{1-q}`, ``tv`` :math:`|p - q|` with
    :math:`p = e^{\mathrm{rollout}}, q = e^{\mathrm{old}}` clamped to :math:`[10^{-6}, 1 - 10^{-6}]` (their
    sequence means at ``level="seq"``). ``mode="mask"``: the weight is :math:`\rho_t` where the unit's
    statistic is in ``[low, high]``, else 0; ``mode="clip"`` (token ratio only): the statistic clamped to
    ``[low, high]``.

    Args:
        old_log_probs, rollout_log_probs, action_mask: ``[B, T]`` (masked positions may hold anything).
        level: ``"token"`` or ``"seq"``; mode, gating, threshold: OpenRLHF's ``is_correction_*``.
        weights: also form the weights (False: only ``filtered``, for a gate computed in the kernels).

    Returns:
        :class:`ISCorrection` (no gradient), in float32 (float64 for float64 inputs).
    """
    if level == "off":
        raise ValueError("is_correction_level must be token/seq here (off: no correction)")
    low, high = check_is_correction(level, mode, gating, threshold)
    dtype = compute_dtype(old_log_probs)
    keep = action_mask.to(torch.bool)
    m = keep.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    old = old_log_probs.detach().to(dtype)
    rollout = rollout_log_probs.detach().to(dtype)
    is_log_ratio = torch.where(keep, old - rollout, zero)
    seq = level == "seq"
    if gating == "ratio":
        stat = torch.exp(_sequence_mean(is_log_ratio, m) if seq else is_log_ratio)
    else:
        if gating not in ("binary_kl", "tv"):
            raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {gating}")
        rollout_kept = torch.where(keep, rollout, zero)
        stat = rollout_gate_statistic(torch.where(keep, old, zero), rollout_kept, gating)  # the kernels' formula
        # an unknown (NaN) rollout log-prob: the kernels' statistic is 0, OpenRLHF's NaN (outside every band)
        stat = torch.where(torch.isnan(rollout_kept), torch.full((), math.nan, dtype=dtype, device=keep.device), stat)
        if seq:
            stat = _sequence_mean(stat, m)
    if mode == "clip":
        filtered = (stat < low) | (stat > high)
        coef = stat.clamp(min=low, max=high) if weights else None
    elif mode == "mask":
        kept = (stat >= low) & (stat <= high)
        filtered = ~kept
        coef = torch.where(kept, is_log_ratio.exp(), zero) if weights else None
    else:
        raise ValueError(f"is_correction_mode must be mask/clip, got {mode}")
    if seq:  # OpenRLHF's statistic of an empty row is 0 / 0 = NaN: outside every band
        filtered = filtered | ~keep.any(-1, keepdim=True)
    return ISCorrection(coef, filtered)


def _kernel_gate(level: str, mode: str, gating: str, low: float, high: float) -> Optional[dict]:
    """``grpo_loss``'s rollout options that compute this gate in the kernels (``rollout_is_gate``), or None
    where they would differ from OpenRLHF: a ratio gate whose band reaches ``e^±20`` (the kernels clamp the
    rollout log-ratios, and the sequence's mean log-ratio, to ±20 before comparing; inside that band the clamp
    changes no decision)."""
    seq = level == "seq"
    if gating == "ratio":
        if not math.exp(-LOG_RATIO_CLAMP) < low < high < math.exp(LOG_RATIO_CLAMP):
            return None
        if seq:  # mask only (check_is_correction): the geometric mean of the sequence's ratios
            return dict(rollout_is_mode="sequence_mask", rollout_is_gate="geometric_mean", rollout_is_min=low,
                        rollout_is_max=high)
        return dict(rollout_is_mode="token_mask" if mode == "mask" else "token_truncate", rollout_is_min=low,
                    rollout_is_max=high)
    if gating in ("binary_kl", "tv"):  # mask only; an infinite bound is no bound
        if not low < high:
            return None
        return dict(rollout_is_mode="sequence_mask" if seq else "token_mask", rollout_is_gate=gating,
                    rollout_is_min=None if low == -math.inf else low, rollout_is_max=None if high == math.inf else high)
    raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {gating}")


# --------------------------------------------------------------------------- #
# aggregation
# --------------------------------------------------------------------------- #
def _aggregation(token_level_loss: bool, mask: Tensor, dp_size: int, batch_num_tokens, global_batch_size
                 ) -> LossAggregation:
    """The loss type, its options and the scale that give OpenRLHF's ``aggregate_loss``.

    With S_i the masked loss sum of row i and n_i its token count: token level Σ S_i / Σ n_i, or
    Σ S_i / batch_num_tokens · dp_size (dapo with ``num_items_in_batch``); else Σ' S_i / n_i over the
    non-empty rows, divided by their number or by global_batch_size / dp_size. Our grpo divides by B.
    """
    if token_level_loss:
        if batch_num_tokens is None:
            return LossAggregation("dapo", {}, 1.0)
        return LossAggregation("dapo", {"num_items_in_batch": batch_num_tokens}, float(dp_size))
    batch = mask.shape[0]
    if global_batch_size is None:
        sequences = mask.any(-1).sum().clamp(min=1).to(torch.float64)
        return LossAggregation("grpo", {}, batch / sequences)
    if isinstance(global_batch_size, Tensor):  # OpenRLHF's are float32: the scale in float64, rounded once
        global_batch_size = global_batch_size.to(torch.float64)
    return LossAggregation("grpo", {}, batch * dp_size / global_batch_size)


# --------------------------------------------------------------------------- #
# PolicyLoss
# --------------------------------------------------------------------------- #
class PolicyLoss(nn.Module):
    r"""``openrlhf.models.loss.PolicyLoss`` (OpenRLHF 0.11.2) computed by :func:`grpo_kernels.grpo_loss`.

    ``ppo``: :math:`r = e^{\mathrm{clamp}(\mathrm{logp} - \mathrm{old}, \pm 20)}`,
    :math:`\ell = -\min(rA, \mathrm{clip}(r, 1-\epsilon_l, 1+\epsilon_h)A)`, with ``dual_clip`` c
    :math:`\ell \leftarrow \min(\ell, -cA)` for :math:`A < 0`; times the IS-correction coefficient
    (:func:`is_correction`). ``gspo``: the same clipped loss on the sequence ratio
    :math:`e^{\mathrm{mean}_t(\mathrm{logp} - \mathrm{base})}`, base = ``rollout_log_probs`` when the correction
    is on, else ``old_log_probs`` (no clamp, no IS coefficient), always aggregated per sequence.

    Arguments as OpenRLHF's, plus ``backend`` (the grpo_kernels backend). ``forward`` returns
    ``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)``; the last two are None unless ``ppo`` with the
    correction on. See the module docstring for where each part runs and the differences.
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "ppo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: Sequence[Number] = (0.5, 5.0),
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if policy_loss_type not in POLICY_LOSS_TYPES:
            raise ValueError(f"Invalid policy loss type: {policy_loss_type}")
        if dual_clip is not None and not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
        check_is_correction(is_correction_level, is_correction_mode, is_correction_gating, is_correction_threshold)
        self.clip_eps_low = clip_eps_low
        self.clip_eps_high = clip_eps_high
        self.dual_clip = dual_clip
        self.token_level_loss = token_level_loss and policy_loss_type != "gspo"  # GSPO: per-sequence mean
        self.policy_loss_type = policy_loss_type
        self.is_correction_level = is_correction_level
        self.is_correction_mode = is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        self.backend = backend

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor,
        action_mask: Optional[Tensor] = None,
        rollout_log_probs: Optional[Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[Union[Number, Tensor]] = None,
        global_batch_size: Optional[Union[Number, Tensor]] = None,
    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        """``(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`` as OpenRLHF's ``PolicyLoss.forward``.

        Args:
            log_probs, old_log_probs, advantages: ``[B, T]`` (advantages also ``[B]`` / ``[B, 1]``).
            action_mask: ``[B, T]`` bool or 0/1; None: every token counts.
            rollout_log_probs: ``[B, T]`` log-probs of the rollout engine (vLLM); required when
                ``is_correction_level != "off"``.
            dp_size, batch_num_tokens, global_batch_size: OpenRLHF's global normalizers
                (``get_loss_batch_info``): numbers or 0-d tensors.
        """
        correction = self.is_correction_level != "off"
        if correction and rollout_log_probs is None:
            raise ValueError(f"is_correction_level={self.is_correction_level!r} needs rollout_log_probs (the "
                             f"rollout engine's per-token log-probs)")
        if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
            raise ValueError(f"dp_size must be a positive int, got {dp_size!r}")
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask
        keep = mask.to(torch.bool)
        agg = _aggregation(self.token_level_loss, keep, dp_size, batch_num_tokens, global_batch_size)
        # ppo_kl = masked mean of old - logp = minus the k1 KL metric against ref = old (beta = 0: no loss term)
        options = dict(epsilon_low=self.clip_eps_low, epsilon_high=self.clip_eps_high, clip_ratio_c=self.dual_clip,
                       ref_logprobs=old_log_probs, kl_estimator="k1", loss_type=agg.loss_type, **agg.options)
        base = old_log_probs
        vllm_kl = is_filter_ratio = None
        if self.policy_loss_type == "gspo":
            options["importance_sampling_level"] = "sequence"
            if advantages.shape != log_probs.shape:  # clip_ratio stays a token mean, as OpenRLHF's
                advantages = (advantages.unsqueeze(-1) if advantages.ndim == 1 else advantages).expand_as(log_probs)
            if correction:
                base = rollout_log_probs
        elif self.policy_loss_type == "ppo":
            options["log_ratio_clamp"] = LOG_RATIO_CLAMP
            if correction:
                low, high = check_is_correction(self.is_correction_level, self.is_correction_mode,
                                                self.is_correction_gating, self.is_correction_threshold)
                gate = _kernel_gate(self.is_correction_level, self.is_correction_mode, self.is_correction_gating,
                                    low, high)
                corr = is_correction(old_log_probs, rollout_log_probs, keep, level=self.is_correction_level,
                                     mode=self.is_correction_mode, gating=self.is_correction_gating,
                                     threshold=(low, high), weights=gate is None)
                if gate is None:
                    options["importance_weights"] = corr.weights
                else:
                    options.update(gate, sampling_logprobs=rollout_log_probs)
                if self.is_correction_level == "seq":
                    is_filter_ratio = corr.filtered.float().mean()
                else:
                    is_filter_ratio = masked_mean(corr.filtered.float(), keep)
                dtype = compute_dtype(log_probs)
                vllm_kl = masked_mean(rollout_log_probs.detach().to(dtype) - old_log_probs.detach().to(dtype), keep)
        else:
            raise ValueError(f"Invalid policy loss type: {self.policy_loss_type}")
        out = ops.grpo_loss(log_probs, base, advantages, mask, backend=self.backend, **options)
        scale = agg.scale.to(out.loss.dtype) if isinstance(agg.scale, Tensor) else agg.scale
        return out.loss * scale, out.clip_ratio_region.float(), -out.kl, vllm_kl, is_filter_ratio


# --------------------------------------------------------------------------- #
# KL estimators
# --------------------------------------------------------------------------- #
def compute_approx_kl(
    log_probs: Tensor,
    log_probs_base: Tensor,
    log_probs_old: Optional[Tensor] = None,
    kl_estimator: str = "k1",
    unbiased_gradient: bool = False,
) -> Tensor:
    r"""``openrlhf.models.utils.compute_approx_kl``: per-token KL(π_θ ‖ π_ref) estimates, clamped to ±10.

    With :math:`x = \mathrm{logp} - \mathrm{base}`: k1 :math:`x`, k2 :math:`x^2/2`, k3
    :math:`e^{-x} - 1 + x` (= grpo_kernels' ``low_var_kl``: its ±20 clamp of x and OpenRLHF's
    :math:`x \ge -10` give the same values and gradients after the ±10 clamp). ``unbiased_gradient``: the
    value of the estimator with the gradient of :math:`w\, x^2/2`,
    :math:`w = \mathrm{sg}[\min(e^{\mathrm{logp} - \mathrm{old}}, 10)]` (1 without ``log_probs_old``).
    Computed in float32 (float64 for float64 inputs; OpenRLHF: always float32) by
    :func:`grpo_kernels.reference.kl_estimate`.
    """
    estimators = {"k1": "k1", "k2": "k2", "k3": "low_var_kl"}
    if kl_estimator not in estimators:
        raise ValueError(f"Unknown kl_estimator: {kl_estimator}")
    dtype = compute_dtype(log_probs)
    logp, base = log_probs.to(dtype), log_probs_base.to(dtype)
    value = kl_estimate(logp, base, estimators[kl_estimator]).clamp(min=-KL_VALUE_CLAMP, max=KL_VALUE_CLAMP)
    if not unbiased_gradient:
        return value
    if log_probs_old is None:
        w = 1.0
    else:
        w = (logp - log_probs_old.to(dtype)).exp().clamp(max=KL_IS_WEIGHT_CLIP).detach()
    surrogate = w * kl_estimate(logp, base, "k2")
    return value.detach() + surrogate - surrogate.detach()


# --------------------------------------------------------------------------- #
# reward shaping (GRPO-style advantage estimators)
# --------------------------------------------------------------------------- #
def normalize_rewards(rewards: Tensor, n_samples_per_prompt: int, estimator: str = "group_norm", *,
                      backend: str = "auto") -> Tensor:
    r"""OpenRLHF's reward shaping of ``estimator`` (``compute_advantages_and_returns``, "baseline subtraction").

    ``rewards [B]`` in prompt order, each prompt's ``n_samples_per_prompt`` samples contiguous (OpenRLHF's
    order after sorting by ``index``). ``group_norm``: :math:`(r - \mu_g) / (\sigma_g + 10^{-9})` (unbiased
    std); ``dr_grpo``, ``reinforce_baseline``: :math:`r - \mu_g`; ``rloo``: :math:`r - \frac{1}{n-1}
    \sum_{j \ne i} r_j`; ``flash_reinforce``: :math:`r - \mu_{\text{batch}}`. By
    :func:`grpo_kernels.group_advantages`; float32 (float64 for float64 rewards), as OpenRLHF's
    ``promote_types(dtype, float32)``.
    """
    if estimator not in REWARD_ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(REWARD_ESTIMATORS)}, got {estimator!r}")
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {list(rewards.shape)}")
    if estimator == "flash_reinforce":
        group_size, options = rewards.shape[0], dict(estimator="grpo", scale="none")
    else:
        if isinstance(n_samples_per_prompt, bool) or not isinstance(n_samples_per_prompt, int) \
                or n_samples_per_prompt < 2:
            raise ValueError(f"{estimator} requires n_samples_per_prompt > 1, got {n_samples_per_prompt!r}")
        group_size = n_samples_per_prompt
        options = {"group_norm": dict(estimator="grpo", scale="group", eps=GROUP_NORM_EPS),
                   "dr_grpo": dict(estimator="grpo", scale="none"),
                   "reinforce_baseline": dict(estimator="grpo", scale="none"),
                   "rloo": dict(estimator="rloo", scale="none")}[estimator]
    with torch.no_grad():
        return ops.group_advantages(rewards, group_size=group_size, backend=backend, **options)


def outcome_advantages(rewards: Tensor, action_mask: Tensor, n_samples_per_prompt: int,
                       estimator: str = "group_norm", *, backend: str = "auto") -> Tensor:
    """OpenRLHF's per-token advantages ``[B, T]`` of an outcome reward, without a KL reward (``init_coef = 0``
    or ``use_kl_loss``) and ``gamma = 1``: the shaped reward (:func:`normalize_rewards`) at every position up
    to each row's last action token, 0 after it and in rows without one; ``reinforce_baseline`` then whitens
    them over the masked tokens of the batch (``(a - mean) / sqrt(max(var, 1e-8))``).
    """
    shaped = normalize_rewards(rewards, n_samples_per_prompt, estimator, backend=backend)
    keep = action_mask.to(torch.bool)
    length = keep.shape[-1]
    positions = torch.arange(length, device=keep.device)
    last = torch.where(keep, positions, torch.full_like(positions, -1)).amax(-1, keepdim=True)
    adv = torch.where(positions <= last, shaped.unsqueeze(-1), torch.zeros((), dtype=shaped.dtype,
                                                                             device=shaped.device))
    if estimator == "reinforce_baseline":
        m = keep.to(adv.dtype)
        count = m.sum()
        mean = (adv * m).sum() / count
        var = ((adv - mean).square() * m).sum() / count
        adv = (adv - mean) * var.clamp(min=WHITENING_MIN_VAR).rsqrt()
    return adv


# --------------------------------------------------------------------------- #
# patching OpenRLHF
# --------------------------------------------------------------------------- #
class OpenRLHFPatch:
    """What :func:`patch_openrlhf` did; ``undo()`` (or leaving a ``with`` block) puts OpenRLHF's class back."""

    def __init__(self, replacement: type):
        self.replacement = replacement
        self.original: Optional[type] = None  # OpenRLHF's PolicyLoss, once its module has run
        self.hook: Optional[_PatchOnImport] = None

    @property
    def modules(self) -> list[str]:
        """The modules whose ``PolicyLoss`` is ours now (those imported after the patch included)."""
        return [name for name in PATCH_TARGETS
                if getattr(sys.modules.get(name), "PolicyLoss", None) is self.replacement]

    def apply(self, original: type) -> None:
        """Replace ``original`` in every loaded module of :data:`PATCH_TARGETS`."""
        self.original = original
        for name in PATCH_TARGETS:
            module = sys.modules.get(name)
            if module is not None and getattr(module, "PolicyLoss", None) is original:
                module.PolicyLoss = self.replacement

    def undo(self) -> None:
        """Remove the import hook; give the modules OpenRLHF's ``PolicyLoss`` back."""
        if self.hook is not None and self.hook in sys.meta_path:
            sys.meta_path.remove(self.hook)
        self.hook = None
        if self.original is not None:
            for name in self.modules:
                sys.modules[name].PolicyLoss = self.original

    def __enter__(self) -> "OpenRLHFPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Patches ``openrlhf.models.loss`` right after it runs, before ``openrlhf.models`` and the actor import
    ``PolicyLoss`` from it by name: a process is patched without importing OpenRLHF (whose package imports
    deepspeed, peft and transformers; Ray's setup hook also runs in the vLLM workers)."""

    def __init__(self, patch: OpenRLHFPatch):
        self.patch = patch
        self._loaders: dict = {}

    def find_spec(self, name, path, target=None):
        if name != PATCH_TARGETS[0]:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self._loaders[name], spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module) -> None:
        self._loaders[module.__spec__.name].exec_module(module)
        self.patch.apply(module.PolicyLoss)


def policy_loss_class(backend: str = "auto") -> type:
    """:class:`PolicyLoss` with ``backend`` as its default (OpenRLHF constructs it without one)."""
    if backend == "auto":
        return PolicyLoss

    def __init__(self, *args, backend: str = backend, **kwargs):
        PolicyLoss.__init__(self, *args, backend=backend, **kwargs)

    return type("PolicyLoss", (PolicyLoss,), {"__init__": __init__, "__module__": __name__})


def patch_openrlhf(backend: str = "auto") -> OpenRLHFPatch:
    """Make OpenRLHF's trainer build :class:`PolicyLoss` (with ``backend``) where it builds its own.

    Rebinds ``PolicyLoss`` in ``openrlhf.models.loss``, ``openrlhf.models`` and
    ``openrlhf.trainer.ray.ppo_actor`` (which imports it by name): at once for those already imported; if
    ``openrlhf.models.loss`` is not imported yet, an import hook patches it when it is, so that the other two
    bind ours. Imports nothing of OpenRLHF. Call it in the process that builds the actor: in OpenRLHF's Ray
    workers through Ray's ``worker_process_setup_hook`` (module docstring).

    Returns:
        an :class:`OpenRLHFPatch` (``.modules``: the modules patched so far; ``.undo()``).
    """
    patch = OpenRLHFPatch(policy_loss_class(backend))
    loss = sys.modules.get(PATCH_TARGETS[0])
    if loss is not None:
        patch.apply(loss.PolicyLoss)
    else:
        patch.hook = _PatchOnImport(patch)
        sys.meta_path.insert(0, patch.hook)
    return patch


__all__ = [
    "ISCorrection",
    "OpenRLHFPatch",
    "PolicyLoss",
    "check_is_correction",
    "compute_approx_kl",
    "is_correction",
    "normalize_rewards",
    "outcome_advantages",
    "patch_openrlhf",
    "policy_loss_class",
]

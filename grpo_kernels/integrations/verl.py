"""verl integration: policy losses and advantage estimators with verl's signatures, computed by grpo_kernels.

Each ``*_policy_loss`` function has the signature of verl's registered policy
losses (``verl.trainer.ppo.core_algos``, verl 0.9.1)::

    fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
       config=None, rollout_is_weights=None) -> (pg_loss, pg_metrics)

and returns what verl's function of the same name returns: the 0-d loss to
call ``backward()`` on and the dict of float metrics (``actor/pg_clipfrac``,
``actor/ppo_kl``, ``actor/pg_clipfrac_lower``). The loss is
:func:`grpo_kernels.grpo_loss` with the options that give verl's formula, the
advantages are :func:`grpo_kernels.group_advantages`. ``config`` is verl's
actor config (``ActorConfig``, a ``DictConfig`` or a plain dict; ``None``:
verl's defaults), read for ``clip_ratio``, ``clip_ratio_low``,
``clip_ratio_high``, ``clip_ratio_c``, ``tau_pos``, ``tau_neg`` and
``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``).

:func:`register` adds them to verl's registries under ``grpo_kernels_<name>``
(``actor_rollout_ref.actor.policy_loss.loss_mode=grpo_kernels_vanilla``,
``algorithm.adv_estimator=grpo_kernels_grpo``); it imports verl, nothing else
here does. Importing :mod:`grpo_kernels.integrations.verl_plugin` calls it,
for verl's ``external_lib`` / ``VERL_USE_EXTERNAL_MODULES`` hooks, which import
a module in every worker process.

Differences from verl, all outside ordinary inputs:

- a fully masked batch gives loss 0 (verl: NaN from 0 / 0); verl's
  seq-mean-token-mean divides a sequence's sum by ``count + 1e-8``, we by
  ``count`` (a relative 1e-8); metrics divide by ``max(1, count)``, verl's by
  ``count + 1e-8``;
- GSPO: our sequence-level ratio carries the gradient of the mean log-ratio to
  every token of the sequence (the GSPO paper's sequence ratio), verl's carries
  each token's own (``sg[s_i] · π / sg[π]``); the gradients agree when the
  advantage and the rollout weight are constant over each sequence's tokens,
  as with GRPO / RLOO outcome advantages (the loss always agrees). verl also
  caps the sequence log-ratio at 10.
- gpg supports the token-mean and token-sum modes only.

Not provided: verl's ``cispo`` (it clips the ratio to ``[1 - low, 1 + high]``;
our cispo, TRL's, caps it at ``epsilon_high`` only), ``clip_cov`` and
``kl_cov`` (random / top-k token selection), ``dro``, ``dppo_tv``,
``dppo_kl``, ``bypass_mode``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import ops
from ..loss_table import LOSS_TYPE_TABLE
from .common import LossAggregation, masked_mean

PREFIX = "grpo_kernels_"
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# verl's defaults (ActorConfig)
CLIP_RATIO = 0.2
CLIP_RATIO_C = 3.0
TAU_POS = 1.0
TAU_NEG = 1.05
ADVANTAGE_EPS = 1e-6
LOG_RATIO_CLAMP = 20.0  # verl clamps the log-ratio to ±20 before exp (vanilla, sapo, cispo)

Config = Optional[Union[Mapping, Any]]


# --------------------------------------------------------------------------- #
# config
# --------------------------------------------------------------------------- #
def _get(config: Config, name: str, default: Any) -> Any:
    """``config.name`` (ActorConfig, DictConfig or dict), ``default`` when absent or None."""
    if config is None:
        return default
    value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
    return default if value is None else value


def _clip_range(config: Config) -> tuple[float, float]:
    """verl's ``(clip_ratio_low, clip_ratio_high)``, each falling back to ``clip_ratio``."""
    clip_ratio = _get(config, "clip_ratio", CLIP_RATIO)
    return _get(config, "clip_ratio_low", clip_ratio), _get(config, "clip_ratio_high", clip_ratio)


class _BatchInfo(NamedTuple):
    """verl's ``config.global_batch_info``: the global normalizers of a data-parallel step."""

    dp_size: int
    batch_num_tokens: Optional[Union[int, float, Tensor]]
    global_batch_size: Optional[Union[int, float, Tensor]]
    loss_scale_factor: Optional[int]


def _batch_info(config: Config) -> _BatchInfo:
    info = _get(config, "global_batch_info", {}) or {}
    return _BatchInfo(info.get("dp_size", 1) or 1, info.get("batch_num_tokens"), info.get("global_batch_size"),
                      info.get("loss_scale_factor"))


# --------------------------------------------------------------------------- #
# aggregation: verl's loss_agg_mode as our loss types
# --------------------------------------------------------------------------- #
def _agg_modes(policy_loss: str) -> dict[str, str]:
    """verl's loss_agg_mode -> our loss type, for verl's policy loss ``policy_loss`` (the loss table's columns)."""
    return {mode: name for name, row in LOSS_TYPE_TABLE.items() if row.verl_policy_loss == policy_loss
            for mode in row.verl_agg_modes}


# The verl modes each of verl's policy losses can take, with the loss type that computes it.
CLIPPED = _agg_modes("vanilla")
SAPO = _agg_modes("sapo")
GPG = _agg_modes("gpg")
GEO_MEAN = next(name for name, row in LOSS_TYPE_TABLE.items() if row.verl_policy_loss == "geo_mean")


def _aggregation(loss_types: Mapping[str, str], mode: str, mask: Tensor, info: _BatchInfo) -> LossAggregation:
    """The loss type and options whose loss, times ``scale``, is verl's ``agg_loss(..., mode, **info)``.

    With S_i the masked loss sum of sequence i, n_i its token count, N = Σ n_i,
    B the local batch and G the global batch size (default: the sequences with
    n_i > 0), verl's modes are: token-mean Σ S_i / N_global · dp, token-sum
    Σ S_i · dp, seq-mean-token-mean Σ S_i / n_i / G · dp, seq-mean-token-sum
    Σ S_i / G · dp, seq-mean-token-sum-norm that over ``loss_scale_factor``
    (default T). Ours divide by B where verl divides by G: ``scale = B · dp / G``.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {list(LOSS_AGG_MODES)}, got {mode!r}")
    if mode not in loss_types:
        raise ValueError(f"loss_agg_mode={mode!r} is not available for this policy loss (it supports "
                         f"{list(loss_types)})")
    loss_type = loss_types[mode]
    if info.dp_size > 1 and mode != "token-sum":
        needed = "batch_num_tokens" if mode == "token-mean" else "global_batch_size"
        if getattr(info, needed) is None:
            raise ValueError(f"global_batch_info: {needed} is required when dp_size > 1 (loss_agg_mode={mode!r})")
    if mode == "token-mean":
        return LossAggregation(loss_type, {"num_items_in_batch": info.batch_num_tokens}, float(info.dp_size))
    if mode == "token-sum":
        return LossAggregation(loss_type, {"num_items_in_batch": 1}, float(info.dp_size))
    sequences = info.global_batch_size
    if sequences is None:
        sequences = (mask.sum(-1) > 0).sum().clamp(min=1).to(torch.float64)
    options = {}
    if mode == "seq-mean-token-sum-norm":
        options["max_completion_length"] = info.loss_scale_factor or mask.shape[-1]
    return LossAggregation(loss_type, options, mask.shape[0] * info.dp_size / sequences)


# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #
def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(x, mask, torch.float64)


def _log_ratio(old_log_prob: Tensor, log_prob: Tensor, clamp: bool) -> Tensor:
    """verl's ``negative_approx_kl = log_prob - old_log_prob`` (clamped where verl clamps), no gradient."""
    log_ratio = log_prob.detach().to(torch.float64) - old_log_prob.to(torch.float64)
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) if clamp else log_ratio


def _metrics(clipfrac: Union[float, Tensor], ppo_kl: Tensor, clipfrac_lower: Union[float, Tensor]) -> dict[str, float]:
    return {"actor/pg_clipfrac": float(clipfrac), "actor/ppo_kl": float(ppo_kl),
            "actor/pg_clipfrac_lower": float(clipfrac_lower)}


def _run(loss_types: Mapping[str, str], old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
         rollout_is_weights, backend: str, **options):
    agg = _aggregation(loss_types, loss_agg_mode, response_mask, _batch_info(config))
    out = ops.grpo_loss(log_prob, old_log_prob, advantages, response_mask, loss_type=agg.loss_type,
                        importance_weights=rollout_is_weights, backend=backend, **agg.options, **options)
    scale = agg.scale.to(out.loss.dtype) if isinstance(agg.scale, Tensor) else agg.scale
    return out.loss * scale, out


# --------------------------------------------------------------------------- #
# policy losses
# --------------------------------------------------------------------------- #
def vanilla_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Config = None,
    rollout_is_weights: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, dict[str, float]]:
    r"""verl's ``vanilla`` (``compute_policy_loss_vanilla``): PPO clip with dual clip.

    Per token, :math:`r = e^{\mathrm{logp} - \mathrm{old}}`,
    :math:`\ell = \max(-A r, -A\,\mathrm{clip}(r, 1-\epsilon_l, 1+\epsilon_h))`, for
    :math:`A < 0` capped at :math:`-A c` (``clip_ratio_c``); times ``rollout_is_weights``;
    reduced by ``loss_agg_mode``. ``grpo_loss(clip_ratio_c=c)`` with the loss type of the mode.

    Args:
        old_log_prob, log_prob, advantages, response_mask: ``[B, T]`` (mask bool or 0/1).
        loss_agg_mode: one of :data:`LOSS_AGG_MODES`.
        config: verl's actor config (see the module docstring).
        rollout_is_weights: ``[B, T]`` rollout importance-sampling weights, or None.
        backend: the grpo_kernels backend.

    Returns:
        ``(pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"})``.
    """
    low, high = _clip_range(config)
    clip_c = _get(config, "clip_ratio_c", CLIP_RATIO_C)
    loss, out = _run(CLIPPED, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, backend, epsilon_low=low, epsilon_high=high, clip_ratio_c=clip_c,
                     log_ratio_clamp=LOG_RATIO_CLAMP)
    log_ratio = _log_ratio(old_log_prob, log_prob, clamp=True)
    dual_clipped = (advantages < 0) & (log_ratio.exp() > clip_c)
    return loss, _metrics(out.clip_ratio_region, _masked_mean(-log_ratio, response_mask),
                          _masked_mean(dual_clipped, response_mask))


def gspo_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Config = None,
    rollout_is_weights: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, dict[str, float]]:
    r"""verl's ``gspo`` (``compute_policy_loss_gspo``): the clipped loss on the sequence ratio.

    :math:`s_i = \exp(\sum_t m_{i,t} (\mathrm{logp} - \mathrm{old}) / \max(1, n_i))`,
    :math:`\ell = \max(-A s_i, -A\,\mathrm{clip}(s_i, 1-\epsilon_l, 1+\epsilon_h))` (no dual clip).
    ``grpo_loss(importance_sampling_level="sequence")``; see the module docstring for the
    gradient. Arguments and result as :func:`vanilla_policy_loss` (``pg_clipfrac_lower`` is 0).
    """
    low, high = _clip_range(config)
    loss, out = _run(CLIPPED, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                     rollout_is_weights, backend, epsilon_low=low, epsilon_high=high,
                     importance_sampling_level="sequence")
    log_ratio = _log_ratio(old_log_prob, log_prob, clamp=False)
    return loss, _metrics(out.clip_ratio_region, _masked_mean(-log_ratio, response_mask), 0.0)


def sapo_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "seq-mean-token-mean",
    config: Config = None,
    rollout_is_weights: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, dict[str, float]]:
    r"""verl's ``sapo`` (``compute_policy_loss_sapo``): the soft-gated loss.

    :math:`\ell = -\sigma(\tau (r - 1))\,\tfrac{4}{\tau}\,A` with :math:`\tau` = ``tau_pos``
    for :math:`A > 0`, else ``tau_neg``. As verl, always reduced by seq-mean-token-mean
    (``loss_agg_mode`` is not used). ``grpo_loss(loss_type="sapo")``. Result as
    :func:`vanilla_policy_loss` (both clip fractions are 0).
    """
    del loss_agg_mode  # verl's sapo always aggregates with seq-mean-token-mean
    loss, _ = _run(SAPO, old_log_prob, log_prob, advantages, response_mask,
                   "seq-mean-token-mean", config, rollout_is_weights, backend, log_ratio_clamp=LOG_RATIO_CLAMP,
                   sapo_temperature_pos=_get(config, "tau_pos", TAU_POS),
                   sapo_temperature_neg=_get(config, "tau_neg", TAU_NEG))
    log_ratio = _log_ratio(old_log_prob, log_prob, clamp=True)
    return loss, _metrics(0.0, _masked_mean(-log_ratio, response_mask), 0.0)


def geo_mean_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Config = None,
    rollout_is_weights: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, dict[str, float]]:
    r"""verl's ``geo_mean`` (GMPO, ``compute_policy_loss_geo_mean``): one loss per sequence, the geometric mean.

    Log-ratios clipped in log space to :math:`[-\epsilon_l, \epsilon_h]` on the side of the
    advantage's sign, the sequence ratio their masked mean's exp, times minus the mean
    advantage and the geometric mean of the rollout weights; the mean over the batch.
    As verl, ``loss_agg_mode`` and ``global_batch_info`` are not used.
    ``grpo_loss(loss_type="gmpo")``. Result as :func:`vanilla_policy_loss`
    (``pg_clipfrac`` / ``pg_clipfrac_lower``: clipped tokens with A > 0 / A < 0).
    """
    del loss_agg_mode  # verl's geo_mean takes the mean over sequences
    low, high = _clip_range(config)
    out = ops.grpo_loss(log_prob, old_log_prob, advantages, response_mask, loss_type=GEO_MEAN, epsilon_low=low,
                        epsilon_high=high, importance_weights=rollout_is_weights, backend=backend)
    log_ratio = _log_ratio(old_log_prob, log_prob, clamp=False)
    return out.loss, _metrics(out.clip_ratio_high, _masked_mean(-log_ratio, response_mask), out.clip_ratio_low)


def gpg_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Config = None,
    rollout_is_weights: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> tuple[Tensor, dict[str, float]]:
    r"""verl's ``gpg`` (``compute_policy_loss_gpg``): :math:`\ell = -\mathrm{logp}\, A` (× rollout weights).

    ``grpo_loss(loss_type="gpg")``, whose aggregation is a masked token sum over a
    token count: token-mean and token-sum only. Returns ``(pg_loss, {})`` as verl.
    """
    loss, _ = _run(GPG, old_log_prob, log_prob, advantages, response_mask,
                   loss_agg_mode, config, rollout_is_weights, backend)
    return loss, {}


POLICY_LOSSES: dict[str, Callable] = {
    "vanilla": vanilla_policy_loss,
    "gspo": gspo_policy_loss,
    "sapo": sapo_policy_loss,
    "geo_mean": geo_mean_policy_loss,
    "gpg": gpg_policy_loss,
}


# --------------------------------------------------------------------------- #
# advantage estimators
# --------------------------------------------------------------------------- #
def _group_ids(index, device: torch.device) -> Tensor:
    """Dense int64 labels for verl's ``index`` (any hashable ids, e.g. the ``uid`` strings), order of first sight."""
    if isinstance(index, Tensor):
        return index.to(device=device, dtype=torch.int64)
    codes: dict = {}
    return torch.tensor([codes.setdefault(key, len(codes)) for key in index], dtype=torch.int64, device=device)


def _outcome_advantage(token_level_rewards: Tensor, response_mask: Tensor, index, *, estimator: str, scale: str,
                       epsilon: float, backend: str) -> tuple[Tensor, Tensor]:
    """Scores (the row sums of the token rewards) → advantages ``[B, T]`` (× mask), twice (verl returns
    ``(advantages, returns)``).

    verl gives a group of one mean 0 and std 1: its advantage is ``score / (1 + eps)``
    (``score`` without the std), where ours is 0; we give verl's, ``1 + eps`` rounded
    to the default dtype as verl's ``torch.tensor(1.0) + eps``.
    """
    with torch.no_grad():
        scores = token_level_rewards.sum(-1)
        ids = _group_ids(index, scores.device)
        adv = ops.group_advantages(scores, group_ids=ids, estimator=estimator, scale=scale, eps=epsilon,
                                   backend=backend)
        alone = torch.bincount(ids)[ids] == 1
        lone_adv = scores / (torch.tensor(1.0) + epsilon).to(scores.device) if scale == "group" else scores
        adv = torch.where(alone, lone_adv.to(adv.dtype), adv)
        adv = adv.to(scores.dtype).unsqueeze(-1) * response_mask
    return adv, adv


def grpo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index,
    epsilon: float = ADVANTAGE_EPS,
    norm_adv_by_std_in_grpo: Optional[bool] = None,
    config: Config = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[Tensor, Tensor]:
    r"""verl's ``grpo`` estimator (``compute_grpo_outcome_advantage``) by :func:`grpo_kernels.group_advantages`.

    Score :math:`s_i = \sum_t r_{i,t}`; rows sharing an ``index`` form a group;
    :math:`A_i = (s_i - \mu_g) / (\sigma_g + \epsilon)` (unbiased std), or
    :math:`s_i - \mu_g` without std normalization (Dr. GRPO); a group of one counts
    as :math:`\mu = 0, \sigma = 1`.

    Args:
        token_level_rewards: ``[B, T]``; response_mask: ``[B, T]``.
        index: ``[B]`` group ids (verl's ``uid``: a numpy array of any hashable ids, or an int tensor).
        epsilon: added to the std.
        norm_adv_by_std_in_grpo: divide by the std; None: ``config.norm_adv_by_std_in_grpo``
            (verl's trainer passes only the config to a registered estimator), else True.
        config: verl's ``AlgoConfig`` or None.
        backend: the grpo_kernels backend.
        kwargs: other inputs verl's trainer may pass, unused.

    Returns:
        ``(advantages, returns)``, the same ``[B, T]`` tensor, in the rewards' dtype.
    """
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_get(config, "norm_adv_by_std_in_grpo", True))
    return _outcome_advantage(token_level_rewards, response_mask, index, estimator="grpo",
                              scale="group" if norm_adv_by_std_in_grpo else "none", epsilon=epsilon, backend=backend)


def rloo_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index,
    epsilon: float = ADVANTAGE_EPS,
    config: Config = None,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[Tensor, Tensor]:
    r"""verl's ``rloo`` estimator (``compute_rloo_outcome_advantage``): the leave-one-out baseline.

    :math:`A_i = s_i - \frac{1}{n-1}\sum_{j \ne i} s_j = \frac{n}{n-1}(s_i - \mu_g)`;
    a row alone in its group keeps its score. Arguments and result as
    :func:`grpo_advantage` (``epsilon`` and ``config`` are not used, as in verl).
    """
    return _outcome_advantage(token_level_rewards, response_mask, index, estimator="rloo", scale="none",
                              epsilon=epsilon, backend=backend)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "grpo": grpo_advantage,
    "rloo": rloo_advantage,
}


# --------------------------------------------------------------------------- #
# registration
# --------------------------------------------------------------------------- #
def register() -> list[str]:
    """Add the policy losses and advantage estimators to verl's registries as ``grpo_kernels_<name>``.

    Imports ``verl.trainer.ppo.core_algos``; calling it again is harmless.
    Returns the registered names.
    """
    from verl.trainer.ppo import core_algos

    names = []
    for name, fn in POLICY_LOSSES.items():
        core_algos.register_policy_loss(PREFIX + name)(fn)
        names.append(PREFIX + name)
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        core_algos.register_adv_est(PREFIX + name)(fn)
        names.append(PREFIX + name)
    return names

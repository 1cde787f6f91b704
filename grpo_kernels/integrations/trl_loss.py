"""TRL 1.16's ``GRPOTrainer._compute_loss``, with the policy loss computed by :func:`grpo_kernels.grpo_loss`.

:func:`compute_loss` takes the place of the trainer's ``_compute_loss``: the
same inputs, the same returned loss (the gradient-accumulation and
multi-process scaling included), the same updates of the adaptive entropy
controller and the same metrics in ``trainer._metrics``. The trainer's config
maps to the op's options as :func:`loss_options` states; the off-policy
sequence mask is the op's (``off_policy_mask_threshold``, ``sampling_logprobs``),
the top-entropy mask and the vLLM importance-sampling ratio become
``importance_weights`` (VESPO folds the ratio into its sequence weight, as TRL).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor
from trl.trainer.utils import nanmax, nanmin

from ..ops import grpo_loss
from ..loss_table import LOSS_TYPE_TABLE, VESPO_LOG_MAX, VESPO_LOG_MIN, Aggregation, Family
from ..reference import vespo_phi

# Loss types whose loss TRL divides by the accumulation steps (the others, token sums, by a token count: see
# _loss_scale), and those whose options include delta.
_MEAN_LOSS_TYPES = tuple(n for n, row in LOSS_TYPE_TABLE.items()
                         if row.trl_name is not None and row.aggregation is not Aggregation.TOKEN_SUM)
_CLIPPED_LOSS_TYPES = tuple(n for n, row in LOSS_TYPE_TABLE.items() if row.family is Family.CLIPPED)
# Arguments of the trainer's _get_per_token_logps_and_entropies that are not model inputs from the batch.
_SCORING_ARGUMENTS = ("model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
                      "compute_aux_loss")


def loss_options(trainer) -> dict:
    """The scalar options of :func:`grpo_kernels.grpo_loss` that reproduce ``trainer``'s config.

    ``epsilon`` → ``epsilon_low``; ``epsilon_high`` (``epsilon`` when unset) → ``epsilon_high``;
    ``delta`` (clipped loss types only: TRL ignores it for cispo, sapo and vespo); ``max_completion_length``
    (dr_grpo's normalizer); vespo: ``importance_sampling_level="token"`` (VESPO forms its own sequence weight; TRL
    only warns about "sequence", which then changes nothing but a bias-corrected KL, refused at patch time);
    the rest by name.
    """
    args = trainer.args
    vespo = trainer.loss_type == "vespo"
    return dict(
        beta=float(trainer.beta),
        epsilon_low=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high,
        delta=args.delta if trainer.loss_type in _CLIPPED_LOSS_TYPES else None,
        loss_type=trainer.loss_type,
        importance_sampling_level="token" if vespo else trainer.importance_sampling_level,
        use_bias_correction_kl=bool(args.use_bias_correction_kl),
        max_completion_length=trainer.max_completion_length if trainer.loss_type == "dr_grpo" else None,
        sapo_temperature_pos=args.sapo_temperature_pos,
        sapo_temperature_neg=args.sapo_temperature_neg,
        off_policy_mask_threshold=trainer.off_policy_mask_threshold,
        vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos,
        vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
    )


def compute_loss(trainer, model, inputs: dict, *, backend: str = "auto") -> Tensor:
    """The loss of one micro-batch of ``inputs`` (TRL's prepared batch), as TRL's ``_compute_loss`` returns it."""
    mode = "train" if trainer.model.training else "eval"
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    logps, entropies = _score_completions(trainer, model, inputs)
    entropy_mask = None
    if trainer.top_entropy_quantile < 1.0:
        entropy_mask = trainer.get_high_entropy_mask(entropies, mask, 1 - trainer.top_entropy_quantile)
    advantages = inputs["advantages"]
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logps = inputs.get("old_per_token_logps")

    options = loss_options(trainer)
    off_policy = trainer.off_policy_mask_threshold is not None
    out = grpo_loss(
        logps, old_logps, advantages, mask,
        ref_logprobs=inputs["ref_per_token_logps"] if options["beta"] != 0.0 else None,
        sampling_logprobs=inputs.get("sampling_per_token_logps") if off_policy else None,
        importance_weights=_loss_multipliers(trainer, inputs, logps, entropy_mask),
        num_items_in_batch=None if trainer.loss_type in _MEAN_LOSS_TYPES else inputs["num_items_in_batch"],
        backend=backend, **options,
    )
    scale = _loss_scale(trainer, mode)
    loss = out.loss * scale
    # the policy loss before the accumulation scaling (dapo and cispo: after their normalizer)
    policy_loss = (out.loss if trainer.loss_type in _MEAN_LOSS_TYPES else loss).detach()

    if trainer._entropy_bonus_enabled:
        active = mask if entropy_mask is None else mask * entropy_mask
        loss = loss - _entropy_bonus(trainer, entropies, active, mode)
        trainer._metrics[mode]["policy_loss"].append(trainer.accelerator.gather(policy_loss).nanmean().item())
    _log_metrics(trainer, mode, out, inputs, logps, entropies, advantages, mask)
    return loss


def _score_completions(trainer, model, inputs: dict) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies ``[B, T]`` of the completions under ``model`` (its fused LM head)."""
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    extra = [name for name in inspect.signature(trainer._get_per_token_logps_and_entropies).parameters
             if name not in _SCORING_ARGUMENTS]
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        model,
        torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
        completion_ids.size(1),
        compute_entropy=True,
        **{name: inputs.get(name) for name in extra},
    )
    return logps, entropies


def _loss_multipliers(trainer, inputs, logps, entropy_mask) -> Optional[Tensor]:
    """The product of TRL's per-token loss multipliers besides the off-policy mask (``[B, 1]`` or ``[B, T]``),
    or ``None`` without any: the top-entropy mask and the vLLM importance-sampling ratio. For vespo the ratio of
    the batch, when there is one, alone: the op folds it into the sequence weight, as TRL (without an entropy
    mask: see check_trainer)."""
    factors = []
    if entropy_mask is not None:
        factors.append(entropy_mask)
    if trainer.loss_type == "vespo":
        if inputs.get("importance_sampling_ratio") is not None:
            factors.append(inputs["importance_sampling_ratio"])
    elif trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        factors.append(inputs["importance_sampling_ratio"])
    product = None
    for factor in factors:
        factor = factor.to(logps.dtype)
        product = factor if product is None else product * factor
    return product


def _loss_scale(trainer, mode: str) -> float:
    """What TRL multiplies the op's loss by: 1 / (accumulation steps) for the mean loss types; for dapo and
    cispo, whose op loss is divided by the generation batch's token count N, the rescaling of N to one process's
    accumulation window: processes · steps_per_generation / (accumulation steps)."""
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1
    if trainer.loss_type in _MEAN_LOSS_TYPES:
        return 1.0 / accumulation
    scale = float(trainer.accelerator.num_processes)
    if mode == "train":  # in eval the generation batch is neither split across steps nor accumulated
        scale = scale * trainer.args.steps_per_generation / accumulation
    return scale


def _entropy_bonus(trainer, entropies: Tensor, active: Tensor, mode: str) -> Tensor:
    """``coef · H``: ``H`` the mean entropy over the ``active`` tokens, divided by the accumulation steps; ``coef``
    the trainer's ``entropy_coef`` (adaptive: 0 while the last window's entropy is above ``entropy_target``).

    In train mode with ``use_adaptive_entropy``, the entropy sums of the accumulation window are collected, and
    at its last micro-batch the coefficient moves by ``entropy_coef_delta`` towards more bonus when the window's
    entropy (all processes) is at or below the target, towards less otherwise, within
    ``[entropy_coef_min, entropy_coef_max]``.
    """
    args = trainer.args
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    weighted = (entropies * active).sum()
    mean_entropy = weighted / active.sum().clamp(min=1.0) / accumulation
    coef = trainer.entropy_coef
    if trainer.use_adaptive_entropy and trainer._last_world_entropy > args.entropy_target:
        coef = 0.0
    bonus = coef * mean_entropy

    if trainer.use_adaptive_entropy and mode == "train":
        stats = torch.stack([weighted, active.sum()]).detach()
        window = trainer._entropy_window_stats
        trainer._entropy_window_stats = stats if window is None else window + stats
        if trainer.accelerator.sync_gradients:
            total = trainer.accelerator.reduce(trainer._entropy_window_stats, reduction="sum")
            world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
            if world_entropy <= args.entropy_target:
                trainer.entropy_coef = min(trainer.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
            else:
                trainer.entropy_coef = max(trainer.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
            trainer._last_world_entropy = world_entropy
            trainer._entropy_window_stats = None
    if mode == "train" and trainer.accelerator.sync_gradients:
        trainer._metrics[mode]["entropy_coef"].append(trainer.entropy_coef)
    return bonus


def _global_mean(trainer, total: Tensor, count: Tensor) -> float:
    """Σ total / Σ count over all processes (count clamped to 1)."""
    totals = trainer.accelerator.reduce(torch.stack([total.float(), count.float()]), reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


def _op_metric(trainer, value: Tensor, per_sequence: bool, mask: Tensor) -> float:
    """The all-process mean of a metric of the op (a local masked mean, or a mean over sequences)."""
    count = torch.tensor(float(mask.shape[0]), device=mask.device) if per_sequence else mask.sum().float()
    return _global_mean(trainer, value * count.clamp(min=1.0), count)


def _kept(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` where ``mask`` keeps the token, else 0: TRL multiplies by the mask, which lets NaN / inf at dropped
    positions through (0 · NaN = NaN)."""
    return torch.where(mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _trl_mean(trainer, x: Tensor, mask: Tensor) -> float:
    """TRL's all-process mean of a ``[B, T]`` metric over the mask, or of a ``[B, 1]`` one over the sequences."""
    if x.shape[1] == 1:
        return _global_mean(trainer, x.sum(), x.new_tensor(float(x.shape[0])))
    return _global_mean(trainer, _kept(x, mask).sum(), mask.sum())


def _log_metrics(trainer, mode, out, inputs, logps, entropies, advantages, mask) -> None:
    """TRL's metrics of the loss: ``kl``, ``entropy``, then ``clip_ratio/*``, ``cispo_clip_ratio`` or
    ``vespo/phi_seq_mean``, over all processes."""
    metrics = trainer._metrics[mode]
    if trainer.beta != 0.0:
        metrics["kl"].append(_op_metric(trainer, out.kl, False, mask))
    metrics["entropy"].append(_trl_mean(trainer, entropies, mask))
    old_logps = inputs.get("old_per_token_logps")
    if trainer.loss_type == "vespo":
        phi = _vespo_weights(trainer, logps, old_logps, inputs.get("importance_sampling_ratio"), advantages, mask)
        metrics["vespo/phi_seq_mean"].append(_trl_mean(trainer, phi, mask))
    # the op's clip ratios are means over sequences when the ratio and the advantage are per sequence
    per_sequence = trainer.importance_sampling_level == "sequence" and advantages.shape[1] == 1 < mask.shape[1]
    if trainer.loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(_op_metric(trainer, out.clip_ratio_high, per_sequence, mask))
    if trainer.loss_type not in _CLIPPED_LOSS_TYPES:
        return
    for name, value in (("low", out.clip_ratio_low), ("high", out.clip_ratio_high), ("region", out.clip_ratio_region)):
        metrics[f"clip_ratio/{name}_mean"].append(_op_metric(trainer, value, per_sequence, mask))
    low, high = _sequence_clip_fractions(trainer, logps, old_logps, advantages, mask)
    metrics["clip_ratio/low_min"].append(nanmin(trainer.accelerator.gather(low)).item())
    metrics["clip_ratio/high_max"].append(nanmax(trainer.accelerator.gather(high)).item())


@torch.no_grad()
def _vespo_weights(trainer, logps, old_logps, is_ratio, advantages, mask) -> Tensor:
    """VESPO's gamma weights φ (``[B, 1]``, or ``[B, T]`` for per-token advantages) for TRL's
    ``vespo/phi_seq_mean``, which the op does not report: :func:`grpo_kernels.reference.vespo_phi` of the clamped
    sequence log-weight (the summed log-ratios and log vLLM importance-sampling ratios), as the op forms it."""
    logps = logps.detach()
    log_ratio = logps - (logps if old_logps is None else old_logps)
    log_w = _kept(log_ratio.clamp(-VESPO_LOG_MAX, VESPO_LOG_MAX), mask).sum(-1, keepdim=True)
    if is_ratio is not None:
        log_w = log_w + _kept(torch.log(is_ratio).clamp(VESPO_LOG_MIN, VESPO_LOG_MAX), mask).sum(-1, keepdim=True)
    args = trainer.args
    return vespo_phi(log_w.clamp(VESPO_LOG_MIN, VESPO_LOG_MAX), advantages, args.vespo_k_pos, args.vespo_lambda_pos,
                     args.vespo_k_neg, args.vespo_lambda_neg)


def _sequence_clip_fractions(trainer, logps, old_logps, advantages, mask) -> tuple[Tensor, Tensor]:
    """Per sequence ``[B]``, the fraction of its tokens clipped low and high (NaN for a sequence without
    tokens); for TRL's ``clip_ratio/low_min`` and ``clip_ratio/high_max``, which the op does not report."""
    logps = logps.detach()
    log_ratio = logps - (logps if old_logps is None else old_logps)
    if trainer.importance_sampling_level == "sequence":
        log_ratio = _kept(log_ratio, mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    ratio = torch.exp(log_ratio)
    if trainer.args.delta is not None:
        ratio = ratio.clamp(max=trainer.args.delta)
    is_low = ((ratio < 1 - trainer.epsilon_low) & (advantages < 0)).float()
    is_high = ((ratio > 1 + trainer.epsilon_high) & (advantages > 0)).float()

    def per_sequence(x: Tensor) -> Tensor:
        return x.squeeze(1) if x.shape[1] == 1 else _kept(x, mask).sum(-1) / mask.sum(-1)

    return per_sequence(is_low), per_sequence(is_high)


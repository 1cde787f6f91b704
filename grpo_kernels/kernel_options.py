"""The loss options as every kernel backend sees them, decided once on the host.

:func:`kernel_loss_options` turns the keyword options of
:func:`grpo_kernels.reference.grpo_loss` into code-path switches (constexprs
of the Triton kernels, fields of the C++ ``LossConfig``) and float64 numbers
that the kernels round to their compute dtype, as PyTorch rounds a Python
scalar. It also carries what the aggregation needs (:mod:`grpo_kernels.aggregation`).
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Optional, Union

from torch import Tensor

from . import reference
from .aggregation import Aggregate, aggregate, sequence_weights
from .loss_table import (
    IMPORTANCE_SAMPLING_LEVELS,
    KERNEL_SCALARS,
    KL_ESTIMATORS,
    ROLLOUT_IS_GATES,
    ROLLOUT_IS_MODES,
    SCALAR_NAMES,
    Family,
    KlEstimator,
    RolloutGate,
    RolloutLevel,
    loss_type_row,
)

# The keyword options of the loss and their defaults, as named by the specification.
LOSS_DEFAULTS = {
    name: p.default for name, p in inspect.signature(reference.grpo_loss).parameters.items() if p.kind is p.KEYWORD_ONLY
}

# The numeric options as the kernels take them (grpo_kernels.loss_table.KERNEL_SCALARS), by name.
LossScalars = NamedTuple("LossScalars", [(name, float) for name in SCALAR_NAMES])


def code(table: dict, name: str, value):
    """``table[value]``, or a ValueError naming ``name`` and the values ``table`` knows."""
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name} must be one of {list(table)}, got {value!r}") from None


def needs_sequence_pass(options: dict) -> bool:
    """Whether a token's loss depends on a statistic of its whole sequence (a first pass over the sequence):
    the sequence-level ratio (GSPO), the loss types with their own sequence weights (VESPO, GMPO), the
    sequence-level rollout ratio, the off-policy mask. ``options``: keyword options of the reference
    ``grpo_loss`` (absent ones: defaults)."""
    o = {**LOSS_DEFAULTS, **options}
    return (o["importance_sampling_level"] == "sequence" or loss_type_row(o["loss_type"]).sequence_pass
            or code(ROLLOUT_IS_MODES, "rollout_is_mode", o["rollout_is_mode"]).level == RolloutLevel.SEQUENCE
            or o["off_policy_mask_threshold"] is not None)


class KernelLossOptions(NamedTuple):
    loss_type: str
    family: Family
    seq_level: bool  # importance_sampling_level == "sequence" (GSPO)
    seq_pass: bool  # a first pass over each sequence forms its statistics (needs_sequence_pass)
    shared_ratio: bool  # one ratio per sequence with a gradient: GSPO's c1 or GMPO's geometric-mean ratio
    kl_estimator: KlEstimator
    has_ref: bool  # ref_logprobs given: KL metric
    add_kl: bool  # ref_logprobs given and beta != 0: per-token loss += beta * KL
    bias_kl: bool  # use_bias_correction_kl: KL *= c1
    has_iw: bool  # importance_weights given
    has_delta: bool  # c1 <- min(c1, delta)
    has_clip_c: bool  # dual clip for A < 0
    per_seq_metrics: bool  # clip flags are per sequence (sequence level, per-sequence advantages, T != 1)
    has_sampling: bool  # sampling_logprobs given
    rollout_is: RolloutLevel  # where the rollout importance ratio is formed
    rollout_is_mask: bool  # masked (MIS) instead of truncated (TIS)
    rollout_is_gate: RolloutGate  # the statistic the rollout importance sampling bounds
    has_off_policy_mask: bool  # off_policy_mask_threshold given
    has_log_clamp: bool  # log_ratio_clamp given
    scalars: LossScalars  # the numeric options (grpo_kernels.loss_table.KERNEL_SCALARS)
    max_completion_length: Optional[int]
    num_items_in_batch: Optional[Union[int, float, Tensor]]

    def aggregate(self, partials: Tensor, T: int) -> Aggregate:
        """Loss and metrics from the per-sequence partials ``[NUM_PARTIALS, B]``."""
        return aggregate(partials, self.loss_type, T, has_ref=self.has_ref, per_seq_metrics=self.per_seq_metrics,
                         max_completion_length=self.max_completion_length,
                         num_items_in_batch=self.num_items_in_batch)

    def sequence_weights(self, seq_count: Tensor, T: int) -> Tensor:
        """``dL/dS_i`` as a contiguous ``[B]`` tensor, from the masked token counts ``[B]``."""
        weights = sequence_weights(seq_count, self.loss_type, T, max_completion_length=self.max_completion_length,
                                   num_items_in_batch=self.num_items_in_batch)
        return weights.expand(seq_count.shape[0]).contiguous()


def kernel_loss_options(T: int, advantages: Tensor, options: dict) -> KernelLossOptions:
    """The kernels' view of ``options`` (keyword options of the reference ``grpo_loss``; the absent ones
    take its defaults) for a ``[B, T]`` batch with ``advantages`` of shape ``[B]``, ``[B, 1]`` or ``[B, T]``."""
    o = {**LOSS_DEFAULTS, **options}
    row = loss_type_row(o["loss_type"])
    seq_level = code(dict(zip(IMPORTANCE_SAMPLING_LEVELS, (False, True))), "importance_sampling_level",
                     o["importance_sampling_level"])
    per_sequence_adv = advantages.ndim == 1 or advantages.shape[1] == 1
    rollout = code(ROLLOUT_IS_MODES, "rollout_is_mode", o["rollout_is_mode"])
    return KernelLossOptions(
        loss_type=o["loss_type"],
        family=row.family,
        seq_level=seq_level,
        seq_pass=needs_sequence_pass(o),
        shared_ratio=seq_level or row.family is Family.GMPO,
        kl_estimator=code(KL_ESTIMATORS, "kl_estimator", o["kl_estimator"]),
        has_ref=o["ref_logprobs"] is not None,
        add_kl=o["ref_logprobs"] is not None and o["beta"] != 0.0,
        bias_kl=bool(o["use_bias_correction_kl"]),
        has_iw=o["importance_weights"] is not None,
        has_delta=o["delta"] is not None,
        has_clip_c=o["clip_ratio_c"] is not None,
        # the reference's metric flags are [B, 1] then: a mean over sequences (unless T == 1)
        per_seq_metrics=seq_level and per_sequence_adv and T != 1,
        has_sampling=o["sampling_logprobs"] is not None,
        rollout_is=rollout.level,
        rollout_is_mask=rollout.mask,
        rollout_is_gate=code(ROLLOUT_IS_GATES, "rollout_is_gate", o["rollout_is_gate"]),
        has_off_policy_mask=o["off_policy_mask_threshold"] is not None,
        has_log_clamp=o["log_ratio_clamp"] is not None,
        scalars=LossScalars(*(scalar.value(o) for scalar in KERNEL_SCALARS)),
        max_completion_length=o["max_completion_length"],
        num_items_in_batch=o["num_items_in_batch"],
    )

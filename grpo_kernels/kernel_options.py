"""The loss options as every kernel backend sees them, decided once on the host.

:func:`kernel_loss_options` turns the keyword options of
:func:`grpo_kernels.reference.grpo_loss` into code-path switches (constexprs
of the Triton kernels, fields of the C++ ``LossConfig``) and float64 numbers
that the kernels round to their compute dtype, as PyTorch rounds a Python
scalar. It also carries what the aggregation needs (:mod:`grpo_kernels.aggregation`).
"""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple, Optional, Union

from torch import Tensor

from . import reference
from .aggregation import Aggregate, aggregate, sequence_weights

# The keyword options of the loss and their defaults, as named by the specification.
LOSS_DEFAULTS = {
    name: p.default for name, p in inspect.signature(reference.grpo_loss).parameters.items() if p.kind is p.KEYWORD_ONLY
}

# loss_type -> kernel family: 0 clipped ratio (grpo, bnpo, dr_grpo, dapo, luspo), 1 cispo, 2 sapo, 3 vespo,
# 4 gmpo, 5 gpg
FAMILIES = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2, "vespo": 3, "gmpo": 4,
            "gpg": 5}
KL_ESTIMATOR_CODES = {"k3": 0, "k1": 1, "k2": 2, "low_var_kl": 3}
# rollout_is_mode -> (level: 0 none, 1 token, 2 sequence; mask instead of truncate)
ROLLOUT_IS_CODES = {None: (0, False), "token_truncate": (1, False), "token_mask": (1, True),
                    "sequence_truncate": (2, False), "sequence_mask": (2, True)}


def code(table: dict, name: str, value):
    """``table[value]``, or a ValueError naming ``name`` and the values ``table`` knows."""
    try:
        return table[value]
    except (KeyError, TypeError):
        raise ValueError(f"{name} must be one of {list(table)}, got {value!r}") from None


def needs_sequence_pass(options: dict) -> bool:
    """Whether a token's loss depends on a statistic of its whole sequence (a first pass over the sequence):
    the sequence-level ratio (GSPO), VESPO's and GMPO's sequence weights, the sequence-level rollout ratio,
    the off-policy mask. ``options``: keyword options of the reference ``grpo_loss`` (absent ones: defaults)."""
    o = {**LOSS_DEFAULTS, **options}
    return (o["importance_sampling_level"] == "sequence" or o["loss_type"] in ("vespo", "gmpo")
            or code(ROLLOUT_IS_CODES, "rollout_is_mode", o["rollout_is_mode"])[0] == 2
            or o["off_policy_mask_threshold"] is not None)


class KernelLossOptions(NamedTuple):
    loss_type: str
    family: int
    seq_level: bool  # importance_sampling_level == "sequence" (GSPO)
    seq_pass: bool  # a first pass over each sequence forms its statistics (needs_sequence_pass)
    shared_ratio: bool  # one ratio per sequence with a gradient: GSPO's c1 or GMPO's geometric-mean ratio
    kl_estimator: int
    has_ref: bool  # ref_logprobs given: KL metric
    add_kl: bool  # ref_logprobs given and beta != 0: per-token loss += beta * KL
    bias_kl: bool  # use_bias_correction_kl: KL *= c1
    has_iw: bool  # importance_weights given
    has_delta: bool  # c1 <- min(c1, delta)
    has_clip_c: bool  # dual clip for A < 0
    per_seq_metrics: bool  # clip flags are per sequence (sequence level, per-sequence advantages, T != 1)
    has_sampling: bool  # sampling_logprobs given
    rollout_is: int  # rollout importance sampling: 0 none, 1 token level, 2 sequence level
    rollout_is_mask: bool  # masked (MIS) instead of truncated (TIS)
    has_off_policy_mask: bool  # off_policy_mask_threshold given
    has_log_clamp: bool  # log_ratio_clamp given
    lo: float  # 1 - epsilon_low
    hi: float  # 1 + epsilon_high
    eps_high: float  # epsilon_high (cispo's absolute cap)
    delta: float
    clip_c: float
    beta: float
    tau_pos: float  # SAPO temperatures
    tau_neg: float
    eps_low: float  # epsilon_low (GMPO's log-space clip range is [-eps_low, eps_high])
    is_min: float  # rollout_is_min, -inf when None
    is_max: float  # rollout_is_max, +inf when None
    off_policy_threshold: float
    k_pos: float  # VESPO
    lambda_pos: float  # at least 1e-4, as TRL clamps it
    k_neg: float
    lambda_neg: float
    log_clamp: float  # log_ratio_clamp
    max_completion_length: Optional[int]
    num_items_in_batch: Optional[Union[int, float, Tensor]]

    @property
    def scalars(self) -> tuple[float, ...]:
        """The numeric options in kernel-argument order (:data:`SCALAR_NAMES`)."""
        return tuple(getattr(self, name) for name in SCALAR_NAMES)

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


# The numeric options, in the order of the kernels' scalar arguments.
SCALAR_NAMES = ("lo", "hi", "eps_high", "delta", "clip_c", "beta", "tau_pos", "tau_neg", "eps_low", "is_min", "is_max",
                "off_policy_threshold", "k_pos", "lambda_pos", "k_neg", "lambda_neg", "log_clamp")


def kernel_loss_options(T: int, advantages: Tensor, options: dict) -> KernelLossOptions:
    """The kernels' view of ``options`` (keyword options of the reference ``grpo_loss``; the absent ones
    take its defaults) for a ``[B, T]`` batch with ``advantages`` of shape ``[B]``, ``[B, 1]`` or ``[B, T]``."""
    o = {**LOSS_DEFAULTS, **options}
    eps_high = o["epsilon_low"] if o["epsilon_high"] is None else o["epsilon_high"]
    seq_level = code({"token": False, "sequence": True}, "importance_sampling_level", o["importance_sampling_level"])
    per_sequence_adv = advantages.ndim == 1 or advantages.shape[1] == 1
    rollout_is, rollout_is_mask = code(ROLLOUT_IS_CODES, "rollout_is_mode", o["rollout_is_mode"])
    return KernelLossOptions(
        loss_type=o["loss_type"],
        family=code(FAMILIES, "loss_type", o["loss_type"]),
        seq_level=seq_level,
        seq_pass=needs_sequence_pass(o),
        shared_ratio=seq_level or o["loss_type"] == "gmpo",
        kl_estimator=code(KL_ESTIMATOR_CODES, "kl_estimator", o["kl_estimator"]),
        has_ref=o["ref_logprobs"] is not None,
        add_kl=o["ref_logprobs"] is not None and o["beta"] != 0.0,
        bias_kl=bool(o["use_bias_correction_kl"]),
        has_iw=o["importance_weights"] is not None,
        has_delta=o["delta"] is not None,
        has_clip_c=o["clip_ratio_c"] is not None,
        # the reference's metric flags are [B, 1] then: a mean over sequences (unless T == 1)
        per_seq_metrics=seq_level and per_sequence_adv and T != 1,
        has_sampling=o["sampling_logprobs"] is not None,
        rollout_is=rollout_is,
        rollout_is_mask=rollout_is_mask,
        has_off_policy_mask=o["off_policy_mask_threshold"] is not None,
        has_log_clamp=o["log_ratio_clamp"] is not None,
        lo=float(1 - o["epsilon_low"]),
        hi=float(1 + eps_high),
        eps_high=float(eps_high),
        delta=0.0 if o["delta"] is None else float(o["delta"]),
        clip_c=0.0 if o["clip_ratio_c"] is None else float(o["clip_ratio_c"]),
        beta=float(o["beta"]),
        tau_pos=float(o["sapo_temperature_pos"]),
        tau_neg=float(o["sapo_temperature_neg"]),
        eps_low=float(o["epsilon_low"]),
        is_min=-math.inf if o["rollout_is_min"] is None else float(o["rollout_is_min"]),
        is_max=math.inf if o["rollout_is_max"] is None else float(o["rollout_is_max"]),
        off_policy_threshold=0.0 if o["off_policy_mask_threshold"] is None else float(o["off_policy_mask_threshold"]),
        k_pos=float(o["vespo_k_pos"]),
        lambda_pos=max(float(o["vespo_lambda_pos"]), reference.VESPO_MIN_LAMBDA),
        k_neg=float(o["vespo_k_neg"]),
        lambda_neg=max(float(o["vespo_lambda_neg"]), reference.VESPO_MIN_LAMBDA),
        log_clamp=0.0 if o["log_ratio_clamp"] is None else float(o["log_ratio_clamp"]),
        max_completion_length=o["max_completion_length"],
        num_items_in_batch=o["num_items_in_batch"],
    )

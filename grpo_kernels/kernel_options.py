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

# The keyword options of the loss and their defaults, as named by the specification.
LOSS_DEFAULTS = {
    name: p.default for name, p in inspect.signature(reference.grpo_loss).parameters.items() if p.kind is p.KEYWORD_ONLY
}

# loss_type -> kernel family: 0 clipped ratio (grpo, bnpo, dr_grpo, dapo, luspo), 1 cispo, 2 sapo
FAMILIES = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2}
KL_ESTIMATOR_CODES = {"k3": 0, "k1": 1, "k2": 2, "low_var_kl": 3}


class KernelLossOptions(NamedTuple):
    loss_type: str
    family: int
    seq_level: bool  # importance_sampling_level == "sequence" (GSPO)
    kl_estimator: int
    has_ref: bool  # ref_logprobs given: KL metric
    add_kl: bool  # ref_logprobs given and beta != 0: per-token loss += beta * KL
    bias_kl: bool  # use_bias_correction_kl: KL *= c1
    has_iw: bool  # importance_weights given
    has_delta: bool  # c1 <- min(c1, delta)
    has_clip_c: bool  # dual clip for A < 0
    per_seq_metrics: bool  # clip flags are per sequence (sequence level, per-sequence advantages, T != 1)
    lo: float  # 1 - epsilon_low
    hi: float  # 1 + epsilon_high
    eps_high: float  # epsilon_high (cispo's absolute cap)
    delta: float
    clip_c: float
    beta: float
    tau_pos: float  # SAPO temperatures
    tau_neg: float
    max_completion_length: Optional[int]
    num_items_in_batch: Optional[Union[int, float, Tensor]]

    @property
    def scalars(self) -> tuple[float, ...]:
        """The numeric options in kernel-argument order: lo, hi, eps_high, delta, clip_c, beta, tau_pos, tau_neg."""
        return (self.lo, self.hi, self.eps_high, self.delta, self.clip_c, self.beta, self.tau_pos, self.tau_neg)

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
    eps_high = o["epsilon_low"] if o["epsilon_high"] is None else o["epsilon_high"]
    seq_level = o["importance_sampling_level"] == "sequence"
    per_sequence_adv = advantages.ndim == 1 or advantages.shape[1] == 1
    return KernelLossOptions(
        loss_type=o["loss_type"],
        family=FAMILIES[o["loss_type"]],
        seq_level=seq_level,
        kl_estimator=KL_ESTIMATOR_CODES[o["kl_estimator"]],
        has_ref=o["ref_logprobs"] is not None,
        add_kl=o["ref_logprobs"] is not None and o["beta"] != 0.0,
        bias_kl=bool(o["use_bias_correction_kl"]),
        has_iw=o["importance_weights"] is not None,
        has_delta=o["delta"] is not None,
        has_clip_c=o["clip_ratio_c"] is not None,
        # the reference's metric flags are [B, 1] then: a mean over sequences (unless T == 1)
        per_seq_metrics=seq_level and per_sequence_adv and T != 1,
        lo=float(1 - o["epsilon_low"]),
        hi=float(1 + eps_high),
        eps_high=float(eps_high),
        delta=0.0 if o["delta"] is None else float(o["delta"]),
        clip_c=0.0 if o["clip_ratio_c"] is None else float(o["clip_ratio_c"]),
        beta=float(o["beta"]),
        tau_pos=float(o["sapo_temperature_pos"]),
        tau_neg=float(o["sapo_temperature_neg"]),
        max_completion_length=o["max_completion_length"],
        num_items_in_batch=o["num_items_in_batch"],
    )

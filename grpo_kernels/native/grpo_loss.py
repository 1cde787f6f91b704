"""``grpo_loss`` over the extension's kernels, with exactly the numbers of
:func:`grpo_kernels.reference.grpo_loss` (formulas in its docstring).

``grpo_loss_fwd`` writes the per-token loss ``[B, T]`` and per-sequence
partials ``[7, B]``; the scalar loss and metrics come from them through
:mod:`grpo_kernels.aggregation` (torch ops on the device, no host sync).
``grpo_loss_bwd`` writes ``d loss / d logprobs``.

Gradients: only ``loss`` is differentiable, and only w.r.t. ``logprobs``;
``per_token_loss``, ``kl`` and the clip metrics come without gradient, and
``old_logprobs``, ``ref_logprobs``, ``advantages`` and ``importance_weights``
are constants (as in the Triton backend).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._extension import _C
from ..aggregation import P_COUNT, Aggregate, aggregate, sequence_weights
from ..reference import GRPOLossOutput

_FAMILY = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2}
_KL_ESTIMATORS = {"k3": 0, "k1": 1, "k2": 2, "low_var_kl": 3}


class LossSetup(NamedTuple):
    """What the kernels and the aggregation need to know of the loss options."""

    cfg: object  # _C.LossConfig
    loss_type: str
    has_ref: bool
    max_completion_length: Optional[int]
    num_items_in_batch: Optional[Union[int, float, Tensor]]

    def aggregate(self, partials: Tensor, T: int) -> Aggregate:
        """Loss and metrics from the per-sequence partials."""
        return aggregate(partials, self.loss_type, T, has_ref=self.has_ref, per_seq_metrics=self.cfg.per_seq_metrics,
                         max_completion_length=self.max_completion_length,
                         num_items_in_batch=self.num_items_in_batch)

    def sequence_weights(self, seq_count: Tensor, T: int) -> Tensor:
        """``dL/dS_i`` as a contiguous ``[B]`` tensor."""
        weights = sequence_weights(seq_count, self.loss_type, T, max_completion_length=self.max_completion_length,
                                   num_items_in_batch=self.num_items_in_batch)
        return weights.expand(seq_count.shape[0]).contiguous()


def loss_setup(
    advantages: Tensor,
    T: int,
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
) -> LossSetup:
    """The kernel configuration of the keyword options of :func:`grpo_kernels.reference.grpo_loss`."""
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    seq_level = importance_sampling_level == "sequence"
    cfg = _C.LossConfig()
    cfg.family = _FAMILY[loss_type]
    cfg.seq_level = seq_level
    cfg.kl_estimator = _KL_ESTIMATORS[kl_estimator]
    cfg.add_kl = ref_logprobs is not None and beta != 0.0
    cfg.bias_kl = bool(use_bias_correction_kl)
    cfg.has_delta = delta is not None
    cfg.has_clip_c = clip_ratio_c is not None
    # the reference's clip flags are [B, 1] then: a mean over sequences (unless T == 1)
    cfg.per_seq_metrics = seq_level and (advantages.ndim == 1 or advantages.shape[1] == 1) and T != 1
    cfg.lo, cfg.hi, cfg.eps_high = 1 - epsilon_low, 1 + eps_high, eps_high
    cfg.delta = 0.0 if delta is None else delta
    cfg.clip_c = 0.0 if clip_ratio_c is None else clip_ratio_c
    cfg.beta, cfg.tau_pos, cfg.tau_neg = beta, sapo_temperature_pos, sapo_temperature_neg
    return LossSetup(cfg, loss_type, ref_logprobs is not None, max_completion_length, num_items_in_batch)


def compute_dtype(t: Tensor) -> torch.dtype:
    """The kernels' compute dtype for a main input ``t``: float64 for float64, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def loss_tensors(dtype: torch.dtype, shape: torch.Size, *tensors: Optional[Tensor]) -> tuple:
    """``tensors`` as the kernels' ``[B, T]`` inputs: ``dtype``, broadcast views of ``[B]``/``[B, 1]``, no grad."""

    def as_bt(t: Optional[Tensor]) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.detach().to(dtype)
        return (t[:, None] if t.ndim == 1 else t).expand(shape)

    return tuple(as_bt(t) for t in tensors)


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, iw, setup: LossSetup):
        T = logp.shape[1]
        tensors = loss_tensors(compute_dtype(logp), logp.shape, logp, old, ref, adv, mask, iw)
        per_token_loss, partials = _C.grpo_loss_fwd(*tensors, setup.cfg)
        loss, kl, low, high, region = setup.aggregate(partials, T)
        ctx.setup = setup
        ctx.logp_dtype = logp.dtype
        ctx.save_for_backward(*tensors, partials)
        ctx.mark_non_differentiable(per_token_loss, kl, low, high, region)
        return loss, per_token_loss, kl, low, high, region

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *_unused):
        grad_logp = None
        if ctx.needs_input_grad[0] and grad_loss is not None:
            *tensors, partials = ctx.saved_tensors
            T = tensors[0].shape[1]
            seq_grad = grad_loss.to(partials.dtype) * ctx.setup.sequence_weights(partials[P_COUNT], T)
            grad_logp = _C.grpo_loss_bwd(*tensors, partials, seq_grad, ctx.setup.cfg).to(ctx.logp_dtype)
        return grad_logp, None, None, None, None, None, None


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
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.grpo_loss` with the extension's kernels (inputs already validated).

    Only ``loss`` is differentiable (w.r.t. ``logprobs``); ``per_token_loss``,
    ``kl`` and the clip metrics come without gradient.
    """
    setup = loss_setup(
        advantages, logprobs.shape[1], ref_logprobs=ref_logprobs, beta=beta, epsilon_low=epsilon_low,
        epsilon_high=epsilon_high, delta=delta, clip_ratio_c=clip_ratio_c, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, kl_estimator=kl_estimator,
        use_bias_correction_kl=use_bias_correction_kl, importance_weights=importance_weights,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
    )
    loss, per_token_loss, kl, low, high, region = _GRPOLossFunction.apply(
        logprobs, old_logprobs, ref_logprobs, advantages, mask, importance_weights, setup
    )
    return GRPOLossOutput(loss=loss, per_token_loss=per_token_loss, kl=kl if setup.has_ref else None,
                          clip_ratio_low=low, clip_ratio_high=high, clip_ratio_region=region)

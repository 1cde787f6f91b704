"""``grpo_loss`` over the extension's kernels, with exactly the numbers of
:func:`grpo_kernels.reference.grpo_loss` (formulas in its docstring).

CPU tensors: one call of ``_C.grpo_loss`` (``csrc/cpu/grpo_loss_host.h``) converts the inputs, runs
``grpo_loss_fwd_grad`` — the per-token loss, the per-sequence partials and, when ``logprobs`` requires grad,
``d S_i / d logp`` from the same evaluation of the token terms — and aggregates the partials into the loss,
the metrics and the weights ``dL/dS_i`` in C++; the loss's autograd node is a C++ one whose backward is one
scaling (``grpo_loss_backward``). A call whose options passed validation before comes through
``grpo_loss_checked``: the checks of its tensors in the same C++ call (``_C.grpo_loss_checked``), Python
validation only where they fail, to name the problem.

Other devices: ``grpo_loss_fwd`` writes the per-token loss ``[B, T]`` and per-sequence
partials ``[NUM_PARTIALS, B]``; the scalar loss and metrics come from them through
:mod:`grpo_kernels.aggregation` (torch ops on the device, no host sync).
``grpo_loss_bwd`` writes ``d loss / d logprobs``.

Gradients: only ``loss`` is differentiable, and only w.r.t. ``logprobs``;
``per_token_loss``, ``kl`` and the clip metrics come without gradient, and
``old_logprobs``, ``ref_logprobs``, ``advantages``, ``importance_weights`` and
``sampling_logprobs`` are constants (as in the Triton backend).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._extension import _C
from ..aggregation import P_COUNT, kernel_rule
from ..kernel_options import KernelLossOptions, kernel_loss_options
from ..reference import GRPOLossOutput
from ..validation import loss_options_key


class LossSetup(NamedTuple):
    """The loss options for the C++ kernels (``cfg``, a ``_C.LossConfig``), the aggregation (``options``) and,
    for the CPU host code, the aggregation as a ``_C.LossAggregation``."""

    cfg: object
    options: KernelLossOptions
    aggregation: object


def loss_setup(advantages: Tensor, T: int, loss_options: dict, options_key: Optional[tuple] = None) -> LossSetup:
    """The kernel configuration of ``loss_options``, the keyword options of the reference ``grpo_loss``
    (memoized: the same options at the same T give the same setup; a tensor ``num_items_in_batch`` is taken
    at each call, and read on the host for CPU ``advantages``). ``options_key``: the options'
    ``validation.loss_options_key`` when the caller has it; by default worked out here."""
    key = _setup_key(advantages, T, loss_options_key(loss_options) if options_key is None else options_key)
    setup = _SETUPS.get(key) if key is not None else None
    num_items = loss_options.get("num_items_in_batch")
    if setup is None:
        options = kernel_loss_options(T, advantages, loss_options)
        cfg = _C.LossConfig(options.scalars)  # the numeric options in loss_table.KERNEL_SCALARS order
        for field in _CONFIG_FIELDS:
            setattr(cfg, field, getattr(options, field))
        if isinstance(num_items, Tensor):  # taken at each call, not kept
            setup = LossSetup(cfg, options._replace(num_items_in_batch=None), None)
        else:
            setup = LossSetup(cfg, options, _aggregation(options, T))
        if key is not None:
            if len(_SETUPS) >= _MAX_SETUPS:
                _SETUPS.clear()
            _SETUPS[key] = setup
    if isinstance(num_items, Tensor):  # this call's value
        options = setup.options._replace(num_items_in_batch=num_items)
        setup = LossSetup(setup.cfg, options, _aggregation(options, T) if advantages.device.type == "cpu" else None)
    return setup


_SETUPS: dict = {}
_MAX_SETUPS = 64


def _setup_key(advantages: Tensor, T: int, options_key: Optional[tuple]) -> Optional[tuple]:
    """What the setup depends on: T, whether advantages are per sequence, the options' key (None: not
    memoized)."""
    return None if options_key is None else (T, advantages.ndim == 1 or advantages.shape[1] == 1, options_key)


def _aggregation(options: KernelLossOptions, T: int):
    """``_C.LossAggregation`` of the options (a tensor num_items_in_batch is read on the host)."""
    return _C.LossAggregation(*kernel_rule(options.loss_type, T, max_completion_length=options.max_completion_length,
                                           num_items_in_batch=options.num_items_in_batch))


# The code paths of _C.LossConfig (csrc/common/loss_config.h), named as in KernelLossOptions; the enums
# (family, kl_estimator, rollout_is, rollout_is_gate) go as their int codes, checked by the extension.
_CONFIG_FIELDS = ("family", "seq_level", "seq_pass", "shared_ratio", "kl_estimator", "add_kl", "bias_kl", "has_delta",
                  "has_clip_c", "per_seq_metrics", "has_iw", "rollout_is", "rollout_is_mask", "rollout_is_gate",
                  "has_off_policy_mask", "has_log_clamp")


def compute_dtype(t: Tensor) -> torch.dtype:
    """The kernels' compute dtype for a main input ``t``: float64 for float64, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def loss_tensors(dtype: torch.dtype, shape: torch.Size, *tensors: Optional[Tensor]) -> tuple:
    """``tensors`` as the kernels' ``[B, T]`` inputs: ``dtype``, broadcast views of ``[B]``/``[B, 1]`` (called
    inside an autograd Function's forward, or on constants: no autograd history is recorded)."""
    return tuple(None if t is None else _as_bt(t, dtype, shape) for t in tensors)


def _as_bt(t: Tensor, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.ndim == 1:
        t = t.unsqueeze(1)
    return t if t.shape == shape else t.expand(shape)


def kernel_mask(mask: Tensor, dtype: torch.dtype, shape: torch.Size) -> Tensor:
    """The mask as ``grpo_loss_fwd`` / ``_bwd`` take it: a CPU bool mask as is (the CPU kernels read its
    bytes), else in the compute dtype ``dtype``."""
    if mask.dtype == torch.bool and mask.device.type == "cpu":
        return mask
    return _as_bt(mask, dtype, shape)


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, ref, adv, mask, iw, sampling, setup: LossSetup):
        T = logp.shape[1]
        dtype = compute_dtype(logp)
        tensors = loss_tensors(dtype, logp.shape, logp, old, ref, adv)
        tensors += (kernel_mask(mask, dtype, logp.shape),) + loss_tensors(dtype, logp.shape, iw, sampling)
        per_token_loss, partials = _C.grpo_loss_fwd(*tensors, setup.cfg)
        loss, kl, low, high, region = setup.options.aggregate(partials, T)
        ctx.setup = setup
        ctx.logp_dtype = logp.dtype
        ctx.set_materialize_grads(False)  # only loss has a gradient: no zeros for the other outputs
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
            seq_grad = grad_loss.to(partials.dtype) * ctx.setup.options.sequence_weights(partials[P_COUNT], T)
            grad_logp = _C.grpo_loss_bwd(*tensors, partials, seq_grad, ctx.setup.cfg)
            if grad_logp.dtype != ctx.logp_dtype:
                grad_logp = grad_logp.to(ctx.logp_dtype)
        return grad_logp, None, None, None, None, None, None, None


def grpo_loss_checked(logprobs: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor, mask: Tensor,
                      loss_options: dict, options_key: tuple) -> Optional[GRPOLossOutput]:
    """:func:`grpo_loss` on CPU tensors whose checks are done here, in C++ (``_C.grpo_loss_checked``: the
    tensor checks of :mod:`grpo_kernels.validation`), for ``loss_options`` (every one given) that passed
    validation, ``options_key`` being what validation read of them (``validation.grpo_loss_call_key``: it keys
    the setup too); None, before any kernel, where an input does not pass them (the caller then validates it)."""
    if (logprobs.__class__ is not Tensor or advantages.__class__ is not Tensor or not logprobs.is_cpu
            or logprobs.ndim != 2 or advantages.ndim not in (1, 2)
            or loss_options["num_items_in_batch"].__class__ is Tensor):
        return None
    T = logprobs.shape[1]
    setup = loss_setup(advantages, T, loss_options, options_key)  # the call key is loss_options_key's here
    get = loss_options.get
    outputs = _C.grpo_loss_checked(logprobs, old_logprobs, get("ref_logprobs"), advantages, mask,
                                   get("importance_weights"), get("sampling_logprobs"), setup.cfg, setup.aggregation,
                                   get("loss_type") == "vespo")
    if outputs is None:
        return None
    loss, per_token_loss, kl, low, high, region = outputs
    return GRPOLossOutput(loss=loss, per_token_loss=per_token_loss, kl=kl if setup.options.has_ref else None,
                          clip_ratio_low=low, clip_ratio_high=high, clip_ratio_region=region)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    **loss_options,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.grpo_loss` with the extension's kernels (inputs already validated);
    ``loss_options`` are its keyword options (absent ones take its defaults).

    Only ``loss`` is differentiable (w.r.t. ``logprobs``); ``per_token_loss``,
    ``kl`` and the clip metrics come without gradient.
    """
    setup = loss_setup(advantages, logprobs.shape[1], loss_options)
    get = loss_options.get
    ref, iw, sampling = get("ref_logprobs"), get("importance_weights"), get("sampling_logprobs")
    if logprobs.device.type == "cpu":
        loss, per_token_loss, kl, low, high, region = _C.grpo_loss(logprobs, old_logprobs, ref, advantages, mask, iw,
                                                                   sampling, setup.cfg, setup.aggregation)
    else:
        loss, per_token_loss, kl, low, high, region = _GRPOLossFunction.apply(
            logprobs, old_logprobs, ref, advantages, mask, iw, sampling, setup)
    return GRPOLossOutput(loss=loss, per_token_loss=per_token_loss, kl=kl if setup.options.has_ref else None,
                          clip_ratio_low=low, clip_ratio_high=high, clip_ratio_region=region)

"""``fused_grpo_loss`` over the extension's kernels: logits → log-probs → loss,
with ``d loss / d logits`` formed in the forward.

The loss is a scalar and, without a sequence pass (token-level ratios), each token's
weight ``w = d loss / d logp`` is known as soon as its ``logp`` is (the
sequence weights ``dL/dS_i`` of :func:`grpo_kernels.aggregation.sequence_weights`
depend on the mask only): ``fused_grpo_loss_fwd`` reads each row of logits
once, exponentiates it once, and writes the row of ``w (onehot_y - p) / T``.
With a sequence pass (GSPO, VESPO, GMPO, the sequence-level rollout ratio, the off-policy mask:
:func:`grpo_kernels.kernel_options.needs_sequence_pass`) a token's weight depends on the whole
sequence's log-probs; a rollout gate other than the ratio (``rollout_is_gate``) is kept out of the
single-pass kernels (its statistic would spill the CUDA kernel's registers). The forward then runs
the ``token_logprobs`` forward, the loss forward and backward on ``[B, T]``, and the ``token_logprobs``
backward. The autograd backward only scales the gradient by the incoming
scalar, in place (not at all when it is 1; after an in-place scaling a second
backward through the same graph is refused). Peak extra memory: one
logits-sized buffer, none with ``inplace_backward``.

``inplace_backward=True`` writes the gradient into the logits buffer during the
forward (``logits`` must not be used afterwards). With ``return_entropy=True``
the entropy metric stays differentiable: its gradient (an entropy bonus) is
formed in the backward, on demand, from the logits and the saved statistics,
so not after ``inplace_backward=True``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._extension import _C
from ..aggregation import P_COUNT
from ..loss_table import RolloutGate
from ..precomputed_gradient import check_backward
from ..reference import GRPOLossOutput, fused_loss_mask, kept_ids, masked_mean_entropy
from .grpo_loss import LossSetup, compute_dtype, loss_setup, loss_tensors
from .token_logprobs import kernel_logits, kernel_temperature, writable_rows


def _forward_sequence_level(logits: Tensor, token_ids: Tensor, tensors: tuple, setup: LossSetup, temperature: float,
                            row_t: Optional[Tensor], ignore_index: int, return_entropy: bool, compute_grad: bool,
                            inplace: bool) -> tuple:
    """Log-probs first, then the loss and its weights, then the logits gradient (two passes over the logits)."""
    B, T = token_ids.shape
    logp, lse, entropy = _C.token_logprobs_fwd(logits, token_ids, temperature, ignore_index, return_entropy,
                                               row_temperature=row_t)
    logp = logp.view(B, T)
    old, ref, adv, keep, iw, sampling = tensors
    per_token_loss, partials = _C.grpo_loss_fwd(logp, old, ref, adv, keep, iw, sampling, setup.cfg)
    grad = None
    if compute_grad:
        seq_weight = setup.options.sequence_weights(partials[P_COUNT], T)
        grad_logp = _C.grpo_loss_bwd(logp, old, ref, adv, keep, iw, sampling, partials, seq_weight, setup.cfg)
        grad = _C.token_logprobs_bwd(logits, token_ids, lse, grad_logp, None, None, temperature, ignore_index,
                                     inplace, row_temperature=row_t)
    return logp, lse, entropy, per_token_loss, partials, grad


class _FusedGRPOLossFunction(torch.autograd.Function):
    """``(logits, token_ids, old_logprobs, advantages, mask, options)`` → loss, metrics; d logits precomputed."""

    @staticmethod
    def forward(ctx, logits, token_ids, old_logprobs, advantages, mask, options):
        temperature, ignore_index, return_entropy, inplace_backward, loss_options = options
        B, T = token_ids.shape
        temperature, row_t = kernel_temperature(temperature, (B, T))
        compute_grad = ctx.needs_input_grad[0]
        inplace = compute_grad and inplace_backward and writable_rows(logits)
        setup = loss_setup(advantages, T, loss_options)
        keep = fused_loss_mask(mask, token_ids, ignore_index)
        # masked rows read as ignored: the kernels never read their logits and write zeros as their gradient
        token_ids = kept_ids(token_ids, keep, ignore_index)
        tensors = loss_tensors(compute_dtype(logits), token_ids.shape, old_logprobs, loss_options.get("ref_logprobs"),
                               advantages, keep, loss_options.get("importance_weights"),
                               loss_options.get("sampling_logprobs"))
        if setup.cfg.seq_pass or setup.options.rollout_is_gate != RolloutGate.RATIO:
            logp, lse, entropy, per_token_loss, partials, grad = _forward_sequence_level(
                logits, token_ids, tensors, setup, temperature, row_t, ignore_index, return_entropy, compute_grad,
                inplace)
        else:
            old, ref, adv, keep_t, iw, sampling = tensors
            seq_weight = setup.options.sequence_weights(keep_t.sum(-1), T)
            logp, lse, entropy, per_token_loss, partials, grad = _C.fused_grpo_loss_fwd(
                logits, token_ids, old, ref, adv, keep_t, iw, sampling, seq_weight, setup.cfg, temperature,
                ignore_index, return_entropy, compute_grad, inplace, row_temperature=row_t)
            grad = grad if compute_grad else None
        if inplace:  # the logits now hold their gradient: fail loudly if anything else saved them for its backward
            torch.autograd.graph.increment_version(logits)
        loss, kl, low, high, region = setup.options.aggregate(partials, T)

        entropy_metric = loss.new_zeros(())
        ctx.entropy_graph = None
        if return_entropy:
            with torch.enable_grad():
                row_entropy = entropy.view(B, T).requires_grad_(compute_grad)
                metric = masked_mean_entropy(row_entropy, keep)
            entropy_metric = metric.detach()
            if compute_grad:  # for an entropy bonus: d metric / d H per row, then the logits gradient kernel
                ctx.entropy_graph = (row_entropy, metric)
        # Saved, not a ctx attribute: after a backward without retain_graph autograd drops its reference,
        # so the gradient passed on can be taken over without a copy (e.g. by AccumulateGrad).
        stats = ctx.entropy_graph is not None and not inplace
        ctx.save_for_backward(grad, *((logits, token_ids, lse, entropy) if stats else (None,) * 4))
        ctx.set_materialize_grads(False)
        ctx.options = (temperature, row_t, ignore_index)
        ctx.inplace = inplace
        ctx.consumed = False
        ctx.mark_non_differentiable(per_token_loss, kl, low, high, region)
        return loss, per_token_loss, kl, low, high, region, entropy_metric

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _ptl, _kl, _low, _high, _region, grad_entropy):
        if ctx.entropy_graph is None:
            grad_entropy = None
        if not ctx.needs_input_grad[0] or (grad_loss is None and grad_entropy is None):
            return (None,) * 6
        check_backward(consumed=ctx.consumed, inplace=ctx.inplace, entropy_gradient=grad_entropy is not None)
        grad, logits, token_ids, lse, entropy = ctx.saved_tensors
        entropy_grad = None
        if grad_entropy is not None:
            row_entropy, metric = ctx.entropy_graph
            (grad_h,) = torch.autograd.grad(metric, row_entropy, grad_entropy, retain_graph=True)
            temperature, row_t, ignore_index = ctx.options
            entropy_grad = _C.token_logprobs_bwd(logits, token_ids, lse, None, entropy, grad_h, temperature,
                                                 ignore_index, False, row_temperature=row_t)
        if grad_loss is None:  # only the entropy metric has a gradient: the loss gradient stays as it is
            return entropy_grad, None, None, None, None, None
        if torch.compiler.is_compiling() or not bool(grad_loss == 1):
            grad.mul_(grad_loss.to(grad.dtype))  # in place: no logits-sized allocation
            ctx.consumed = True
        if entropy_grad is not None:
            grad.add_(entropy_grad)
            ctx.consumed = True
        return grad, None, None, None, None, None


def fused_grpo_loss(
    logits: Tensor,
    token_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: Union[float, Tensor] = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    **loss_options,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.fused_grpo_loss` with the extension's kernels (inputs already validated).

    ``loss`` is differentiable w.r.t. ``logits`` (its gradient is computed in
    the forward), and so is ``entropy`` with ``return_entropy=True``;
    ``per_token_loss``, ``kl`` and the clip metrics come without gradient.
    ``inplace_backward=True``: see the module docstring.
    """
    temperature = temperature if isinstance(temperature, Tensor) else float(temperature)
    options = (temperature, int(ignore_index), bool(return_entropy), bool(inplace_backward), loss_options)
    loss, per_token_loss, kl, low, high, region, entropy = _FusedGRPOLossFunction.apply(
        kernel_logits(logits), token_ids, old_logprobs, advantages, mask, options
    )
    return GRPOLossOutput(
        loss=loss,
        per_token_loss=per_token_loss,
        kl=kl if loss_options.get("ref_logprobs") is not None else None,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_region=region,
        entropy=entropy if return_entropy else None,
    )

"""Triton ``fused_grpo_loss``: logits → log-probs → loss, with the logits gradient formed in the forward.

The loss is a scalar, so its gradient w.r.t. the logits is known as soon as the
forward has run: ``d loss / d logits = w ⊙ (onehot_y − softmax(z)) / T`` with
the per-token weights ``w = d loss / d logp``. The forward therefore runs

1. the ``token_logprobs`` forward kernel (one read of the logits; saves ``lse``),
2. the ``grpo_loss`` forward and backward kernels on the ``[B, T]`` log-probs
   (tiny: ``w`` for every token, for the incoming gradient 1),
3. the ``token_logprobs`` backward kernel (one read + one write of the logits),

and the autograd backward only scales that gradient by the incoming scalar.
Logits traffic: two reads + one write, and no work at all in the backward; the
single-pass kernel that keeps each row on chip between the two reads (one
read + one write, the floor) is the next step for this file. When the logits do
not require grad, step 3 is skipped.

With ``return_entropy=True`` the entropy metric stays differentiable: its
gradient is computed in the backward, from the saved per-row statistics, only
when the metric actually received one (an entropy bonus).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import GRPOLossOutput, fused_loss_mask, masked_mean_entropy
from .grpo_loss import grpo_loss
from .token_logprobs import token_logprobs_triton


class _FusedGRPOLossFunction(torch.autograd.Function):
    """``(logits, token_ids, old_logprobs, advantages, mask, options)`` → loss, metrics; d logits precomputed."""

    @staticmethod
    def forward(ctx, logits, token_ids, old_logprobs, advantages, mask, options):
        temperature, ignore_index, return_entropy, loss_options = options
        needs_grad = ctx.needs_input_grad[0]
        with torch.enable_grad():
            x = logits.detach().requires_grad_(needs_grad)
            out = token_logprobs_triton(
                x, token_ids, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
            )
            logp, entropy = out if return_entropy else (out, None)
            keep = fused_loss_mask(mask, token_ids, ignore_index)
            result = grpo_loss(logp, old_logprobs, advantages, keep, **loss_options)
            entropy_metric = None if entropy is None else masked_mean_entropy(entropy, keep)
            grad_logits = None
            if needs_grad:
                (grad_logits,) = torch.autograd.grad(result.loss, x, retain_graph=entropy_metric is not None)
        ctx.grad_logits = grad_logits
        # the inner graph from x to the entropy metric, kept only while an entropy gradient may come
        ctx.inner = (x, entropy_metric) if needs_grad and entropy_metric is not None else None
        kl = result.kl if result.kl is not None else result.loss.new_zeros(())
        entropy_out = entropy_metric.detach() if entropy_metric is not None else result.loss.new_zeros(())
        ctx.mark_non_differentiable(result.per_token_loss, kl, result.clip_ratio_low, result.clip_ratio_high,
                                    result.clip_ratio_region)
        return (result.loss.detach(), result.per_token_loss, kl, result.clip_ratio_low, result.clip_ratio_high,
                result.clip_ratio_region, entropy_out)

    @staticmethod
    def backward(ctx, grad_loss, _ptl, _kl, _low, _high, _region, grad_entropy):
        grad_logits = None
        if ctx.needs_input_grad[0]:
            grad_logits = ctx.grad_logits * grad_loss.to(ctx.grad_logits.dtype)
            if grad_entropy is not None and ctx.inner is not None:
                x, entropy_metric = ctx.inner
                (grad_from_entropy,) = torch.autograd.grad(entropy_metric, x, grad_entropy, retain_graph=True)
                grad_logits = grad_logits + grad_from_entropy
        return grad_logits, None, None, None, None, None


def fused_grpo_loss(
    logits: Tensor,
    token_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    **loss_options,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.fused_grpo_loss` with Triton kernels (inputs already validated).

    ``loss`` is differentiable w.r.t. ``logits`` (its gradient is computed in the
    forward), and so is ``entropy`` with ``return_entropy=True``; ``per_token_loss``,
    ``kl`` and the clip metrics come without gradient.
    """
    options = (float(temperature), int(ignore_index), bool(return_entropy), loss_options)
    loss, per_token_loss, kl, low, high, region, entropy = _FusedGRPOLossFunction.apply(
        logits, token_ids, old_logprobs, advantages, mask, options
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

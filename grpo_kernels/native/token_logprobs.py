"""``token_logprobs`` over the extension's kernels: one pass over each row forward, one backward.

Forward (``token_logprobs_fwd``): online log-sum-exp of ``z = logits / T``,
``logp = z_y - lse`` and optionally ``H = lse - Σ p z``; saves ``lse`` (and ``H``).
Backward (``token_logprobs_bwd``): ``d logits = (g_logp (onehot_y - p) + g_H
(-p (log p + H))) / T`` from the saved statistics, in the logits dtype,
optionally written into the logits buffer (``inplace_backward=True``).
A temperature tensor reaches the kernels as one temperature per row (``row_temperature``).
Formulas: :func:`grpo_kernels.reference.token_logprobs`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._extension import _C
from ..reference import broadcast_temperature


def kernel_logits(logits: Tensor) -> Tensor:
    """``logits`` as the kernels read them: stride 1 over the vocabulary (a copy when it is not)."""
    return logits if logits.shape[-1] <= 1 or logits.stride(-1) == 1 else logits.contiguous()


def kernel_temperature(temperature: Union[float, Tensor], lead_shape) -> tuple[float, Optional[Tensor]]:
    """``(temperature, row_temperature)`` as the entry points take them: a float and None, or 1.0 and the tensor
    broadcast to one temperature per row of ``[*lead_shape, V]`` logits, ``[R]`` (the kernels round it to the
    compute dtype, as the reference does)."""
    if not isinstance(temperature, Tensor):
        return float(temperature), None
    return 1.0, broadcast_temperature(temperature, tuple(lead_shape)).reshape(-1)


def writable_rows(x: Tensor) -> bool:
    """No two rows of ``x`` share memory (a stride-0 expanded dim would make in-place writes race)."""
    return all(st != 0 for n, st in zip(x.shape, x.stride()) if n > 1)


class TokenLogprobsFunction(torch.autograd.Function):
    """``(logits, token_ids, temperature, ignore_index, return_entropy, inplace_backward)``
    → ``logp`` or ``(logp, entropy)``; differentiable w.r.t. ``logits`` only, once."""

    @staticmethod
    def forward(ctx, logits: Tensor, token_ids: Tensor, temperature: Union[float, Tensor], ignore_index: int,
                return_entropy: bool, inplace_backward: bool):
        temperature, row_t = kernel_temperature(temperature, logits.shape[:-1])
        logp, lse, entropy = _C.token_logprobs_fwd(logits, token_ids, temperature, ignore_index, return_entropy,
                                                   row_temperature=row_t)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, token_ids, lse, entropy if return_entropy else None)
        ctx.options = (temperature, row_t, ignore_index, inplace_backward)
        shape = logits.shape[:-1]
        return (logp.view(shape), entropy.view(shape)) if return_entropy else logp.view(shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor] = None):
        logits, token_ids, lse, entropy = ctx.saved_tensors
        if entropy is None:
            grad_entropy = None
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
            return (None,) * 6
        temperature, row_t, ignore_index, inplace_backward = ctx.options
        inplace = inplace_backward and writable_rows(logits)
        grad = _C.token_logprobs_bwd(
            logits, token_ids, lse, grad_logp, entropy if grad_entropy is not None else None, grad_entropy,
            temperature, ignore_index, inplace, row_temperature=row_t,
        )
        if inplace:  # the logits now hold their gradient: fail loudly if anything else saved them
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None, None, None


def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: Union[float, Tensor] = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`grpo_kernels.reference.token_logprobs` with the extension's kernels (inputs already validated).

    ``inplace_backward=True`` writes the gradient into ``logits`` and returns
    that buffer as the gradient: ``logits`` must not be used after ``backward``.
    """
    return TokenLogprobsFunction.apply(
        kernel_logits(logits), token_ids, temperature if isinstance(temperature, Tensor) else float(temperature),
        int(ignore_index), bool(return_entropy),
        bool(inplace_backward)
    )


def row_statistics(
    logits: Tensor, ids: Tensor, temperature: Union[float, Tensor], ignore_index: int, return_entropy: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(logp, lse, entropy or None)`` of each row of ``logits [..., V]`` for ``ids [R]``, each ``[R]`` in the
    compute dtype (lse of ``logits / T``); ignored rows get 0 everywhere. A temperature tensor: of shape
    ``logits.shape[:k]``."""
    temperature, row_t = kernel_temperature(temperature, logits.shape[:-1])
    logp, lse, entropy = _C.token_logprobs_fwd(kernel_logits(logits), ids, temperature, ignore_index, return_entropy,
                                               row_temperature=row_t)
    return logp, lse, entropy if return_entropy else None


def row_gradient(
    logits: Tensor, ids: Tensor, lse: Tensor, ent: Optional[Tensor], g_logp: Optional[Tensor],
    g_ent: Optional[Tensor], temperature: Union[float, Tensor], ignore_index: int, inplace: bool,
) -> Tensor:
    """``d logits = (g_logp (onehot_y − p) − g_ent p (log p + ent)) / T`` with ``p = exp(logits / T − lse)``
    for any given per-row ``lse`` and ``ent`` (an id outside ``[0, V)`` has no one-hot term); into ``logits``
    itself when ``inplace`` and its rows do not alias. Ignored rows get 0."""
    logits = kernel_logits(logits)
    temperature, row_t = kernel_temperature(temperature, logits.shape[:-1])
    return _C.token_logprobs_bwd(logits, ids, lse, g_logp, ent if g_ent is not None else None, g_ent, temperature,
                                 ignore_index, inplace and writable_rows(logits), row_temperature=row_t)

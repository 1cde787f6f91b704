"""Public ops: validate the inputs, pick the backend, run it.

The math of every op is stated in :mod:`grpo_kernels.reference` (the
specification); each backend computes the same numbers.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, Optional, Sequence, Union, overload

import torch
from torch import Tensor

from . import backends, linear, validation
from .backends import implementation
from .kernel_options import LOSS_DEFAULTS
from .reference import GRPOLossOutput

Number = Union[int, float]

LOSS_OPTIONS = tuple(LOSS_DEFAULTS)


def _loss_options(arguments: dict) -> dict:
    return {name: arguments[name] for name in LOSS_OPTIONS}


@overload
def token_logprobs(
    logits: Tensor, token_ids: Tensor, *, temperature: float = ..., ignore_index: int = ...,
    return_entropy: Literal[False] = ..., inplace_backward: bool = ..., backend: str = ...,
) -> Tensor: ...


@overload
def token_logprobs(
    logits: Tensor, token_ids: Tensor, *, temperature: float = ..., ignore_index: int = ...,
    return_entropy: Literal[True], inplace_backward: bool = ..., backend: str = ...,
) -> tuple[Tensor, Tensor]: ...


def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Log-prob of each sampled token under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float16/bfloat16/float32/float64; any leading shape.
        token_ids: ``[...]`` int32/int64 in ``[0, V)``, or ``ignore_index``.
        temperature: positive finite sampling temperature.
        ignore_index: positions with this id get log-prob 0 (and entropy 0).
        return_entropy: also return the entropy of each row's distribution.
        inplace_backward: the kernel backends write the logits gradient into the
            logits' own buffer in the backward (no logits-sized allocation); the
            logits must not be used after ``backward``. No effect on the reference.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``logp [...]`` float32 (float64 for float64 logits), or
        ``(logp, entropy)`` with ``return_entropy=True``. Differentiable
        w.r.t. ``logits``.

    See :func:`grpo_kernels.reference.token_logprobs` for the formula.
    """
    validation.check_token_logprobs(
        logits, token_ids, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
        inplace_backward=inplace_backward,
    )
    return implementation(backend, logits.device, "token_logprobs")(
        logits, token_ids, temperature=float(temperature), ignore_index=ignore_index, return_entropy=return_entropy,
        inplace_backward=inplace_backward,
    )


def group_advantages(
    rewards: Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[Tensor] = None,
    scale: str = "group",
    estimator: str = "grpo",
    eps: float = 1e-4,
    reward_weights: Optional[Union[Tensor, Sequence[float]]] = None,
    multi_objective: str = "sum_then_normalize",
    return_stats: bool = False,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Group-relative advantages ``(r - group mean) / (group std + eps)`` and variants.

    Args:
        rewards: ``[B]`` or ``[B, K]`` (K reward functions); NaN = missing reward.
        group_size: G for contiguous groups of G completions (must divide B).
        group_ids: ``[B]`` integer group label per completion (verl's ``uid``).
        scale: ``"group"`` (divide by group std), ``"batch"`` (by batch std), ``"none"``.
        estimator: ``"grpo"`` (baseline = group mean) or ``"rloo"`` (leave-one-out mean).
        eps: added to the std before dividing.
        reward_weights: ``[K]`` weights of the reward functions, a tensor or a list (default ones).
        multi_objective: ``"sum_then_normalize"`` or ``"normalize_then_sum"`` for ``[B, K]`` rewards.
        return_stats: also return per-group ``mean`` and ``std``.
        backend: see :func:`token_logprobs`.

    Returns:
        ``advantages [B]`` (float32; float64 for float64 rewards), or
        ``(advantages, mean [num_groups], std [num_groups])``.

    See :func:`grpo_kernels.reference.group_advantages` for the formula.
    """
    options = dict(
        group_size=group_size, group_ids=group_ids, scale=scale, estimator=estimator, eps=eps,
        reward_weights=reward_weights, multi_objective=multi_objective, return_stats=return_stats,
    )
    validation.check_group_advantages(rewards, **options)
    if isinstance(reward_weights, (list, tuple)):
        options["reward_weights"] = torch.tensor(reward_weights, dtype=torch.float64, device=rewards.device)
    return implementation(backend, rewards.device, "group_advantages")(rewards, **options)


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
    num_items_in_batch: Optional[Union[Number, Tensor]] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    backend: str = "auto",
) -> GRPOLossOutput:
    """The GRPO policy loss (TRL ``GRPOTrainer`` semantics) on per-token log-probs.

    Args:
        logprobs: ``[B, T]`` float, log-probs of the sampled tokens under the policy (requires grad).
        old_logprobs: ``[B, T]`` under the sampling policy, or ``None`` (uses ``logprobs.detach()``).
        advantages: ``[B]``, ``[B, 1]`` or ``[B, T]``.
        mask: ``[B, T]`` bool or 0/1 (completion tokens that count).
        ref_logprobs: ``[B, T]`` reference-policy log-probs; required when ``beta != 0``.
        beta: KL penalty coefficient.
        epsilon_low, epsilon_high: clip range ``[1 - epsilon_low, 1 + epsilon_high]``;
            ``epsilon_high`` defaults to ``epsilon_low`` (cispo: absolute cap).
        delta: upper clamp of the unclipped ratio (two-sided GRPO).
        clip_ratio_c: dual-clip bound (> 1) for negative advantages (verl).
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``, ``"dapo"``, ``"cispo"``, ``"sapo"``, ``"luspo"``.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        kl_estimator: ``"k3"``, ``"k1"``, ``"k2"`` or ``"low_var_kl"``.
        use_bias_correction_kl: multiply the KL by the importance ratio.
        importance_weights: ``[B, T]``, ``[B, 1]`` or ``[B]`` per-token loss multipliers
            (e.g. TRL's vLLM importance-sampling ratio).
        max_completion_length: normalizer length for ``dr_grpo`` (default T).
        num_items_in_batch: normalizer token count for ``dapo``/``cispo`` (default: masked tokens).
        sapo_temperature_pos, sapo_temperature_neg: SAPO temperatures.
        backend: see :func:`token_logprobs`.

    Returns:
        :class:`~grpo_kernels.GRPOLossOutput` with ``loss`` (0-d), ``per_token_loss [B, T]`` and
        0-d metrics ``kl``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_region``.

    See :func:`grpo_kernels.reference.grpo_loss` for the formulas.
    """
    options = _loss_options(locals())
    validation.check_grpo_loss(logprobs, old_logprobs, advantages, mask, **options)
    return implementation(backend, logprobs.device, "grpo_loss")(logprobs, old_logprobs, advantages, mask, **options)


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
    inplace_backward: bool = False,
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
    num_items_in_batch: Optional[Union[Number, Tensor]] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    backend: str = "auto",
) -> GRPOLossOutput:
    """Logits straight to the GRPO loss: :func:`token_logprobs` then :func:`grpo_loss` in one call.

    Args:
        logits: ``[B, T, V]`` float16/bfloat16/float32/float64 policy logits of the completion tokens.
        token_ids: ``[B, T]`` int sampled completion ids; ``ignore_index`` positions are excluded like masked ones.
        old_logprobs, advantages, mask: as in :func:`grpo_loss`.
        temperature, ignore_index: as in :func:`token_logprobs`.
        return_entropy: also fill ``entropy`` (masked mean entropy) in the result.
        inplace_backward: the kernel backends write the logits gradient into the
            logits' own buffer already in the forward (no logits-sized
            allocation; the logits are overwritten, so an entropy bonus cannot
            be differentiated then). No effect on the reference.
        Remaining options: as in :func:`grpo_loss`.

    Returns:
        :class:`~grpo_kernels.GRPOLossOutput`; gradients flow to ``logits``.

    See :func:`grpo_kernels.reference.fused_grpo_loss` for the formulas.
    """
    options = _loss_options(locals())
    validation.check_fused_grpo_loss(
        logits, token_ids, old_logprobs, advantages, mask,
        temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
        inplace_backward=inplace_backward, **options,
    )
    return implementation(backend, logits.device, "fused_grpo_loss")(
        logits, token_ids, old_logprobs, advantages, mask,
        temperature=float(temperature), ignore_index=ignore_index, return_entropy=return_entropy,
        inplace_backward=inplace_backward, **options,
    )


def _linear_implementation(backend: str, device: torch.device, op: str) -> Callable:
    """``op`` of a backend with a kernel of its own for it (the reference), else the chunked driver
    :mod:`grpo_kernels.linear` over the backend's row ops (checked usable on ``device`` before any compute)."""
    name = backends.resolve_backend(backend, device)
    if not backends.chunked(name, op):
        return implementation(name, device, op)
    for row_op in backends.CHUNKED_OPS[op]:
        implementation(name, device, row_op)
    return functools.partial(getattr(linear, op), backend=name)


@overload
def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, *, bias: Optional[Tensor] = ..., temperature: float = ...,
    logit_scale: float = ..., softcap: Optional[float] = ..., ignore_index: int = ...,
    return_entropy: Literal[False] = ..., chunk_size: Optional[int] = ..., backend: str = ...,
) -> Tensor: ...


@overload
def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, *, bias: Optional[Tensor] = ..., temperature: float = ...,
    logit_scale: float = ..., softcap: Optional[float] = ..., ignore_index: int = ...,
    return_entropy: Literal[True], chunk_size: Optional[int] = ..., backend: str = ...,
) -> tuple[Tensor, Tensor]: ...


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Log-prob of each sampled token straight from the hidden states and the LM head, without the logits.

    The logits ``x = softcap·tanh(logit_scale·(hidden @ weightᵀ + bias) / softcap)`` (no tanh without
    ``softcap``) are formed ``chunk_size`` tokens at a time in float32 and never as a whole ``[N, V]`` tensor;
    the result is :func:`token_logprobs` of them.

    Args:
        hidden: ``[..., H]`` float16/bfloat16/float32/float64 hidden states (the LM head's input).
        weight: ``[V, H]`` LM-head weight, the dtype of ``hidden``.
        token_ids: ``[...]`` int32/int64 in ``[0, V)``, or ``ignore_index``.
        bias: ``[V]`` LM-head bias, the dtype of ``hidden``, or ``None``.
        temperature: positive finite sampling temperature.
        logit_scale: positive finite multiplier of the logits (before the softcap).
        softcap: ``None`` or a positive cap ``c`` (Gemma's ``final_logit_softcapping``).
        ignore_index: positions with this id get log-prob 0 (and entropy 0).
        return_entropy: also return the entropy of each row's distribution.
        chunk_size: tokens per logits tile (default: ``2**24 // V``); memory only, same numbers.
        backend: ``"auto"``, ``"reference"`` (the unchunked composition) or a kernel backend, whose
            ``token_logprobs`` rows the chunked driver runs.

    Returns:
        ``logp [...]`` float32 (float64 for float64 inputs), or ``(logp, entropy)`` with
        ``return_entropy=True``. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``
        (the backward recomputes the tiles).

    See :func:`grpo_kernels.reference.linear_token_logprobs` for the formula.
    """
    options = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                   ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size)
    validation.check_linear_token_logprobs(hidden, weight, token_ids, **options)
    return _linear_implementation(backend, hidden.device, "linear_token_logprobs")(
        hidden, weight, token_ids, **options
    )


def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
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
    num_items_in_batch: Optional[Union[Number, Tensor]] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    backend: str = "auto",
) -> GRPOLossOutput:
    """Hidden states and the LM head straight to the GRPO loss, without the ``[B, T, V]`` logits.

    The gradient w.r.t. ``hidden``, ``weight`` and ``bias`` is formed during the forward, tile by tile
    (token-level importance sampling: one sweep; sequence level: two); the backward only scales it.

    Args:
        hidden: ``[B, T, H]`` float16/bfloat16/float32/float64 hidden states of the completion tokens.
        weight, bias, temperature, logit_scale, softcap, ignore_index, chunk_size: as in
            :func:`linear_token_logprobs`.
        token_ids: ``[B, T]`` int sampled completion ids; ``ignore_index`` positions are excluded like masked ones.
        old_logprobs, advantages, mask: as in :func:`grpo_loss`.
        return_entropy: also fill ``entropy`` (masked mean entropy, differentiable) in the result.
        Remaining options: as in :func:`grpo_loss`.

    Returns:
        :class:`~grpo_kernels.GRPOLossOutput`; ``loss`` and ``entropy`` are differentiable.

    See :func:`grpo_kernels.reference.fused_linear_grpo_loss` for the formulas.
    """
    options = _loss_options(locals())
    head_options = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                        ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size)
    validation.check_fused_linear_grpo_loss(hidden, weight, token_ids, old_logprobs, advantages, mask,
                                            **head_options, **options)
    return _linear_implementation(backend, hidden.device, "fused_linear_grpo_loss")(
        hidden, weight, token_ids, old_logprobs, advantages, mask, **head_options, **options
    )

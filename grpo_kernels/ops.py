"""Public ops: validate the inputs, pick the backend, run it.

The math of every op is stated in :mod:`grpo_kernels.reference` (the
specification); each backend computes the same numbers.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union, overload

import torch
from torch import Tensor

from . import backends, composed, custom_ops, distributed, validation
from .backends import implementation
from .kernel_options import LOSS_DEFAULTS
from .reference import GRPOLossOutput, Temperature

Number = Union[int, float]

LOSS_OPTIONS = tuple(LOSS_DEFAULTS)


def _row_temperature(temperature: Temperature) -> Temperature:
    """A number as a float; a per-row temperature tensor as it is (validated)."""
    return temperature if isinstance(temperature, Tensor) else float(temperature)


def _loss_options(arguments: dict) -> dict:
    return {name: arguments[name] for name in LOSS_OPTIONS}


@torch.compiler.assume_constant_result
def _traced_backend(backend: str, device_type: str, op: str) -> str:
    """The backend that ``backend`` means for ``op`` on ``device_type`` tensors, checked usable there; evaluated
    once while TorchDynamo traces (a constant of the graph), for the custom ops of :mod:`grpo_kernels.custom_ops`."""
    device = torch.device(device_type)
    backends.backend_function(backend, device, op)
    return backends.resolve_backend(backend, device, op)


@overload
def token_logprobs(
    logits: Tensor, token_ids: Tensor, *, temperature: Temperature = ..., ignore_index: int = ...,
    return_entropy: Literal[False] = ..., inplace_backward: bool = ..., vocab_group=..., backend: str = ...,
) -> Tensor: ...


@overload
def token_logprobs(
    logits: Tensor, token_ids: Tensor, *, temperature: Temperature = ..., ignore_index: int = ...,
    return_entropy: Literal[True], inplace_backward: bool = ..., vocab_group=..., backend: str = ...,
) -> tuple[Tensor, Tensor]: ...


def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: Temperature = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    vocab_group=None,
    backend: str = "auto",
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Log-prob of each sampled token under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float16/bfloat16/float32/float64; any leading shape.
        token_ids: ``[...]`` int32/int64 in ``[0, V)``, or ``ignore_index``.
        temperature: positive finite sampling temperature: a float, or a floating tensor with one per sequence
            or per token, of shape ``logits.shape[:k]`` (``[B]`` or ``[B, T]`` for ``[B, T, V]`` logits, ``[N]``
            for ``[N, V]``), broadcast over the remaining row dimensions, on the logits' device; positive and
            finite at the rows that count (ignored rows may hold anything). A tensor is data: a new value never
            recompiles a kernel, and no gradient flows to it.
        ignore_index: positions with this id get log-prob 0 (and entropy 0).
        return_entropy: also return the entropy of each row's distribution.
        inplace_backward: the kernel backends write the logits gradient into the
            logits' own buffer in the backward (no logits-sized allocation); the
            logits must not be used after ``backward``. No effect on the reference.
        vocab_group: a ``torch.distributed`` process group whose ranks each hold a contiguous vocabulary
            shard ``logits [..., V_r]`` (in group-rank order) and the same ``token_ids`` (ids of the whole
            vocabulary); the results are those of the whole vocabulary on every rank and the gradient is the
            shard's (see :mod:`grpo_kernels.distributed`). Not traced by ``torch.compile``.
        backend: ``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``logp [...]`` float32 (float64 for float64 logits), or
        ``(logp, entropy)`` with ``return_entropy=True``. Differentiable
        w.r.t. ``logits``.

    See :func:`grpo_kernels.reference.token_logprobs` for the formula.
    """
    validation.check_token_logprobs(
        logits, token_ids, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
        inplace_backward=inplace_backward, sharded=vocab_group is not None,
    )
    if vocab_group is not None:
        validation.check_process_group("vocab_group", vocab_group)
        return distributed.token_logprobs(
            logits, token_ids, vocab_group=vocab_group, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, inplace_backward=inplace_backward,
            backend=backends.resolve_backend(backend, logits.device, "token_logprobs"),
        )
    if torch.compiler.is_compiling():
        return custom_ops.token_logprobs(
            logits, token_ids, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
            backend=_traced_backend(backend, logits.device.type, "token_logprobs"),
        )
    return implementation(backend, logits.device, "token_logprobs")(
        logits, token_ids, temperature=_row_temperature(temperature), ignore_index=ignore_index,
        return_entropy=return_entropy,
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
    if torch.compiler.is_compiling():
        return custom_ops.group_advantages(
            rewards, **options, backend=_traced_backend(backend, rewards.device.type, "group_advantages"))
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
    sampling_logprobs: Optional[Tensor] = None,
    rollout_is_mode: Optional[str] = None,
    rollout_is_min: Optional[float] = None,
    rollout_is_max: Optional[float] = 3.0,
    rollout_is_gate: str = "ratio",
    off_policy_mask_threshold: Optional[float] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    log_ratio_clamp: Optional[float] = None,
    batch_group=None,
    cu_seqlens: Optional[Tensor] = None,
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
        loss_type: ``"grpo"``, ``"bnpo"``, ``"dr_grpo"``, ``"dapo"``, ``"cispo"``, ``"sapo"``, ``"luspo"``,
            ``"vespo"`` (TRL), ``"gmpo"`` (verl's geo_mean), ``"gpg"`` (verl).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO; not for vespo, gmpo, gpg).
        kl_estimator: ``"k3"``, ``"k1"``, ``"k2"`` or ``"low_var_kl"``.
        use_bias_correction_kl: multiply the KL by the importance ratio (not for gmpo).
        importance_weights: ``[B, T]``, ``[B, 1]`` or ``[B]`` precomputed per-token loss multipliers
            (e.g. TRL's ``importance_sampling_ratio``); vespo folds them (``[B, T]``) into its weight.
        max_completion_length: normalizer length for ``dr_grpo`` (default T).
        num_items_in_batch: normalizer token count for ``dapo``/``cispo``/``vespo``/``gpg`` (default: masked
            tokens).
        sapo_temperature_pos, sapo_temperature_neg: SAPO temperatures.
        sampling_logprobs: ``[B, T]`` log-probs under the sampling engine (vLLM), NaN where unknown; needed by
            ``rollout_is_mode``, used by ``off_policy_mask_threshold`` (else ``old_logprobs``).
        rollout_is_mode: rollout importance sampling computed in the loss from ``old_logprobs`` and
            ``sampling_logprobs``: ``None`` (off), ``"token_truncate"``, ``"token_mask"``,
            ``"sequence_truncate"``, ``"sequence_mask"`` (TRL's ``vllm_importance_sampling_mode``).
        rollout_is_min, rollout_is_max: bounds of the rollout ratio (or of the gate's statistic), ``None`` =
            unbounded (TRL's ``vllm_importance_sampling_clip_min/max``: None, 3.0).
        rollout_is_gate: what the bounds apply to: ``"ratio"`` (TRL, verl), or, with the ``*_mask`` modes only,
            OpenRLHF's gates ``"geometric_mean"`` (the sequence's e^{mean log-ratio}; ``sequence_mask``),
            ``"binary_kl"``, ``"tv"`` (the sampled token's divergence, or its sequence mean): a token keeps its
            ratio where its unit's statistic is within the bounds, else 0.
        off_policy_mask_threshold: drop negative-advantage sequences whose mean KL(sampling ‖ policy) exceeds it
            (TRL; ``None`` = off).
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma-weight parameters (TRL's).
        log_ratio_clamp: clamp the log-ratios to ``±log_ratio_clamp`` before ``exp`` (verl: 20.0; ``None``: TRL).
        batch_group: a ``torch.distributed`` process group over which the batch is split (data parallel,
            whole sequences per rank): the loss is this rank's share of the loss of the whole batch times the
            group size, so that DDP's gradient average is the gradient of the whole batch's loss; the metrics
            are the whole batch's (see :mod:`grpo_kernels.distributed`). Loss types grpo, bnpo, dr_grpo, dapo,
            cispo, sapo, luspo.
        cu_seqlens: ``[num_seqs + 1]`` int32/int64 cumulative sequence lengths (flash-attention's layout):
            the inputs are packed, per-token tensors ``[total]`` or ``[1, total]``, ``advantages`` and
            ``importance_weights`` per sequence ``[num_seqs]`` or per token; the result is the loss of the padded
            batch, without padding (:func:`grpo_kernels.reference.packed_grpo_loss`; :mod:`grpo_kernels.packed`).
        backend: see :func:`token_logprobs`.

    Returns:
        :class:`~grpo_kernels.GRPOLossOutput` with ``loss`` (0-d), ``per_token_loss [B, T]`` and
        0-d metrics ``kl``, ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_region``.

    See :func:`grpo_kernels.reference.grpo_loss` for the formulas.
    """
    options = _loss_options(locals())
    if batch_group is not None or cu_seqlens is not None:
        validation.check_scale_out_grpo_loss(logprobs, old_logprobs, advantages, mask, batch_group=batch_group,
                                             cu_seqlens=cu_seqlens, defaults=LOSS_DEFAULTS, **options)
        return composed.grpo_loss(logprobs, old_logprobs, advantages, mask, batch_group=batch_group,
                                  cu_seqlens=cu_seqlens,
                                  backend=backends.resolve_backend(backend, logprobs.device, "grpo_loss"),
                                  **options)
    if torch.compiler.is_compiling():
        validation.check_grpo_loss(logprobs, old_logprobs, advantages, mask, options)
        return custom_ops.grpo_loss(logprobs, old_logprobs, advantages, mask, **options,
                                    backend=_traced_backend(backend, logprobs.device.type, "grpo_loss"))
    key = validation.grpo_loss_call_key(options)
    if isinstance(logprobs, Tensor) and validation.grpo_loss_options_passed(key):
        checked = backends.self_checked_implementation(backend, logprobs.device, "grpo_loss")
        out = None if checked is None else checked(logprobs, old_logprobs, advantages, mask, options, key)
        if out is not None:  # the backend checked the tensors (a call's Python overhead matters at small batches)
            return out
    validation.check_grpo_loss(logprobs, old_logprobs, advantages, mask, options)
    return implementation(backend, logprobs.device, "grpo_loss")(logprobs, old_logprobs, advantages, mask, **options)


def fused_grpo_loss(
    logits: Tensor,
    token_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    temperature: Temperature = 1.0,
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
    sampling_logprobs: Optional[Tensor] = None,
    rollout_is_mode: Optional[str] = None,
    rollout_is_min: Optional[float] = None,
    rollout_is_max: Optional[float] = 3.0,
    rollout_is_gate: str = "ratio",
    off_policy_mask_threshold: Optional[float] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    log_ratio_clamp: Optional[float] = None,
    vocab_group=None,
    batch_group=None,
    cu_seqlens: Optional[Tensor] = None,
    backend: str = "auto",
) -> GRPOLossOutput:
    """Logits straight to the GRPO loss: :func:`token_logprobs` then :func:`grpo_loss` in one call.

    Args:
        logits: ``[B, T, V]`` float16/bfloat16/float32/float64 policy logits of the completion tokens.
        token_ids: ``[B, T]`` int sampled completion ids; ``ignore_index`` positions are excluded like masked ones.
        old_logprobs, advantages, mask: as in :func:`grpo_loss`.
        temperature, ignore_index: as in :func:`token_logprobs` (a tensor: ``[B]`` or ``[B, T]``, any value at
            the positions that do not count; not with ``vocab_group``, ``batch_group`` or ``cu_seqlens``).
        return_entropy: also fill ``entropy`` (masked mean entropy) in the result.
        inplace_backward: the kernel backends write the logits gradient into the
            logits' own buffer already in the forward (no logits-sized
            allocation; the logits are overwritten, so an entropy bonus cannot
            be differentiated then). No effect on the reference.
        vocab_group: the ranks each hold a vocabulary shard ``logits [B, T, V_r]``, as in :func:`token_logprobs`.
        batch_group, cu_seqlens: as in :func:`grpo_loss` (packed logits ``[total, V]`` or ``[1, total, V]``).
        Remaining options: as in :func:`grpo_loss`.

    Returns:
        :class:`~grpo_kernels.GRPOLossOutput`; gradients flow to ``logits``.

    See :func:`grpo_kernels.reference.fused_grpo_loss` for the formulas.
    """
    options = _loss_options(locals())
    if vocab_group is not None or batch_group is not None or cu_seqlens is not None:
        scale_out = dict(vocab_group=vocab_group, batch_group=batch_group, cu_seqlens=cu_seqlens,
                         temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
                         inplace_backward=inplace_backward)
        validation.check_scale_out_fused_grpo_loss(logits, token_ids, old_logprobs, advantages, mask, **scale_out,
                                                   defaults=LOSS_DEFAULTS, **options)
        return composed.fused_grpo_loss(logits, token_ids, old_logprobs, advantages, mask, **scale_out,
                                        backend=backends.resolve_backend(backend, logits.device, "fused_grpo_loss"),
                                        **options)
    validation.check_fused_grpo_loss(
        logits, token_ids, old_logprobs, advantages, mask,
        temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
        inplace_backward=inplace_backward, **options,
    )
    if torch.compiler.is_compiling():  # inplace_backward does not apply (see grpo_kernels.custom_ops)
        return custom_ops.fused_grpo_loss(
            logits, token_ids, old_logprobs, advantages, mask, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, **options,
            backend=_traced_backend(backend, logits.device.type, "fused_grpo_loss"),
        )
    return implementation(backend, logits.device, "fused_grpo_loss")(
        logits, token_ids, old_logprobs, advantages, mask,
        temperature=_row_temperature(temperature), ignore_index=ignore_index, return_entropy=return_entropy,
        inplace_backward=inplace_backward, **options,
    )


@overload
def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, *, bias: Optional[Tensor] = ..., temperature: Temperature = ...,
    logit_scale: float = ..., softcap: Optional[float] = ..., ignore_index: int = ...,
    return_entropy: Literal[False] = ..., chunk_size: Optional[int] = ..., backend: str = ...,
) -> Tensor: ...


@overload
def linear_token_logprobs(
    hidden: Tensor, weight: Tensor, token_ids: Tensor, *, bias: Optional[Tensor] = ..., temperature: Temperature = ...,
    logit_scale: float = ..., softcap: Optional[float] = ..., ignore_index: int = ...,
    return_entropy: Literal[True], chunk_size: Optional[int] = ..., backend: str = ...,
) -> tuple[Tensor, Tensor]: ...


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: Temperature = 1.0,
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
        temperature: positive finite sampling temperature, or a tensor of one per sequence or per token of
            shape ``hidden.shape[:k]``, as in :func:`token_logprobs`.
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
    if torch.compiler.is_compiling():
        return custom_ops.linear_token_logprobs(
            hidden, weight, token_ids, **options,
            backend=_traced_backend(backend, hidden.device.type, "linear_token_logprobs"))
    return backends.backend_function(backend, hidden.device, "linear_token_logprobs")(
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
    temperature: Temperature = 1.0,
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
    sampling_logprobs: Optional[Tensor] = None,
    rollout_is_mode: Optional[str] = None,
    rollout_is_min: Optional[float] = None,
    rollout_is_max: Optional[float] = 3.0,
    rollout_is_gate: str = "ratio",
    off_policy_mask_threshold: Optional[float] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    log_ratio_clamp: Optional[float] = None,
    vocab_group=None,
    batch_group=None,
    cu_seqlens: Optional[Tensor] = None,
    backend: str = "auto",
) -> GRPOLossOutput:
    """Hidden states and the LM head straight to the GRPO loss, without the ``[B, T, V]`` logits.

    The gradient w.r.t. ``hidden``, ``weight`` and ``bias`` is formed during the forward, tile by tile
    (token-level importance sampling: one sweep; sequence level: two); the backward only scales it.

    Args:
        hidden: ``[B, T, H]`` float16/bfloat16/float32/float64 hidden states of the completion tokens.
        weight, bias, temperature, logit_scale, softcap, ignore_index, chunk_size: as in
            :func:`linear_token_logprobs` (a temperature tensor: ``[B]`` or ``[B, T]``; not with ``vocab_group``,
            ``batch_group`` or ``cu_seqlens``).
        token_ids: ``[B, T]`` int sampled completion ids; ``ignore_index`` positions are excluded like masked ones.
        old_logprobs, advantages, mask: as in :func:`grpo_loss`.
        return_entropy: also fill ``entropy`` (masked mean entropy, differentiable) in the result.
        vocab_group: the ranks each hold a contiguous shard of the LM head's rows, ``weight [V_r, H]`` and
            ``bias [V_r]`` (in group-rank order), and the same ``hidden``; the gradients of ``weight`` and ``bias``
            are the shard's, that of ``hidden`` is summed over the group (see :mod:`grpo_kernels.distributed`).
        batch_group, cu_seqlens: as in :func:`grpo_loss` (packed ``hidden [total, H]`` or ``[1, total, H]``).
        Remaining options: as in :func:`grpo_loss`.

    Returns:
        :class:`~grpo_kernels.GRPOLossOutput`; ``loss`` and ``entropy`` are differentiable.

    See :func:`grpo_kernels.reference.fused_linear_grpo_loss` for the formulas.
    """
    options = _loss_options(locals())
    head_options = dict(bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                        ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size)
    if vocab_group is not None or batch_group is not None or cu_seqlens is not None:
        scale_out = dict(vocab_group=vocab_group, batch_group=batch_group, cu_seqlens=cu_seqlens)
        validation.check_scale_out_fused_linear_grpo_loss(hidden, weight, token_ids, old_logprobs, advantages, mask,
                                                          **scale_out, head_options=head_options,
                                                          defaults=LOSS_DEFAULTS, **options)
        return composed.fused_linear_grpo_loss(
            hidden, weight, token_ids, old_logprobs, advantages, mask, **scale_out, head_options=head_options,
            backend=backends.resolve_backend(backend, hidden.device, "fused_linear_grpo_loss"),
            implementation=backends.backend_function(backend, hidden.device, "fused_linear_grpo_loss"), **options)
    validation.check_fused_linear_grpo_loss(hidden, weight, token_ids, old_logprobs, advantages, mask,
                                            **head_options, **options)
    if torch.compiler.is_compiling():
        return custom_ops.fused_linear_grpo_loss(
            hidden, weight, token_ids, old_logprobs, advantages, mask, **head_options, **options,
            backend=_traced_backend(backend, hidden.device.type, "fused_linear_grpo_loss"))
    return backends.backend_function(backend, hidden.device, "fused_linear_grpo_loss")(
        hidden, weight, token_ids, old_logprobs, advantages, mask, **head_options, **options
    )

"""TRL's fused LM head, computed by :func:`grpo_kernels.linear_token_logprobs`.

TRL 1.16 patches the policy (and the reference model) so that
``model(..., labels=labels, fused_lm_head=True)`` returns per-token log-probs
and entropies of the next-token labels instead of logits
(``trl.trainer.utils.add_fused_lm_head``). :func:`install_fused_lm_head`
replaces that forward with one that runs the backbone, then scores the labelled
positions with our op, the ``[tokens, vocab]`` logits never formed. The
unfused forward (generation, plain calls) is the model's own.

Same numbers as TRL's head: logits ``softcap·tanh(logit_scale·(h Wᵀ + b) / softcap) / temperature``
with ``logit_scale`` and ``softcap`` read from the model's config as TRL reads
them; positions labelled ``-100`` get log-prob and entropy 0. Precision: our op
forms every logits tile in float32, also from bfloat16/float16 hidden states
(TRL rounds its tiles to the autocast dtype), so in mixed precision our
log-probs are the more accurate ones; in float32 the two agree to rounding.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
import transformers
from packaging.version import Version
from torch import nn
from trl.trainer.utils import FusedCausalLMOutput

from ..ops import linear_token_logprobs

IGNORE_INDEX = -100
# Per-token outputs of TRL's head that this head computes (TRL has more, which GRPOTrainer does not request).
SUPPORTED_OUTPUTS = ("log_probs", "entropy")
# Config fields that multiply the logits before the softcap, in the order TRL looks them up.
_LOGIT_MULTIPLIERS = ("logit_scale", "output_multiplier", "lm_head_multiplier")


def logit_transform(config) -> tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` of a transformers model's LM head, from its (text) config, as TRL reads them.

    ``logit_scale`` is the first of ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` that is set,
    else ``1 / logits_scaling`` (Granite, MiniCPM3; HyperCLOVA X multiplies by it), else 1.0;
    ``softcap`` is ``final_logit_softcapping`` (Gemma) or ``None``.
    """
    text_config = config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    for name in _LOGIT_MULTIPLIERS:
        value = getattr(text_config, name, None)
        if value is not None:
            return float(value), softcap
    divisor = getattr(text_config, "logits_scaling", None)
    if divisor is not None:
        return (float(divisor) if text_config.model_type == "hyperclovax" else 1.0 / divisor), softcap
    return 1.0, softcap


def _backbone(model: nn.Module, config) -> nn.Module:
    """The module whose output is the LM head's input (before transformers 5, a VLM's language backbone is
    ``model.model``, as TRL's head uses)."""
    if config.get_text_config() is not config and Version(transformers.__version__) < Version("5.0.0"):
        return model.model
    return model.base_model


def install_fused_lm_head(
    model: nn.Module,
    *,
    temperature: float,
    outputs: tuple[str, ...] = ("log_probs",),
    chunk_size: Optional[int] = None,
    backend: str = "auto",
) -> None:
    """Make ``model(..., labels=..., fused_lm_head=True)`` return a TRL ``FusedCausalLMOutput`` from our op.

    Args:
        model: a transformers causal LM (the base model under a PEFT wrapper), with or without TRL's head.
        temperature: the logits are divided by it (the trainer's sampling temperature).
        outputs: per-token fields to compute, among ``"log_probs"`` (always) and ``"entropy"``.
        chunk_size, backend: as in :func:`grpo_kernels.linear_token_logprobs`.

    Raises:
        ValueError: an output this head does not compute, or a non-positive ``logit_scale`` in the config.
    """
    unknown = [name for name in outputs if name not in SUPPORTED_OUTPUTS]
    if unknown:
        raise ValueError(f"the fused LM head computes {list(SUPPORTED_OUTPUTS)}, not {unknown}")
    logit_scale, softcap = logit_transform(model.config)
    if not logit_scale > 0:
        raise ValueError(f"the model's logit scale must be positive for the fused LM head, got {logit_scale}")
    # The forward before any fused head (TRL's or ours): the unfused path and generation stay the model's own.
    unfused_forward = getattr(model, "_grpo_kernels_unfused_forward", None) or model.forward
    with_entropy = "entropy" in outputs
    config = model.config

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return unfused_forward(*args, **kwargs)
        if kwargs.get("output_router_logits"):
            raise NotImplementedError("the grpo_kernels fused LM head does not return the MoE router auxiliary loss")
        kwargs["use_cache"] = False
        hidden = _backbone(self, config)(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # the hidden state at t scores the label at t + 1
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        log_probs, entropy = score_labels(
            hidden, self.get_output_embeddings(), shift_labels, temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, with_entropy=with_entropy, chunk_size=chunk_size, backend=backend,
        )
        label_mask = shift_labels.to(log_probs.device) != IGNORE_INDEX
        count = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy, label_mask=label_mask
        )

    model._grpo_kernels_unfused_forward = unfused_forward
    model.forward = types.MethodType(forward, model)


def score_labels(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    *,
    temperature: float,
    logit_scale: float,
    softcap: Optional[float],
    with_entropy: bool,
    chunk_size: Optional[int],
    backend: str,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log-probs ``[B, T]`` (and entropies, else ``None``) of ``labels [B, T]`` under ``lm_head(hidden [B, T, H])``;
    0 where the label is ``-100``. Only the labelled positions are sent to the op."""
    weight, bias = lm_head.weight, lm_head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as DTensors
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    hidden = hidden.to(device=weight.device, dtype=weight.dtype)  # cast_lm_head_to_fp32: a float32 head
    labels = labels.to(weight.device)
    keep = labels != IGNORE_INDEX
    rows, row_labels = hidden[keep], labels[keep]
    empty = row_labels.numel() == 0
    if empty:  # nothing to score: the ignored rows keep the (zero) result connected to the graph
        rows, row_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    with torch.autocast(hidden.device.type, enabled=False):  # the op computes in float32 itself
        result = linear_token_logprobs(
            rows, weight, row_labels, bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
            ignore_index=IGNORE_INDEX, return_entropy=with_entropy, chunk_size=chunk_size, backend=backend,
        )
    per_row = result if with_entropy else (result, None)
    if empty:
        return tuple(None if x is None else x.view(keep.shape) for x in per_row)
    return tuple(None if x is None else x.new_zeros(keep.shape).masked_scatter(keep, x) for x in per_row)

"""``GRPOLoss``: the loss options held in an ``nn.Module``."""

from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn

from . import validation
from .ops import LOSS_DEFAULTS, Number, fused_grpo_loss, grpo_loss
from .loss_table import Family, loss_type_row
from .reference import GRPOLossOutput, Temperature
from .validation import PER_CALL_OPTIONS


class GRPOLoss(nn.Module):
    """GRPO loss with fixed options; call it on log-probs, or on logits with :meth:`from_logits`.

    Example::

        loss_fn = GRPOLoss(loss_type="dapo", beta=0.04, epsilon_high=0.28)
        out = loss_fn(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs)
        out.loss.backward()

    Args:
        temperature: sampling temperature (a float), used by :meth:`from_logits`; a batch sampled at several
            temperatures passes its per-sequence or per-token tensor to :meth:`from_logits` instead.
        backend: backend of every call (see :func:`grpo_kernels.token_logprobs`).
        **options: the scalar options of :func:`grpo_kernels.grpo_loss` (``beta``,
            ``epsilon_low``, ``epsilon_high``, ``delta``, ``clip_ratio_c``, ``loss_type``,
            ``importance_sampling_level``, ``kl_estimator``, ``use_bias_correction_kl``,
            ``max_completion_length``, ``sapo_temperature_pos``, ``sapo_temperature_neg``, ``rollout_is_mode``,
            ``rollout_is_min``, ``rollout_is_max``, ``rollout_is_gate``, ``off_policy_mask_threshold``, ``vespo_k_pos``,
            ``vespo_lambda_pos``, ``vespo_k_neg``, ``vespo_lambda_neg``, ``log_ratio_clamp``).
    """

    def __init__(self, *, temperature: float = 1.0, backend: str = "auto", **options: Any) -> None:
        super().__init__()
        held = {k: v for k, v in LOSS_DEFAULTS.items() if k not in PER_CALL_OPTIONS}
        unknown = set(options) - set(held)
        if unknown:
            raise TypeError(f"GRPOLoss got unknown options {sorted(unknown)}; expected some of {sorted(held)}")
        # Fail at construction, not at the first step.
        if isinstance(temperature, Tensor):
            raise TypeError("GRPOLoss(temperature=...) must be a float; pass a batch's per-sequence or per-token "
                            "temperature tensor to from_logits(..., temperature=...)")
        validation.check_temperature(temperature)
        validation.check_loss_options(**{**held, **options})
        self.temperature = temperature
        self.backend = backend
        self.options = options

    @classmethod
    def from_trl_config(cls, args: Any, **overrides: Any) -> "GRPOLoss":
        """Build from a TRL ``GRPOConfig`` (read by attribute name; trl itself is not imported)."""
        loss_type = getattr(args, "loss_type", "dapo")
        options = dict(
            beta=getattr(args, "beta", 0.0),
            epsilon_low=getattr(args, "epsilon", 0.2),
            epsilon_high=getattr(args, "epsilon_high", None),
            loss_type=loss_type,
            importance_sampling_level=getattr(args, "importance_sampling_level", "token"),
            use_bias_correction_kl=getattr(args, "use_bias_correction_kl", False),
            max_completion_length=getattr(args, "max_completion_length", None),
            sapo_temperature_pos=getattr(args, "sapo_temperature_pos", 1.0),
            sapo_temperature_neg=getattr(args, "sapo_temperature_neg", 1.05),
            off_policy_mask_threshold=getattr(args, "off_policy_mask_threshold", None),
            **{name: getattr(args, name, LOSS_DEFAULTS[name])
               for name in ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")},
        )
        if loss_type_row(loss_type).family is Family.CLIPPED:  # TRL ignores delta for the other types
            options["delta"] = getattr(args, "delta", None)
        options.update(overrides)
        return cls(temperature=options.pop("temperature", getattr(args, "temperature", 1.0)), **options)

    def forward(
        self,
        logprobs: Tensor,
        old_logprobs: Optional[Tensor],
        advantages: Tensor,
        mask: Tensor,
        *,
        ref_logprobs: Optional[Tensor] = None,
        importance_weights: Optional[Tensor] = None,
        num_items_in_batch: Optional[Union[Number, Tensor]] = None,
        sampling_logprobs: Optional[Tensor] = None,
    ) -> GRPOLossOutput:
        """:func:`grpo_kernels.grpo_loss` with this module's options."""
        return grpo_loss(
            logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
            importance_weights=importance_weights, num_items_in_batch=num_items_in_batch,
            sampling_logprobs=sampling_logprobs, backend=self.backend, **self.options,
        )

    def from_logits(
        self,
        logits: Tensor,
        token_ids: Tensor,
        old_logprobs: Optional[Tensor],
        advantages: Tensor,
        mask: Tensor,
        *,
        ref_logprobs: Optional[Tensor] = None,
        importance_weights: Optional[Tensor] = None,
        num_items_in_batch: Optional[Union[Number, Tensor]] = None,
        ignore_index: int = -100,
        return_entropy: bool = False,
        sampling_logprobs: Optional[Tensor] = None,
        temperature: Optional[Temperature] = None,
    ) -> GRPOLossOutput:
        """:func:`grpo_kernels.fused_grpo_loss` with this module's options and temperature.

        ``temperature``: this batch's own (a float, or a ``[B]`` / ``[B, T]`` tensor of per-sequence or
        per-token temperatures, as in :func:`grpo_kernels.fused_grpo_loss`) instead of the module's float.
        """
        return fused_grpo_loss(
            logits, token_ids, old_logprobs, advantages, mask,
            temperature=self.temperature if temperature is None else temperature,
            ignore_index=ignore_index, return_entropy=return_entropy, ref_logprobs=ref_logprobs,
            importance_weights=importance_weights, num_items_in_batch=num_items_in_batch,
            sampling_logprobs=sampling_logprobs, backend=self.backend, **self.options,
        )

    def extra_repr(self) -> str:
        items = {"temperature": self.temperature, "backend": self.backend, **self.options}
        return ", ".join(f"{k}={v!r}" for k, v in items.items())

"""grpo_kernels inside TRL's ``GRPOTrainer`` (trl 1.16).

Two lines in a training script::

    from grpo_kernels.integrations.trl import patch_grpo_trainer

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    patch_grpo_trainer(trainer)  # before trainer.train()

or :class:`GRPOTrainer` of this module in place of ``trl.GRPOTrainer``. Then

- the fused LM head that TRL puts on the policy and the reference model
  (per-token log-probs and entropies from the hidden states, no logits) is
  :func:`grpo_kernels.linear_token_logprobs` (:mod:`.trl_lm_head`);
- the loss of each micro-batch is :func:`grpo_kernels.grpo_loss`
  (:mod:`.trl_loss`), with the trainer's config, the same scaling for
  gradient accumulation, ``steps_per_generation`` and the number of processes,
  the entropy bonus (static or adaptive) and the same metrics in
  ``trainer._metrics``.

Configs the integration cannot reproduce exactly are refused by
:func:`patch_grpo_trainer` with ``NotImplementedError`` (see
:func:`check_trainer`); invalid option values raise the op's ``ValueError``.
Numbers: float32 training gives TRL's losses and gradients to rounding;
in bfloat16/float16 our LM head forms its logits in float32 (TRL in the
autocast dtype).
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
import trl
from accelerate.utils import is_peft_model

from ..ops import grpo_loss, linear_token_logprobs
from .trl_lm_head import install_fused_lm_head, logit_transform
from .trl_loss import compute_loss, loss_options

SUPPORTED_TRL_VERSION = "1.16"


def check_trainer(trainer) -> None:
    """Raise unless ``trainer`` is a TRL 1.16 ``GRPOTrainer`` whose config the integration reproduces.

    Raises:
        TypeError: not a ``trl.GRPOTrainer``.
        NotImplementedError: another trl version; a subclass with its own ``_compute_loss``; vespo with
            ``top_entropy_quantile < 1`` (the op has no multiplier of VESPO's per-token loss besides the off-policy
            mask) or with a bias-corrected KL at ``importance_sampling_level="sequence"``; the MoE router auxiliary
            loss; DeepSpeed ZeRO-3 (the LM head is gathered per call); a model without an output embedding with a
            ``weight``.
    """
    if not isinstance(trainer, trl.GRPOTrainer):
        raise TypeError(f"patch_grpo_trainer needs a trl.GRPOTrainer, got {type(trainer).__name__}")
    if not trl.__version__.startswith(SUPPORTED_TRL_VERSION + "."):
        raise NotImplementedError(
            f"grpo_kernels.integrations.trl reproduces trl {SUPPORTED_TRL_VERSION}.x's GRPOTrainer, found trl "
            f"{trl.__version__}"
        )
    if type(trainer)._compute_loss is not trl.GRPOTrainer._compute_loss:
        raise NotImplementedError(
            f"{type(trainer).__name__} overrides _compute_loss; patching would drop that override"
        )
    if trainer.loss_type == "vespo":
        if trainer.top_entropy_quantile < 1.0:
            raise NotImplementedError("loss_type='vespo' with top_entropy_quantile < 1 is not supported")
        bias_corrected_kl = trainer.beta != 0.0 and trainer.args.use_bias_correction_kl
        if trainer.importance_sampling_level == "sequence" and bias_corrected_kl:
            raise NotImplementedError(
                "loss_type='vespo' with a bias-corrected KL at importance_sampling_level='sequence' is not supported"
            )
    if trainer.aux_loss_enabled:
        raise NotImplementedError(
            "the MoE router auxiliary loss (router_aux_loss_coef != 0) is not supported by the grpo_kernels LM head; "
            "set router_aux_loss_coef=0.0"
        )
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        raise NotImplementedError("DeepSpeed ZeRO-3 is not supported: the LM head weight must be whole in the backward")
    for model in _scored_models(trainer):
        head = model.get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise NotImplementedError(f"{type(model).__name__} has no output embedding with a weight to fuse")


def patch_grpo_trainer(trainer, *, backend: str = "auto", chunk_size: Optional[int] = None):
    """Make ``trainer`` (a ``trl.GRPOTrainer``) compute its log-probs and its loss with grpo_kernels.

    Call it once, after the trainer is built and before ``trainer.train()``.

    Args:
        trainer: the ``trl.GRPOTrainer`` (TRL 1.16) to patch in place.
        backend: the backend of every op call (``"auto"``: the best one for the model's device).
        chunk_size: tokens per logits tile of the LM head (see :func:`grpo_kernels.linear_token_logprobs`).

    Returns:
        ``trainer``.

    Raises:
        TypeError, NotImplementedError: see :func:`check_trainer`.
        ValueError: an option value the ops reject (e.g. ``epsilon >= 1``), or a ``backend`` or ``chunk_size``
            they reject; :class:`grpo_kernels.BackendUnavailableError` for a backend that cannot run here.
    """
    check_trainer(trainer)
    _check_options(trainer, backend, chunk_size)
    for model, outputs in zip(_scored_models(trainer), (("log_probs", "entropy"), ("log_probs",))):
        install_fused_lm_head(model, temperature=trainer.temperature, outputs=outputs, chunk_size=chunk_size,
                              backend=backend)
    trainer._compute_loss = types.MethodType(functools.partial(compute_loss, backend=backend), trainer)
    return trainer


class GRPOTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` with grpo_kernels: the same arguments, plus ``kernel_backend`` and
    ``kernel_chunk_size`` (``backend`` and ``chunk_size`` of :func:`patch_grpo_trainer`)."""

    def __init__(self, *args, kernel_backend: str = "auto", kernel_chunk_size: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        patch_grpo_trainer(self, backend=kernel_backend, chunk_size=kernel_chunk_size)


def _scored_models(trainer) -> list:
    """The models whose fused LM head scores tokens: the policy (its base model under PEFT), then the
    reference model when there is one."""
    policy = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    return [policy] + ([trainer.ref_model] if trainer.ref_model is not None else [])


def _check_options(trainer, backend: str, chunk_size: Optional[int]) -> None:
    """Validate the trainer's options (and ``backend``, ``chunk_size``) by the ops themselves, on a 1-token batch,
    so that a bad value fails at patch time rather than at the first step."""
    device = trainer.accelerator.device
    one = torch.zeros(1, 1, device=device)
    options = loss_options(trainer)
    grpo_loss(one, None, one[:, 0], torch.ones(1, 1, device=device), ref_logprobs=one if options["beta"] else None,
              num_items_in_batch=1, backend=backend, **options)
    logit_scale, softcap = logit_transform(trainer.model.config)
    linear_token_logprobs(one, one, torch.zeros(1, dtype=torch.long, device=device), temperature=trainer.temperature,
                          logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size, backend=backend)

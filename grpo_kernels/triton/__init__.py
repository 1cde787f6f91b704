"""Triton backend: one kernel family per file, each wrapped in an autograd Function.

``OPS`` lists the ops this backend implements so far; the others raise
``BackendUnavailableError`` (see :mod:`grpo_kernels.backends`). Kernels never
import the public API.
"""

from .fused_grpo_loss import fused_grpo_loss
from .group_advantages import group_advantages
from .grpo_loss import grpo_loss
from .linear_logprobs import fused_linear_grpo_loss, linear_token_logprobs
from .token_logprobs import token_logprobs

OPS: tuple[str, ...] = ("token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss", "linear_token_logprobs",
                        "fused_linear_grpo_loss")
__all__ = ["OPS", "fused_grpo_loss", "fused_linear_grpo_loss", "group_advantages", "grpo_loss",
           "linear_token_logprobs", "token_logprobs"]

"""Triton backend: one kernel family per file, each wrapped in an autograd Function.

``OPS`` lists the ops this backend implements so far; the others raise
``BackendUnavailableError`` (see :mod:`grpo_kernels.backends`). Kernels never
import the public API.
"""

from .token_logprobs import token_logprobs  # noqa: E402
from .group_advantages import group_advantages  # noqa: E402
from .grpo_loss import grpo_loss  # noqa: E402
from .fused_grpo_loss import fused_grpo_loss  # noqa: E402

OPS: tuple[str, ...] = ("token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss")

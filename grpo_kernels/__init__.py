"""grpo_kernels: exact, fused kernels for the GRPO loss.

Ops: :func:`token_logprobs`, :func:`group_advantages`, :func:`grpo_loss`,
:func:`fused_grpo_loss`, and from the hidden states and the LM head without
the logits :func:`linear_token_logprobs`, :func:`fused_linear_grpo_loss`;
the module :class:`GRPOLoss`; backend selection with ``backend=`` on every
op (:func:`available_backends`). The specification of every op is
:mod:`grpo_kernels.reference`.
"""

from . import backends, self_check
from ._extension import cpu_flags, extension_available, extension_info
from ._version import __version__
from .backends import BackendUnavailableError, available_backends
from .module import GRPOLoss
from .ops import (
    fused_grpo_loss,
    fused_linear_grpo_loss,
    group_advantages,
    grpo_loss,
    linear_token_logprobs,
    token_logprobs,
)
from .reference import GRPOLossOutput
from .workspace import keep_cpu_workspace, release_cpu_workspace

# "auto" asks self_check before it uses a backend that must pass an on-device check. self_check runs the backends
# (it imports them, not the other way round), so the package installs it here; looked up at each call.
backends.set_device_check(lambda backend, op, device: self_check.backend_usable(backend, op, device))

__all__ = [
    "BackendUnavailableError",
    "GRPOLoss",
    "GRPOLossOutput",
    "__version__",
    "available_backends",
    "cpu_flags",
    "extension_available",
    "extension_info",
    "fused_grpo_loss",
    "fused_linear_grpo_loss",
    "group_advantages",
    "grpo_loss",
    "keep_cpu_workspace",
    "linear_token_logprobs",
    "release_cpu_workspace",
    "token_logprobs",
]

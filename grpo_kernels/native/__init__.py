"""Backend glue of the compiled extension ``grpo_kernels._C``: autograd Functions over its C++ entry points.

The entry points (``csrc/common/entry_points.h``) dispatch on the tensors' device, so
this package serves the ``"cpu"`` backend (``csrc/cpu``) and is written to serve
a ``"cuda"`` backend with the same entry points (``csrc/cuda``). ``OPS`` lists
the ops implemented; kernels never import the public API.
"""

from .fused_grpo_loss import fused_grpo_loss
from .group_advantages import group_advantages
from .grpo_loss import grpo_loss
from .token_logprobs import token_logprobs

OPS: tuple[str, ...] = ("token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss")
__all__ = ["OPS", "fused_grpo_loss", "group_advantages", "grpo_loss", "token_logprobs"]

"""The backward contract of the kernel backends' ``fused_grpo_loss``, whose logits gradient is formed in the forward.

The backward only scales that gradient by the incoming one, in place, so it can
run once after such a scaling; and with ``inplace_backward=True`` the logits
hold the gradient, so an entropy bonus (which needs the logits) cannot be
differentiated. Both refusals are raised here, with the same words for every backend.
"""

from __future__ import annotations


def check_backward(*, consumed: bool, inplace: bool, entropy_gradient: bool) -> None:
    """Raise ``RuntimeError`` when the precomputed gradient cannot serve this backward."""
    if consumed:
        raise RuntimeError(
            "fused_grpo_loss: its logits gradient was already scaled in place by an earlier backward through "
            "this graph; a second backward (retain_graph=True) needs a new forward"
        )
    if entropy_gradient and inplace:
        raise RuntimeError(
            "fused_grpo_loss(inplace_backward=True) overwrote the logits with the loss gradient, so the "
            "entropy metric cannot be differentiated (an entropy bonus): use inplace_backward=False"
        )

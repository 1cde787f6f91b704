"""The tests' Triton interpreter set-up (tests/triton_interpreter.py) changes the speed, not what runs."""

import os

import pytest
import torch

import grpo_kernels as gk

if os.environ.get("TRITON_INTERPRET", "0") != "1" or "triton" not in gk.available_backends("fused_grpo_loss"):
    pytest.skip("the Triton kernels run under the interpreter only without a GPU", allow_module_level=True)

from triton.runtime import interpreter  # noqa: E402


def _runs():
    """Loss and gradient of grpo_loss (sequence level: helpers in loops) and fused_grpo_loss (row helpers)."""
    g = torch.Generator().manual_seed(5)
    B, T, V = 3, 5, 37
    logits = torch.randn(B, T, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    x = logits.clone().requires_grad_()
    fused = gk.fused_grpo_loss(x, ids, old, adv, mask, beta=0.04, ref_logprobs=old - 0.1, backend="triton")
    fused.loss.backward()
    logp = old + 0.1 * torch.randn(B, T, generator=g)
    y = logp.clone().requires_grad_()
    loss = gk.grpo_loss(y, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence", backend="triton")
    loss.loss.backward()
    return [fused.loss, x.grad, fused.per_token_loss, loss.loss, y.grad]


def test_a_launch_patches_once_with_the_same_results():
    patched = interpreter._patch_lang
    assert getattr(patched, "once_per_launch", False), "conftest installs the set-up once per launch"
    fast = _runs()
    interpreter._patch_lang = patched.__wrapped__
    try:
        plain = _runs()
    finally:
        interpreter._patch_lang = patched
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)

"""The reference runs on any device: CUDA results equal CPU results (float64). Needs a GPU."""

import pytest
import torch

import grpo_kernels as gk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]


def both(*tensors):
    return tensors, tuple(t.cuda() for t in tensors)


def assert_same(cpu_out, cuda_out):
    for a, b in zip(cpu_out, cuda_out):
        if a is not None:
            assert b.device.type == "cuda"
            torch.testing.assert_close(a, b.cpu(), atol=1e-12, rtol=1e-12)


def test_token_logprobs_on_cuda():
    logits = torch.randn(3, 5, 257, dtype=torch.float64)
    logits[0, 0, :7] = float("-inf")
    ids = torch.randint(7, 257, (3, 5))
    ids[2, 1] = -100
    (x, y), (xc, yc) = both(logits, ids)
    assert_same(gk.token_logprobs(x, y, temperature=0.7, return_entropy=True),
                gk.token_logprobs(xc, yc, temperature=0.7, return_entropy=True))


@pytest.mark.parametrize("group", ["size", "ids"])
def test_group_advantages_on_cuda(group):
    rewards = torch.tensor([1.0, 0.0, float("nan"), 2.0, 2.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    ids = torch.tensor([4, 4, 1, 1, 9, 9, 9, 4])
    (r, g), (rc, gc) = both(rewards, ids)
    kw = dict(group_size=4) if group == "size" else {}
    a = gk.group_advantages(r, group_ids=None if kw else g, return_stats=True, **kw)
    b = gk.group_advantages(rc, group_ids=None if kw else gc, return_stats=True, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.cpu(), equal_nan=True)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_losses_on_cuda(loss_type, level):
    B, T, V = 3, 6, 50
    logits = torch.randn(B, T, V, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T))
    old = -torch.rand(B, T, dtype=torch.float64) * 4
    ref = -torch.rand(B, T, dtype=torch.float64) * 4
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.3
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, num_items_in_batch=torch.tensor(9))
    cpu, cuda = both(logits, ids, old, ref, adv, mask)
    x, xc = cpu[0].requires_grad_(), cuda[0].requires_grad_()
    a = gk.fused_grpo_loss(x, *cpu[1:3], cpu[4], cpu[5], ref_logprobs=cpu[3], return_entropy=True, **opts)
    b = gk.fused_grpo_loss(xc, *cuda[1:3], cuda[4], cuda[5], ref_logprobs=cuda[3], return_entropy=True,
                           **dict(opts, num_items_in_batch=torch.tensor(9, device="cuda")))
    assert_same(a, b)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(x.grad, xc.grad.cpu(), atol=1e-12, rtol=1e-12)

"""Packed sequences (``cu_seqlens``): the losses on ``[total]`` tensors equal the padded ``[B, T]`` ones."""

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference
from grpo_kernels.loss_table import SCALE_OUT_LOSS_TYPES

LOSS_TYPES = SCALE_OUT_LOSS_TYPES
LENGTHS = (3, 1, 5, 2, 4)
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def layout(lengths=LENGTHS, dtype=torch.int64):
    """``(cu_seqlens, valid [B, T])``: the packed tokens are ``padded[valid]``."""
    lengths = torch.tensor(lengths)
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(dtype)
    return cu, torch.arange(int(lengths.max())) < lengths[:, None]


def loss_inputs(valid, dtype, *, per_token_adv: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    B, T = valid.shape
    old = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).to(dtype)
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    ref = (old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    shape = (B, T) if per_token_adv else (B,)
    adv = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    iw = (0.5 + torch.rand(*shape, generator=g, dtype=torch.float64)).to(dtype)
    mask = valid & (torch.rand(B, T, generator=g) > 0.2)
    return logp, old, ref, adv, iw, mask


def options_for(loss_type: str, level: str) -> dict:
    options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05)
    if loss_type == "cispo":
        options["epsilon_high"] = 1.1
    return options


def assert_result(out, expected, valid, tol, packed_shape):
    torch.testing.assert_close(out.loss.double(), expected.loss.double(), **tol)
    assert out.per_token_loss.shape == packed_shape
    torch.testing.assert_close(out.per_token_loss.reshape(-1).double(), expected.per_token_loss[valid].double(), **tol)
    for field in ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "entropy"):
        a, e = getattr(out, field), getattr(expected, field)
        assert (a is None) == (e is None), field
        if a is not None:
            torch.testing.assert_close(a.double(), e.double(), **tol, msg=lambda m: f"{field}: {m}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ("token", "sequence"))
@pytest.mark.parametrize("per_token_adv", (False, True), ids=("adv_per_seq", "adv_per_token"))
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32))
def test_grpo_loss_packed_equals_padded(loss_type, level, per_token_adv, dtype):
    cu, valid = layout(dtype=torch.int32 if dtype == torch.float32 else torch.int64)
    logp, old, ref, adv, iw, mask = loss_inputs(valid, dtype, per_token_adv=per_token_adv)
    options = options_for(loss_type, level)
    padded = logp.double().requires_grad_()
    expected = reference.grpo_loss(padded, old.double(), adv.double(), mask, ref_logprobs=ref.double(),
                                   importance_weights=iw.double(), **options)
    (grad_ref,) = torch.autograd.grad(expected.loss, padded)

    def pack(t):
        return t[valid] if t.shape == valid.shape else t

    packed = logp[valid].requires_grad_()
    out = gk.grpo_loss(packed, pack(old), pack(adv), mask[valid], ref_logprobs=pack(ref), importance_weights=pack(iw),
                       cu_seqlens=cu, **options)
    assert_result(out, expected, valid, TOL[dtype], packed.shape)
    (grad,) = torch.autograd.grad(out.loss, packed)
    torch.testing.assert_close(grad.double(), grad_ref[valid], **TOL[dtype])
    # the reference's statement of the packed semantics agrees
    spec = reference.packed_grpo_loss(packed, pack(old), pack(adv), mask[valid], cu, ref_logprobs=pack(ref),
                                      importance_weights=pack(iw), **options)
    assert_result(spec, expected, valid, TOL[dtype], packed.shape)


OP = "fused_grpo_loss"


@pytest.mark.parametrize("loss_type", ("dapo", "grpo", "dr_grpo", "sapo"))
@pytest.mark.parametrize("level", ("token", "sequence"))
def test_fused_grpo_loss_packed_equals_padded(backend, loss_type, level):
    cu, valid = layout()
    B, T = valid.shape
    V = 7
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[2, 1] = -100
    _, old, ref, adv, _, mask = loss_inputs(valid, torch.float32, per_token_adv=False)
    options = dict(options_for(loss_type, level), temperature=0.8, return_entropy=True)
    padded = logits.double().requires_grad_()
    expected = reference.fused_grpo_loss(padded, ids, old.double(), adv.double(), mask, ref_logprobs=ref.double(),
                                         **options)
    (grad_ref,) = torch.autograd.grad(expected.loss + 0.1 * expected.entropy, padded)
    packed = logits[valid][None].requires_grad_()  # [1, total, V]
    out = gk.fused_grpo_loss(packed, ids[valid][None], old[valid][None], adv, mask[valid][None],
                             ref_logprobs=ref[valid][None], cu_seqlens=cu, backend=backend, **options)
    assert_result(out, expected, valid, TOL[torch.float32], (1, int(valid.sum())))
    (grad,) = torch.autograd.grad(out.loss + 0.1 * out.entropy, packed)
    torch.testing.assert_close(grad[0].double(), grad_ref[valid], **TOL[torch.float32])


@pytest.mark.parametrize("level", ("token", "sequence"))
def test_fused_linear_grpo_loss_packed_equals_padded(backend, level):
    cu, valid = layout()
    B, T = valid.shape
    H, V = 3, 6
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    _, old, ref, adv, _, mask = loss_inputs(valid, torch.float32, per_token_adv=False)
    options = dict(options_for("grpo", level), return_entropy=True)
    inputs = [hidden.double().requires_grad_(), weight.double().requires_grad_()]
    expected = reference.fused_linear_grpo_loss(*inputs, ids, old.double(), adv.double(), mask,
                                                ref_logprobs=ref.double(), **options)
    grads_ref = torch.autograd.grad(expected.loss, inputs)
    mine = [hidden[valid].requires_grad_(), weight.clone().requires_grad_()]
    out = gk.fused_linear_grpo_loss(*mine, ids[valid], old[valid], adv, mask[valid], ref_logprobs=ref[valid],
                                    cu_seqlens=cu, backend=backend, **options)
    assert_result(out, expected, valid, TOL[torch.float32], (int(valid.sum()),))
    grads = torch.autograd.grad(out.loss, mine)
    torch.testing.assert_close(grads[0].double(), grads_ref[0][valid], **TOL[torch.float32])
    torch.testing.assert_close(grads[1].double(), grads_ref[1], **TOL[torch.float32])


@pytest.mark.parametrize("cu, error, match", [
    (torch.tensor([0, 2, 5]), ValueError, "end at the number of packed tokens"),
    (torch.tensor([1, 3, 11]), ValueError, "start at 0"),
    (torch.tensor([0, 5, 5, 11]), ValueError, "strictly increasing"),
    (torch.tensor([0.0, 11.0]), TypeError, "int32 or int64"),
    (torch.tensor([[0, 11]]), ValueError, r"\[num_seqs \+ 1\]"),
    ([0, 11], TypeError, "torch.Tensor"),
])
def test_cu_seqlens_validation(cu, error, match):
    logp = torch.zeros(11)
    with pytest.raises(error, match=match):
        gk.grpo_loss(logp, None, torch.zeros(11), torch.ones(11), cu_seqlens=cu)


def test_packed_shapes_validation():
    cu = torch.tensor([0, 4, 11])
    with pytest.raises(ValueError, match="advantages must have the packed token shape"):
        gk.grpo_loss(torch.zeros(11), None, torch.zeros(3), torch.ones(11), cu_seqlens=cu)
    with pytest.raises(ValueError, match="token shape"):
        gk.grpo_loss(torch.zeros(2, 11), None, torch.zeros(2), torch.ones(2, 11), cu_seqlens=cu)
    with pytest.raises(ValueError, match="loss_type with cu_seqlens"):
        gk.grpo_loss(torch.zeros(11), None, torch.zeros(2), torch.ones(11), cu_seqlens=cu, loss_type="vespo")

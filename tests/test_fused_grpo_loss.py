"""fused_grpo_loss: equals token_logprobs + grpo_loss, values and logits gradients; d logits formula."""

import pytest
import torch
from conftest import TOLERANCES
from test_token_logprobs import numpy_token_logprobs

import grpo_kernels as gk

OP = "fused_grpo_loss"

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo"]


def make_inputs(B=3, T=4, V=19, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(logits.double(), -1).gather(-1, ids[..., None])[..., 0]
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[-1, :] = False
    mask[0, 0] = True
    return logits, ids, old, ref, adv, mask


OPTIONS = [
    dict(),
    dict(beta=0.04),
    dict(beta=0.04, importance_sampling_level="sequence", use_bias_correction_kl=True),
    dict(epsilon_high=0.28, delta=1.5, clip_ratio_c=3.0),
    dict(kl_estimator="k2", beta=0.1, num_items_in_batch=7),
]


# delta / clip_ratio_c apply to the clipped loss types only
CASES = [(lt, o) for lt in LOSS_TYPES for o in OPTIONS if lt not in ("cispo", "sapo") or "delta" not in o]


@pytest.mark.parametrize("loss_type,opts", CASES, ids=[f"{lt}-{'-'.join(sorted(o)) or 'default'}" for lt, o in CASES])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_equals_composition(backend, loss_type, opts, temperature):
    logits, ids, old, ref, adv, mask = make_inputs()
    opts = dict(opts, loss_type=loss_type)
    if opts.get("beta"):
        opts["ref_logprobs"] = ref

    x1 = logits.clone().requires_grad_()
    fused = gk.fused_grpo_loss(x1, ids, old, adv, mask, temperature=temperature, backend=backend, **opts)
    fused.loss.backward()

    x2 = logits.clone().requires_grad_()
    logp = gk.token_logprobs(x2, ids, temperature=temperature, backend=backend)
    composed = gk.grpo_loss(logp, old, adv, mask, backend=backend, **opts)
    composed.loss.backward()

    for a, b in zip(fused, composed):
        if a is not None:
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_logits_gradient_formula(backend, temperature):
    """d loss / d logits = (d loss / d logp) · (onehot − softmax(x/T)) / T."""
    logits, ids, old, ref, adv, mask = make_inputs()
    x = logits.clone().requires_grad_()
    gk.fused_grpo_loss(x, ids, old, adv, mask, temperature=temperature, ref_logprobs=ref, beta=0.1,
                       backend=backend).loss.backward()

    logp = gk.token_logprobs(logits, ids, temperature=temperature).requires_grad_()
    gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.1).loss.backward()
    p = torch.softmax(logits / temperature, -1)
    onehot = torch.nn.functional.one_hot(ids, logits.shape[-1]).double()
    torch.testing.assert_close(x.grad, logp.grad[..., None] * (onehot - p) / temperature)
    assert (x.grad[~mask] == 0).all()


def test_ignore_index_excluded_like_masked(backend):
    logits, ids, old, ref, adv, mask = make_inputs()
    ids_ignored = ids.clone()
    ids_ignored[0, 1] = -100
    ids_ignored[1, 2] = -100
    keep = mask.clone()
    keep[0, 1] = keep[1, 2] = False
    for loss_type in LOSS_TYPES:
        a = gk.fused_grpo_loss(logits, ids_ignored, old, adv, mask, loss_type=loss_type, backend=backend)
        b = gk.fused_grpo_loss(logits, ids, old, adv, keep, loss_type=loss_type, backend=backend)
        torch.testing.assert_close(a.loss, b.loss)
        torch.testing.assert_close(a.clip_ratio_region, b.clip_ratio_region)


@pytest.mark.parametrize("temperature", [0.3, 1.0])
def test_entropy_metric(backend, temperature):
    logits, ids, old, _, adv, mask = make_inputs()
    out = gk.fused_grpo_loss(logits, ids, old, adv, mask, temperature=temperature, return_entropy=True,
                             backend=backend)
    _, ent = numpy_token_logprobs(logits, ids, temperature)
    m = mask.double()
    torch.testing.assert_close(out.entropy, (ent * m).sum() / m.sum())
    assert gk.fused_grpo_loss(logits, ids, old, adv, mask, backend=backend).entropy is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_logits(backend, dtype):
    logits, ids, old, ref, adv, mask = make_inputs(V=37)
    x = logits.to(dtype).requires_grad_()
    out = gk.fused_grpo_loss(x, ids, old, adv, mask, ref_logprobs=ref, beta=0.04, temperature=0.7, backend=backend)
    assert out.loss.dtype == torch.float32
    exact = gk.fused_grpo_loss(x.detach().double(), ids, old, adv, mask, ref_logprobs=ref, beta=0.04,
                               temperature=0.7, backend="reference")
    torch.testing.assert_close(out.loss.double(), exact.loss, **TOLERANCES[dtype])
    out.loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def test_extreme_logits(backend):
    logits, ids, old, _, adv, mask = make_inputs()
    logits[0, 0, :] = -1e4
    logits[0, 0, ids[0, 0]] = 1e4
    logits[1, :, 3] = float("-inf")
    ids[1, ids[1] == 3] = 4
    x = logits.clone().requires_grad_()
    out = gk.fused_grpo_loss(x, ids, old, adv, mask, return_entropy=True, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.entropy) and torch.isfinite(x.grad).all()


def test_single_token_vocab_one(backend):
    logits = torch.zeros(1, 1, 1, dtype=torch.float64, requires_grad=True)
    out = gk.fused_grpo_loss(logits, torch.zeros(1, 1, dtype=torch.long), None, torch.tensor([1.0]),
                             torch.ones(1, 1, dtype=torch.bool), backend=backend)
    torch.testing.assert_close(out.loss, torch.tensor(-1.0, dtype=torch.float64))
    out.loss.backward()
    assert logits.grad.item() == 0.0  # log p = 0 for any logit when V = 1


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradcheck(backend, loss_type):
    logits, ids, old, ref, adv, mask = make_inputs(B=2, T=3, V=5)
    logits.requires_grad_()

    def f(x):
        out = gk.fused_grpo_loss(x, ids, old, adv, mask, temperature=0.9, ref_logprobs=ref, beta=0.04,
                                 loss_type=loss_type, return_entropy=True, backend=backend)
        return out.loss, out.entropy

    assert torch.autograd.gradcheck(f, (logits,))


def test_noncontiguous_logits(backend):
    logits, ids, old, _, adv, mask = make_inputs(B=3, T=4, V=11)
    wide = torch.randn(4, 3, 11, dtype=torch.float64)
    wide.copy_(logits.transpose(0, 1))
    x = wide.transpose(0, 1)
    assert not x.is_contiguous()
    a = gk.fused_grpo_loss(x, ids, old, adv, mask, backend=backend).loss
    b = gk.fused_grpo_loss(logits, ids, old, adv, mask, backend=backend).loss
    torch.testing.assert_close(a, b)

"""fused_grpo_loss: equals token_logprobs + grpo_loss, values and logits gradients; d logits formula."""

import pytest
import torch
from conftest import TOLERANCES, interpreted
from loss_cases import TOKEN_RATIO_LOSS_TYPES, applicable
from test_token_logprobs import numpy_token_logprobs

import grpo_kernels as gk

OP = "fused_grpo_loss"

LOSS_TYPES = TOKEN_RATIO_LOSS_TYPES  # the OPTIONS grid includes the sequence level; the others: VARIANTS


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


CASES = [(lt, o) for lt in LOSS_TYPES for o in OPTIONS if applicable(lt, o)]


TEMPERATURES = [0.1, 1.0, 10.0]


@pytest.mark.vs_reference
@pytest.mark.parametrize("loss_type,opts", CASES, ids=[f"{lt}-{'-'.join(sorted(o)) or 'default'}" for lt, o in CASES])
def test_equals_composition(backend, loss_type, opts):
    temperatures = TEMPERATURES
    if interpreted(backend):  # the interpreter is slow: one temperature per case, rotating over the cases
        temperatures = [TEMPERATURES[CASES.index((loss_type, opts)) % len(TEMPERATURES)]]
    logits, ids, old, ref, adv, mask = make_inputs()
    opts = dict(opts, loss_type=loss_type)
    if opts.get("beta"):
        opts["ref_logprobs"] = ref
    for temperature in temperatures:
        x1 = logits.clone().requires_grad_()
        fused = gk.fused_grpo_loss(x1, ids, old, adv, mask, temperature=temperature, backend=backend, **opts)
        fused.loss.backward()

        x2 = logits.clone().requires_grad_()
        logp = gk.token_logprobs(x2, ids, temperature=temperature, backend=backend)
        composed = gk.grpo_loss(logp, old, adv, mask, backend=backend, **opts)
        composed.loss.backward()

        for a, b in zip(fused, composed):
            if a is not None:
                torch.testing.assert_close(a, b, msg=lambda m: f"temperature {temperature}: {m}")
        torch.testing.assert_close(x1.grad, x2.grad, msg=lambda m: f"temperature {temperature}: {m}")


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

    # fast_mode under the interpreter: the Jacobian in one random direction, not column by column
    assert torch.autograd.gradcheck(f, (logits,), fast_mode=interpreted(backend))


def test_noncontiguous_logits(backend):
    logits, ids, old, _, adv, mask = make_inputs(B=3, T=4, V=11)
    wide = torch.randn(4, 3, 11, dtype=torch.float64)
    wide.copy_(logits.transpose(0, 1))
    x = wide.transpose(0, 1)
    assert not x.is_contiguous()
    a = gk.fused_grpo_loss(x, ids, old, adv, mask, backend=backend).loss
    b = gk.fused_grpo_loss(logits, ids, old, adv, mask, backend=backend).loss
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- #
# memory options: the gradient formed in the forward, in place on request
# --------------------------------------------------------------------------- #
IS_LEVELS = ["token", "sequence"]


def _reference_grad(logits, ids, old, adv, mask, **opts):
    x = logits.detach().clone().requires_grad_()
    gk.fused_grpo_loss(x, ids, old, adv, mask, backend="reference", **opts).loss.backward()
    return x.grad


@pytest.mark.parametrize("level", IS_LEVELS)
def test_inplace_backward(backend, level):
    """inplace_backward=True: the same gradient; kernel backends write it into the logits buffer."""
    logits, ids, old, ref, adv, mask = make_inputs(V=23)
    ids[0, 2] = -100
    opts = dict(ref_logprobs=ref, beta=0.04, importance_sampling_level=level, temperature=0.8)
    expected = _reference_grad(logits, ids, old, adv, mask, **opts)
    leaf = logits.clone().requires_grad_()
    x = leaf.clone()  # not a leaf, as the LM head's output: in place is allowed
    out = gk.fused_grpo_loss(x, ids, old, adv, mask, inplace_backward=True, backend=backend, **opts)
    out.loss.backward()
    torch.testing.assert_close(leaf.grad, expected)
    if backend != "reference":
        torch.testing.assert_close(x.detach(), expected)  # the logits now hold their gradient


@pytest.mark.parametrize("inplace", [False, True])
def test_incoming_gradient_scales(backend, inplace):
    logits, ids, old, _, adv, mask = make_inputs()
    expected = _reference_grad(logits, ids, old, adv, mask, loss_type="grpo")
    leaf = logits.clone().requires_grad_()
    out = gk.fused_grpo_loss(leaf.clone(), ids, old, adv, mask, loss_type="grpo", inplace_backward=inplace,
                             backend=backend)
    (out.loss * -0.25).backward()
    torch.testing.assert_close(leaf.grad, -0.25 * expected)


def test_repeated_backward(backend):
    """retain_graph: a gradient of 1 leaves the precomputed gradient as it is; after an in-place scaling
    a kernel backend refuses a second backward instead of returning a wrong gradient."""
    logits, ids, old, _, adv, mask = make_inputs()
    expected = _reference_grad(logits, ids, old, adv, mask)
    x = logits.clone().requires_grad_()
    loss = gk.fused_grpo_loss(x, ids, old, adv, mask, backend=backend).loss
    for _ in range(2):
        (grad,) = torch.autograd.grad(loss, x, retain_graph=True)
        torch.testing.assert_close(grad, expected)
    torch.autograd.grad(3 * loss, x, retain_graph=True)
    if backend != "reference":
        with pytest.raises(RuntimeError, match="second backward"):
            torch.autograd.grad(3 * loss, x)


@pytest.mark.parametrize("level", IS_LEVELS)
def test_entropy_bonus_gradient(backend, level):
    """loss − c·entropy: the entropy metric's gradient is added to the precomputed one."""
    logits, ids, old, _, adv, mask = make_inputs()
    opts = dict(return_entropy=True, temperature=1.3, importance_sampling_level=level)
    grads = []
    for b in (backend, "reference"):
        x = logits.clone().requires_grad_()
        out = gk.fused_grpo_loss(x, ids, old, adv, mask, backend=b, **opts)
        (out.loss - 0.05 * out.entropy).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])
    x = logits.clone().requires_grad_()
    (entropy_only,) = torch.autograd.grad(gk.fused_grpo_loss(x, ids, old, adv, mask, backend=backend, **opts).entropy,
                                          x)
    y = logits.clone().requires_grad_()
    gk.fused_grpo_loss(y, ids, old, adv, mask, backend="reference", **opts).entropy.backward()
    torch.testing.assert_close(entropy_only, y.grad)


def test_inplace_refuses_entropy_gradient(backend):
    if backend == "reference":
        pytest.skip("the reference never overwrites the logits")
    logits, ids, old, _, adv, mask = make_inputs()
    leaf = logits.clone().requires_grad_()
    out = gk.fused_grpo_loss(leaf.clone(), ids, old, adv, mask, return_entropy=True, inplace_backward=True,
                             backend=backend)
    out.loss.backward(retain_graph=True)  # the entropy as a metric only: fine
    out = gk.fused_grpo_loss(leaf.clone(), ids, old, adv, mask, return_entropy=True,
                             inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="entropy"):
        (out.loss + out.entropy).backward()


def test_inplace_write_is_seen_by_autograd(backend):
    """In place, the logits' version counter moves: an op that saved them for its backward fails loudly."""
    if backend == "reference":
        pytest.skip("the reference never overwrites the logits")
    logits, ids, old, _, adv, mask = make_inputs()
    z = logits.clone().requires_grad_()
    x = z.exp()  # exp saves its output for the backward
    out = gk.fused_grpo_loss(x, ids, old, adv, mask, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_inplace_on_a_leaf_is_refused(backend):
    """A leaf that requires grad would end up holding its own gradient (PyTorch refuses in-place ops on one)."""
    logits, ids, old, _, adv, mask = make_inputs()
    x = logits.clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward=True.*leaf"):
        gk.fused_grpo_loss(x, ids, old, adv, mask, inplace_backward=True, backend=backend)
    with pytest.raises(ValueError, match="inplace_backward=True.*leaf"):
        gk.token_logprobs(x, ids, inplace_backward=True, backend=backend)
    assert torch.equal(x.detach(), logits)


@pytest.mark.parametrize("inplace", [False, True])
def test_no_gradient_write_without_requires_grad(backend, inplace):
    logits, ids, old, _, adv, mask = make_inputs()
    x = logits.clone()
    out = gk.fused_grpo_loss(x, ids, old, adv, mask, inplace_backward=inplace, backend=backend)
    assert torch.equal(x, logits) and not out.loss.requires_grad
    expected = gk.fused_grpo_loss(logits, ids, old, adv, mask, backend="reference")
    torch.testing.assert_close(out.loss, expected.loss)


def test_gradient_handed_over_without_copy(backend):
    """After a backward without retain_graph, the precomputed gradient becomes ``.grad`` itself (no clone)."""
    logits, ids, old, _, adv, mask = make_inputs()
    x = logits.clone().requires_grad_()
    seen = []
    x.register_hook(lambda g: seen.append(g.data_ptr()))
    gk.fused_grpo_loss(x, ids, old, adv, mask, backend=backend).loss.backward()
    assert seen == [x.grad.data_ptr()]


# ----------------------------------------------------------------------------- loss variants
# VESPO, GMPO, GPG, rollout importance sampling, the off-policy mask and the log-ratio clamp: the token-level
# ones take the single-pass kernels, the others (a sequence pass) the two-read path; both against the float64
# reference, values and logits gradients.
VARIANTS = [
    ("vespo", dict()),
    ("vespo", dict(rollout_is_mode="token_mask", rollout_is_min=0.7, rollout_is_max=1.4, importance_weights=True)),
    ("gmpo", dict(rollout_is_mode="token_truncate", beta=0.04)),
    ("gmpo", dict(log_ratio_clamp=0.2, epsilon_low=0.1, epsilon_high=0.3)),
    ("gpg", dict(rollout_is_mode="token_truncate", rollout_is_max=1.2)),
    ("gpg", dict(off_policy_mask_threshold=0.01)),
    ("dapo", dict(rollout_is_mode="token_mask", rollout_is_min=0.8, rollout_is_max=1.25, log_ratio_clamp=0.25,
                  beta=0.04, use_bias_correction_kl=True)),
    ("grpo", dict(rollout_is_mode="sequence_truncate", rollout_is_min=0.5, rollout_is_max=1.5)),
    ("sapo", dict(off_policy_mask_threshold=0.0, importance_weights=True)),
    ("cispo", dict(rollout_is_mode="sequence_mask", rollout_is_max=2.0, importance_sampling_level="sequence")),
    ("dapo", dict(rollout_is_mode="token_mask", rollout_is_gate="tv", rollout_is_min=0.0, rollout_is_max=0.02,
                  log_ratio_clamp=20.0)),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type,opts", VARIANTS, ids=[f"{lt}-{'-'.join(sorted(o)) or 'default'}"
                                                          for lt, o in VARIANTS])
def test_loss_variants_match_reference(backend, loss_type, opts, dtype):
    logits, ids, old, ref, adv, mask = make_inputs()
    g = torch.Generator().manual_seed(7)
    sampling = old + 0.3 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    sampling[0, 1] = float("nan")
    old[1, 0] -= 25.0  # a log-ratio past every clamp
    opts = dict(opts, loss_type=loss_type, sampling_logprobs=sampling, ref_logprobs=ref)
    if opts.pop("importance_weights", False):
        opts["importance_weights"] = 0.5 + torch.rand(old.shape, generator=g, dtype=torch.float64)
    x = logits.to(dtype).requires_grad_()
    out = gk.fused_grpo_loss(x, ids, old, adv, mask, temperature=0.8, backend=backend, **opts)
    out.loss.backward()
    y = logits.to(dtype).double().requires_grad_()
    exact = gk.fused_grpo_loss(y, ids, old, adv, mask, temperature=0.8, backend="reference", **opts)
    exact.loss.backward()
    tol = TOLERANCES[dtype]
    for name, a, b in zip(out._fields, out, exact):
        if b is not None:
            torch.testing.assert_close(a.double(), b.detach(), **tol, msg=lambda m: f"{name}: {m}")
    grad_tol = dict(atol=1e-6, rtol=2**-7) if dtype == torch.bfloat16 else tol
    torch.testing.assert_close(x.grad.double(), y.grad.to(dtype).double(), **grad_tol)

"""grpo_loss: against a token-by-token Python implementation for every option; gradients; properties."""

import itertools
import math

import pytest
import torch
from conftest import interpreted
from hypothesis import given
from hypothesis import strategies as st
from loss_cases import LOSS_TYPES as ALL
from loss_cases import OWN_WEIGHT_LOSS_TYPES, TOKEN_RATIO_LOSS_TYPES, applicable

import grpo_kernels as gk

OP = "grpo_loss"

# check_against_python implements the loss types with a per-token ratio (the others: test_variants_*)
LOSS_TYPES = list(TOKEN_RATIO_LOSS_TYPES)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def python_loss(logp, old, adv, mask, *, ref=None, beta=0.0, eps_low=0.2, eps_high=None, delta=None, c=None,
                loss_type="dapo", level="token", kl_est="k3", bias_kl=False, iw=None, max_len=None, n_items=None,
                tau_pos=1.0, tau_neg=1.05):
    """Plain floats, one token at a time. adv/iw given per token ([B][T] lists)."""
    eps_high = eps_low if eps_high is None else eps_high
    B, T = len(logp), len(logp[0])
    per_token = [[0.0] * T for _ in range(B)]
    kl = [[0.0] * T for _ in range(B)]
    low = [[False] * T for _ in range(B)]
    high = [[False] * T for _ in range(B)]
    for i in range(B):
        n_i = sum(mask[i])
        seq_w = sum(mask[i][t] * (logp[i][t] - old[i][t]) for t in range(T)) / max(1.0, n_i)
        for t in range(T):
            a = adv[i][t]
            w = seq_w if level == "sequence" else logp[i][t] - old[i][t]
            c1 = math.exp(w)
            if ref is not None:
                d = ref[i][t] - logp[i][t]
                if kl_est == "k1":
                    k = -d
                elif kl_est == "k2":
                    k = d * d / 2
                elif kl_est == "low_var_kl":
                    dc = min(max(d, -20.0), 20.0)
                    k = min(max(math.exp(dc) - dc - 1, -10.0), 10.0)
                else:
                    k = math.exp(d) - d - 1
                kl[i][t] = k * c1 if bias_kl else k
            if loss_type == "cispo":
                loss = -min(c1, eps_high) * a * logp[i][t]
                high[i][t] = c1 > eps_high and a > 0
            elif loss_type == "sapo":
                tau = tau_pos if a > 0 else tau_neg
                loss = -sigmoid(tau * (c1 - 1)) * 4 / tau * a
                low[i][t] = c1 < 1 - eps_low and a < 0
                high[i][t] = c1 > 1 + eps_high and a > 0
            else:
                c2 = min(max(c1, 1 - eps_low), 1 + eps_high)
                if delta is not None:
                    c1 = min(c1, delta)
                loss = -min(c1 * a, c2 * a)
                if c is not None and a < 0:
                    loss = min(loss, -a * c)
                low[i][t] = c1 < 1 - eps_low and a < 0
                high[i][t] = c1 > 1 + eps_high and a > 0
            if iw is not None:
                loss *= iw[i][t]
            if beta != 0.0:
                loss += beta * kl[i][t]
            per_token[i][t] = loss

    seq_sums = [sum(mask[i][t] * per_token[i][t] for t in range(T)) for i in range(B)]
    n_seq = [sum(mask[i]) for i in range(B)]
    total_n = sum(n_seq)
    if loss_type in ("grpo", "sapo"):
        loss = sum(s / max(1.0, n) for s, n in zip(seq_sums, n_seq)) / B
    elif loss_type == "bnpo":
        loss = sum(seq_sums) / max(1.0, total_n)
    elif loss_type == "dr_grpo":
        loss = sum(seq_sums) / (B * (max_len or T))
    elif loss_type in ("dapo", "cispo"):
        loss = sum(seq_sums) / max(1.0, total_n if n_items is None else n_items)
    else:
        loss = sum(seq_sums) / B

    def masked_mean(x):
        return sum(mask[i][t] * float(x[i][t]) for i in range(B) for t in range(T)) / max(1.0, total_n)

    region = [[low[i][t] or high[i][t] for t in range(T)] for i in range(B)]
    return dict(loss=loss, per_token_loss=per_token, kl=masked_mean(kl) if ref is not None else None,
                clip_ratio_low=masked_mean(low), clip_ratio_high=masked_mean(high),
                clip_ratio_region=masked_mean(region))


def make_inputs(B=3, T=5, *, spread=0.3, dtype=torch.float64, adv_shape="B", seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + spread * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = {"B": torch.randn(B, generator=g, dtype=torch.float64),
           "B1": torch.randn(B, 1, generator=g, dtype=torch.float64),
           "BT": torch.randn(B, T, generator=g, dtype=torch.float64)}[adv_shape]
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = True
    if B > 2:
        mask[2] = False  # a fully masked sequence
    iw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return [x.to(dtype) for x in (logp, old, ref, adv, iw)] + [mask]


def per_token_list(t, B, T):
    t = t.double()
    if t.ndim == 1:
        t = t[:, None]
    return t.expand(B, T).tolist()


def check_against_python(out, logp, old, adv, mask, ref=None, iw=None, **opts):
    B, T = logp.shape
    py_opts = dict(beta=opts.get("beta", 0.0), eps_low=opts.get("epsilon_low", 0.2),
                   eps_high=opts.get("epsilon_high"), delta=opts.get("delta"), c=opts.get("clip_ratio_c"),
                   loss_type=opts.get("loss_type", "dapo"), level=opts.get("importance_sampling_level", "token"),
                   kl_est=opts.get("kl_estimator", "k3"), bias_kl=opts.get("use_bias_correction_kl", False),
                   max_len=opts.get("max_completion_length"),
                   n_items=None if opts.get("num_items_in_batch") is None else float(opts["num_items_in_batch"]),
                   tau_pos=opts.get("sapo_temperature_pos", 1.0), tau_neg=opts.get("sapo_temperature_neg", 1.05))
    old_l = logp.tolist() if old is None else old.double().tolist()
    expected = python_loss(
        logp.double().tolist(), old_l, per_token_list(adv, B, T), mask.int().tolist(),
        ref=None if ref is None else ref.double().tolist(),
        iw=None if iw is None else per_token_list(iw, B, T), **py_opts,
    )
    tol = dict(atol=1e-12, rtol=1e-10) if logp.dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    dt = torch.float64
    torch.testing.assert_close(out.loss.double(), torch.tensor(expected["loss"], dtype=dt), **tol)
    expected_ptl = torch.tensor(expected["per_token_loss"], dtype=dt).where(mask.bool(), 0.0)  # 0 where masked
    torch.testing.assert_close(out.per_token_loss.double(), expected_ptl, **tol)
    assert out.per_token_loss.shape == (B, T)
    if ref is None:
        assert out.kl is None
    else:
        torch.testing.assert_close(out.kl.double(), torch.tensor(expected["kl"], dtype=dt), **tol)
    if opts.get("importance_sampling_level", "token") == "token" or adv.ndim == 2 and adv.shape[1] == T:
        for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
            torch.testing.assert_close(getattr(out, name).double(), torch.tensor(expected[name], dtype=dt), **tol)


OPTION_GRID = [
    dict(),
    dict(beta=0.04),
    dict(beta=0.1, kl_estimator="k1"),
    dict(beta=0.1, kl_estimator="k2"),
    dict(beta=0.1, kl_estimator="low_var_kl"),
    dict(beta=0.04, use_bias_correction_kl=True),
    dict(epsilon_low=0.1, epsilon_high=0.28),
    dict(epsilon_high=5.0),
    dict(delta=1.3),
    dict(clip_ratio_c=3.0),
    dict(clip_ratio_c=1.5, delta=1.2, epsilon_high=0.28),
    dict(max_completion_length=9),
    dict(num_items_in_batch=17),
    dict(num_items_in_batch=torch.tensor(4.0)),
    dict(sapo_temperature_pos=0.5, sapo_temperature_neg=2.0),
]


CASES = [(lt, o) for lt, o in itertools.product(LOSS_TYPES, OPTION_GRID) if applicable(lt, o)]


LEVEL_SHAPES = list(itertools.product(["token", "sequence"], ["B", "BT"]))  # (level, advantages' shape)


@pytest.mark.parametrize("loss_type,opts", CASES, ids=[f"{lt}-{sorted(o)}" for lt, o in CASES])
def test_matches_python(backend, loss_type, opts):
    cases = LEVEL_SHAPES
    if interpreted(backend):  # the interpreter is slow: one (level, shape) per case, rotating over the cases
        cases = [LEVEL_SHAPES[CASES.index((loss_type, opts)) % len(LEVEL_SHAPES)]]
    for level, adv_shape in cases:
        logp, old, ref, adv, iw, mask = make_inputs(adv_shape=adv_shape, spread=0.4)
        kwargs = dict(opts, loss_type=loss_type, importance_sampling_level=level)
        out = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, backend=backend, **kwargs)
        check_against_python(out, logp, old, adv, mask, ref=ref, **kwargs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("iw_shape", ["B", "B1", "BT"])
def test_importance_weights(backend, loss_type, iw_shape):
    logp, old, ref, adv, iw, mask = make_inputs()
    iw = {"B": iw[:, 0], "B1": iw[:, :1], "BT": iw}[iw_shape]
    out = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.05, importance_weights=iw,
                       loss_type=loss_type, backend=backend)
    check_against_python(out, logp, old, adv, mask, ref=ref, iw=iw, beta=0.05, loss_type=loss_type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_low_precision_inputs(backend, dtype, loss_type):
    logp, old, ref, adv, _, mask = make_inputs(dtype=dtype)
    out = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type, backend=backend)
    assert out.loss.dtype == torch.float32
    check_against_python(out, logp, old, adv, mask, ref=ref, beta=0.04, loss_type=loss_type)


def test_sequence_level_metrics_are_per_sequence(backend):
    """With one ratio per sequence and per-sequence advantages, clip metrics average over sequences."""
    logp = torch.zeros(4, 3, dtype=torch.float64)
    old = torch.tensor([[-1.0] * 3, [1.0] * 3, [0.0] * 3, [-1.0] * 3], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    out = gk.grpo_loss(logp, old, adv, mask, importance_sampling_level="sequence", backend=backend)
    # ratio e^1 with A>0 (high), e^-1 with A<0 (low), 1, and an empty sequence (ratio e^0)
    assert out.clip_ratio_high.item() == 0.25
    assert out.clip_ratio_low.item() == 0.25
    assert out.clip_ratio_region.item() == 0.5


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradcheck(backend, loss_type, level):
    logp, old, ref, adv, iw, mask = make_inputs(spread=0.25)
    logp.requires_grad_()
    opts = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, ref_logprobs=ref,
                importance_weights=iw, use_bias_correction_kl=True, epsilon_high=0.28)

    def f(x):
        return gk.grpo_loss(x, old, adv, mask, backend=backend, **opts).loss

    # fast_mode under the interpreter: the Jacobian in one random direction, not column by column
    assert torch.autograd.gradcheck(f, (logp,), fast_mode=interpreted(backend))


def test_gradient_only_through_unmasked_tokens(backend):
    logp, old, ref, adv, _, mask = make_inputs()
    logp.requires_grad_()
    gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.1, backend=backend).loss.backward()
    assert (logp.grad[~mask] == 0).all()
    assert (logp.grad[mask] != 0).any()


@pytest.mark.parametrize("loss_type", [lt for lt in LOSS_TYPES if lt != "cispo"])
def test_on_policy_loss_is_minus_mean_advantage(backend, loss_type):
    """old = None (ratio 1), beta 0: the loss is -A averaged like the loss type aggregates."""
    logp, _, _, adv, _, mask = make_inputs()
    out = gk.grpo_loss(logp, None, adv, mask, loss_type=loss_type, max_completion_length=5, backend=backend)
    m = mask.double()
    a = adv[:, None].expand_as(m)
    expected = {
        "grpo": ((a * m).sum(-1) / m.sum(-1).clamp(min=1)).mean(),
        "sapo": ((a * m).sum(-1) / m.sum(-1).clamp(min=1)).mean(),  # sigmoid(0)·4/τ·A·τ/... = A·2/τ? no: see below
        "bnpo": (a * m).sum() / m.sum(),
        "dapo": (a * m).sum() / m.sum(),
        "dr_grpo": (a * m).sum() / (m.shape[0] * 5),
        "luspo": (a * m).sum(-1).mean(),
    }[loss_type]
    if loss_type == "sapo":  # -σ(0)·4/τ·A = -2A/τ, τ depending on the sign of A
        tau = torch.where(adv > 0, 1.0, 1.05).double()
        expected = (((2 / tau)[:, None] * a * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    torch.testing.assert_close(out.loss, -expected)
    assert out.clip_ratio_region == 0


def test_on_policy_gradient(backend):
    """At ratio 1 the dapo gradient is the policy gradient -A·m / N."""
    logp, _, _, adv, _, mask = make_inputs()
    logp.requires_grad_()
    gk.grpo_loss(logp, None, adv, mask, backend=backend).loss.backward()
    expected = -adv[:, None] * mask.double() / mask.sum()
    torch.testing.assert_close(logp.grad, expected)


def test_all_masked(backend):
    logp, old, ref, adv, _, mask = make_inputs()
    mask = torch.zeros_like(mask)
    for loss_type in LOSS_TYPES:
        out = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.1, loss_type=loss_type, backend=backend)
        assert out.loss.item() == 0.0 and out.kl.item() == 0.0 and out.clip_ratio_region.item() == 0.0


def test_single_token(backend):
    logp = torch.tensor([[-0.5]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    out = gk.grpo_loss(logp, old, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool),
                       backend=backend)
    # ratio e^0.5 > 1.2 with A > 0: clipped, constant loss -1.2·2, zero gradient
    torch.testing.assert_close(out.loss, torch.tensor(-2.4, dtype=torch.float64))
    assert out.clip_ratio_high.item() == 1.0
    out.loss.backward()
    assert logp.grad.item() == 0.0


def test_dual_clip_caps_negative_advantage_loss(backend):
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    old = torch.tensor([[-3.0, -0.1]], dtype=torch.float64)  # ratios e^3 ≈ 20 and e^0.1
    adv = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2)
    plain = gk.grpo_loss(logp, old, adv, mask, backend=backend).per_token_loss
    dual = gk.grpo_loss(logp, old, adv, mask, clip_ratio_c=3.0, backend=backend).per_token_loss
    torch.testing.assert_close(plain[0, 0], torch.tensor(math.exp(3.0), dtype=torch.float64))
    torch.testing.assert_close(dual[0, 0], torch.tensor(3.0, dtype=torch.float64))
    torch.testing.assert_close(dual[0, 1], plain[0, 1])


def test_delta_caps_ratio(backend):
    logp = torch.tensor([[0.0]], dtype=torch.float64)
    old = torch.tensor([[-2.0]], dtype=torch.float64)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    out = gk.grpo_loss(logp, old, adv, torch.ones(1, 1), delta=2.0, backend=backend)
    torch.testing.assert_close(out.loss, torch.tensor(2.0, dtype=torch.float64))  # -min(2·(-1), 1.2·(-1)) = 2


def test_num_items_in_batch_forms_agree(backend):
    logp, old, _, adv, _, mask = make_inputs()
    a = gk.grpo_loss(logp, old, adv, mask, num_items_in_batch=11, backend=backend).loss
    b = gk.grpo_loss(logp, old, adv, mask, num_items_in_batch=torch.tensor(11), backend=backend).loss
    c = gk.grpo_loss(logp, old, adv, mask, num_items_in_batch=11.0, backend=backend).loss
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    # N < 1 is refused (a normalizer counts tokens)
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 1"):
        gk.grpo_loss(logp, old, adv, mask, num_items_in_batch=0, backend=backend)


def test_float_mask_equals_bool_mask(backend):
    logp, old, ref, adv, _, mask = make_inputs()
    for other in (mask.float(), mask.long(), mask.to(torch.uint8)):
        a = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.1, backend=backend)
        b = gk.grpo_loss(logp, old, adv, other, ref_logprobs=ref, beta=0.1, backend=backend)
        for x, y in zip(a, b):
            if x is not None:
                torch.testing.assert_close(x, y)


def test_kl_reported_with_beta_zero(backend):
    logp, old, ref, adv, _, mask = make_inputs()
    out0 = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, backend=backend)
    plain = gk.grpo_loss(logp, old, adv, mask, backend=backend)
    torch.testing.assert_close(out0.loss, plain.loss)
    assert out0.kl is not None and out0.kl > 0


# ----------------------------------------------------------------------------- properties
@given(
    st.integers(1, 4), st.integers(1, 6), st.sampled_from(LOSS_TYPES), st.sampled_from(["token", "sequence"]),
    st.floats(0.0, 1.0), st.integers(0, 2**31 - 1),
)
def test_metric_ranges_and_kl_nonnegative(B, T, loss_type, level, spread, seed):
    logp, old, ref, adv, _, mask = make_inputs(B, T, spread=spread, seed=seed)
    out = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type,
                       importance_sampling_level=level)
    for name in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        v = getattr(out, name).item()
        assert 0.0 <= v <= 1.0, name
    # low and high are disjoint (opposite advantage signs): region is their sum
    torch.testing.assert_close(out.clip_ratio_region, out.clip_ratio_low + out.clip_ratio_high)
    assert out.kl.item() >= 0.0  # k3 >= 0
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- against the reference's autograd
# Cases for fast backends (trivially true for the reference itself): every output and d loss / d logprobs equal
# the reference's, including at ties of the clipped objective (PyTorch's clamp passes the gradient at its bounds,
# torch.min splits a tie 0.5/0.5).
def _loss_and_grad(backend, logp, old, adv, mask, **kwargs):
    x = logp.detach().clone().requires_grad_()
    out = gk.grpo_loss(x, old, adv, mask, backend=backend, **kwargs)
    out.loss.backward()
    return out, x.grad


def assert_matches_reference(backend, logp, old, adv, mask, *, tol=None, **kwargs):
    tol = tol or dict(atol=1e-12, rtol=1e-10)
    out, grad = _loss_and_grad(backend, logp, old, adv, mask, **kwargs)
    ref_out, ref_grad = _loss_and_grad("reference", logp, old, adv, mask, **kwargs)
    for name, x, y in zip(out._fields, out, ref_out):
        if y is None:
            assert x is None, name
        else:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            torch.testing.assert_close(x, y.detach(), **tol, msg=lambda m: f"{name}: {m}")
    assert grad.dtype == ref_grad.dtype
    torch.testing.assert_close(grad, ref_grad, **tol)


@pytest.mark.vs_reference
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gradient_matches_reference(backend, loss_type, level):
    logp, old, ref, adv, iw, mask = make_inputs(adv_shape="BT" if level == "token" else "B", spread=0.4)
    options = OPTION_GRID
    if interpreted(backend):  # the interpreter is slow: every other option, alternating over the parametrization
        options = OPTION_GRID[(LOSS_TYPES.index(loss_type) + (level == "sequence")) % 2::2]
    for opts in options:
        if applicable(loss_type, opts):
            assert_matches_reference(backend, logp, old, adv, mask, ref_logprobs=ref, importance_weights=iw,
                                     loss_type=loss_type, importance_sampling_level=level, **opts)


TIE_OPTIONS = [dict(), dict(delta=1.0), dict(epsilon_low=0.0, epsilon_high=0.0), dict(clip_ratio_c=1.5, delta=1.0)]


@pytest.mark.vs_reference
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_tie_gradient_matches_reference(backend, loss_type, level):
    """old == logp exactly (ratio exactly 1, the on-policy case): c1·A == clip(c1)·A, c1 == delta, c1 == 1 ± eps."""
    logp, _, ref, adv, iw, mask = make_inputs()
    for opts in TIE_OPTIONS:
        if applicable(loss_type, opts):
            for old in (logp.clone(), None):
                assert_matches_reference(backend, logp, old, adv, mask, ref_logprobs=ref, beta=0.04,
                                         importance_weights=iw[:, :1], loss_type=loss_type,
                                         importance_sampling_level=level, **opts)


def test_many_sequences(backend):
    B, T = 67, 23
    logp, old, ref, adv, iw, mask = make_inputs(B, T, spread=0.3, dtype=torch.float32, seed=3)
    for loss_type, level in (("dapo", "token"), ("grpo", "sequence"), ("sapo", "token")):
        assert_matches_reference(backend, logp, old, adv, mask, ref_logprobs=ref, beta=0.04, importance_weights=iw,
                                 loss_type=loss_type, importance_sampling_level=level,
                                 tol=dict(atol=1e-6, rtol=1e-5))


@pytest.mark.parametrize("n_items", [torch.tensor(7.0), torch.tensor(7), torch.tensor(1.0)],
                         ids=["float0d", "int0d", "one"])
def test_num_items_in_batch_tensor(backend, n_items):
    """A 0-d CPU tensor N (no CUDA involved): loss and gradient as the reference's."""
    logp, old, ref, adv, _, mask = make_inputs()
    for loss_type in ("dapo", "cispo"):
        assert_matches_reference(backend, logp, old, adv, mask, ref_logprobs=ref, beta=0.04, loss_type=loss_type,
                                 num_items_in_batch=n_items)


def test_num_items_in_batch_one_element_tensor(backend):
    logp, old, _, adv, _, mask = make_inputs()
    a, grad_a = _loss_and_grad(backend, logp, old, adv, mask, num_items_in_batch=torch.tensor([7.0]))
    b, grad_b = _loss_and_grad(backend, logp, old, adv, mask, num_items_in_batch=7.0)
    # the reference's loss takes the shape [1] of such an N; the documented shape, 0-d, elsewhere
    torch.testing.assert_close(a.loss.reshape(()), b.loss)
    torch.testing.assert_close(grad_a, grad_b)
    if backend != "reference":
        assert a.loss.shape == ()


def test_noncontiguous_inputs(backend):
    logp, old, ref, adv, iw, mask = make_inputs(4, 6, adv_shape="BT")
    t = lambda x: x.t().contiguous().t()  # noqa: E731  same values, column-major
    for level in ("token", "sequence"):
        assert_matches_reference(backend, t(logp), t(old), adv[:, 1:2], t(mask), ref_logprobs=t(ref), beta=0.1,
                                 importance_weights=iw[:, ::2][:, 0], importance_sampling_level=level)
        assert_matches_reference(backend, logp, old, t(adv), mask, ref_logprobs=ref, beta=0.1,
                                 importance_weights=t(iw), importance_sampling_level=level)


# ----------------------------------------------------------------------------- Triton only
def _triton_module():
    if "triton" not in gk.available_backends(OP):
        pytest.skip("the triton backend does not implement grpo_loss here")
    import importlib

    return importlib.import_module("grpo_kernels.triton.grpo_loss")


@pytest.mark.parametrize("loss_type,level,adv_shape", [
    ("dapo", "token", "BT"), ("grpo", "sequence", "B"), ("cispo", "sequence", "BT"), ("sapo", "token", "B"),
    ("luspo", "sequence", "B1"),
])
def test_triton_completion_longer_than_one_block(monkeypatch, loss_type, level, adv_shape):
    """T = 11 over blocks of 4 tokens (the last one partial), first loop of the sequence level included."""
    monkeypatch.setattr(_triton_module(), "BLOCK_T_OVERRIDE", 4)
    logp, old, ref, adv, iw, mask = make_inputs(3, 11, adv_shape=adv_shape, spread=0.4, seed=1)
    assert_matches_reference("triton", logp, old, adv, mask, ref_logprobs=ref, beta=0.04, importance_weights=iw,
                             use_bias_correction_kl=True, loss_type=loss_type, importance_sampling_level=level)
    out = gk.grpo_loss(logp, old, adv, mask, loss_type=loss_type, importance_sampling_level=level, backend="triton")
    check_against_python(out, logp, old, adv, mask, loss_type=loss_type, importance_sampling_level=level)


def test_triton_block_table():
    module = _triton_module()
    assert module._block_config(5)[0] == 16
    assert module._block_config(300)[0] == 512
    assert module._block_config(100_000)[0] == 1024


def test_triton_only_loss_is_differentiable():
    """Documented: per_token_loss, kl and the metrics of the triton backend carry no gradient."""
    _triton_module()
    logp, old, ref, adv, _, mask = make_inputs(dtype=torch.bfloat16)
    logp.requires_grad_()
    out = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, beta=0.04, backend="triton")
    assert out.loss.requires_grad
    for name in ("per_token_loss", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        assert not getattr(out, name).requires_grad, name
    out.loss.backward()
    assert logp.grad.dtype == torch.bfloat16
    x = logp.detach().clone().requires_grad_()
    gk.grpo_loss(x, old, adv, mask, ref_logprobs=ref, beta=0.04, backend="reference").loss.backward()
    torch.testing.assert_close(logp.grad, x.grad, atol=1e-6, rtol=2**-7)  # float32 math, rounded to bfloat16


def test_loss_is_0d_with_one_element_num_items(backend):
    logp, old, _, adv, _, mask = make_inputs()
    out = gk.grpo_loss(logp, old, adv, mask, num_items_in_batch=torch.tensor([11.0]), backend=backend)
    assert out.loss.shape == ()
    expected = gk.grpo_loss(logp, old, adv, mask, num_items_in_batch=11, backend=backend).loss
    torch.testing.assert_close(out.loss, expected)


# ----------------------------------------------------------------------------- loss variants
# VESPO, GMPO, GPG, rollout importance sampling from sampling log-probs, the off-policy sequence mask and the
# log-ratio clamp, against the float64 reference (its formulas are checked against TRL's and verl's code in
# tests/test_trl_parity.py and tests/test_verl_parity.py).
VARIANT_OPTIONS = [
    dict(),
    dict(rollout_is_mode="token_truncate"),
    dict(rollout_is_mode="token_truncate", rollout_is_min=0.9, rollout_is_max=None),
    dict(rollout_is_mode="token_mask", rollout_is_min=0.8, rollout_is_max=1.25),
    dict(rollout_is_mode="sequence_truncate", rollout_is_min=0.5, rollout_is_max=2.0),
    dict(rollout_is_mode="sequence_mask", rollout_is_min=0.3, rollout_is_max=None),
    dict(off_policy_mask_threshold=0.02),
    dict(off_policy_mask_threshold=0.0, sampling=False),  # the mask's KL from old_logprobs
    dict(log_ratio_clamp=0.3),
    dict(log_ratio_clamp=0.3, rollout_is_mode="token_mask", rollout_is_min=0.9, rollout_is_max=1.1),
    dict(vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=0.0, epsilon_low=0.1,
         epsilon_high=0.3),
    dict(beta=0.05, kl_estimator="low_var_kl", use_bias_correction_kl=True, off_policy_mask_threshold=0.05,
         rollout_is_mode="token_truncate"),
]
ALL_LOSS_TYPES = list(ALL)


def variant_applicable(loss_type, level, opts):
    """The combinations the options allow (the others are refused by validation: tests/test_validation.py)."""
    return applicable(loss_type, {k: v for k, v in opts.items() if k != "sampling"}, level)


def variant_inputs(B=4, T=7, *, adv_shape="B", dtype=torch.float64, seed=0, extreme=True):
    """make_inputs plus sampling log-probs (a NaN, as vLLM leaves unscored tokens) and, with ``extreme``,
    log-ratios of ±30 and a huge rollout ratio, past every clamp."""
    logp, old, ref, adv, iw, mask = make_inputs(B, T, spread=0.4, adv_shape=adv_shape, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    sampling = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    sampling[1, 2] = float("nan")
    if extreme:
        old[0, 0], old[1, 1] = logp[0, 0] - 30.0, logp[1, 1] + 30.0
        sampling[3, 0] = old[3, 0] - 60.0
        mask[1, 1] = mask[3, 0] = True
    return [x.to(dtype) for x in (logp, old, ref, adv, iw, sampling)] + [mask]


def variant_kwargs(opts, ref, iw, sampling):
    kwargs = {k: v for k, v in opts.items() if k != "sampling"}
    if opts.get("sampling", True):
        kwargs["sampling_logprobs"] = sampling
    if kwargs.get("beta"):
        kwargs["ref_logprobs"] = ref
    kwargs["importance_weights"] = iw
    return kwargs


@pytest.mark.vs_reference
@pytest.mark.parametrize("loss_type", ALL_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_variants_match_reference(backend, loss_type, level):
    shapes = list(itertools.product(["B", "BT"], ["none", "BT", "B1"]))
    cases = [(adv_shape, iw_shape, opts) for (adv_shape, iw_shape), opts in itertools.product(shapes, VARIANT_OPTIONS)]
    if interpreted(backend):
        # the interpreter is slow: each option once, with the (advantage, weight) shapes rotating over the
        # options and over the parametrization, so the matrix as a whole still meets every combination
        shift = ALL_LOSS_TYPES.index(loss_type) + 2 * (level == "sequence")
        cases = [(*shapes[(k + shift) % len(shapes)], opts) for k, opts in enumerate(VARIANT_OPTIONS)]
    for adv_shape, iw_shape, opts in cases:
        if not variant_applicable(loss_type, level, opts) or (loss_type == "vespo" and iw_shape == "B1"):
            continue
        logp, old, ref, adv, iw, sampling, mask = variant_inputs(adv_shape=adv_shape)
        iw = {"none": None, "BT": iw, "B1": iw[:, :1]}[iw_shape]
        assert_matches_reference(backend, logp, old, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                                 **variant_kwargs(opts, ref, iw, sampling))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss_type", [*OWN_WEIGHT_LOSS_TYPES, "dapo"])
def test_variants_low_precision(backend, dtype, loss_type):
    """float32 / bfloat16 inputs: values and gradients as the float64 reference on the same (rounded) inputs."""
    for opts in VARIANT_OPTIONS:
        if not variant_applicable(loss_type, "token", opts):
            continue
        logp, old, ref, adv, iw, sampling, mask = variant_inputs(dtype=dtype, adv_shape="BT", seed=2)
        kwargs = variant_kwargs(opts, ref, iw, sampling)
        x = logp.detach().clone().requires_grad_()
        out = gk.grpo_loss(x, old, adv, mask, loss_type=loss_type, backend=backend, **kwargs)
        out.loss.backward()
        exact_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        y = logp.detach().double().requires_grad_()
        exact = gk.grpo_loss(y, old.double(), adv.double(), mask, loss_type=loss_type, backend="reference",
                             **exact_kwargs)
        exact.loss.backward()
        assert out.loss.dtype == torch.float32
        for name in ("loss", "clip_ratio_low", "clip_ratio_high", "per_token_loss"):
            torch.testing.assert_close(getattr(out, name).double(), getattr(exact, name).detach(), atol=2e-5,
                                       rtol=2e-5, msg=lambda m: f"{opts} {name}: {m}")
        grad_tol = dict(atol=1e-6, rtol=2**-7) if dtype == torch.bfloat16 else dict(atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(x.grad.double(), y.grad.to(dtype).double(), **grad_tol)


def test_variants_fully_masked(backend):
    logp, old, ref, adv, iw, sampling, mask = variant_inputs()
    mask = torch.zeros_like(mask)
    for loss_type in OWN_WEIGHT_LOSS_TYPES:
        for opts in VARIANT_OPTIONS:
            if variant_applicable(loss_type, "token", opts):
                out = gk.grpo_loss(logp, old, adv, mask, loss_type=loss_type, backend=backend,
                                   **variant_kwargs(opts, ref, iw, sampling))
                assert out.loss.item() == 0.0 and out.clip_ratio_region.item() == 0.0


def test_log_ratio_clamp_stops_the_gradient_outside(backend):
    """With log_ratio_clamp = c, a token whose |log-ratio| > c has a constant ratio e^{±c}: no gradient."""
    logp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-30.0, 0.1, 30.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    out = gk.grpo_loss(logp, old, adv, torch.ones(1, 3), log_ratio_clamp=20.0, epsilon_high=1e30, backend=backend)
    expected = torch.tensor([[-math.exp(20.0), -math.exp(-0.1), -math.exp(-20.0)]], dtype=torch.float64)
    torch.testing.assert_close(out.per_token_loss, expected)
    out.loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0 and logp.grad[0, 1] != 0


def test_off_policy_mask_drops_drifted_negative_sequences(backend):
    """TRL's off-policy mask keeps A >= 0 and sequences whose mean KL(sampling ‖ policy) is at most the threshold."""
    logp = torch.full((4, 2), -1.0, dtype=torch.float64)
    drift = torch.tensor([[0.5, 0.5], [0.5, float("nan")], [0.01, 0.01], [0.5, 0.5]], dtype=torch.float64)
    adv = torch.tensor([-1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    out = gk.grpo_loss(logp, None, adv, torch.ones(4, 2), loss_type="gpg", sampling_logprobs=logp + drift,
                       off_policy_mask_threshold=0.1, backend=backend)
    # gpg: ℓ = -logp · A = A; row 1's NaN counts as 0 (mean KL 0.25): dropped like row 0; row 2 kept (0.01)
    expected = torch.tensor([[0.0], [0.0], [-1.0], [1.0]], dtype=torch.float64).expand(4, 2)
    torch.testing.assert_close(out.per_token_loss, expected)


@pytest.mark.parametrize("mode,expected", [
    ("token_truncate", [2.0, 1.0, 0.5, 0.5]),
    ("token_mask", [0.0, 1.0, 0.0, 0.0]),
    ("sequence_truncate", [0.5] * 4),  # e^{ln 3 + 0 - ln 3 - ln 5} = 0.2, truncated to 0.5
    ("sequence_mask", [0.0] * 4),
])
def test_rollout_ratio_modes(backend, mode, expected):
    """gpg with logp = -1, A = -1: the per-token loss is -ρ, ρ the rollout ratio old / sampling in [0.5, 2]."""
    logp = torch.full((1, 4), -1.0, dtype=torch.float64)
    old = torch.zeros(1, 4, dtype=torch.float64)
    sampling = -torch.log(torch.tensor([[3.0, 1.0, 1 / 3.0, 0.2]], dtype=torch.float64))
    out = gk.grpo_loss(logp, old, torch.tensor([-1.0], dtype=torch.float64), torch.ones(1, 4), loss_type="gpg",
                       sampling_logprobs=sampling, rollout_is_mode=mode, rollout_is_min=0.5, rollout_is_max=2.0,
                       backend=backend)
    torch.testing.assert_close(out.per_token_loss, -torch.tensor([expected], dtype=torch.float64))


# ----------------------------------------------------------------------------- rollout gates
# rollout_is_gate (OpenRLHF's IS-correction gates): (mode, gate, rollout_is_min, rollout_is_max); the bounds
# filter part of gate_inputs' units and keep the rest.
GATE_CASES = [
    ("token_mask", "binary_kl", None, 0.02),
    ("token_mask", "tv", 0.0, 0.1),
    ("sequence_mask", "binary_kl", -1.0, 0.035),
    ("sequence_mask", "tv", None, 0.08),
    ("sequence_mask", "geometric_mean", 0.8, 1.25),
]
# loss type, importance_sampling_level, log_ratio_clamp: the clipped family at both levels, a folding family
# (token-level gates only), with and without the clamp of the rollout log-ratios
GATE_LOSSES = [("dapo", "token", None), ("grpo", "sequence", 20.0), ("cispo", "token", 20.0), ("vespo", "token", None),
               ("gmpo", "token", 20.0)]


def gate_inputs(dtype=torch.float64, seed=3):
    """variant_inputs (a NaN sampling log-prob at a kept token, log-ratios past ±20) with wider train/rollout
    gaps, garbage at masked positions and an empty row (2)."""
    logp, old, ref, adv, iw, sampling, mask = variant_inputs(B=5, T=6, adv_shape="BT", seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    sampling = old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    sampling[1, 2], mask[1, 2] = float("nan"), True
    sampling[3, 0] = old[3, 0] - 60.0
    old, sampling = old.clamp(max=-1e-3), sampling.clamp(max=-1e-3)
    mask[2] = False
    for k, t in enumerate((logp, old, adv, sampling, iw)):
        t.masked_fill_(~mask, (float("nan"), float("inf"), -float("inf"), float("nan"), float("inf"))[k])
    return [x.to(dtype) for x in (logp, old, ref, adv, iw, sampling)] + [mask]


@pytest.mark.vs_reference
@pytest.mark.parametrize("mode,gate,low,high", GATE_CASES, ids=[f"{m}-{g}" for m, g, _, _ in GATE_CASES])
def test_rollout_gates_match_reference(backend, mode, gate, low, high):
    """Values, metrics and gradients of every gate against the reference, float64 and float32."""
    options = dict(rollout_is_mode=mode, rollout_is_gate=gate, rollout_is_min=low, rollout_is_max=high)
    losses = [case for case in GATE_LOSSES if applicable(case[0], options, case[1])]
    cases = [(*case, dtype) for case in losses for dtype in (torch.float64, torch.float32)]
    if interpreted(backend):  # the interpreter is slow: one loss type per gate (rotating), float64
        cases = [(*losses[GATE_CASES.index((mode, gate, low, high)) % len(losses)], torch.float64)]
    for loss_type, level, clamp, dtype in cases:
        logp, old, _ref, adv, _iw, sampling, mask = gate_inputs(dtype)
        tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-5)
        assert_matches_reference(backend, logp, old, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                                 sampling_logprobs=sampling, log_ratio_clamp=clamp, tol=tol, **options)
    # the bounds keep some kept tokens and drop others (a test that can filter nothing would prove little)
    _logp, old, _ref, _adv, _iw, sampling, mask = gate_inputs()
    w = gk.reference.rollout_importance_ratio(old.masked_fill(~mask, 0), sampling.masked_fill(~mask, 0),
                                              mask.double(), mode, low, high, None, gate)
    assert 0 < int((w[mask] == 0).sum()) < int(mask.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rollout_gates_low_precision(backend, dtype):
    """float32 / bfloat16 inputs: values and gradients as the float64 reference on the same (rounded) inputs."""
    cases = GATE_CASES[1:3] if interpreted(backend) else GATE_CASES
    for mode, gate, low, high in cases:
        logp, old, _ref, adv, _iw, sampling, mask = gate_inputs(dtype, seed=5)
        options = dict(rollout_is_mode=mode, rollout_is_gate=gate, rollout_is_min=low, rollout_is_max=high,
                       log_ratio_clamp=20.0)
        x = logp.detach().clone().requires_grad_()
        out = gk.grpo_loss(x, old, adv, mask, sampling_logprobs=sampling, backend=backend, **options)
        out.loss.backward()
        y = logp.detach().double().requires_grad_()
        exact = gk.grpo_loss(y, old.double(), adv.double(), mask, sampling_logprobs=sampling.double(),
                             backend="reference", **options)
        exact.loss.backward()
        for name in ("loss", "clip_ratio_region", "per_token_loss"):
            torch.testing.assert_close(getattr(out, name).double(), getattr(exact, name).detach(), atol=2e-5,
                                       rtol=2e-5, msg=lambda m: f"{gate} {name}: {m}")
        grad_tol = dict(atol=1e-6, rtol=2**-7) if dtype == torch.bfloat16 else dict(atol=2e-6, rtol=2e-5)
        torch.testing.assert_close(x.grad.double(), y.grad.to(dtype).double(), **grad_tol)
        assert torch.all(x.grad[~mask] == 0)


def test_rollout_gate_edges(backend):
    """gpg with logp = -1, A = -1: the per-token loss is -w, w the gate's weight. Statistics exactly at the bounds
    (kept), just beyond them (dropped); a NaN sampling log-prob (statistic 0, ratio 1); an empty row."""
    f64 = torch.float64
    c = gk.loss_table.ROLLOUT_GATE_PROB_CLAMP
    # row 0: p = q (statistics 0) at t = 0, 1; t = 2: q = c, p = 1 - c (tv (1 - c) - c); t = 3: NaN sampling
    old = torch.tensor([[-0.5, -2.0, -100.0, -1.0], [0.5, -0.5, 0.0, 0.0], [9.0] * 4], dtype=f64)
    sampling = torch.tensor([[-0.5, -2.0, 5.0, float("nan")], [0.0, 0.0, 0.0, 0.0], [9.0] * 4], dtype=f64)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [False] * 4])
    sampling[1, 2:] = float("nan")  # masked: garbage
    tv_edge = (1 - c) - c

    def weights(mode, gate, low, high, clamp=None):
        logp = torch.full((3, 4), -1.0, dtype=f64, requires_grad=True)
        out = gk.grpo_loss(logp, old, torch.tensor([-1.0, -1.0, float("nan")], dtype=f64), mask, loss_type="gpg",
                           sampling_logprobs=sampling, rollout_is_mode=mode, rollout_is_gate=gate, rollout_is_min=low,
                           rollout_is_max=high, log_ratio_clamp=clamp, backend=backend)
        out.loss.backward()
        assert torch.all(logp.grad[~mask] == 0) and torch.all(out.per_token_loss[2] == 0)
        return -out.per_token_loss

    rho = torch.exp(torch.nan_to_num((old - sampling) * mask, nan=0.0))
    w = weights("token_mask", "tv", 0.0, tv_edge)  # every token of row 0 in [0, tv_edge]
    torch.testing.assert_close(w[0], rho[0])
    w = weights("token_mask", "tv", None, math.nextafter(tv_edge, 0.0))  # token 2 just beyond
    torch.testing.assert_close(w[0], rho[0] * torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=f64))
    w = weights("token_mask", "binary_kl", -1.0, 0.0, clamp=20.0)  # only the zero statistics (and the NaN's)
    torch.testing.assert_close(w[0], torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=f64))
    # row 1, t = 0: q = e^0.5 and p = e^0 are both clamped to 1 - c: statistic 0
    torch.testing.assert_close(w[1, :2], torch.tensor([math.exp(0.5), 0.0], dtype=f64))
    # row 1: d = (0.5, -0.5), geometric mean e^0 = 1 exactly: kept at both edges, dropped just inside [1, 2]
    for low, high, kept in ((1.0, 2.0, True), (0.5, 1.0, True), (math.nextafter(1.0, 2.0), 2.0, False)):
        w = weights("sequence_mask", "geometric_mean", low, high)
        expected = torch.exp(torch.tensor([0.5, -0.5], dtype=f64)) * float(kept)
        torch.testing.assert_close(w[1, :2], expected)
    # sequence tv: row 0's mean is tv_edge / 4 (the NaN token counts, with statistic 0)
    edge = (0.0 + 0.0 + tv_edge + 0.0) / 4
    torch.testing.assert_close(weights("sequence_mask", "tv", None, edge)[0], rho[0])
    assert torch.all(weights("sequence_mask", "tv", None, math.nextafter(edge, 0.0))[0] == 0)


"""The cpu backend's vectorized grpo_loss kernels (csrc/cpu/loss_simd.h) against the reference: sequences
longer than a token block (512) with a tail that is no multiple of the 16 sum lanes, every loss type at both
ratio levels, each option that has its own code path in the kernels, bool and float masks, strided and
broadcast inputs, NaN at masked positions."""

from __future__ import annotations

import pytest
import torch

import grpo_kernels
from grpo_kernels.kernel_options import LOSS_DEFAULTS

from conftest import TOLERANCES
from loss_cases import LOSS_TYPES, applicable

pytestmark = pytest.mark.skipif("cpu" not in grpo_kernels.available_backends("grpo_loss"),
                                reason="the cpu backend is not built")

B, T = 3, 1100  # three blocks of 512 tokens, the last 76 (not a multiple of 16)

# Options with a code path of their own in the kernels (the plain path has none of them).
OPTIONS = (
    {},
    dict(log_ratio_clamp=0.03, kl_estimator="low_var_kl"),
    dict(delta=1.02, clip_ratio_c=3.0, use_bias_correction_kl=True, kl_estimator="k2"),
    dict(kl_estimator="k1", importance_weights="token"),
)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 700, 1])
    mask = torch.arange(T) < lengths[:, None]
    logp = -2 * torch.rand(B, T, generator=g)
    old = logp + 0.05 * torch.randn(B, T, generator=g)
    ref = logp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    iw = 0.5 + torch.rand(B, T, generator=g)
    for t in (logp, old, ref, iw):
        t[~mask] = float("nan")  # garbage at masked positions
    return logp, old, ref, adv, mask, iw


def _run(backend, logp, old, adv, mask, **options):
    x = logp.detach().clone().requires_grad_()
    out = grpo_kernels.grpo_loss(x, old, adv, mask, backend=backend, **options)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


def _check(logp, old, adv, mask, **options):
    (want, want_grad), (got, got_grad) = (_run(b, logp, old, adv, mask, **options) for b in ("reference", "cpu"))
    tol = TOLERANCES[torch.float32]
    for name in ("loss", "per_token_loss", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b.detach(), **tol, msg=name)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    assert torch.isfinite(got_grad).all() and (got_grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", range(len(OPTIONS)))
def test_long_sequences_match_the_reference(loss_type, level, case):
    options = dict(OPTIONS[case])
    if not applicable(loss_type, options, level):
        pytest.skip("validation refuses this combination")
    logp, old, ref, adv, mask, iw = _inputs(case)
    if options.pop("importance_weights", None):
        options["importance_weights"] = iw
    _check(logp, old, adv, mask, ref_logprobs=ref, beta=0.04, epsilon_low=0.2,
           epsilon_high=5.0 if loss_type == "cispo" else 0.28, loss_type=loss_type, importance_sampling_level=level,
           **options)


@pytest.mark.parametrize("layout", ["float_mask", "strided", "token_advantages", "no_old_no_ref"])
def test_layouts_match_the_reference(layout):
    logp, old, ref, adv, mask, _ = _inputs(7)
    options = dict(ref_logprobs=ref, beta=0.04, loss_type="grpo")
    if layout == "float_mask":
        mask = mask.float()
    elif layout == "strided":  # rows with a stride along T: read through the block buffers
        old = torch.stack([old, old], -1)[..., 0]
        options["ref_logprobs"] = torch.stack([ref, ref], -1)[..., 1]
    elif layout == "token_advantages":
        adv = adv[:, None] + 0.1 * torch.randn(B, T)
    elif layout == "no_old_no_ref":
        old, options = None, dict(loss_type="dapo")
    _check(logp, old, adv, mask, **options)


# --------------------------------------------------------------------------- #
# the CPU call path: gradient formed in the forward, aggregation and value checks in C++
# --------------------------------------------------------------------------- #
def _kernel_inputs(seed: int, dtype=torch.float32):
    """The [B, T] kernel inputs of _inputs (advantages broadcast), in dtype."""
    logp, old, ref, adv, mask, iw = _inputs(seed)
    cast = [t.to(dtype) for t in (logp, old, ref, adv[:, None].expand(B, T), iw)]
    return cast[0], cast[1], cast[2], cast[3], mask, cast[4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # the vector and the token-by-token path
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_forward_gradient_is_the_backward_at_weight_one(loss_type, level, dtype):
    """grpo_loss_fwd_grad's d S_i / d logp, formed in the forward, is grpo_loss_bwd's for seq_grad = 1 (bit for
    bit: the same terms in the same order), its loss and partials grpo_loss_fwd's."""
    options = dict(ref_logprobs=True, beta=0.04, loss_type=loss_type, importance_sampling_level=level,
                   epsilon_high=5.0 if loss_type == "cispo" else 0.28)
    if not applicable(loss_type, options, level):
        pytest.skip("validation refuses this combination")
    from grpo_kernels._extension import _C
    from grpo_kernels.native.grpo_loss import loss_setup

    logp, old, ref, adv, mask, iw = _kernel_inputs(3, dtype)
    options["ref_logprobs"] = ref
    cfg = loss_setup(adv, T, options).cfg
    args = (logp, old, ref, adv, mask, None, None)
    per_token_loss, partials, grad_sums = _C.grpo_loss_fwd_grad(*args, cfg, True)
    want_loss, want_partials = _C.grpo_loss_fwd(*args, cfg)
    want_grad = _C.grpo_loss_bwd(*args, want_partials, torch.ones(B, dtype=dtype), cfg)
    assert torch.equal(per_token_loss, want_loss) and torch.equal(partials, want_partials)
    assert torch.equal(grad_sums, want_grad)
    assert _C.grpo_loss_fwd_grad(*args, cfg, False)[2].shape == (0, T)


AGGREGATION_OPTIONS = (
    dict(),
    dict(max_completion_length=2000),
    dict(num_items_in_batch=1234),
    dict(num_items_in_batch=torch.tensor(321.0)),
)


@pytest.mark.parametrize("case", range(len(AGGREGATION_OPTIONS)))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_host_aggregation_matches_the_torch_aggregation(loss_type, level, case):
    """_C.grpo_loss_forward's loss, metrics and weights dL/dS_i equal aggregation.aggregate / sequence_weights
    (the other backends') on the same partials, to float32 rounding."""
    options = dict(AGGREGATION_OPTIONS[case], loss_type=loss_type, importance_sampling_level=level)
    if not applicable(loss_type, options, level):
        pytest.skip("validation refuses this combination")
    from grpo_kernels._extension import _C
    from grpo_kernels.aggregation import P_COUNT
    from grpo_kernels.native.grpo_loss import loss_setup

    logp, old, ref, adv, mask, _ = _kernel_inputs(5)
    adv = adv[:, 0]  # per sequence: per-sequence clip metrics at sequence level
    options["ref_logprobs"] = ref
    setup = loss_setup(adv, T, options)
    loss, _, kl, low, high, region, _, seq_weight = _C.grpo_loss_forward(
        logp, old, ref, adv, mask, None, None, setup.cfg, setup.aggregation, False)
    _, partials = _C.grpo_loss_fwd(logp, old, ref, adv[:, None].expand(B, T), mask, None, None, setup.cfg)
    want = setup.options.aggregate(partials, T)
    for name, got, expected in zip(("loss", "kl", "low", "high", "region"), (loss, kl, low, high, region), want):
        assert got.dtype == expected.dtype and got.shape == (), name
        torch.testing.assert_close(got, expected, rtol=2e-7, atol=0, msg=name)
    torch.testing.assert_close(seq_weight, setup.options.sequence_weights(partials[P_COUNT], T), rtol=2e-7, atol=0)


def test_gradient_scaled_by_the_incoming_gradient_in_the_input_dtype():
    """The backward scales the forward's gradient by the incoming one (not 1) and returns it in logp's dtype;
    retain_graph gives the same gradient twice; bfloat16 log-probs get a bfloat16 gradient."""
    logp, old, ref, adv, mask, _ = _inputs(11)
    options = dict(ref_logprobs=ref, beta=0.04, loss_type="grpo")
    for dtype in (torch.float32, torch.bfloat16):
        grads = {}
        for backend in ("reference", "cpu"):
            x = logp.to(dtype).requires_grad_()
            out = grpo_kernels.grpo_loss(x, old, adv, mask, backend=backend, **options)
            g = torch.tensor(-2.5)
            (first,) = torch.autograd.grad(out.loss, x, g, retain_graph=True)
            (second,) = torch.autograd.grad(out.loss, x, g)
            assert first.dtype == dtype and torch.equal(first, second)
            grads[backend] = first
        torch.testing.assert_close(grads["cpu"].float(), grads["reference"].float(),
                                   **(TOLERANCES[torch.float32] if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))


def test_differentiable_once():
    """The cpu backend's loss node (C++) gives the gradient under create_graph=True too, and differentiating
    that gradient again raises, as the other kernel backends' once_differentiable nodes do (no silent zero
    second derivative); the first gradient is unchanged by create_graph."""
    logp, old, ref, adv, mask, _ = _inputs(12)
    x = logp.clone().requires_grad_()
    out = grpo_kernels.grpo_loss(x, old, adv, mask, backend="cpu", ref_logprobs=ref, beta=0.04)
    (plain,) = torch.autograd.grad(out.loss, x, retain_graph=True)
    (graphed,) = torch.autograd.grad(out.loss, x, create_graph=True)
    assert torch.equal(plain, graphed.detach()) and graphed.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        graphed.sum().backward()


def test_outputs_without_gradient():
    """Without a gradient to form (no_grad, or logp not requiring grad) no output requires grad and the values
    are those of the call with one; a constant input requiring grad leaves logp without gradient."""
    logp, old, ref, adv, mask, _ = _inputs(13)
    options = dict(ref_logprobs=ref, beta=0.04, loss_type="dapo", importance_sampling_level="sequence")
    x = logp.clone().requires_grad_()
    with_grad = grpo_kernels.grpo_loss(x, old, adv, mask, backend="cpu", **options)
    with torch.no_grad():
        without = grpo_kernels.grpo_loss(x, old, adv, mask, backend="cpu", **options)
    plain = grpo_kernels.grpo_loss(logp, old, adv, mask, backend="cpu", **options)
    for name in ("loss", "per_token_loss", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        for out in (without, plain):
            assert not getattr(out, name).requires_grad, name
            assert torch.equal(getattr(out, name), getattr(with_grad, name).detach()), name
    assert with_grad.loss.requires_grad and not with_grad.per_token_loss.requires_grad
    const = grpo_kernels.grpo_loss(logp, old.clone().requires_grad_(), adv, mask, backend="cpu", **options)
    assert torch.equal(const.loss.detach(), plain.loss)


def test_num_items_tensor_read_at_each_call():
    """A tensor num_items_in_batch is read at each call (the memoized setup does not keep the first one)."""
    logp, old, ref, adv, mask, _ = _inputs(17)
    losses = [grpo_kernels.grpo_loss(logp, old, adv, mask, backend="cpu", loss_type="dapo",
                                     num_items_in_batch=torch.tensor(n)).loss for n in (100.0, 400.0)]
    torch.testing.assert_close(losses[0], 4 * losses[1])


def _value_error(monkeypatch, scan: bool, *args, **options):
    """The ValueError text of grpo_loss on these inputs (None: accepted), by the C++ scan or by torch ops."""
    from grpo_kernels import validation

    if not scan:
        monkeypatch.setattr(validation, "_LOSS_VALUE_PROBLEM", None)
    try:
        validation.check_grpo_loss(*args, {**LOSS_DEFAULTS, **options})
    except ValueError as error:
        return str(error)
    finally:
        monkeypatch.undo()
    return None


@pytest.mark.parametrize("adv_shape", ["B", "B1", "BT"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("adv_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_value_checks_in_one_pass_match_the_torch_checks(monkeypatch, adv_shape, mask_dtype, adv_dtype):
    """The C++ value scan of mask and advantages raises what the torch checks raise (the same first bad value,
    the mask first) and accepts what they accept: non-finite advantages at masked positions or in fully masked
    sequences, NaN everywhere else masked, strided masks."""
    g = torch.Generator().manual_seed(23)
    b, t = 5, 37
    mask = torch.arange(t) < torch.tensor([t, 20, 0, 1, 30])[:, None]
    logp = -torch.rand(b, t, generator=g)
    full = {"B": (b,), "B1": (b, 1), "BT": (b, t)}[adv_shape]
    cases = []
    for where, value in ((None, 0.0), ((2, 0), float("nan")), ((1, 25), float("inf")), ((1, 3), -float("inf")),
                         ((4, 29), float("nan")), ((3, 0), float("nan"))):
        adv = torch.randn(full, generator=g).to(adv_dtype)
        if where is not None:
            adv.view(b, -1)[where[0], where[1] if adv_shape == "BT" else 0] = value
        cases.append((mask.to(mask_dtype), adv))
    bad_mask = mask.to(mask_dtype).clone()
    if mask_dtype != torch.bool:
        bad_mask[1, 2] = 2
        cases.append((bad_mask, torch.randn(full, generator=g).to(adv_dtype).fill_(float("nan"))))
    cases.append((mask.to(mask_dtype).t().contiguous().t(), cases[1][1]))  # a column-major mask
    outcomes = set()
    for m, adv in cases:
        got, want = (_value_error(monkeypatch, scan, logp, None, adv, m) for scan in (True, False))
        assert got == want, (m, adv)
        outcomes.add(got is None)
    assert outcomes == {True, False}  # some accepted, some refused


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo", "gmpo"])
def test_padding_on_either_side_matches_the_reference(loss_type, level, mask_dtype):
    """The kernels visit only the span of a row between its first and last counted token (the padding
    outside adds nothing): left padding not on a lane boundary, holes, right padding, one token at the very end,
    a fully masked row."""
    if not applicable(loss_type, {}, level):
        pytest.skip("validation refuses this combination")
    g = torch.Generator().manual_seed(19)
    logp = -2 * torch.rand(B, T, generator=g)
    old, ref = (logp + 0.05 * torch.randn(B, T, generator=g) for _ in range(2))
    adv = torch.randn(B, generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 37:900] = True
    mask[0, 300:341] = False
    mask[1, T - 1] = True
    for t in (logp, old, ref):
        t[~mask] = float("nan")
    _check(logp, old, adv, mask.to(mask_dtype), ref_logprobs=ref, beta=0.04, loss_type=loss_type,
           importance_sampling_level=level)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_backward_scaling_rounds_as_torch(dtype):
    """_C.grpo_loss_backward is (g · w_i) · grad_sums rounded to logp's dtype exactly as torch rounds it: ties to
    even, overflow to inf, NaN kept."""
    from grpo_kernels._extension import _C

    g = torch.Generator().manual_seed(29)
    grad_sums = torch.randn(5, 67, generator=g) * torch.logspace(-30, 30, 67)
    grad_sums[0, :4] = torch.tensor([1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, float("nan"), -float("inf")])  # bf16 ties
    seq_weight, grad_loss = torch.rand(5, generator=g), torch.tensor(-1.5)
    want = ((grad_loss * seq_weight)[:, None] * grad_sums).to(dtype)
    got = _C.grpo_loss_backward(grad_sums, seq_weight, grad_loss, dtype)
    assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def _messy_tensor(g: torch.Generator, shape, dtype, role: str) -> torch.Tensor:
    """A tensor for the input checks: some of the values the checks look at (0/1/2 masks, non-finite values)."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.3
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if role == "mask":
        x = (torch.rand(shape, generator=g) > 0.3).double()
        if torch.rand((), generator=g) < 0.2:
            x.view(-1)[0] = 2.0
    elif torch.rand((), generator=g) < 0.3:
        x.view(-1)[int(torch.randint(x.numel(), (), generator=g))] = float("nan")
    return x.to(dtype)


def test_the_cpu_tensor_checks_pass_only_inputs_validation_passes():
    """``_C.grpo_loss_checked`` (the checks of a call whose options passed before) computes only where
    ``validation.check_grpo_loss`` passes: messy shapes, dtypes, devices, masks and advantages; and it does
    compute the ordinary inputs."""
    from grpo_kernels import validation
    from grpo_kernels._extension import _C
    from grpo_kernels.native.grpo_loss import loss_setup

    g = torch.Generator().manual_seed(0)
    b, t = 3, 5
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.int64, torch.bool,
              torch.complex64, torch.float8_e4m3fn]
    shapes = {"per_token": [(b, t), (b, t + 1), (b + 1, t), (b * t,), (b, t, 1)],
              "per_sequence": [(b,), (b, 1), (b, t), (b + 1,), (b, 2), ()]}
    roles = dict(logp="per_token", old="per_token", ref="per_token", adv="per_sequence", mask="per_token",
                 iw="per_sequence", sampling="per_token")
    computed = refused = 0
    for case in range(600):
        inputs = {}
        for role, kind in roles.items():
            if role in ("old", "ref", "iw", "sampling") and torch.rand((), generator=g) < 0.3:
                inputs[role] = None
                continue
            odd = torch.rand((), generator=g) < 0.15  # one odd property in a few inputs
            dtype = dtypes[int(torch.randint(len(dtypes), (), generator=g))] if odd else (
                torch.bool if role == "mask" and case % 2 else torch.float32)
            shape = shapes[kind][int(torch.randint(len(shapes[kind]), (), generator=g))] if odd else shapes[kind][0]
            x = _messy_tensor(g, shape, dtype, role)
            if odd and torch.rand((), generator=g) < 0.2:
                x = torch.empty_like(x, device="meta")
            inputs[role] = x
        vespo = case % 5 == 0
        options = dict(LOSS_DEFAULTS, loss_type="vespo" if vespo else "dapo", ref_logprobs=inputs["ref"],
                       importance_weights=inputs["iw"], sampling_logprobs=inputs["sampling"])
        try:
            validation.check_grpo_loss(inputs["logp"], inputs["old"], inputs["adv"], inputs["mask"], options)
            valid = True
        except (ValueError, TypeError):
            valid = False
        if inputs["adv"].dim() not in (1, 2) or inputs["logp"].dim() != 2 or inputs["adv"].is_meta:
            continue  # grpo_loss_checked's Python guard refuses these before the setup
        setup = loss_setup(inputs["adv"], inputs["logp"].shape[1], options)
        out = _C.grpo_loss_checked(inputs["logp"], inputs["old"], inputs["ref"], inputs["adv"], inputs["mask"],
                                   inputs["iw"], inputs["sampling"], setup.cfg, setup.aggregation, vespo)
        assert out is None or valid, {k: None if v is None else (v.dtype, tuple(v.shape), v.device.type)
                                      for k, v in inputs.items()}
        computed += out is not None
        refused += out is None
    assert computed > 50 and refused > 50, (computed, refused)
    assert _C.grpo_loss_checked([[0.0]], None, None, torch.zeros(1), torch.ones(1, 1), None, None, setup.cfg,
                                setup.aggregation, False) is None  # not a tensor


@pytest.mark.parametrize("loss_type", ["dapo", "vespo"])
def test_repeated_options_skip_validation_and_give_the_same_bits(monkeypatch, loss_type):
    """A call whose options passed before takes the cpu backend's checks in C++ (validation.check_grpo_loss is
    not called), with the same outputs and gradient, bit for bit, as the validated call."""
    from grpo_kernels import validation

    logp, old, ref, adv, mask, iw = _inputs(1)
    options = dict(ref_logprobs=ref, beta=0.04, importance_weights=iw, loss_type=loss_type)
    first, first_grad = _run("cpu", logp, old, adv, mask, **options)
    calls = []
    check = validation.check_grpo_loss
    monkeypatch.setattr(validation, "check_grpo_loss", lambda *a, **k: calls.append(1) or check(*a, **k))
    again, again_grad = _run("cpu", logp, old, adv, mask, **options)
    assert calls == []
    for a, b in zip(first, again):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(first_grad, again_grad)
    _run("cpu", logp, old, adv, mask, **dict(options, beta=0.05))  # other options: validated
    assert calls == [1]

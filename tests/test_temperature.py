"""A temperature per sequence or per token: ``temperature`` as a tensor ``[B]`` / ``[B, T]`` (``[N]`` for flat rows).

The spec (reference) against a row-by-row loop of float temperatures; every backend against the reference on the
same inputs (values and logits gradients, fp64/fp32/bf16, temperatures 0.1-10 mixed in one batch, NaN temperatures
at masked and ignored rows); validation; the custom ops under ``torch.compile``; the Triton kernels take the
temperature as data (no recompilation per value).
"""

import importlib
import math

import pytest
import torch
import torch._dynamo.testing
from conftest import TOLERANCES
from test_linear_token_logprobs import TOLERANCES as LINEAR_TOLERANCES

import grpo_kernels as gk
from grpo_kernels import reference, validation

OP = "token_logprobs"

TEMPERATURES = (0.1, 0.7, 1.0, 2.5, 10.0)
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# (logits shape, temperature shape): per sequence, per token, flat rows, one float
KINDS = {
    "float": ((2, 3, 11), None),
    "per-sequence": ((2, 3, 11), (2,)),
    "per-token": ((2, 3, 11), (2, 3)),
    "flat": ((5, 11), (5,)),
}


def mixed_temperatures(shape, dtype=torch.float64, seed=1) -> torch.Tensor:
    """Temperatures drawn from TEMPERATURES (0.1 to 10 in one batch)."""
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(TEMPERATURES), shape, generator=g)
    return torch.tensor(TEMPERATURES, dtype=torch.float64)[pick].to(dtype)


def per_row(temperature, lead_shape) -> torch.Tensor:
    """``temperature`` broadcast to one value per row (``lead_shape``), float64."""
    if not isinstance(temperature, torch.Tensor):
        return torch.full(lead_shape, float(temperature), dtype=torch.float64)
    t = temperature.double()
    return t.reshape(t.shape + (1,) * (len(lead_shape) - t.ndim)).expand(lead_shape)


def make_rows(kind, dtype, seed=0):
    shape, t_shape = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, shape[-1], shape[:-1], generator=g)
    temperature = 0.7 if t_shape is None else mixed_temperatures(t_shape)
    return logits, ids, temperature


def with_garbage(temperature, uncounted: torch.Tensor):
    """``temperature`` with NaN at the entries whose rows all do not count (masked or ignored)."""
    if not isinstance(temperature, torch.Tensor):
        return temperature
    t = temperature.clone()
    dead = uncounted.reshape(t.shape + (-1,)).all(-1)
    t[dead] = math.nan
    return t


def grad_tolerance(dtype):
    # float64: assert_close's default; float32 as TOLERANCES (both sides compute in float32, 1/T rounded
    # differently); bfloat16 gradients: one bfloat16 ulp of the float32 reference gradient
    if dtype == torch.bfloat16:
        return dict(atol=1e-6, rtol=2 ** -7)
    return TOLERANCES[dtype] if dtype == torch.float32 else {}


def backends_of(op):
    return gk.available_backends(op)


# --------------------------------------------------------------------------- #
# the spec
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", KINDS)
def test_reference_is_a_row_by_row_float_temperature(kind):
    """Row r of a tensor temperature gives what the float T_r gives that row alone (values, entropy, gradient)."""
    logits, ids, temperature = make_rows(kind, torch.float64)
    ids.view(-1)[1] = -100
    logits.requires_grad_()
    logp, ent = reference.token_logprobs(logits, ids, temperature=temperature, return_entropy=True)
    (grad,) = torch.autograd.grad(logp.sum() + 0.5 * ent.sum(), logits)
    t_rows = per_row(temperature, ids.shape).reshape(-1)
    flat, flat_ids = logits.detach().reshape(-1, logits.shape[-1]), ids.reshape(-1)
    for r in range(flat.shape[0]):
        row = flat[r:r + 1].clone().requires_grad_()
        lp, h = reference.token_logprobs(row, flat_ids[r:r + 1], temperature=float(t_rows[r]), return_entropy=True)
        (g,) = torch.autograd.grad(lp.sum() + 0.5 * h.sum(), row)
        torch.testing.assert_close(logp.reshape(-1)[r], lp[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(ent.reshape(-1)[r], h[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(grad.reshape(-1, logits.shape[-1])[r], g[0], atol=1e-12, rtol=1e-12)


def test_reference_gradient_formula():
    """d logp / dx = (onehot - p) / T_r, with p = softmax(x / T_r)."""
    logits, ids, temperature = make_rows("per-token", torch.float64)
    logits.requires_grad_()
    logp = reference.token_logprobs(logits, ids, temperature=temperature)
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    t = per_row(temperature, ids.shape)[..., None]
    p = torch.softmax(logits.detach() / t, -1)
    onehot = torch.nn.functional.one_hot(ids, logits.shape[-1]).double()
    torch.testing.assert_close(grad, (onehot - p) / t, atol=1e-13, rtol=1e-12)


def test_reference_temperature_gets_no_gradient():
    logits, ids, temperature = make_rows("per-sequence", torch.float64)
    temperature.requires_grad_()
    logp = reference.token_logprobs(logits.requires_grad_(), ids, temperature=temperature)
    logp.sum().backward()
    assert temperature.grad is None and logits.grad is not None


# --------------------------------------------------------------------------- #
# every backend against the reference
# --------------------------------------------------------------------------- #
@pytest.mark.vs_reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_token_logprobs_matches_reference(backend, kind, dtype):
    logits, ids, temperature = make_rows(kind, dtype)
    ids.view(-1)[[1, -1]] = -100
    temperature = with_garbage(temperature, ids == -100)
    logits[ids == -100] = math.nan  # ignored rows hold garbage: logits and temperature
    x = logits.clone().requires_grad_()
    logp, ent = gk.token_logprobs(x, ids, temperature=temperature, return_entropy=True, backend=backend)
    g_logp, g_ent = torch.randn(ids.shape, dtype=logp.dtype), torch.randn(ids.shape, dtype=logp.dtype)
    (grad,) = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), x)

    r = logits.clone().requires_grad_()
    ref_logp, ref_ent = reference.token_logprobs(r, ids, temperature=temperature, return_entropy=True)
    (ref_grad,) = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum(), r)
    torch.testing.assert_close(logp, ref_logp, **TOLERANCES[dtype])
    torch.testing.assert_close(ent, ref_ent, **TOLERANCES[dtype])
    torch.testing.assert_close(grad, ref_grad, **grad_tolerance(dtype))
    assert (grad[ids == -100] == 0).all()


FUSED_OPTIONS = [dict(), dict(beta=0.04, epsilon_high=0.28, loss_type="grpo"),
                 dict(importance_sampling_level="sequence", loss_type="dr_grpo", max_completion_length=3)]


@pytest.mark.vs_reference
@pytest.mark.parametrize("options", range(len(FUSED_OPTIONS)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["float", "per-sequence", "per-token"])
def test_fused_grpo_loss_matches_reference(backend, kind, dtype, options):
    if backend not in backends_of("fused_grpo_loss"):
        pytest.skip(f"{backend} does not implement fused_grpo_loss")
    opts = FUSED_OPTIONS[options]
    logits, ids, temperature = make_rows(kind, dtype, seed=3)
    B, T, _ = logits.shape
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = False
    mask[1, :] = False if kind == "per-sequence" else mask[1, :]  # a whole sequence masked: its temperature NaN
    ids[0, 2] = -100
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0
    ref_lp = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    counted = mask & (ids != -100)
    temperature = with_garbage(temperature, ~counted)
    logits[~counted] = math.nan
    if opts.get("beta"):
        opts = dict(opts, ref_logprobs=ref_lp)

    # an entropy bonus, except in bfloat16 (the kernel backends add its gradient to the loss's, already rounded
    # to bfloat16: two roundings)
    bonus = 0.0 if dtype == torch.bfloat16 else 0.1
    x = logits.clone().requires_grad_()
    out = gk.fused_grpo_loss(x, ids, old, adv, mask, temperature=temperature, return_entropy=True, backend=backend,
                             **opts)
    (grad,) = torch.autograd.grad(out.loss + bonus * out.entropy, x)
    r = logits.clone().requires_grad_()
    expected = reference.fused_grpo_loss(r, ids, old, adv, mask, temperature=temperature, return_entropy=True, **opts)
    (ref_grad,) = torch.autograd.grad(expected.loss + bonus * expected.entropy, r)
    for name in ("loss", "per_token_loss", "entropy", "clip_ratio_region"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), **TOLERANCES[dtype], msg=name)
    torch.testing.assert_close(grad, ref_grad, **grad_tolerance(dtype))
    assert torch.isfinite(out.loss) and (grad[~counted] == 0).all()


@pytest.mark.vs_reference
def test_grpo_loss_module_takes_a_batch_temperature(backend):
    if backend not in backends_of("fused_grpo_loss"):
        pytest.skip(f"{backend} does not implement fused_grpo_loss")
    logits, ids, temperature = make_rows("per-sequence", torch.float32)
    B, T, _ = logits.shape
    old, adv, mask = torch.randn(B, T) - 2.0, torch.randn(B), torch.ones(B, T, dtype=torch.bool)
    loss_fn = gk.GRPOLoss(temperature=0.7, backend=backend, beta=0.0)
    out = loss_fn.from_logits(logits, ids, old, adv, mask, temperature=temperature)
    expected = reference.fused_grpo_loss(logits, ids, old, adv, mask, temperature=temperature)
    torch.testing.assert_close(out.loss, expected.loss, **TOLERANCES[torch.float32])
    default = loss_fn.from_logits(logits, ids, old, adv, mask)
    torch.testing.assert_close(default.loss, reference.fused_grpo_loss(logits, ids, old, adv, mask,
                                                                       temperature=0.7).loss)


LINEAR_KINDS = {"float": ((2, 3), None), "per-sequence": ((2, 3), (2,)), "per-token": ((2, 3), (2, 3)),
                "flat": ((5,), (5,))}


def make_head(kind, dtype, seed=5, H=8, V=13):
    lead, t_shape = LINEAR_KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / 2).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, V, lead, generator=g)
    temperature = 0.7 if t_shape is None else mixed_temperatures(t_shape, seed=seed)
    return hidden, weight, bias, ids, temperature


@pytest.mark.vs_reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_linear_token_logprobs_matches_reference(backend, kind, dtype):
    if backend not in backends_of("linear_token_logprobs"):
        pytest.skip(f"{backend} does not implement linear_token_logprobs")
    hidden, weight, bias, ids, temperature = make_head(kind, dtype)
    ids.view(-1)[1] = -100
    temperature = with_garbage(temperature, ids == -100)
    hidden[ids == -100] = math.nan
    options = dict(bias=bias, temperature=temperature, softcap=20.0, logit_scale=1.3, return_entropy=True)
    g = torch.Generator().manual_seed(6)
    g_logp, g_ent = (torch.randn(ids.shape, generator=g, dtype=torch.float64) for _ in range(2))

    def run(fn, upcast=False, **extra):
        leaves = [(t.double() if upcast else t.clone()).requires_grad_() for t in (hidden, weight)]
        logp, ent = fn(leaves[0], leaves[1], ids, **dict(options, bias=bias.double() if upcast else bias), **extra)
        loss = (logp * g_logp.to(logp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()
        return (logp, ent, *torch.autograd.grad(loss, leaves))

    # against the float64 spec on the same inputs, as tests/test_linear_token_logprobs.py
    out = run(gk.linear_token_logprobs, chunk_size=2, backend=backend)
    expected = run(reference.linear_token_logprobs, upcast=True)
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight"), out, expected):
        torch.testing.assert_close(a.double(), b.to(a.dtype).double(), **LINEAR_TOLERANCES[dtype], msg=name)


@pytest.mark.vs_reference
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["float", "per-sequence", "per-token"])
def test_fused_linear_grpo_loss_matches_reference(backend, kind, dtype):
    if backend not in backends_of("fused_linear_grpo_loss"):
        pytest.skip(f"{backend} does not implement fused_linear_grpo_loss")
    hidden, weight, bias, ids, temperature = make_head(kind, dtype, seed=7)
    B, T = ids.shape
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 1] = False
    ids[1, 2] = -100
    counted = mask & (ids != -100)
    temperature = with_garbage(temperature, ~counted)
    hidden[~counted] = math.nan
    g = torch.Generator().manual_seed(8)
    old, adv = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0, torch.randn(B, generator=g,
                                                                                       dtype=torch.float64)
    options = dict(bias=bias, temperature=temperature, return_entropy=True, beta=0.0, epsilon_high=0.28)

    def run(fn, upcast=False, **extra):
        leaves = [(t.double() if upcast else t.clone()).requires_grad_() for t in (hidden, weight)]
        out = fn(leaves[0], leaves[1], ids, old, adv, mask, **dict(options, bias=bias.double() if upcast else bias),
                 **extra)
        return (out.loss, out.entropy, *torch.autograd.grad(out.loss, leaves))

    out = run(gk.fused_linear_grpo_loss, chunk_size=4, backend=backend)
    expected = run(reference.fused_linear_grpo_loss, upcast=True)
    for name, a, b in zip(("loss", "entropy", "d hidden", "d weight"), out, expected):
        torch.testing.assert_close(a.double(), b.to(a.dtype).double(), **LINEAR_TOLERANCES[dtype], msg=name)
    assert (out[2][~counted] == 0).all()


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def _rows():
    logits = torch.randn(2, 3, 5)
    ids = torch.randint(0, 5, (2, 3))
    return logits, ids


@pytest.mark.parametrize("temperature, error, match", [
    (torch.ones(3), ValueError, r"temperature must be a float or a tensor of shape logits.shape\[:k\]"),
    (torch.ones(2, 3, 1), ValueError, "temperature must be a float or a tensor of shape"),
    (torch.ones(2, 3, dtype=torch.int64), TypeError, "temperature must be a floating-point tensor"),
    (torch.tensor([1.0, 0.0]), ValueError, "temperature must be positive and finite at every row that counts"),
    (torch.tensor([1.0, -2.0]), ValueError, "temperature must be positive and finite"),
    (torch.tensor([math.nan, 1.0]), ValueError, "temperature must be positive and finite"),
    (torch.tensor([math.inf, 1.0]), ValueError, "temperature must be positive and finite"),
])
def test_token_logprobs_refuses(temperature, error, match):
    logits, ids = _rows()
    with pytest.raises(error, match=match):
        gk.token_logprobs(logits, ids, temperature=temperature)


def test_uncounted_rows_may_hold_any_temperature():
    logits, ids = _rows()
    ids[1] = -100
    t = torch.tensor([[0.5, 2.0, 1.0], [math.nan, 0.0, -1.0]])
    gk.token_logprobs(logits, ids, temperature=t)
    gk.token_logprobs(logits, ids, temperature=torch.tensor([0.5, math.nan]))
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[0, 2] = False
    t = torch.tensor([[0.5, 2.0, math.inf], [1.0, 1.0, 1.0]])
    gk.fused_grpo_loss(logits, torch.randint(0, 5, (2, 3)), None, torch.ones(2), mask, temperature=t)
    with pytest.raises(ValueError, match="positive and finite"):
        gk.fused_grpo_loss(logits, torch.randint(0, 5, (2, 3)), None, torch.ones(2), torch.ones(2, 3), temperature=t)


def test_value_checks_follow_the_switch(monkeypatch):
    logits, ids = _rows()
    monkeypatch.setenv("GRPO_KERNELS_CHECK_VALUES", "0")
    gk.token_logprobs(logits, ids, temperature=torch.tensor([math.nan, 1.0]), backend="reference")
    with pytest.raises(ValueError, match="shape"):  # the shape is checked whatever the switch
        gk.token_logprobs(logits, ids, temperature=torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_temperature_on_another_device():
    logits, ids = _rows()
    with pytest.raises(ValueError, match="temperature is on"):
        gk.token_logprobs(logits, ids, temperature=torch.ones(2, device="cuda"))


def test_what_takes_a_float_only():
    """The options whose every backend does not take a tensor temperature refuse one (TypeError): the packed and
    batch-parallel losses, the module's own temperature."""
    assert validation.TENSOR_TEMPERATURE_OPS == {"token_logprobs", "fused_grpo_loss", "linear_token_logprobs",
                                                 "fused_linear_grpo_loss"}
    t = torch.ones(2)
    packed = torch.randn(6, 5)
    with pytest.raises(TypeError, match="temperature must be a float with cu_seqlens"):
        gk.fused_grpo_loss(packed, torch.randint(0, 5, (6,)), None, torch.ones(2), torch.ones(6), temperature=t,
                           cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(TypeError, match="temperature must be a float with cu_seqlens"):
        gk.fused_linear_grpo_loss(torch.randn(6, 4), torch.randn(5, 4), torch.randint(0, 5, (6,)), None,
                                  torch.ones(2), torch.ones(6), temperature=t, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(TypeError, match=r"GRPOLoss\(temperature=...\) must be a float"):
        gk.GRPOLoss(temperature=torch.ones(2))


# --------------------------------------------------------------------------- #
# torch.compile and the custom ops
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bk", backends_of("fused_grpo_loss"))
def test_opcheck_with_a_tensor_temperature(bk):
    from grpo_kernels import custom_ops

    logits, ids, temperature = make_rows("per-token", torch.float32)
    args = (logits, ids, bk, *custom_ops._pack_temperature(temperature), -100, True)
    torch.library.opcheck(custom_ops.token_logprobs_op, args)
    B, T, _ = logits.shape
    args = (logits, ids, torch.randn(B, T) - 2, torch.randn(B), torch.ones(B, T, dtype=torch.bool), bk,
            *custom_ops._pack_temperature(temperature[:, 0]), -100, True, True, *custom_ops._pack_loss({}))
    torch.library.opcheck(custom_ops.fused_grpo_loss_op, args)
    hidden, weight, bias, ids, temperature = make_head("per-token", torch.float32)
    args = (hidden, weight, ids, bias, bk, *custom_ops._pack_temperature(temperature), 1.0, None, -100, True, 2)
    torch.library.opcheck(custom_ops.linear_token_logprobs_op, args)
    args = (hidden, weight, ids, bias, torch.randn(B, T) - 2, torch.randn(B), torch.ones(B, T, dtype=torch.bool),
            [True, True, True], bk, *custom_ops._pack_temperature(temperature[:, 0]), 1.0, None, -100, True, 2,
            *custom_ops._pack_loss({}))
    torch.library.opcheck(custom_ops.fused_linear_grpo_loss_op, args)


@pytest.mark.parametrize("bk", backends_of("fused_grpo_loss"))
def test_compile_fullgraph_with_a_tensor_temperature(bk):
    """One graph, no break; a new temperature value reuses it (no recompilation)."""
    torch._dynamo.reset()
    logits, ids, temperature = make_rows("per-sequence", torch.float32)
    B, T, _ = logits.shape
    old, adv, mask = torch.randn(B, T) - 2.0, torch.randn(B), torch.ones(B, T, dtype=torch.bool)
    counter = torch._dynamo.testing.CompileCounter()

    def step(x, t):
        out = gk.fused_grpo_loss(x, ids, old, adv, mask, temperature=t, return_entropy=True, backend=bk)
        logp = gk.token_logprobs(x, ids, temperature=t[:, None].expand(B, T), backend=bk)
        return out.loss + 0.1 * out.entropy + logp.sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for t in (temperature, temperature * 1.5):
        x = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad(compiled(x, t), x)
        r = logits.clone().requires_grad_()
        (expected,) = torch.autograd.grad(step(r, t), r)
        torch.testing.assert_close(grad, expected)
        r = logits.clone().requires_grad_()
        out = reference.fused_grpo_loss(r, ids, old, adv, mask, temperature=t, return_entropy=True)
        spec = out.loss + 0.1 * out.entropy + reference.token_logprobs(r, ids, temperature=t[:, None]).sum()
        torch.testing.assert_close(grad, torch.autograd.grad(spec, r)[0], **TOLERANCES[torch.float32])
    assert counter.frame_count == 1
    torch._dynamo.reset()


# --------------------------------------------------------------------------- #
# Triton: the temperature is data
# --------------------------------------------------------------------------- #
needs_triton = pytest.mark.skipif("triton" not in gk.available_backends("token_logprobs"),
                                  reason="the Triton backend is not available")


def _triton_kernels():
    rows = importlib.import_module("grpo_kernels.triton.token_logprobs")
    fused = importlib.import_module("grpo_kernels.triton.fused_grpo_loss")
    return {"forward": rows._token_logprobs_fwd_kernel, "backward": rows._token_logprobs_bwd_kernel,
            "fused": fused._fused_grpo_loss_kernel}


@needs_triton
def test_triton_temperature_is_a_runtime_pointer():
    """The per-row temperature is a pointer argument, its kind a constexpr: no value is baked into a kernel."""
    import inspect

    for name, kernel in _triton_kernels().items():
        params = inspect.signature(kernel.fn).parameters
        assert "t_ptr" in params and params["t_ptr"].annotation is inspect.Parameter.empty, name
        assert "constexpr" in str(params["PER_ROW_T"].annotation), name


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel cache exists only for compiled kernels")
def test_triton_new_temperature_values_do_not_recompile():
    kernels = _triton_kernels()
    logits, ids, temperature = make_rows("per-token", torch.float32)
    logits, ids = logits.cuda().requires_grad_(), ids.cuda()

    def run(t):
        logp = gk.token_logprobs(logits, ids, temperature=t.cuda(), backend="triton")
        logp.sum().backward()
        gk.fused_grpo_loss(logits, ids, None, torch.ones(2, device="cuda"), torch.ones(2, 3, device="cuda"),
                           temperature=t.cuda(), backend="triton").loss.backward()

    def cached():
        return {n: sum(len(c[0]) for c in k.device_caches.values()) for n, k in kernels.items()}

    run(temperature)
    before = cached()
    for scale in (0.5, 3.0, 7.0):
        run(temperature * scale)
    assert cached() == before


@needs_triton
def test_triton_per_row_kernels_compile_for_hopper():
    """The token_logprobs kernels with a per-row temperature (div_rn in fp32 and fp64) compile to sm_90."""
    from triton_compile import run_compile_script

    run_compile_script(r'''
import importlib, inspect
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
rows = importlib.import_module("grpo_kernels.triton.token_logprobs")
for xdt, acc, tdt in (("bf16", tl.float32, "fp32"), ("fp64", tl.float64, "fp64")):
    for kernel, constexprs in (
            (rows._token_logprobs_fwd_kernel, dict(RETURN_ENTROPY=True, BLOCK_V=1024, ACC=acc, PER_ROW_T=True)),
            (rows._token_logprobs_bwd_kernel, dict(HAS_G_LOGP=True, HAS_G_ENT=True, ACCUMULATE=False, SOFTCAP=False,
                                                   BLOCK_V=1024, ACC=acc, PER_ROW_T=True))):
        sig = {}
        for name, p in inspect.signature(kernel.fn).parameters.items():
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in ("x_ptr", "dx_ptr"):
                sig[name] = "*" + xdt
            elif name == "y_ptr":
                sig[name] = "*i64"
            elif name.endswith("_ptr"):
                sig[name] = "*" + tdt
            elif name in ("inv_t_hi", "inv_t_lo"):
                sig[name] = "fp32"
            elif name in ("scale_arg", "softcap_arg"):
                sig[name] = "fp64"
            else:
                sig[name] = "i64"
        compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=4))
print("compiled")
''')

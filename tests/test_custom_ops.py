"""The ``torch.library`` custom ops (grpo_kernels/custom_ops.py): schemas, opcheck per op × backend × options,
and ``torch.compile(fullgraph=True)`` giving the eager values and gradients."""

import typing

import pytest
import torch
from conftest import TOLERANCES, takes_cpu_tensors

import grpo_kernels as gk
from grpo_kernels import custom_ops, reference
from grpo_kernels.kernel_options import LOSS_DEFAULTS

B, T, V, H = 2, 3, 5, 4
BACKENDS = [b for b in gk.available_backends() if takes_cpu_tensors(b)]


def backends_of(op):
    return [b for b in gk.available_backends(op) if takes_cpu_tensors(b)]


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = -100
    logp = torch.log_softmax(logits.detach().double(), -1).gather(-1, ids.clamp(min=0)[..., None])[..., 0]
    old = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(dtype)
    adv = torch.randn(B, generator=g).to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2] = False
    hidden = torch.randn(B, T, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(V, generator=g).to(dtype).requires_grad_()
    return dict(logits=logits, ids=ids, logp=logp.to(dtype).requires_grad_(), old=old, ref=ref, adv=adv, mask=mask,
                hidden=hidden, weight=weight, bias=bias)


# Representative options: with/without old and reference log-probs, token/sequence level, a tensor normalizer.
LOSS_CASES = {
    "on-policy": lambda x: (None, {}),
    "old+ref": lambda x: (x["old"], dict(ref_logprobs=x["ref"], beta=0.04, epsilon_high=0.28)),
    "sequence": lambda x: (x["old"], dict(importance_sampling_level="sequence", loss_type="grpo")),
    "num-items-tensor": lambda x: (x["old"], dict(num_items_in_batch=torch.tensor(9.0), clip_ratio_c=3.0)),
}


# --------------------------------------------------------------------------- #
# schemas
# --------------------------------------------------------------------------- #
def test_every_loss_option_is_a_schema_argument():
    """New keyword options of reference.grpo_loss reach the ops without edits: each has a schema argument,
    and packing then unpacking gives the options back."""
    assert sorted({name for name, _, _ in custom_ops._LOSS_ARGS}) == sorted(LOSS_DEFAULTS)
    hints = typing.get_type_hints(reference.grpo_loss)
    assert set(hints) >= set(LOSS_DEFAULTS)
    for value in (None, 7, 7.5, torch.tensor(7.0)):
        options = dict(num_items_in_batch=value)
        assert custom_ops._unpack_loss(custom_ops._pack_loss(options)) == {**LOSS_DEFAULTS, **options}
    schema = str(torch.ops.grpo_kernels.grpo_loss.default._schema)
    for name in LOSS_DEFAULTS:
        assert name in schema


def test_unsupported_option_type_fails_loudly():
    with pytest.raises(TypeError, match="'odd_option'.*no torch.library schema"):
        custom_ops._schema_arguments("odd_option", dict)
    assert custom_ops._schema_arguments("n", typing.Optional[typing.Union[int, float, torch.Tensor]]) == (
        ("Tensor?", "n__tensor"), ("Scalar?", "n"))
    assert custom_ops._schema_arguments("b", typing.Optional[tuple[float, float]]) == (("float[]?", "b"),)


# --------------------------------------------------------------------------- #
# opcheck
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bk", backends_of("token_logprobs"))
@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck_token_logprobs(bk, return_entropy):
    x = inputs()
    args = (x["logits"], x["ids"], bk, *custom_ops._pack_temperature(0.7), -100, return_entropy)
    torch.library.opcheck(custom_ops.token_logprobs_op, args)


@pytest.mark.parametrize("bk", backends_of("grpo_loss"))
@pytest.mark.parametrize("case", LOSS_CASES)
def test_opcheck_grpo_loss(bk, case):
    x = inputs()
    old, options = LOSS_CASES[case](x)
    args = (x["logp"], old, x["adv"], x["mask"], bk, *custom_ops._pack_loss(options))
    torch.library.opcheck(custom_ops.grpo_loss_op, args)


@pytest.mark.parametrize("bk", backends_of("fused_grpo_loss"))
@pytest.mark.parametrize("case", LOSS_CASES)
@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck_fused_grpo_loss(bk, case, return_entropy):
    x = inputs()
    old, options = LOSS_CASES[case](x)
    args = (x["logits"], x["ids"], old, x["adv"], x["mask"], bk, *custom_ops._pack_temperature(1.3), -100,
            return_entropy, True, *custom_ops._pack_loss(options))
    torch.library.opcheck(custom_ops.fused_grpo_loss_op, args)


@pytest.mark.parametrize("bk", backends_of("group_advantages"))
@pytest.mark.parametrize("grouping", ["size", "ids"])
@pytest.mark.parametrize("return_stats", [False, True])
def test_opcheck_group_advantages(bk, grouping, return_stats):
    rewards = torch.tensor([1.0, 0.0, 2.0, float("nan"), 3.0, 1.0])
    size, ids = (3, None) if grouping == "size" else (None, torch.tensor([4, 1, 4, 1, 9, 9]))
    args = (rewards, size, ids, "group", "rloo" if grouping == "ids" else "grpo", 1e-4, None, "sum_then_normalize",
            return_stats, bk)
    # a data-dependent group count has no fake implementation to compare in aot dispatch
    skip = ("test_aot_dispatch_dynamic",) if grouping == "ids" and return_stats else ()
    utils = [u for u in torch.library._OPCHECK_DEFAULT_UTILS if u not in skip]
    torch.library.opcheck(custom_ops.group_advantages_op, args, test_utils=utils)


@pytest.mark.parametrize("bk", backends_of("linear_token_logprobs"))
@pytest.mark.parametrize("with_bias,return_entropy,softcap", [(False, False, None), (True, True, 3.0)])
def test_opcheck_linear_token_logprobs(bk, with_bias, return_entropy, softcap):
    x = inputs()
    args = (x["hidden"], x["weight"], x["ids"], x["bias"] if with_bias else None, bk,
            *custom_ops._pack_temperature(0.9), 1.5, softcap, -100, return_entropy, 4)
    torch.library.opcheck(custom_ops.linear_token_logprobs_op, args)


@pytest.mark.parametrize("bk", backends_of("fused_linear_grpo_loss"))
@pytest.mark.parametrize("case", ["on-policy", "old+ref", "sequence"])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_opcheck_fused_linear_grpo_loss(bk, case, return_entropy):
    x = inputs()
    old, options = LOSS_CASES[case](x)
    args = (x["hidden"], x["weight"], x["ids"], x["bias"], old, x["adv"], x["mask"], [True, True, True], bk,
            *custom_ops._pack_temperature(1.0), 1.0, None, -100, return_entropy, 4, *custom_ops._pack_loss(options))
    torch.library.opcheck(custom_ops.fused_linear_grpo_loss_op, args)


# --------------------------------------------------------------------------- #
# traced == eager, values and gradients (aot_eager: Dynamo + AOTAutograd, no code generation)
# --------------------------------------------------------------------------- #
@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles closures of the same few functions: without a reset, Dynamo's cache of their code
    objects fills up across tests (recompile limit) and later tests fail for that alone."""
    torch._dynamo.reset()
    yield


def run(fn, x, names, compile_backend=None):
    """``fn(x) = (differentiable outputs, metrics)`` (eager or compiled) → all outputs and the gradients of
    ``Σ differentiable outputs`` w.r.t. ``x[names]``."""
    leaves = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in x.items()}
    f = fn if compile_backend is None else torch.compile(fn, backend=compile_backend, fullgraph=True)
    differentiable, metrics = f(leaves)
    grads = torch.autograd.grad(sum(o.sum() for o in differentiable), [leaves[k] for k in names])
    return [o.detach() for o in differentiable + metrics if o is not None], grads


def assert_same(eager, traced, dtype=torch.float32):
    for a, b in zip(eager[0] + list(eager[1]), traced[0] + list(traced[1])):
        torch.testing.assert_close(b, a, **TOLERANCES[dtype])


def _fused(backend, case, **kw):
    def fn(x):
        old, options = LOSS_CASES[case](x)
        out = gk.fused_grpo_loss(x["logits"], x["ids"], old, x["adv"], x["mask"], backend=backend, **kw, **options)
        return [out.loss] + ([out.entropy] if out.entropy is not None else []), [out.per_token_loss, out.kl,
                                                                                 out.clip_ratio_low]
    return fn


def _composed(backend, case):
    def fn(x):
        old, options = LOSS_CASES[case](x)
        logp, entropy = gk.token_logprobs(x["logits"], x["ids"], return_entropy=True, backend=backend)
        out = gk.grpo_loss(logp, old, x["adv"], x["mask"], backend=backend, **options)
        return [out.loss - 0.01 * (entropy * x["mask"]).sum()], [out.clip_ratio_high, out.per_token_loss]
    return fn


def _linear(backend, case):
    def fn(x):
        old, options = LOSS_CASES[case](x)
        out = gk.fused_linear_grpo_loss(x["hidden"], x["weight"], x["ids"], old, x["adv"], x["mask"], bias=x["bias"],
                                        return_entropy=True, chunk_size=4, backend=backend, **options)
        logp = gk.linear_token_logprobs(x["hidden"], x["weight"], x["ids"], softcap=2.0, chunk_size=3, backend=backend)
        return [out.loss, out.entropy, logp], [out.kl, out.clip_ratio_region]
    return fn


TRACED = [("fused", _fused, ("logits",)), ("composed", _composed, ("logits",)),
          ("linear", _linear, ("hidden", "weight", "bias"))]


@pytest.mark.parametrize("bk", BACKENDS)
@pytest.mark.parametrize("case", ["on-policy", "old+ref", "sequence"])
@pytest.mark.parametrize("name,make,names", TRACED, ids=[t[0] for t in TRACED])
def test_traced_equals_eager(bk, case, name, make, names):
    fn = make(bk, case) if name != "fused" else make(bk, case, return_entropy=True)
    x = inputs()
    assert_same(run(fn, x, names), run(fn, x, names, "aot_eager"))


def test_traced_calls_go_through_the_custom_ops():
    x = inputs()
    explanation = torch._dynamo.explain(_fused("reference", "old+ref", return_entropy=True))(x)
    assert explanation.graph_break_count == 0
    graph = str(explanation.graphs[0].code)
    assert "grpo_kernels.fused_grpo_loss" in graph


@pytest.mark.parametrize("bk", BACKENDS)
def test_inplace_backward_under_compile_keeps_the_numbers(bk):
    """``inplace_backward=True`` is not honored by the custom ops: same loss and gradient, the logits untouched."""
    fn = _fused(bk, "old+ref", inplace_backward=True)
    x = inputs()
    expected = run(_fused(bk, "old+ref"), x, ("logits",))
    leaves = dict(x, logits=x["logits"].detach().clone().requires_grad_())
    before = leaves["logits"].detach().clone()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    (loss,), _ = compiled(leaves)
    (grad,) = torch.autograd.grad(loss, leaves["logits"])
    torch.testing.assert_close(loss, expected[0][0])
    assert torch.equal(leaves["logits"].detach(), before)
    torch.testing.assert_close(grad, expected[1][0])


def test_backend_errors_surface_while_tracing():
    x = inputs()
    fn = torch.compile(lambda x: gk.token_logprobs(x["logits"], x["ids"], backend="cuda"), backend="aot_eager",
                       fullgraph=True)
    with pytest.raises(Exception, match="cuda"):
        fn(x)


# --------------------------------------------------------------------------- #
# inductor: a tiny LM (embedding + linear head) and the loss, compiled whole
# --------------------------------------------------------------------------- #
class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V, bias=False)


def _model_losses(backend):
    loss_fn = gk.GRPOLoss(beta=0.04, epsilon_high=0.28, backend=backend)

    def fused(m, ids, old, ref, adv, mask):
        out = gk.fused_grpo_loss(m.head(m.embed(ids)), ids, old, adv, mask, ref_logprobs=ref, beta=0.04,
                                 return_entropy=True, backend=backend)
        return out.loss - 0.01 * out.entropy

    def module(m, ids, old, ref, adv, mask):
        logp = gk.token_logprobs(m.head(m.embed(ids)), ids, backend=backend)
        return loss_fn(logp, old, adv, mask, ref_logprobs=ref).loss

    def linear(m, ids, old, ref, adv, mask):
        return gk.fused_linear_grpo_loss(m.embed(ids), m.head.weight, ids, old, adv, mask, ref_logprobs=ref,
                                         beta=0.04, chunk_size=4, backend=backend).loss

    return dict(fused=fused, module=module, linear=linear)


@pytest.mark.parametrize("bk", ["reference", "cpu"])
@pytest.mark.parametrize("which", ["fused", "module", "linear"])
def test_inductor_tiny_model(bk, which):
    if bk not in BACKENDS:
        pytest.skip(f"bk {bk} not available")
    model = TinyLM()
    x = inputs()
    args = (x["ids"].clamp(min=0), x["old"], x["ref"], x["adv"], x["mask"])
    fn = _model_losses(bk)[which]

    def loss_and_grads(f):
        model.zero_grad()
        loss = f(model, *args)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager = loss_and_grads(fn)
    compiled = loss_and_grads(torch.compile(fn, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0])
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(b, a)

"""On CUDA, every backend gives the CPU reference's numbers (float64); the on-device check passes and "auto"
uses the checked kernels. Needs a GPU.

The reference must be device-agnostic; the kernel backends run their GPU code
here (on CPU they are tested under the Triton interpreter). The op tests run the
GPU backends on CUDA tensors too (the device axis of tests/conftest.py).
"""

import pytest
import torch
from loss_cases import TOKEN_RATIO_LOSS_TYPES

import grpo_kernels as gk
from grpo_kernels import backends, self_check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LOSS_TYPES = TOKEN_RATIO_LOSS_TYPES
BACKENDS = [b for b in gk.available_backends() if b != "cpu"]


def both(*tensors):
    return tensors, tuple(t.cuda() for t in tensors)


def assert_same(cpu_out, cuda_out):
    for a, b in zip(cpu_out, cuda_out):
        if a is not None:
            assert b.device.type == "cuda"
            torch.testing.assert_close(a.detach(), b.detach().cpu(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", BACKENDS)
def test_token_logprobs_on_cuda(impl):
    logits = torch.randn(3, 5, 257, dtype=torch.float64)
    logits[0, 0, :7] = float("-inf")
    ids = torch.randint(7, 257, (3, 5))
    ids[2, 1] = -100
    (x, y), (xc, yc) = both(logits, ids)
    assert_same(gk.token_logprobs(x, y, temperature=0.7, return_entropy=True, backend="reference"),
                gk.token_logprobs(xc, yc, temperature=0.7, return_entropy=True, backend=impl))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("group", ["size", "ids"])
def test_group_advantages_on_cuda(group, impl):
    rewards = torch.tensor([1.0, 0.0, float("nan"), 2.0, 2.0, 5.0, 1.0, 0.0], dtype=torch.float64)
    ids = torch.tensor([4, 4, 1, 1, 9, 9, 9, 4])
    (r, g), (rc, gc) = both(rewards, ids)
    kw = dict(group_size=4) if group == "size" else {}
    a = gk.group_advantages(r, group_ids=None if kw else g, return_stats=True, backend="reference", **kw)
    b = gk.group_advantages(rc, group_ids=None if kw else gc, return_stats=True, backend=impl, **kw)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y.cpu(), equal_nan=True)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_losses_on_cuda(loss_type, level, impl):
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
    a = gk.fused_grpo_loss(x, *cpu[1:3], cpu[4], cpu[5], ref_logprobs=cpu[3], return_entropy=True,
                           backend="reference", **opts)
    b = gk.fused_grpo_loss(xc, *cuda[1:3], cuda[4], cuda[5], ref_logprobs=cuda[3], return_entropy=True,
                           backend=impl, **dict(opts, num_items_in_batch=torch.tensor(9, device="cuda")))
    assert_same(a, b)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(x.grad, xc.grad.cpu(), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_vocab_low_precision_on_cuda(impl, dtype):
    """A realistic row length (V = 151936, several blocks) in the training dtypes."""
    logits = torch.randn(64, 151936, device="cuda").to(dtype).requires_grad_()
    ids = torch.randint(0, 151936, (64,), device="cuda")
    logp, ent = gk.token_logprobs(logits, ids, temperature=0.9, return_entropy=True, backend=impl)
    exact_logp, exact_ent = gk.token_logprobs(logits.detach().double(), ids, temperature=0.9, return_entropy=True,
                                              backend="reference")
    torch.testing.assert_close(logp.double(), exact_logp, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(ent.double(), exact_ent, atol=2e-5, rtol=2e-5)
    (logp.sum() + ent.sum()).backward()
    assert logits.grad.dtype == dtype and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_loss_large_vocab_bf16_on_cuda(impl, inplace, level):
    """V = 151936 bf16 logits, the gradient formed in the forward (in place or not): the float64
    reference's gradient rounded to bf16, within one bf16 rounding."""
    B, T, V = 4, 16, 151936
    logits = (3 * torch.randn(B, T, V, device="cuda")).to(torch.bfloat16)
    ids = torch.randint(0, V, (B, T), device="cuda")
    ids[1, 3] = -100
    old = -4 * torch.rand(B, T, device="cuda", dtype=torch.float64)
    ref = -4 * torch.rand(B, T, device="cuda", dtype=torch.float64)
    adv = torch.randn(B, device="cuda", dtype=torch.float64)
    mask = torch.rand(B, T, device="cuda") > 0.2
    opts = dict(ref_logprobs=ref, beta=0.04, epsilon_high=0.28, importance_sampling_level=level, temperature=0.8)
    exact_x = logits.double().requires_grad_()
    exact = gk.fused_grpo_loss(exact_x, ids, old, adv, mask, backend="reference", **opts)
    exact.loss.backward()
    x = logits.clone().requires_grad_()
    out = gk.fused_grpo_loss(x.clone(), ids, old, adv, mask, inplace_backward=inplace, backend=impl, **opts)
    (2 * out.loss).backward()
    torch.testing.assert_close(out.loss.double(), exact.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), (2 * exact_x.grad).to(torch.bfloat16).double(),
                               atol=1e-12, rtol=2**-7)


KERNELS = [b for b in gk.available_backends() if b in ("triton", "cuda")]


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(self_check.CACHE_DIR_VARIABLE, str(tmp_path))
    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    self_check.forget()
    yield tmp_path
    self_check.forget()


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("op", backends.OPS)
def test_on_device_check_passes(impl, op):
    """The check "auto" runs at first use: every op, bf16 and fp32, edge rows and V = 151936 with more rows
    than twice the SM count, against the float64 reference on this GPU."""
    if impl not in gk.available_backends(op):
        pytest.skip(f"{impl} has no {op}")
    verdict = self_check.validate(impl, op, torch.device("cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert any("V=151936" in c.case for c in verdict.cases)
    assert self_check.sizes(impl, torch.device("cuda")).large_rows > 2 * sms
    assert verdict.passed, verdict.summary()


def test_auto_uses_the_checked_triton_kernels_and_caches_the_verdicts(fresh_cache):
    ops = ("token_logprobs", "fused_linear_grpo_loss")  # test_on_device_check_passes checks every op
    assert self_check.prepare(torch.device("cuda"), ops=ops) == {op: "triton" for op in ops}
    assert len(list(fresh_cache.glob("triton-*.json"))) == len(ops)
    logits = torch.randn(4, 1000, device="cuda", requires_grad=True)
    ids = torch.randint(0, 1000, (4,), device="cuda")
    exact = gk.token_logprobs(logits.detach().double(), ids, backend="reference")
    torch.testing.assert_close(gk.token_logprobs(logits, ids).double(), exact, atol=1e-5, rtol=1e-5)


def test_first_use_inside_a_cuda_graph_capture(fresh_cache, monkeypatch):
    """Without a verdict a capture gets the reference (a warning says to call prepare()); after prepare() the
    captured graph runs the checked kernel."""
    monkeypatch.setenv("GRPO_KERNELS_CHECK_VALUES", "0")  # no host synchronization inside the capture
    logits = torch.randn(8, 1000, device="cuda")
    ids = torch.randint(0, 1000, (8,), device="cuda")
    expected = gk.token_logprobs(logits.double(), ids, backend="reference")
    torch.cuda.synchronize()
    with pytest.warns(self_check.ValidationWarning, match="capture"):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            picked = backends.resolve_backend("auto", torch.device("cuda"), "token_logprobs")
    assert picked == "reference" and not list(fresh_cache.glob("*.json"))
    self_check.prepare(torch.device("cuda"), ops=("token_logprobs",))
    out = torch.empty(8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture (Triton compiles here)
        out.copy_(gk.token_logprobs(logits, ids))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(gk.token_logprobs(logits, ids))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)

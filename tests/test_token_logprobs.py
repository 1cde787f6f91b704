"""token_logprobs: against an independent numpy float64 implementation, gradients, properties."""

import hashlib
import inspect
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TOLERANCES, interpreted
from hypothesis import given
from hypothesis import strategies as st
from triton_compile import run_compile_script

import grpo_kernels as gk
from grpo_kernels import _extension

OP = "token_logprobs"


def numpy_token_logprobs(logits, ids, temperature, ignore_index=-100):
    """Row by row in float64 numpy: log p(y) and entropy of softmax(x / T)."""
    x = logits.detach().to(torch.float64).numpy().reshape(-1, logits.shape[-1])
    y = ids.numpy().reshape(-1)
    logp = np.zeros(len(y))
    ent = np.zeros(len(y))
    for i in range(len(y)):
        if y[i] == ignore_index:
            continue
        z = x[i] / temperature
        zmax = z.max()
        lse = zmax + math.log(np.exp(z - zmax).sum())
        logp[i] = z[y[i]] - lse
        p = np.exp(z - lse)
        nz = p > 0
        ent[i] = -(p[nz] * (z[nz] - lse)).sum()
    shape = ids.shape
    return torch.from_numpy(logp).reshape(shape), torch.from_numpy(ent).reshape(shape)


SHAPES = [(1, 1), (1, 5), (3, 7), (2, 3, 17), (4, 1), (2, 2, 2, 33)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [0.1, 0.7, 1.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_numpy(backend, shape, temperature, dtype):
    logits = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, shape[-1], shape[:-1])
    logp, ent = gk.token_logprobs(logits, ids, temperature=temperature, return_entropy=True, backend=backend)
    expected_logp, expected_ent = numpy_token_logprobs(logits, ids, temperature)
    assert logp.dtype == ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert logp.shape == ent.shape == shape[:-1]
    torch.testing.assert_close(logp.double(), expected_logp, **TOLERANCES[dtype])
    torch.testing.assert_close(ent.double(), expected_ent, **TOLERANCES[dtype])


def test_without_entropy_returns_tensor(backend):
    logits = torch.randn(2, 3, 5)
    ids = torch.randint(0, 5, (2, 3))
    out = gk.token_logprobs(logits, ids, backend=backend)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, gk.token_logprobs(logits, ids, return_entropy=True, backend=backend)[0])


def test_ignore_index_rows_are_zero(backend):
    logits = torch.randn(3, 4, 9, dtype=torch.float64)
    ids = torch.randint(0, 9, (3, 4))
    ids[0, 1] = ids[2, 3] = -100
    ids[1] = -100  # a fully ignored row
    logp, ent = gk.token_logprobs(logits, ids, return_entropy=True, backend=backend)
    ignored = ids == -100
    assert (logp[ignored] == 0).all() and (ent[ignored] == 0).all()
    expected_logp, expected_ent = numpy_token_logprobs(logits, ids, 1.0)
    torch.testing.assert_close(logp, expected_logp)
    torch.testing.assert_close(ent, expected_ent)


def test_custom_ignore_index(backend):
    logits = torch.randn(4, 6, dtype=torch.float64)
    ids = torch.tensor([0, 5, 7, 2])
    logp = gk.token_logprobs(logits, ids, ignore_index=7, backend=backend)
    assert logp[2] == 0
    torch.testing.assert_close(logp, numpy_token_logprobs(logits, ids, 1.0, ignore_index=7)[0])


def test_vocab_of_one(backend):
    logits = torch.randn(5, 1)
    logp, ent = gk.token_logprobs(logits, torch.zeros(5, dtype=torch.long), return_entropy=True, backend=backend)
    assert (logp == 0).all() and (ent == 0).all()


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_logits(backend, scale):
    logits = torch.randn(4, 50, dtype=torch.float32)
    logits[:, 7] = scale
    ids = torch.tensor([7, 0, 7, 3])
    logp, ent = gk.token_logprobs(logits, ids, return_entropy=True, backend=backend)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    expected_logp, expected_ent = numpy_token_logprobs(logits, ids, 1.0)
    torch.testing.assert_close(logp.double(), expected_logp, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent.double(), expected_ent, atol=1e-4, rtol=1e-5)


def test_negative_infinity_logits(backend):
    logits = torch.randn(3, 10, dtype=torch.float64)
    logits[:, ::3] = float("-inf")  # a masked-out vocabulary
    ids = torch.tensor([1, 2, 0])  # the last sampled id has -inf logit
    logits = logits.requires_grad_()
    logp, ent = gk.token_logprobs(logits, ids, temperature=0.5, return_entropy=True, backend=backend)
    expected_logp, expected_ent = numpy_token_logprobs(logits, ids, 0.5)
    assert logp[2] == float("-inf")
    torch.testing.assert_close(logp[:2], expected_logp[:2])
    torch.testing.assert_close(ent, expected_ent)  # finite: 0·log 0 = 0
    (logp[:2].sum() + ent.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, ::3] == 0).all()


def test_noncontiguous_logits(backend):
    base = torch.randn(9, 4, 31)
    logits = base.transpose(0, 1)[:, ::2]  # row strides that are not V
    assert not logits.is_contiguous()
    ids = torch.randint(0, 31, logits.shape[:-1])
    out = gk.token_logprobs(logits, ids, temperature=1.3, backend=backend)
    torch.testing.assert_close(out, gk.token_logprobs(logits.contiguous(), ids, temperature=1.3, backend=backend))


def test_int32_ids(backend):
    logits = torch.randn(3, 8)
    ids = torch.randint(0, 8, (3,))
    torch.testing.assert_close(
        gk.token_logprobs(logits, ids.int(), backend=backend), gk.token_logprobs(logits, ids, backend=backend)
    )


@pytest.mark.parametrize("temperature", [0.1, 1.0, 3.0])
def test_gradient_formula(backend, temperature):
    """d logp / d logits = (onehot - softmax(x/T)) / T, weighted by the incoming gradient."""
    logits = torch.randn(6, 13, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 13, (6,))
    ids[4] = -100
    g = torch.randn(6, dtype=torch.float64)
    logp = gk.token_logprobs(logits, ids, temperature=temperature, backend=backend)
    (logp * g).sum().backward()
    p = torch.softmax(logits.detach() / temperature, -1)
    onehot = torch.nn.functional.one_hot(ids.clamp(min=0), 13).double()
    expected = g[:, None] * (onehot - p) / temperature
    expected[4] = 0
    torch.testing.assert_close(logits.grad, expected)


def test_entropy_gradient_formula(backend):
    """dH/dx = -p ⊙ (log p + H) / T."""
    temperature = 0.8
    logits = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (5,))
    _, ent = gk.token_logprobs(logits, ids, temperature=temperature, return_entropy=True, backend=backend)
    ent.sum().backward()
    logp_all = torch.log_softmax(logits.detach() / temperature, -1)
    p = logp_all.exp()
    h = -(p * logp_all).sum(-1, keepdim=True)
    torch.testing.assert_close(logits.grad, -p * (logp_all + h) / temperature)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 10.0])
def test_gradcheck(backend, temperature):
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 7, (2, 3))
    ids[1, 0] = -100

    def f(x):
        logp, ent = gk.token_logprobs(x, ids, temperature=temperature, return_entropy=True, backend=backend)
        return logp, ent

    # fast_mode under the interpreter: the Jacobian in one random direction, not column by column
    assert torch.autograd.gradcheck(f, (logits,), fast_mode=interpreted(backend))
    if backend == "reference":  # the Triton backward is once_differentiable: no double backward
        assert torch.autograd.gradgradcheck(f, (logits,))


def test_low_precision_gradient_dtype(backend):
    logits = torch.randn(3, 9, dtype=torch.bfloat16, requires_grad=True)
    logp = gk.token_logprobs(logits, torch.randint(0, 9, (3,)), backend=backend)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the cpu forward's chunk paths
needs_cpu = pytest.mark.skipif("cpu" not in gk.available_backends(OP), reason="the cpu kernels are not built")
CHUNK_VOCAB = 2 * 16384 + 301  # 3 chunks of float32 (16384 values), 2 of bfloat16 (32768)


def _chunk_path_rows(dtype):
    """Rows whose chunks take each path of the cpu forward: all d above the underflow (no mask), a -inf chunk,
    one -inf logit, a range over 87 T, an ascending row (the max in the last chunk), an ignored NaN row."""
    g = torch.Generator().manual_seed(5)
    x = 3 * torch.randn(7, CHUNK_VOCAB, generator=g, dtype=torch.float64)
    x[1, :16384] = float("-inf")  # a float32 chunk all -inf, the row's max later
    x[2, -5] = float("-inf")
    x[3, 16390:16396] = 120.0  # 120 - N(0, 9): a range over 87 T at T <= 1 in that chunk only
    x[4] = torch.sort(10 * x[4]).values
    x[5] = float("nan")
    x[6] += 100.0  # a large common offset
    ids = torch.randint(0, CHUNK_VOCAB, (7,), generator=g)
    ids[5] = -100
    return x.to(dtype), ids


@needs_cpu
@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])  # 1.0: the loop without the product x (1/T)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cpu_forward_chunk_paths_match_numpy(dtype, temperature):
    logits, ids = _chunk_path_rows(dtype)
    logp, ent = gk.token_logprobs(logits, ids, temperature=temperature, return_entropy=True, backend="cpu")
    expected_logp, expected_ent = numpy_token_logprobs(logits, ids, temperature)
    torch.testing.assert_close(logp.double(), expected_logp, **TOLERANCES[dtype])
    torch.testing.assert_close(ent.double(), expected_ent, **TOLERANCES[dtype])
    plain = gk.token_logprobs(logits, ids, temperature=temperature, backend="cpu")
    assert torch.equal(plain, logp)  # the same sums with and without the entropy
    # a row temperature tensor holding T takes the same paths
    by_row = gk.token_logprobs(logits, ids, temperature=torch.full((7,), temperature), backend="cpu")
    assert torch.equal(by_row, logp)


def _chunk_path_digest():
    """A digest of the cpu forward's outputs on _chunk_path_rows."""
    digest = hashlib.sha256()
    for dtype in (torch.float32, torch.bfloat16):
        logits, ids = _chunk_path_rows(dtype)
        for temperature in (1.0, 0.3):
            for t in gk.token_logprobs(logits, ids, temperature=temperature, return_entropy=True, backend="cpu"):
                digest.update(t.numpy().tobytes())
    return digest.hexdigest()


# prints the copy that ran and _chunk_path_digest()
CHUNK_PATH_SCRIPT = f"""
import hashlib, torch, grpo_kernels as gk
CHUNK_VOCAB = {CHUNK_VOCAB}
{inspect.getsource(_chunk_path_rows)}
{inspect.getsource(_chunk_path_digest)}
print(gk.extension_info()["cpu_isa"], _chunk_path_digest())
"""


@needs_cpu
def test_cpu_forward_chunk_paths_same_bits_on_the_avx2_copy():
    """The forward's paths (mask or not, T = 1 or not) give the dispatched copy's bits on the AVX2 copy too."""
    copies = [copy["copy"] for copy in _extension._build_info().get("cpu_copies", [])]
    if "avx2" not in copies or gk.extension_info()["cpu_isa"] == "avx2":
        pytest.skip("only the AVX2 copy runs here")
    run = subprocess.run([sys.executable, "-c", CHUNK_PATH_SCRIPT], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, GRPO_KERNELS_CPU_ISA="avx2"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["avx2", _chunk_path_digest()]


# ----------------------------------------------------------------------------- properties
@given(
    rows=st.lists(st.lists(st.floats(-50, 50), min_size=6, max_size=6), min_size=1, max_size=4),
    shift=st.floats(-1e3, 1e3),
    temperature=st.floats(0.1, 10),
)
def test_shift_invariance(rows, shift, temperature):
    logits = torch.tensor(rows, dtype=torch.float64)
    ids = torch.arange(len(rows)) % 6
    a = gk.token_logprobs(logits, ids, temperature=temperature, return_entropy=True)
    b = gk.token_logprobs(logits + shift, ids, temperature=temperature, return_entropy=True)
    torch.testing.assert_close(a[0], b[0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(a[1], b[1], atol=1e-9, rtol=1e-9)


@given(rows=st.lists(st.lists(st.floats(-50, 50), min_size=7, max_size=7), min_size=1, max_size=3),
       temperature=st.floats(0.1, 10))
def test_distribution_properties(rows, temperature):
    """exp(logp) over all ids sums to 1; logp <= 0; 0 <= H <= log V; T scaling equals dividing logits."""
    logits = torch.tensor(rows, dtype=torch.float64)
    n, vocab = logits.shape
    every = torch.stack(
        [gk.token_logprobs(logits, torch.full((n,), v), temperature=temperature) for v in range(vocab)], -1
    )
    torch.testing.assert_close(every.exp().sum(-1), torch.ones(n, dtype=torch.float64))
    assert (every <= 0).all()
    _, ent = gk.token_logprobs(logits, torch.zeros(n, dtype=torch.long), temperature=temperature,
                               return_entropy=True)
    assert (ent >= -1e-12).all() and (ent <= math.log(vocab) + 1e-9).all()
    scaled = gk.token_logprobs(logits / temperature, torch.zeros(n, dtype=torch.long))
    torch.testing.assert_close(every[:, 0], scaled)


# ----------------------------------------------------------------------------- Triton kernels
# The kernels loop over each row in BLOCK_V chunks with an online log-sum-exp; these
# tests force small chunks (``block_v``) so that rows span several chunks and end in a
# partial one, under the interpreter at small sizes. Tolerances: float64 1e-10
# (values) and assert_close's float64 default (gradients); float32/bfloat16 values
# as TOLERANCES (math in float32); bfloat16 gradients to one bfloat16 ulp (rtol 2^-7)
# of the float32 reference gradient.
needs_triton = pytest.mark.skipif(
    "triton" not in gk.available_backends(OP), reason="the Triton backend does not implement token_logprobs here"
)


def _triton_module():
    import importlib

    return importlib.import_module("grpo_kernels.triton.token_logprobs")


BLOCK = 16


@needs_triton
@pytest.mark.parametrize("vocab", [BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK - 5, 4 * BLOCK])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_triton_multi_block_rows_match_numpy(vocab, dtype):
    tl_mod = _triton_module()
    logits = (3 * torch.randn(3, 2, vocab, dtype=torch.float64)).to(dtype)
    logits[0, 0, : 2 * BLOCK] = float("-inf")  # the first chunk(s) all -inf, the max comes later
    logits[0, 0, -1] = 5.0
    logits[1, 1, -1] = 40.0  # the max in the last, partial chunk
    ids = torch.randint(0, vocab, (3, 2))
    ids[0, 0] = vocab - 1
    ids[2, 1] = -100
    for temperature in (0.3, 2.0):
        logp, ent = tl_mod.token_logprobs_triton(logits, ids, temperature=temperature, return_entropy=True,
                                                 block_v=BLOCK)
        expected_logp, expected_ent = numpy_token_logprobs(logits, ids, temperature)
        torch.testing.assert_close(logp.double(), expected_logp, **TOLERANCES[dtype])
        torch.testing.assert_close(ent.double(), expected_ent, **TOLERANCES[dtype])
        plain = tl_mod.token_logprobs_triton(logits, ids, temperature=temperature, block_v=BLOCK)
        torch.testing.assert_close(plain, logp, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("vocab", [BLOCK + 1, 3 * BLOCK - 5])
@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_triton_multi_block_gradients_match_reference(vocab, temperature):
    tl_mod = _triton_module()
    logits = torch.randn(4, vocab, dtype=torch.float64)
    logits[1, :BLOCK] = float("-inf")
    logits = logits.requires_grad_()
    ids = torch.randint(BLOCK, vocab, (4,))
    ids[3] = -100
    g_logp, g_ent = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    logp, ent = tl_mod.token_logprobs_triton(logits, ids, temperature=temperature, return_entropy=True,
                                             block_v=BLOCK)
    (grad,) = torch.autograd.grad((logp * g_logp).sum() + (ent * g_ent).sum(), logits)
    ref_logp, ref_ent = gk.token_logprobs(logits, ids, temperature=temperature, return_entropy=True,
                                          backend="reference")
    (expected,) = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_ent * g_ent).sum(), logits)
    torch.testing.assert_close(logp, ref_logp, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ent, ref_ent, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, expected)
    assert (grad[3] == 0).all() and (grad[1, :BLOCK] == 0).all()


@needs_triton
def test_triton_default_block_table_and_longer_rows():
    tl_mod = _triton_module()
    assert tl_mod.launch_config(1, torch.float32) == (1, 1)
    assert tl_mod.launch_config(1000, torch.bfloat16) == (1024, 4)
    assert tl_mod.launch_config(151_936, torch.bfloat16)[0] == 8192
    assert tl_mod.launch_config(151_936, torch.float32)[0] == 4096
    assert tl_mod.launch_config(151_936, torch.float64)[0] == 2048
    with pytest.raises(ValueError, match="power of two"):
        tl_mod.launch_config(100, torch.float32, block_v=48)
    # A row longer than the default float32 chunk (4096): two chunks, the second partial.
    vocab = 4096 + 1003
    logits = torch.randn(2, vocab)
    ids = torch.tensor([vocab - 1, 17])
    logp, ent = gk.token_logprobs(logits, ids, temperature=0.7, return_entropy=True, backend="triton")
    expected_logp, expected_ent = numpy_token_logprobs(logits, ids, 0.7)
    torch.testing.assert_close(logp.double(), expected_logp, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ent.double(), expected_ent, **TOLERANCES[torch.float32])


@needs_triton
def test_triton_many_rows():
    logits = torch.randn(3, 50, 2, 7) * 4
    ids = torch.randint(0, 7, (3, 50, 2))
    ids[ids == 3] = -100
    logits.requires_grad_()
    logp, ent = gk.token_logprobs(logits, ids, temperature=1.5, return_entropy=True, backend="triton")
    expected_logp, expected_ent = numpy_token_logprobs(logits, ids, 1.5)
    torch.testing.assert_close(logp.double(), expected_logp, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ent.double(), expected_ent, **TOLERANCES[torch.float32])
    (logp.sum() + ent.sum()).backward()
    ref = logits.detach().requires_grad_()
    ref_logp, ref_ent = gk.token_logprobs(ref, ids, temperature=1.5, return_entropy=True, backend="reference")
    (ref_logp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-6, rtol=1e-5)


@needs_triton
def test_triton_row_layouts_without_copy():
    tl_mod = _triton_module()
    base = torch.randn(9, 4, 31)
    two_level = base.transpose(0, 1)[:, ::2]  # leading dims that do not collapse into one stride
    x, n_inner, stride_outer, stride_inner = tl_mod.row_layout(two_level)
    assert x is two_level and (n_inner, stride_outer, stride_inner) == (5, 31, 2 * 4 * 31)
    padded = base[:, :, :20]  # padded rows: one row stride, no copy
    x, n_inner, stride_outer, stride_inner = tl_mod.row_layout(padded)
    assert x is padded and (n_inner, stride_outer, stride_inner) == (36, 0, 31)
    three_level = torch.randn(4, 3, 5, 11).permute(0, 2, 1, 3)[::2]  # 3 non-collapsible leading dims
    assert tl_mod.row_layout(three_level)[0] is not three_level  # copied
    vocab_strided = torch.randn(11, 6).t()  # vocab stride != 1: copied
    assert tl_mod.row_layout(vocab_strided)[0].is_contiguous()
    for logits in (two_level, three_level, vocab_strided):
        logits = logits.double().requires_grad_() if logits.dtype != torch.float64 else logits
        ids = torch.randint(0, logits.shape[-1], logits.shape[:-1])
        out = gk.token_logprobs(logits, ids, temperature=1.3, return_entropy=True, backend="triton")
        expected = numpy_token_logprobs(logits, ids, 1.3)
        torch.testing.assert_close(out[0], expected[0])
        torch.testing.assert_close(out[1], expected[1])
        (grad,) = torch.autograd.grad(out[0].sum() + out[1].sum(), logits)
        ref = gk.token_logprobs(logits, ids, temperature=1.3, return_entropy=True, backend="reference")
        (expected_grad,) = torch.autograd.grad(ref[0].sum() + ref[1].sum(), logits)
        torch.testing.assert_close(grad, expected_grad)


@needs_triton
@pytest.mark.parametrize("return_entropy", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_triton_inplace_backward(return_entropy, strided):
    """inplace_backward=True: the gradient lands in the logits buffer, equal to the out-of-place one."""
    tl_mod = _triton_module()
    weight = torch.randn(8, 3 * BLOCK - 5, dtype=torch.float64, requires_grad=True)
    hidden = torch.randn(5, 8, dtype=torch.float64)
    ids = torch.randint(0, 3 * BLOCK - 5, (5,))
    ids[2] = -100
    grads = []
    for inplace in (False, True):
        full = hidden @ weight  # the logits: an intermediate, dead after the loss
        logits = full[:, 1:-1] if strided else full  # rows with stride V + 2
        vocab = logits.shape[-1]
        out = tl_mod.token_logprobs_triton(logits, torch.where(ids >= 0, ids % vocab, ids), temperature=0.7,
                                           return_entropy=return_entropy, inplace_backward=inplace, block_v=BLOCK)
        loss = (out[0].sum() + 0.5 * out[1].sum()) if return_entropy else out.sum()
        (logits_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        if inplace:
            # the logits buffer now holds the gradient
            assert logits_grad.data_ptr() == logits.data_ptr()
            torch.testing.assert_close(logits.detach(), logits_grad, atol=0, rtol=0)
            assert (logits[2] == 0).all()
        grads.append(logits_grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)
    # and the gradient flows on through the matmul
    weight.grad = None
    logits = hidden @ weight
    out = tl_mod.token_logprobs_triton(logits, ids, temperature=0.7, inplace_backward=True, block_v=BLOCK)
    out.sum().backward()
    ref_weight = weight.detach().clone().requires_grad_()
    gk.token_logprobs(hidden @ ref_weight, ids, temperature=0.7, backend="reference").sum().backward()
    torch.testing.assert_close(weight.grad, ref_weight.grad)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_low_precision_gradient_values(dtype):
    """The gradient is written in the logits dtype: the float32 gradient rounded once."""
    tl_mod = _triton_module()
    logits = (2 * torch.randn(4, 2 * BLOCK + 3)).to(dtype).requires_grad_()
    ids = torch.randint(0, 2 * BLOCK + 3, (4,))
    ids[1] = -100
    g = torch.randn(4)
    logp, ent = tl_mod.token_logprobs_triton(logits, ids, temperature=0.9, return_entropy=True, block_v=BLOCK)
    assert logp.dtype == ent.dtype == torch.float32
    (grad,) = torch.autograd.grad((logp * g).sum() + ent.sum(), logits)
    assert grad.dtype == dtype
    ref = logits.detach().float().requires_grad_()
    ref_logp, ref_ent = gk.token_logprobs(ref, ids, temperature=0.9, return_entropy=True, backend="reference")
    (expected,) = torch.autograd.grad((ref_logp * g).sum() + ref_ent.sum(), ref)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(grad.float(), expected.to(dtype).float(), atol=1e-6, rtol=ulp)
    assert (grad[1] == 0).all()


@needs_triton
def test_triton_temperature_is_a_runtime_argument():
    """No recompilation per temperature: 1/T reaches the kernels as runtime (non-constexpr) floats."""
    tl_mod = _triton_module()
    for kernel in (tl_mod._token_logprobs_fwd_kernel, tl_mod._token_logprobs_bwd_kernel):
        params = inspect.signature(kernel.fn).parameters
        assert params["inv_t_hi"].annotation is inspect.Parameter.empty
        assert params["inv_t_lo"].annotation is inspect.Parameter.empty
        assert "constexpr" in str(params["BLOCK_V"].annotation)  # the check would see a constexpr


@needs_triton
def test_triton_kernels_compile_for_hopper():
    """The interpreter is lenient about types: compile both kernels to sm_90 cubins (no GPU needed)."""

    script = r'''
import importlib
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
m = importlib.import_module("grpo_kernels.triton.token_logprobs")
target = GPUTarget("cuda", 90, 32)
for xdt, acc, block, warps in [("bf16", tl.float32, 8192, 16), ("fp64", tl.float64, 2048, 8)]:
    odt = "fp64" if xdt == "fp64" else "fp32"
    sig = dict(x_ptr="*" + xdt, y_ptr="*i64", logp_ptr="*" + odt, ent_ptr="*" + odt, lse_ptr="*" + odt,
               n_inner="i32", stride_outer="i64", stride_inner="i32", V="i32", inv_t_hi="fp32", inv_t_lo="fp32",
               t_ptr="*" + odt, ignore_index="i64", RETURN_ENTROPY="constexpr", BLOCK_V="constexpr",
               ACC="constexpr", PER_ROW_T="constexpr")
    # the float temperature's path (the per-row one: tests/test_temperature.py)
    compile(ASTSource(m._token_logprobs_fwd_kernel, sig,
                      constexprs={"RETURN_ENTROPY": True, "BLOCK_V": block, "ACC": acc, "PER_ROW_T": False}),
            target=target, options=dict(num_warps=warps))
    sig = dict(x_ptr="*" + xdt, dx_ptr="*" + xdt, y_ptr="*i32", lse_ptr="*" + odt, ent_ptr="*" + odt,
               g_logp_ptr="*" + odt, g_ent_ptr="*" + odt, n_inner="i32", stride_outer="i64", stride_inner="i32",
               dx_stride_outer="i64", dx_stride_inner="i32", V="i32", inv_t_hi="fp32", inv_t_lo="fp32",
               t_ptr="*" + odt, scale_arg="fp64", softcap_arg="fp64", ignore_index="i32", HAS_G_LOGP="constexpr",
               HAS_G_ENT="constexpr", ACCUMULATE="constexpr", SOFTCAP="constexpr", BLOCK_V="constexpr",
               ACC="constexpr", PER_ROW_T="constexpr")
    compile(ASTSource(m._token_logprobs_bwd_kernel, sig,
                      constexprs={"HAS_G_LOGP": True, "HAS_G_ENT": True, "ACCUMULATE": True, "SOFTCAP": True,
                                  "BLOCK_V": block, "ACC": acc, "PER_ROW_T": False}),
            target=target, options=dict(num_warps=warps))
print("compiled")
'''
    run_compile_script(script)

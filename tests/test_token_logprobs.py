"""token_logprobs: against an independent numpy float64 implementation, gradients, properties."""

import math

import numpy as np
import pytest
import torch
from conftest import TOLERANCES
from hypothesis import given
from hypothesis import strategies as st

import grpo_kernels as gk

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

    assert torch.autograd.gradcheck(f, (logits,))
    assert torch.autograd.gradgradcheck(f, (logits,))


def test_low_precision_gradient_dtype(backend):
    logits = torch.randn(3, 9, dtype=torch.bfloat16, requires_grad=True)
    logp = gk.token_logprobs(logits, torch.randint(0, 9, (3,)), backend=backend)
    logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


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

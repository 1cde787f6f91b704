"""What is specific to the C++ CPU backend ("cpu"): thread-count independence, in-place gradients,
auto selection, the row layouts it reads without a copy. Its values and gradients are tested with
every other backend in the op test modules."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import TOLERANCES

import grpo_kernels as gk
from grpo_kernels import _extension, backends

pytestmark = pytest.mark.skipif("cpu" not in gk.available_backends(), reason="grpo_kernels._C was not built")

# One script per op family; each prints its outputs' bytes so that runs can be compared bitwise.
THREAD_SCRIPT = r"""
import hashlib, sys, torch, grpo_kernels as gk
torch.set_num_threads(int(sys.argv[1]))
def digest_of(dtype):
    g = torch.Generator().manual_seed(0)
    B, T, V = 5, 7, 70003  # several chunks per row (32768 bfloat16 or 16384 float32 values), odd row count
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[1, 2] = -100
    old = -torch.rand(B, T, generator=g)
    ref = old + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    outs = []
    for level in ("token", "sequence"):
        out = gk.fused_grpo_loss(logits, ids, old, adv, mask, ref_logprobs=ref, beta=0.04, return_entropy=True,
                                 importance_sampling_level=level, backend="cpu")
        (grad,) = torch.autograd.grad(out.loss - 0.01 * out.entropy, logits)
        outs += [t for t in out if t is not None] + [grad]
    logp, ent = gk.token_logprobs(logits, ids, temperature=0.7, return_entropy=True, backend="cpu")
    outs += [logp, ent, *torch.autograd.grad((logp * old).sum() + ent.sum(), logits)]
    outs.append(gk.group_advantages(torch.randn(60, 2, generator=g), group_size=6, backend="cpu"))
    lp = (-torch.rand(6, 301, generator=g)).requires_grad_()  # grpo_loss over rows longer than a vector
    lp_old = lp.detach() + 0.2 * torch.randn(6, 301, generator=g)
    for level in ("token", "sequence"):
        out = gk.grpo_loss(lp, lp_old, torch.randn(6, generator=g), torch.rand(6, 301, generator=g) > 0.1,
                           ref_logprobs=lp_old - 0.1, beta=0.04, importance_sampling_level=level, backend="cpu")
        outs += [out.loss, *torch.autograd.grad(out.loss, lp)]
    digest = hashlib.sha256()
    for t in outs:
        digest.update(t.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
print(gk.extension_info()["cpu_isa"], *(digest_of(getattr(torch, name)) for name in sys.argv[2:]))
"""
BASELINE_ISA = "avx2"  # the baseline copy of a default x86-64 build (setup.py X86_CPU_COPIES)


DTYPES = ("float32", "bfloat16")


def _digest(threads, cpu_isa=None):
    """(the copy of the kernels that ran, THREAD_SCRIPT's digest per dtype of DTYPES), from one process;
    cpu_isa: the copy to force (None: as this process, GRPO_KERNELS_CPU_ISA included)."""
    env = dict(os.environ, **({"GRPO_KERNELS_CPU_ISA": cpu_isa} if cpu_isa else {}))
    run = subprocess.run([sys.executable, "-c", THREAD_SCRIPT, str(threads), *DTYPES], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    isa, *digests = run.stdout.split()
    assert len(digests) == len(DTYPES)
    return isa, tuple(digests)


def test_results_depend_neither_on_the_thread_count_nor_on_the_instruction_set():
    """The same bits, per dtype, from 1, 2 or 3 threads and, where this build dispatches to an AVX-512
    copy, from the AVX2 copy forced by GRPO_KERNELS_CPU_ISA (sums in 16 fixed lanes, whatever the vector
    width)."""
    runs = {(threads, None): _digest(threads) for threads in (1, 2, 3)}
    dispatched = runs[1, None][0]
    copies = [copy["copy"] for copy in _extension._build_info().get("cpu_copies", [])]
    if dispatched != BASELINE_ISA and BASELINE_ISA in copies:
        runs[2, BASELINE_ISA] = _digest(2, BASELINE_ISA)
        assert runs[2, BASELINE_ISA][0] == BASELINE_ISA
    assert len({digests for _, digests in runs.values()}) == 1, runs
    assert len(set(runs[1, None][1])) == len(DTYPES)  # the dtypes' runs differ: each digest covers its own


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    assert backends.resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert backends.resolve_backend("auto", torch.device("cuda")) == "reference"


def test_cpu_backend_rejects_other_devices():
    with pytest.raises(gk.BackendUnavailableError, match="CPU tensors only"):
        backends._check_device("cpu", torch.device("cuda"))


def test_without_the_kernels_auto_falls_back_to_the_reference():
    code = (
        "import sys; sys.modules['grpo_kernels._C'] = None\n"
        "import torch, grpo_kernels as gk\n"
        "from grpo_kernels import backends\n"
        "assert 'cpu' not in gk.available_backends()\n"
        "assert backends.resolve_backend('auto', torch.device('cpu')) == 'reference'\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok"


def _logits(dtype, shape=(3, 4, 301)):
    return (2 * torch.randn(*shape, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("return_entropy", [False, True])
def test_token_logprobs_inplace_backward(dtype, return_entropy):
    logits = _logits(dtype)
    ids = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    ids[0, 1] = -100
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        x = leaf.clone()  # in place needs a non-leaf (as the LM head's output)
        out = gk.token_logprobs(x, ids, temperature=0.8, return_entropy=return_entropy, inplace_backward=inplace,
                                backend="cpu")
        total = (out[0].sum() + out[1].sum()) if return_entropy else out.sum()
        total.backward()
        grads.append(leaf.grad)
        if inplace:
            assert torch.equal(x.detach(), leaf.grad)  # the logits buffer holds the gradient
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_fused_inplace_gradient_is_bitwise_the_allocated_one(dtype, level):
    logits = _logits(dtype)
    ids = torch.randint(0, logits.shape[-1], logits.shape[:-1])
    old, adv, mask = -torch.rand(3, 4), torch.randn(3), torch.rand(3, 4) > 0.3
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        gk.fused_grpo_loss(leaf.clone(), ids, old, adv, mask, importance_sampling_level=level,
                           inplace_backward=inplace, backend="cpu").loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("make", [
    lambda x: x.transpose(0, 1),  # leading dims in any order
    lambda x: x[:, ::2],  # row strides that are not V
    lambda x: x[..., :-3],  # rows padded in memory
    lambda x: x[:1, :1],  # one row
], ids=["transposed", "strided", "padded", "one-row"])
def test_strided_rows_without_copy(make):
    base = _logits(torch.float32, (4, 6, 259))
    x = make(base).requires_grad_()
    ids = torch.randint(0, x.shape[-1], x.shape[:-1])
    logp, ent = gk.token_logprobs(x, ids, temperature=1.7, return_entropy=True, backend="cpu")
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    y = x.detach().contiguous().requires_grad_()
    ref_logp, ref_ent = gk.token_logprobs(y, ids, temperature=1.7, return_entropy=True, backend="cpu")
    (ref_grad,) = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), y)
    assert torch.equal(logp, ref_logp) and torch.equal(ent, ref_ent) and torch.equal(grad, ref_grad)


def _chunk(dtype):
    """The kernels' chunk of a row: 64 KiB of logits (csrc/cpu/softmax_row.h)."""
    return 65536 // torch.empty((), dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [None, -1, 0, 1, "2.5x"])  # vocab: 1, around the chunk, several chunks
def test_rows_across_chunks_match_the_reference(dtype, offset):
    chunk = _chunk(dtype)
    vocab = 1 if offset is None else 5 * chunk // 2 if offset == "2.5x" else chunk + offset
    logits = _logits(torch.float64, (2, 3, vocab)).to(dtype)
    logits[0, 0, : vocab // 2] = float("-inf")  # a first chunk without any finite value
    ids = torch.randint(vocab // 2, vocab, (2, 3))
    x = logits.clone().requires_grad_()
    logp, ent = gk.token_logprobs(x, ids, temperature=0.3, return_entropy=True, backend="cpu")
    (grad,) = torch.autograd.grad(logp.sum() + ent.sum(), x)
    y = logits.double().requires_grad_()
    ref_logp, ref_ent = gk.token_logprobs(y, ids, temperature=0.3, return_entropy=True, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref_logp.sum() + ref_ent.sum(), y)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(logp.double(), ref_logp, **tol)
    torch.testing.assert_close(ent.double(), ref_ent, **tol)
    grad_tol = dict(rtol=1.6e-2, atol=1e-5) if dtype == torch.bfloat16 else tol  # one bfloat16 rounding apart
    torch.testing.assert_close(grad.double(), ref_grad.to(dtype).double(), **grad_tol)


def test_the_build_under_test_runs_the_requested_copy():
    """`make test-baseline-cpu` sets GRPO_KERNELS_CPU_ISA=avx2: these tests must then run the baseline
    (AVX2) copy of the kernels of the default build."""
    info = gk.extension_info()
    assert info["cpu_isa"] in ("avx512+bf16", "avx512", "avx2", "avx2-no-fma", "avx", "sse4.2", "sse2", "generic")
    requested = os.environ.get("GRPO_KERNELS_CPU_ISA")
    if requested:
        assert info["cpu_isa"] == requested


def _free_page_reporting() -> bool:
    """Whether a virtio balloon here reports free pages to the host (feature bit 5 of its sysfs string)."""
    for features in pathlib.Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*/features"):
        bits = features.read_text().strip()
        if len(bits) > 5 and bits[5] == "1":
            return True
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge gradient pages are a Linux choice")
def test_gradient_buffers_take_4k_pages_where_the_host_takes_freed_memory_back():
    """csrc/cpu/gradient_buffer.h: huge pages for large gradient buffers, except on a VM whose balloon reports
    free pages (each fresh huge page is faulted in from the host again); extension_info says which."""
    pages = gk.extension_info()["gradient_buffer_pages"]
    if _free_page_reporting():
        assert pages.startswith("4 KiB (free page reporting"), pages
    else:
        assert pages.startswith("2 MiB"), pages


def test_fused_kernel_refuses_a_rollout_gate():
    """The single-pass fused kernels compute the ratio gate only (their registers on CUDA); the glue composes the
    loss for the other gates, and a kernel called with one refuses it."""
    from grpo_kernels.native.grpo_loss import loss_setup

    _C = _extension._C
    B, T, V = 2, 3, 5
    options = dict(rollout_is_mode="token_mask", rollout_is_gate="tv", rollout_is_max=0.1)
    cfg = loss_setup(torch.zeros(B), T, options).cfg
    old = -torch.rand(B, T)
    args = (torch.randn(B * T, V), torch.zeros(B * T, dtype=torch.long), old, None, torch.ones(B, T),
            torch.ones(B, T), None, old - 0.1, torch.ones(B), cfg, 1.0, -100, False, True, False)
    with pytest.raises(RuntimeError, match="gate other than the ratio is composed by the caller"):
        _C.fused_grpo_loss_fwd(*args)

"""Shared fixtures: the backend matrix with its device axis, tolerances per dtype, hypothesis profile.

Each test module names the op it tests in ``OP``; its tests that take the
``backend`` fixture run once per backend implementing that op. Without a GPU,
Triton kernels run on CPU tensors under the Triton interpreter. On a machine
with CUDA, the GPU backends (``triton``, ``cuda``) run the same tests on CUDA
tensors: the test builds its inputs on the CPU as everywhere, and the public
ops it calls with that backend copy their tensor arguments to the GPU
(differentiably) and their results back (test ids ``triton-on-cuda``,
``cuda-on-cuda``), so every comparison of the test (numpy, the float64
reference on the CPU, gradients) holds as is.
"""

import os

import torch
from torch.utils._pytree import tree_map

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import grpo_kernels  # noqa: E402

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    from triton_interpreter import patch_once_per_launch

    patch_once_per_launch()

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tolerance of a backend's output against the float64 reference, by input dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-5),  # inputs rounded first; math in float32
    torch.float16: dict(atol=1e-5, rtol=1e-5),
}


GPU_BACKENDS = ("triton", "cuda")
ON_CUDA = torch.cuda.is_available()


def takes_cpu_tensors(backend: str) -> bool:
    """The backend computes on CPU tensors here: "cuda" never, "triton" only under the interpreter."""
    if backend == "cuda":
        return False
    return backend != "triton" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def runs_on_cuda(backend: str) -> bool:
    """The op tests run ``backend`` on CUDA tensors (a GPU machine, a GPU backend not under the interpreter)."""
    return ON_CUDA and backend in GPU_BACKENDS and not takes_cpu_tensors(backend)


def interpreted(backend: str) -> bool:
    """``backend`` runs under the (slow) Triton interpreter: tests may thin out their inner loops there."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_generate_tests(metafunc):
    """``backend``: every backend here that implements the module's ``OP`` (all backends if none), on CPU tensors
    or, for the GPU backends on a GPU machine, on CUDA tensors."""
    if "backend" in metafunc.fixturenames:
        op = getattr(metafunc.module, "OP", None)
        # a test marked vs_reference compares the backend with the reference on the same inputs: for the reference
        # itself it would assert nothing
        skip_reference = metafunc.definition.get_closest_marker("vs_reference") is not None
        params = []
        for b in grpo_kernels.available_backends(op):
            if skip_reference and b == "reference":
                continue
            if takes_cpu_tensors(b):
                params.append(pytest.param(b, id=b))
            elif runs_on_cuda(b):
                params.append(pytest.param(b, id=f"{b}-on-cuda", marks=pytest.mark.on_cuda))
        metafunc.parametrize("backend", params)


def pytest_configure(config):
    config.addinivalue_line("markers", "on_cuda: an op test whose public op calls compute on CUDA tensors")
    config.addinivalue_line("markers", "vs_reference: compares the backend with the reference on the same inputs "
                                       "(not run for the reference itself)")


def _to_cuda(x):
    return x.to("cuda") if isinstance(x, torch.Tensor) and x.device.type == "cpu" else x


def _to_cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) and x.device.type == "cuda" else x


def _computing_on_cuda(fn):
    """``fn`` computing on CUDA copies when called with a GPU backend (the reference it is compared with stays on
    the CPU)."""
    def op(*args, **kwargs):
        if kwargs.get("backend") not in GPU_BACKENDS:
            return fn(*args, **kwargs)
        return tree_map(_to_cpu, fn(*tree_map(_to_cuda, args), **tree_map(_to_cuda, kwargs)))

    return op


@pytest.fixture(autouse=True)
def _device_axis(request, monkeypatch):
    """For an ``on_cuda`` test: the public ops (as the package, its ops module and GRPOLoss see them) compute on
    CUDA copies of their tensor arguments and return CPU copies of their results."""
    if request.node.get_closest_marker("on_cuda") is None:
        yield
        return
    import grpo_kernels.module
    import grpo_kernels.ops

    for module in (grpo_kernels, grpo_kernels.ops, grpo_kernels.module):
        for name in grpo_kernels.backends.OPS:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _computing_on_cuda(getattr(grpo_kernels.ops, name)))
    yield
    torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

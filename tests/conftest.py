"""Shared fixtures: the backend matrix, tolerances per dtype, hypothesis profile.

Each test module names the op it tests in ``OP``; its tests that take the
``backend`` fixture run once per backend implementing that op. Without a GPU,
Triton kernels run on CPU tensors under the Triton interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import grpo_kernels  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tolerance of a backend's output against the float64 reference, by input dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-5),  # inputs rounded first; math in float32
    torch.float16: dict(atol=1e-5, rtol=1e-5),
}


def takes_cpu_tensors(backend: str) -> bool:
    """The op tests build CPU tensors: "cuda" never takes them, "triton" only under the interpreter
    (on a GPU machine both are tested on CUDA tensors by tests/test_device_agnostic.py)."""
    if backend == "cuda":
        return False
    return backend != "triton" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted(backend: str) -> bool:
    """``backend`` runs under the (slow) Triton interpreter: tests may thin out their inner loops there."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_generate_tests(metafunc):
    """``backend``: every backend here that implements the module's ``OP`` (all backends if none)
    and takes CPU tensors."""
    if "backend" in metafunc.fixturenames:
        op = getattr(metafunc.module, "OP", None)
        metafunc.parametrize("backend", [b for b in grpo_kernels.available_backends(op) if takes_cpu_tensors(b)])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

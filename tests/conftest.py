"""Shared fixtures: the backend matrix, tolerances per dtype, hypothesis profile."""

import os

import pytest
import torch
from hypothesis import settings

import grpo_kernels

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tolerance of a backend's output against the float64 reference, by input dtype.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-5),  # inputs rounded first; math in float32
    torch.float16: dict(atol=1e-5, rtol=1e-5),
}


@pytest.fixture(params=grpo_kernels.available_backends())
def backend(request) -> str:
    """Every backend usable here; each test runs once per backend."""
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""Compile Triton kernels for sm_90 without a GPU: the interpreter is lenient about types, the compiler is not."""

import os
import subprocess
import sys

import pytest


def run_compile_script(script: str) -> None:
    """Run ``script`` (it compiles kernels, then prints "compiled") in a subprocess without TRITON_INTERPRET."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

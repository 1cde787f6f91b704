"""The environment a run measured: code version, device, software, threads."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

import grpo_kernels

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("triton", "trl", "liger-kernel", "transformers")
# What caps the instruction set of torch's kernels and inductor's code, MKL's and oneDNN's below the CPU's.
ISA_LIMIT_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def git_sha() -> str:
    """Short sha of HEAD, with ``-dirty`` when tracked code differs from it (``unknown`` outside git); the result
    files are not code (a run appends to ``all.csv``: the next run of a session is not dirty for it)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "grpo_kernels", "csrc", "benchmarks",
                                ":(exclude)benchmarks/results"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# x86 vector extensions that decide which code path the CPU kernels can take, widest first.
_VECTOR_FLAGS = ("avx512_bf16", "avx512bw", "avx512f", "avx2", "fma", "avx", "sse4_2")


def cpu_vector_flags() -> list[str]:
    """The vector extensions of _VECTOR_FLAGS this machine's CPU has (empty where its flags cannot be read)."""
    flags = grpo_kernels.cpu_flags() or frozenset()
    return [flag for flag in _VECTOR_FLAGS if flag in flags]


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: torch.device) -> dict:
    """Everything recorded with the results of a run on ``device``."""
    extension = grpo_kernels.extension_info()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],  # other processes competing for the CPU at the start
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "grpo_kernels": grpo_kernels.__version__,
        "backends": grpo_kernels.available_backends(),
        "extension": grpo_kernels.extension_available(),
        "cpu_vector_flags": cpu_vector_flags(),  # what the machine has
        # the cpu backend's kernels: the -march of each copy built, the copy this run used (the most capable one
        # the CPU supports, unless GRPO_KERNELS_CPU_ISA named another)
        "extension_cpu_arch": extension.get("cpu_arch"),
        "extension_cpu_isa": extension.get("cpu_isa"),
        "extension_cpu_isa_forced": os.environ.get("GRPO_KERNELS_CPU_ISA") or None,
        # the vector ISA of torch's own CPU kernels (and of inductor's generated code), and the variables that
        # held torch, MKL and oneDNN below what the CPU has (benchmarks/avx2.sh: a CPU without AVX-512)
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_limits": {name: os.environ[name] for name in ISA_LIMIT_VARIABLES if os.environ.get(name)} or None,
        # the pages of the cpu kernels' gradient buffers: 4 KiB on a VM that hands its free memory back to the
        # host, where fresh memory costs host faults (csrc/cpu/gradient_buffer.h)
        "extension_gradient_buffer_pages": extension.get("gradient_buffer_pages"),
        "triton_tuning": os.environ.get("GRPO_KERNELS_TRITON_TUNING"),  # knob overrides of a tuned run
        **{name: _version(name) for name in PEERS},
    }

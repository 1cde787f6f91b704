"""Backend registry and selection.

A backend is a module providing ``token_logprobs``, ``group_advantages``,
``grpo_loss`` and ``fused_grpo_loss`` with the signatures of
:mod:`grpo_kernels.reference`. ``"auto"`` picks, per device type, the first
available backend of an ordered preference list; the environment variable
``GRPO_KERNELS_BACKEND`` overrides that choice.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import reference

BACKENDS = ("reference", "triton", "cpu", "cuda")

# What each backend will be once built, for the error message.
_DESCRIPTIONS = {
    "reference": "pure PyTorch (the specification)",
    "triton": "Triton kernels (GPU, or CPU under TRITON_INTERPRET=1)",
    "cpu": "C++ kernels from the grpo_kernels._C extension",
    "cuda": "CUDA kernels from the grpo_kernels._C extension",
}

# Backends that exist in this version.
_IMPLEMENTATIONS: dict[str, ModuleType] = {"reference": reference}

# "auto": preference per device type; a backend is listed here only once its
# tests (and, for GPUs, a committed GPU result file) show it correct.
_AUTO_PREFERENCE = {"cpu": ("reference",), "cuda": ("reference",)}


class BackendUnavailableError(RuntimeError):
    """A known backend that is not built or cannot run here."""


def available_backends() -> list[str]:
    """Names of the backends usable in this installation (``"reference"`` always)."""
    return [name for name in BACKENDS if name in _IMPLEMENTATIONS]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name that ``backend`` means for tensors on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        override = os.environ.get("GRPO_KERNELS_BACKEND", "").strip()
        if override and override != "auto":
            return _check_known(override, "GRPO_KERNELS_BACKEND")
        preference = _AUTO_PREFERENCE.get(device.type, ("reference",))
        return next(name for name in preference if name in _IMPLEMENTATIONS)
    return _check_known(backend, "backend")


def _check_known(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be 'auto' or one of {list(BACKENDS)}, got {name!r}")
    if name not in _IMPLEMENTATIONS:
        raise BackendUnavailableError(
            f"backend {name!r} ({_DESCRIPTIONS[name]}) is not available in this version of grpo_kernels; "
            f"available: {available_backends()}"
        )
    return name


def implementation(backend: str, device: torch.device) -> ModuleType:
    """The backend module to run for ``backend`` on ``device``."""
    return _IMPLEMENTATIONS[resolve_backend(backend, device)]

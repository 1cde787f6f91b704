"""Backend registry and selection.

A backend is a module providing some of the ops ``token_logprobs``,
``group_advantages``, ``grpo_loss`` and ``fused_grpo_loss`` with the
signatures of :mod:`grpo_kernels.reference`; a module lists what it provides
in ``OPS`` (the reference provides all). A backend without kernels of its own
for the fused-linear ops (``CHUNKED_OPS``) provides them through a chunked
driver over its row ops. Backend modules are imported on first use.
``"auto"`` picks, per device type, the first available backend of an
ordered preference list; the environment variable ``GRPO_KERNELS_BACKEND``
overrides that choice.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "triton", "cpu", "cuda")
OPS = ("token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss", "linear_token_logprobs",
       "fused_linear_grpo_loss")

# Ops that a backend without a kernel of its own for them still provides through the
# chunked driver of :mod:`grpo_kernels.linear`, which runs the backend's row ops listed here.
CHUNKED_OPS = {"linear_token_logprobs": ("token_logprobs",), "fused_linear_grpo_loss": ("token_logprobs", "grpo_loss")}

# What each backend is, for the error messages.
_DESCRIPTIONS = {
    "reference": "pure PyTorch (the specification)",
    "triton": "Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)",
    "cpu": "C++ kernels from the grpo_kernels._C extension",
    "cuda": "CUDA kernels from the grpo_kernels._C extension",
}


def _package_installed(package: str) -> Callable[[], bool]:
    """Availability predicate: ``package`` is importable."""
    return lambda: importlib.util.find_spec(package) is not None


def _extension_has_kernels() -> bool:
    """Availability predicate: ``grpo_kernels._C`` was built and has the kernel entry points."""
    from ._extension import _C

    return _C is not None and hasattr(_C, "fused_grpo_loss_fwd")


def _extension_has_cuda_kernels() -> bool:
    """Availability predicate: the extension was also built with its CUDA kernels."""
    from ._extension import _C

    return _extension_has_kernels() and bool(_C.with_cuda())


# Backends that exist in this version: the module that implements each, and
# whether it can be used in this installation.
_MODULES: dict[str, tuple[str, Callable[[], bool]]] = {
    "reference": ("grpo_kernels.reference", lambda: True),
    "triton": ("grpo_kernels.triton", _package_installed("triton")),
    "cpu": ("grpo_kernels.native", _extension_has_kernels),
    # the same glue: the extension's entry points dispatch on the tensors' device
    "cuda": ("grpo_kernels.native", _extension_has_cuda_kernels),
}

# "auto": preference per device type; a backend is listed here only once its
# tests (and, for GPUs, a committed GPU result file) show it correct.
_AUTO_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("reference",)}


class BackendUnavailableError(RuntimeError):
    """A known backend that is not built, not installed, or cannot run here."""


def _installed(name: str) -> bool:
    return name in _MODULES and _MODULES[name][1]()


def _module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name][0])


def _provides(name: str, op: str) -> bool:
    return op in getattr(_module(name), "OPS", OPS)


def available_backends(op: Optional[str] = None) -> list[str]:
    """Names of the backends usable in this installation (``"reference"`` always).

    With ``op``, only those that implement that op.
    """
    if op is not None and op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
    return [name for name in BACKENDS if _installed(name) and (op is None or _provides(name, op) or chunked(name, op))]


def chunked(name: str, op: str) -> bool:
    """Backend ``name`` provides ``op`` through the chunked driver (no kernel of its own, all its row ops)."""
    return not _provides(name, op) and op in CHUNKED_OPS and all(_provides(name, r) for r in CHUNKED_OPS[op])


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name that ``backend`` means for tensors on ``device``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        override = os.environ.get("GRPO_KERNELS_BACKEND", "").strip()
        if override and override != "auto":
            return _check_known(override, "GRPO_KERNELS_BACKEND")
        preference = _AUTO_PREFERENCE.get(device.type, ("reference",))
        return next(name for name in preference if _installed(name))
    return _check_known(backend, "backend")


def _check_known(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be 'auto' or one of {list(BACKENDS)}, got {name!r}")
    if not _installed(name):
        raise BackendUnavailableError(
            f"backend {name!r} ({_DESCRIPTIONS[name]}) is not available in this installation of grpo_kernels; "
            f"available: {available_backends()}"
        )
    return name


def _check_device(name: str, device: torch.device) -> None:
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"backend 'cpu' runs CPU tensors only, got {device.type} tensors")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend 'cuda' runs CUDA tensors only, got {device.type} tensors")
    if name != "triton":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise BackendUnavailableError(
            "backend 'triton' runs CPU tensors only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing triton, or pass CUDA tensors"
        )
    if device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"backend 'triton' does not run on {device.type} tensors")


def implementation(backend: str, device: torch.device, op: str) -> Callable:
    """The function computing ``op`` for ``backend`` on ``device``."""
    name = resolve_backend(backend, device)
    if not _provides(name, op):
        raise BackendUnavailableError(
            f"backend {name!r} does not implement {op} yet; backends with {op}: {available_backends(op)}"
        )
    _check_device(name, device)
    return getattr(_module(name), op)


def backend_function(backend: str, device: torch.device, op: str) -> Callable:
    """The function computing ``op`` for ``backend`` on ``device`` (inputs already validated): the backend's own,
    or, for a fused-linear op of a backend without a kernel of its own for it, the chunked driver
    :mod:`grpo_kernels.linear` over the backend's row ops (checked usable on ``device`` before any compute)."""
    name = resolve_backend(backend, device)
    if op not in CHUNKED_OPS or not chunked(name, op):
        return implementation(name, device, op)
    for row_op in CHUNKED_OPS[op]:
        implementation(name, device, row_op)
    from . import linear  # the driver runs the public row ops

    return functools.partial(getattr(linear, op), backend=name)

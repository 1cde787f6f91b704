"""Backend registry and selection.

A backend is a module providing some of the ops ``token_logprobs``,
``group_advantages``, ``grpo_loss`` and ``fused_grpo_loss`` with the
signatures of :mod:`grpo_kernels.reference`; a module lists what it provides
in ``OPS`` (the reference provides all). A backend without kernels of its own
for the fused-linear ops (``CHUNKED_OPS``) provides them through a chunked
driver over its row ops. Backend modules are imported on first use.
``"auto"`` picks, per device type and op, the first available backend of an
ordered preference list that is trusted there: tested by this project's CI
(CPU), or validated on the user's device at first use
(:mod:`grpo_kernels.self_check`; CUDA, which CI does not have). The
environment variable ``GRPO_KERNELS_BACKEND`` overrides that choice, and an
explicit ``backend=`` is never replaced.
"""

from __future__ import annotations

import enum
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

class Trust(enum.Enum):
    """Why ``"auto"`` may use a backend on a kind of device."""

    TESTED = "tested"  # CI runs its tests on this kind of device
    VALIDATE_ON_DEVICE = "validate on device"  # only once grpo_kernels.self_check passed it there


# "auto": preference per device type, best first. CI has no GPU, so on CUDA the kernel backends are used only
# after the on-device check (triton first: no committed GPU result shows cuda faster yet).
_AUTO_PREFERENCE: dict[str, tuple[tuple[str, Trust], ...]] = {
    "cpu": (("cpu", Trust.TESTED), ("reference", Trust.TESTED)),
    "cuda": (("triton", Trust.VALIDATE_ON_DEVICE), ("cuda", Trust.VALIDATE_ON_DEVICE), ("reference", Trust.TESTED)),
}
_AUTO_OTHER_DEVICES = (("reference", Trust.TESTED),)


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


def resolve_backend(backend: str, device: torch.device, op: Optional[str] = None) -> str:
    """The concrete backend name that ``backend`` means for ``op`` on tensors on ``device``.

    ``"auto"`` without ``op`` considers only backends that need no on-device check.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        override = _override()
        return _auto(device, op) if override is None else _check_known(override, "GRPO_KERNELS_BACKEND")
    return _check_known(backend, "backend")


def _override() -> Optional[str]:
    """The backend named by ``GRPO_KERNELS_BACKEND`` for ``"auto"`` (None: unset or ``auto``)."""
    override = os.environ.get("GRPO_KERNELS_BACKEND", "").strip()
    return override if override and override != "auto" else None


def auto_preference(device_type: str) -> tuple[tuple[str, Trust], ...]:
    """``"auto"``'s candidates for ``device_type`` tensors, best first, with what makes each usable."""
    return _AUTO_PREFERENCE.get(device_type, _AUTO_OTHER_DEVICES)


def _auto(device: torch.device, op: Optional[str]) -> str:
    for name, trust in auto_preference(device.type):
        if not _installed(name) or (op is not None and not (_provides(name, op) or chunked(name, op))):
            continue
        if trust is Trust.TESTED:
            return name
        if trust is not Trust.VALIDATE_ON_DEVICE:
            raise ValueError(f"unknown trust {trust!r} of backend {name!r}")
        if op is None:
            continue
        from . import self_check  # it runs the backends: imported on first use

        if self_check.backend_usable(name, op, device):
            return name
    return "reference"


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
    name = resolve_backend(backend, device, op)
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
    name = resolve_backend(backend, device, op)
    auto_fallback = backend == "auto" and _override() is None and name == "reference"
    if op in CHUNKED_OPS and auto_fallback and device.type in _BOUNDED_FALLBACK:
        # the fallback on a GPU: the chunked driver over the reference's row ops, O(chunk_size × V) memory
        return functools.partial(getattr(_linear(), op), backend=name)
    if op not in CHUNKED_OPS or not chunked(name, op):
        return implementation(name, device, op)
    for row_op in CHUNKED_OPS[op]:
        implementation(name, device, row_op)
    return functools.partial(getattr(_linear(), op), backend=name)


# Device types on which "auto"'s reference fallback for the fused-linear ops is the chunked driver over the
# reference's row ops rather than the unchunked specification (whose [tokens × V] logits do not fit a GPU).
_BOUNDED_FALLBACK = ("cuda",)


def _linear() -> ModuleType:
    from . import linear  # the driver runs the public row ops

    return linear

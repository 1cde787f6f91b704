"""Backend registry and selection.

The backends are the rows of :data:`REGISTRY`, the one table of them. A
backend is a module providing some of the ops (``OPS``) with the signatures
of :mod:`grpo_kernels.reference`; a module lists what it provides in ``OPS``
(the reference provides all). A backend without kernels of its own for the
fused-linear ops (``CHUNKED_OPS``) provides them through the chunked driver
over its row ops. Backend modules are imported on first use. ``"auto"``
picks, per device type and op, the first available backend of an ordered
preference list that is trusted there: tested by this project's CI (CPU), or
validated on the user's device at first use (CUDA, which CI does not have;
the check of :mod:`grpo_kernels.self_check`, installed by
:func:`set_device_check`). The environment variable ``GRPO_KERNELS_BACKEND``
overrides that choice, and an explicit ``backend=`` is never replaced.
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Callable, NamedTuple, Optional

import torch

from . import linear
from ._extension import extension_has_cuda_kernels, extension_has_kernels

OPS = ("token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss", "linear_token_logprobs",
       "fused_linear_grpo_loss")

# Ops that a backend without a kernel of its own for them still provides through the
# chunked driver of :mod:`grpo_kernels.linear`, which runs the backend's row ops listed here.
CHUNKED_OPS = {"linear_token_logprobs": ("token_logprobs",), "fused_linear_grpo_loss": ("token_logprobs", "grpo_loss")}


def _package_installed(package: str) -> Callable[[], bool]:
    """Availability predicate: ``package`` is importable."""
    return lambda: importlib.util.find_spec(package) is not None


# Device predicates: why a backend cannot run tensors on ``device`` (None: it can).
DeviceProblem = Callable[[torch.device], Optional[str]]


def _any_device(device: torch.device) -> Optional[str]:
    return None


def _only(device_type: str, label: str) -> DeviceProblem:
    def problem(device: torch.device) -> Optional[str]:
        return None if device.type == device_type else f"runs {label} tensors only, got {device.type} tensors"

    return problem


def _triton_device(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return ("runs CPU tensors only under the Triton interpreter: set TRITON_INTERPRET=1 before importing triton, "
                "or pass CUDA tensors")
    if device.type not in ("cpu", "cuda"):
        return f"does not run on {device.type} tensors"
    return None


class Backend(NamedTuple):
    """A backend of this version."""

    module: str  # the module with the ops (and ``OPS``, the ops it implements; default: all)
    # the module with ``row_statistics`` / ``row_gradient`` (a vocabulary shard's statistics, the gradient from given
    # statistics) for grpo_kernels.distributed; None for the reference, whose row math distributed writes in torch
    row_module: Optional[str]
    available: Callable[[], bool]  # usable in this installation
    device_problem: DeviceProblem  # why it cannot run a device's tensors (None: it can)
    description: str  # for the error messages


# The one table of backends, in the order available_backends() lists them.
REGISTRY: dict[str, Backend] = {
    "reference": Backend("grpo_kernels.reference", None, lambda: True, _any_device,
                         "pure PyTorch (the specification)"),
    "triton": Backend("grpo_kernels.triton", "grpo_kernels.triton.token_logprobs", _package_installed("triton"),
                      _triton_device, "Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)"),
    "cpu": Backend("grpo_kernels.native", "grpo_kernels.native.token_logprobs", extension_has_kernels,
                   _only("cpu", "CPU"), "C++ kernels from the grpo_kernels._C extension"),
    # the same glue: the extension's entry points dispatch on the tensors' device
    "cuda": Backend("grpo_kernels.native", "grpo_kernels.native.token_logprobs", extension_has_cuda_kernels,
                    _only("cuda", "CUDA"), "CUDA kernels from the grpo_kernels._C extension"),
}
BACKENDS = tuple(REGISTRY)


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
    return name in REGISTRY and REGISTRY[name].available()


def _module(name: str) -> ModuleType:
    return importlib.import_module(REGISTRY[name].module)


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
        return _auto_choice(device, op) if override is None else _check_known(override, "GRPO_KERNELS_BACKEND")
    return _check_known(backend, "backend")


class _AutoChoice(NamedTuple):
    name: str
    fixed: bool  # chosen without asking the on-device check


class _Remembered(NamedTuple):
    preference: tuple  # the preference list it was chosen from (the choice holds while that is the list)
    name: str


_AUTO_CHOSEN: dict = {}  # (device, op) → _Remembered


def _auto_choice(device: torch.device, op: Optional[str]) -> str:
    """``"auto"``'s backend for ``op`` on ``device``: remembered where no on-device check took part in the choice
    (then it is the same on every call: installation and preferences do not change), else chosen anew."""
    preference = auto_preference(device.type)
    remembered = _AUTO_CHOSEN.get((device, op))
    if remembered is not None and remembered.preference is preference:
        return remembered.name
    choice = _auto(device, op)
    if choice.fixed:
        _AUTO_CHOSEN[(device, op)] = _Remembered(preference, choice.name)
    return choice.name


def _override() -> Optional[str]:
    """The backend named by ``GRPO_KERNELS_BACKEND`` for ``"auto"`` (None: unset or ``auto``)."""
    override = os.environ.get("GRPO_KERNELS_BACKEND", "").strip()
    return override if override and override != "auto" else None


def auto_preference(device_type: str) -> tuple[tuple[str, Trust], ...]:
    """``"auto"``'s candidates for ``device_type`` tensors, best first, with what makes each usable."""
    return _AUTO_PREFERENCE.get(device_type, _AUTO_OTHER_DEVICES)


def _auto(device: torch.device, op: Optional[str]) -> _AutoChoice:
    asked = False
    for name, trust in auto_preference(device.type):
        if not _installed(name) or (op is not None and not (_provides(name, op) or chunked(name, op))):
            continue
        if trust is Trust.TESTED:
            return _AutoChoice(name, fixed=not asked)
        if trust is not Trust.VALIDATE_ON_DEVICE:
            raise ValueError(f"unknown trust {trust!r} of backend {name!r}")
        if op is None:
            continue
        if _device_check is None:
            raise RuntimeError(f"backend {name!r} needs an on-device check before 'auto' uses it, and none is "
                               f"installed (grpo_kernels/__init__.py installs grpo_kernels.self_check's)")
        asked = True
        if _device_check(name, op, device):
            return _AutoChoice(name, fixed=False)
    return _AutoChoice("reference", fixed=not asked)


# What "auto" asks before using a backend whose trust is VALIDATE_ON_DEVICE: (backend, op, device) -> passed.
# grpo_kernels.self_check answers it; it runs the backends and so imports this module, and the package's
# __init__ installs it here (no import cycle).
DeviceCheck = Callable[[str, str, torch.device], bool]
_device_check: Optional[DeviceCheck] = None


def set_device_check(check: Optional[DeviceCheck]) -> None:
    """Install the on-device check that ``"auto"`` asks (see :class:`Trust`)."""
    global _device_check
    _device_check = check


def _check_known(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where} must be 'auto' or one of {list(BACKENDS)}, got {name!r}")
    if not _installed(name):
        raise BackendUnavailableError(
            f"backend {name!r} ({REGISTRY[name].description}) is not available in this installation of grpo_kernels; "
            f"available: {available_backends()}"
        )
    return name


def _check_device(name: str, device: torch.device) -> None:
    problem = REGISTRY[name].device_problem(device)
    if problem is not None:
        raise BackendUnavailableError(f"backend {name!r} {problem}")


def implementation(backend: str, device: torch.device, op: str) -> Callable:
    """The function computing ``op`` for ``backend`` on ``device``."""
    name = resolve_backend(backend, device, op) if backend == "auto" else backend
    module = _CHECKED_MODULES.get((name, device, op))
    if module is not None:
        return getattr(module, op)
    name = resolve_backend(name, device, op)
    if not _provides(name, op):
        raise BackendUnavailableError(
            f"backend {name!r} does not implement {op} yet; backends with {op}: {available_backends(op)}"
        )
    _check_device(name, device)
    module = _module(name)
    _CHECKED_MODULES[(name, device, op)] = module  # a backend on a device: its checks pass for good
    return getattr(module, op)


_CHECKED_MODULES: dict = {}  # (backend name, device, op) → the backend's module, its checks passed


def self_checked_implementation(backend: str, device: torch.device, op: str) -> Optional[Callable]:
    """The backend's ``<op>_checked`` for ``op`` on ``device``, where it has one: ``op`` with the checks of its
    tensor inputs done by the backend itself, for options that passed validation before; it returns None where
    an input needs :mod:`grpo_kernels.validation` (which names the problem, or finds none). None when the backend
    has none, or cannot run ``op`` there (the caller's usual path then raises the error)."""
    try:
        function = implementation(backend, device, op)
    except (ValueError, TypeError, BackendUnavailableError):
        return None
    checked = _SELF_CHECKED.get(function, _NONE)
    if checked is _NONE:
        checked = _SELF_CHECKED[function] = getattr(importlib.import_module(function.__module__), f"{op}_checked",
                                                    None)
    return checked


_SELF_CHECKED: dict = {}  # an op's function → its module's <op>_checked or None
_NONE = object()


def backend_function(backend: str, device: torch.device, op: str) -> Callable:
    """The function computing ``op`` for ``backend`` on ``device`` (inputs already validated): the backend's own,
    or, for a fused-linear op of a backend without a kernel of its own for it, the chunked driver
    :mod:`grpo_kernels.linear` over the backend's row ops (checked usable on ``device`` before any compute)."""
    name = resolve_backend(backend, device, op)
    auto_fallback = backend == "auto" and _override() is None and name == "reference"
    if op in CHUNKED_OPS and auto_fallback and device.type in _BOUNDED_FALLBACK:
        # the fallback on a GPU: the chunked driver over the reference's row ops, O(chunk_size × V) memory
        return chunked_driver(name, device, op)
    if op not in CHUNKED_OPS or not chunked(name, op):
        return implementation(name, device, op)
    for row_op in CHUNKED_OPS[op]:
        implementation(name, device, row_op)
    return chunked_driver(name, device, op)


def chunked_driver(name: str, device: torch.device, op: str) -> Callable:
    """``op`` (a key of ``CHUNKED_OPS``) by the chunked driver :mod:`grpo_kernels.linear` over the row ops of
    backend ``name`` (a resolved name) on ``device``."""
    if op not in CHUNKED_OPS:
        raise ValueError(f"op must be one of {list(CHUNKED_OPS)}, got {op!r}")
    return functools.partial(getattr(linear, op), backend=name, kernel=functools.partial(implementation, name, device))


def row_kernels(name: str, device: torch.device) -> ModuleType:
    """The module with ``row_statistics`` / ``row_gradient`` of backend ``name`` (a resolved name), checked usable
    on ``device``; :class:`BackendUnavailableError` for a backend without one (the reference)."""
    implementation(name, device, "token_logprobs")
    row_module = REGISTRY[name].row_module
    if row_module is None:
        raise BackendUnavailableError(f"backend {name!r} has no row kernels module")
    return importlib.import_module(row_module)


# Device types on which "auto"'s reference fallback for the fused-linear ops is the chunked driver over the
# reference's row ops rather than the unchunked specification (whose [tokens × V] logits do not fit a GPU).
_BOUNDED_FALLBACK = ("cuda",)

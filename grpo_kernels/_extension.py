"""Optional compiled extension ``grpo_kernels._C``.

The package works without it (``GRPO_KERNELS_NO_EXT=1`` at build time skips
it); backends that need it report themselves unavailable. The CPU kernels are
compiled once per instruction set (by default x86-64-v3, the baseline, and
x86-64-v4 with AVX-512; ``GRPO_KERNELS_CPU_ARCH`` builds one copy), and the
extension runs the most capable copy the CPU supports (``cpu_isa()``;
``GRPO_KERNELS_CPU_ISA=avx2`` forces the baseline). ``_C_build.json`` records the
x86 features each copy requires; on a CPU that lacks one of the baseline's, the
extension is not imported (it could stop the process with an illegal
instruction) and one warning says how to rebuild it.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (loads libtorch, which _C links against)

BUILD_INFO = Path(__file__).with_name("_C_build.json")  # written by setup.py beside the extension
PORTABLE_REBUILD = "pip install --no-build-isolation ."  # the default targets: any x86-64 CPU with AVX2 and FMA
NATIVE_REBUILD = "GRPO_KERNELS_CPU_ARCH=native pip install --no-build-isolation ."
CPU_ISA_ENV = "GRPO_KERNELS_CPU_ISA"  # read by the extension when it loads: the copy of the CPU kernels to run


def _build_info() -> dict:
    """What setup.py recorded of the extension's build ({} for a build without the record)."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[frozenset]:
    """The running CPU's feature flags as Linux names them (None where they cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return None  # no x86 flags line (another architecture)


def _missing_cpu_features(info: dict, flags: Optional[frozenset]) -> list:
    """The features importing the build requires (its baseline copy's) that `flags` lack ([] where either
    is unknown)."""
    if flags is None or not info.get("x86_features"):
        return []
    return [feature for feature in info["x86_features"] if feature not in flags]


def _import_extension() -> ModuleType:
    return importlib.import_module(f"{__package__}._C")


def _built_files() -> list:
    return list(Path(__file__).parent.glob("_C*.so")) + list(Path(__file__).parent.glob("_C*.pyd"))


def _load() -> Optional[ModuleType]:
    built = _built_files()
    info = _build_info()
    missing = _missing_cpu_features(info, cpu_flags()) if built else []
    if missing:
        copies = info.get("cpu_copies") or [{"march": info.get("cpu_arch")}]
        warnings.warn(f"grpo_kernels: the compiled extension was built for -march={copies[0]['march'] or '(default)'} "
                      f"and this CPU lacks {', '.join(missing)}, so it is not imported (it could execute an illegal "
                      f"instruction): the 'cpu' and 'cuda' backends are unavailable and backend='auto' uses the "
                      f"others. Rebuild it for this CPU (`{NATIVE_REBUILD}`) or, on a CPU with AVX2 and FMA, with "
                      f"the default targets, which run on any such x86-64 CPU (`{PORTABLE_REBUILD}`).",
                      RuntimeWarning, stacklevel=2)
        return None
    try:
        _C = _import_extension()
    except ImportError as error:
        if built:  # built but broken (e.g. against another torch): say why instead of silently going without
            remedy = ("Unset GRPO_KERNELS_CPU_ISA or name one of the listed instruction sets" if CPU_ISA_ENV in str(error)
                      else "Rebuild it with `pip install --no-build-isolation -e .`")
            warnings.warn(f"grpo_kernels: the compiled extension {built[0].name} exists but failed to import "
                          f"({type(error).__name__}: {error}); the 'cpu' and 'cuda' backends are unavailable. "
                          f"{remedy}.", RuntimeWarning, stacklevel=2)
        return None
    return _C


_C = _load()


def extension_available() -> bool:
    """Whether the compiled extension ``grpo_kernels._C`` was built and imports."""
    return _C is not None


def extension_has_kernels() -> bool:
    """Whether the extension imports and has the kernel entry points (the ``"cpu"`` backend)."""
    return _C is not None and hasattr(_C, "fused_grpo_loss_fwd")


def extension_has_cuda_kernels() -> bool:
    """Whether the extension was also built with its CUDA kernels (the ``"cuda"`` backend)."""
    return extension_has_kernels() and bool(_C.with_cuda())


def extension_info() -> dict:
    """Version and build facts of the extension (empty when it is absent), and the choices its CPU kernels made
    on this machine: ``cpu_isa`` (the copy it runs), ``gradient_buffer_pages``."""
    if _C is None:
        return {}
    return {"version": _C.version(), "cpu_arch": _C.cpu_arch(), "cpu_isa": _C.cpu_isa(), "cuda": bool(_C.with_cuda()),
            "cuda_version": int(_C.cuda_version()), "gradient_buffer_pages": _C.gradient_buffer_pages()}

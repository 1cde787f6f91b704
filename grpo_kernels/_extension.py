"""Optional compiled extension ``grpo_kernels._C``.

The package works without it (``GRPO_KERNELS_NO_EXT=1`` at build time skips
it); backends that need it report themselves unavailable.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (loads libtorch, which _C links against)


def _load() -> Optional[ModuleType]:
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as error:
        built = list(Path(__file__).parent.glob("_C*.so")) + list(Path(__file__).parent.glob("_C*.pyd"))
        if built:  # built but broken (e.g. against another torch): say why instead of silently going without
            warnings.warn(f"grpo_kernels: the compiled extension {built[0].name} exists but failed to import "
                          f"({type(error).__name__}: {error}); the 'cpu' and 'cuda' backends are unavailable. "
                          f"Rebuild it with `pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)
        return None
    return _C


_C = _load()


def extension_available() -> bool:
    """Whether the compiled extension ``grpo_kernels._C`` was built and imports."""
    return _C is not None


def extension_info() -> dict:
    """Version and build facts of the extension (empty when it is absent)."""
    if _C is None:
        return {}
    return {"version": _C.version(), "cpu_arch": _C.cpu_arch(), "cpu_isa": _C.cpu_isa(), "cuda": bool(_C.with_cuda()),
            "cuda_version": int(_C.cuda_version())}

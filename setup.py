"""Build of grpo-kernels with the optional extension ``grpo_kernels._C``.

The extension is compiled with torch.utils.cpp_extension (pybind11 underneath)
from ``csrc/cpu/*.cpp``, plus ``csrc/cuda/*.cu`` when the installed torch has
CUDA and nvcc is found. Environment switches:

- ``GRPO_KERNELS_NO_EXT=1``: build no extension (the package works without it).
- ``GRPO_KERNELS_NO_CUDA=1``: leave out the CUDA sources.
- ``TORCH_CUDA_ARCH_LIST``: CUDA architectures (default "9.0a": Hopper, one device compile per source).
- ``GRPO_KERNELS_CPU_ARCH``: the ``-march`` of the CPU kernels (default ``native``: the
  vector ISA of the building machine, e.g. AVX-512; a binary built this way may not run
  on an older CPU, so set e.g. ``x86-64-v3`` to build one for other machines, or an empty
  value for the compiler's default target).
"""

import glob
import os
import re
import shutil
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "grpo_kernels", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _cpu_arch():
    return os.environ.get("GRPO_KERNELS_CPU_ARCH", "native").strip()


def _cpu_arch_flags():
    arch = _cpu_arch()
    return [f"-march={arch}"] if arch else []


def _extensions():
    if os.environ.get("GRPO_KERNELS_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: building grpo_kernels without its extension")
        return [], {}

    sources = _sources("csrc/cpu/*.cpp")
    macros = [("GRPO_KERNELS_VERSION", f'"{_version()}"'), ("GRPO_KERNELS_CPU_ARCH", f'"{_cpu_arch()}"')]
    # -ffp-contract=off: every product is rounded as written (z = x / T as the reference rounds it);
    # the kernels ask for fused multiply-adds explicitly where they want them
    # -g0: Python's CFLAGS carry -g, ~20 MB of debug info in module.o and a quarter of its compile time
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-g0"] + _cpu_arch_flags()
    nvcc_found = cpp_extension.CUDA_HOME is not None and shutil.which(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    use_cuda = (
        torch.version.cuda is not None and nvcc_found and os.environ.get("GRPO_KERNELS_NO_CUDA", "0") != "1"
    )
    if torch.version.cuda is not None and not nvcc_found:
        warnings.warn("torch has CUDA but nvcc was not found: building the extension without CUDA kernels")
    if use_cuda:
        # one architecture unless the environment names others (each is another device compile of every .cu)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
        ext = cpp_extension.CUDAExtension(
            "grpo_kernels._C",
            sources + _sources("csrc/cuda/*.cu"),
            define_macros=macros + [("GRPO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "grpo_kernels._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

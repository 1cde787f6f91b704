"""Build of grpo-kernels with the optional extension ``grpo_kernels._C``.

The extension is compiled with torch.utils.cpp_extension (pybind11 underneath)
from ``csrc/cpu/*.cpp``, plus ``csrc/cuda/*.cu`` when the installed torch has
CUDA and nvcc is found. Environment switches:

- ``GRPO_KERNELS_NO_EXT=1``: build no extension (the package works without it).
- ``GRPO_KERNELS_NO_CUDA=1``: leave out the CUDA sources.
- ``TORCH_CUDA_ARCH_LIST``: CUDA architectures (default "9.0").
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
    macros = [("GRPO_KERNELS_VERSION", f'"{_version()}"')]
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    nvcc_found = cpp_extension.CUDA_HOME is not None and shutil.which(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    use_cuda = (
        torch.version.cuda is not None and nvcc_found and os.environ.get("GRPO_KERNELS_NO_CUDA", "0") != "1"
    )
    if torch.version.cuda is not None and not nvcc_found:
        warnings.warn("torch has CUDA but nvcc was not found: building the extension without CUDA kernels")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
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

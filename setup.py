"""Build of grpo-kernels with the optional extension ``grpo_kernels._C``.

The extension is compiled with torch.utils.cpp_extension (pybind11 underneath)
from ``csrc/cpu/*.cpp``, plus ``csrc/cuda/*.cu`` when the installed torch has
CUDA and nvcc is found; both include the shared headers of ``csrc/common``. Before
compiling, the build regenerates ``csrc/common/loss_table.h`` from
``grpo_kernels/loss_table.py`` (``grpo_kernels/codegen.py``, loaded from its file:
no import of the package). Environment switches:

- ``GRPO_KERNELS_NO_EXT=1``: build no extension (the package works without it).
- ``GRPO_KERNELS_NO_CUDA=1``: leave out the CUDA sources.
- ``TORCH_CUDA_ARCH_LIST``: CUDA architectures (default "9.0a": Hopper, one device compile per source).
- ``GRPO_KERNELS_CPU_ARCH``: unset (the default), the CPU kernels are compiled once per
  instruction set on x86-64 (``X86_CPU_COPIES``: x86-64-v3 = AVX2 + FMA, the baseline, and
  x86-64-v4 = AVX-512), each copy in its own namespace, and the extension runs the most capable
  copy the CPU supports (``cpu_isa()``; ``GRPO_KERNELS_CPU_ISA=avx2`` at import forces the
  baseline), so one wheel runs on every x86-64 CPU with AVX2 + FMA; on other architectures, one
  copy for the compiler's default target. Set, one copy for that ``-march`` (e.g. ``native``: the
  building machine's CPU only; an empty value: the compiler's default target). The build records in
  ``grpo_kernels/_C_build.json`` the x86 features each copy requires; ``grpo_kernels._extension``
  does not import the extension on a CPU that lacks one of the baseline's.

torch is imported from the environment that runs the build, never installed by it:
``pip install --no-build-isolation .`` builds against the torch already installed. An isolated
build (plain ``pip install .``, ``python -m build``) cannot see that torch and stops with an
error naming both ways on (``--no-build-isolation``, ``GRPO_KERNELS_NO_EXT=1``).
"""

import glob
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "grpo_kernels", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _generate_headers():
    """csrc/common/loss_table.h from the loss table (rewritten only when it changed)."""
    spec = importlib.util.spec_from_file_location("_grpo_kernels_codegen", os.path.join(HERE, "grpo_kernels",
                                                                                        "codegen.py"))
    codegen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(codegen)
    if codegen.write():
        print(f"grpo_kernels: regenerated {os.path.relpath(codegen.HEADER_PATH, HERE)} from the loss table")


# The copies of the CPU kernels of a default x86-64 build, (namespace = cpu_isa() name, -march), the
# baseline first: module.cpp is compiled for it and runs the last copy in this order that the CPU supports
# (its table kCpuCopies names the same copies).
X86_CPU_COPIES = (("avx2", "x86-64-v3"), ("avx512", "x86-64-v4"))
SINGLE_COPY = "single"  # the namespace of a one-copy build (GRPO_KERNELS_CPU_ARCH, or not x86-64)
BINDING_SOURCES = ["csrc/cpu/module.cpp"]  # compiled once, with the baseline copy (its -march and namespace)


def _cpu_copies():
    """(namespace, -march) of each copy of the CPU kernels this build compiles, the baseline first."""
    arch = os.environ.get("GRPO_KERNELS_CPU_ARCH")
    if arch is not None:
        return ((SINGLE_COPY, arch.strip()),)
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_CPU_COPIES
    return ((SINGLE_COPY, ""),)  # the compiler's default target: the portable one


def _march_flags(arch):
    return [f"-march={arch}"] if arch else []


# Compiler macros of x86 features -> their names in Linux's /proc/cpuinfo flags: the instructions
# code compiled for a -march may contain (vector and bit-manipulation sets; the compiler emits these
# unasked). grpo_kernels/_extension.py checks the recorded names against the running CPU.
X86_FEATURE_MACROS = {
    "__SSE3__": "pni", "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2",
    "__SSE4A__": "sse4a", "__POPCNT__": "popcnt", "__LZCNT__": "abm", "__MOVBE__": "movbe",
    "__BMI__": "bmi1", "__BMI2__": "bmi2", "__F16C__": "f16c", "__FMA__": "fma", "__AVX__": "avx",
    "__AVX2__": "avx2", "__AVXVNNI__": "avx_vnni", "__AVX512F__": "avx512f", "__AVX512CD__": "avx512cd",
    "__AVX512BW__": "avx512bw", "__AVX512DQ__": "avx512dq", "__AVX512VL__": "avx512vl",
    "__AVX512IFMA__": "avx512ifma", "__AVX512VBMI__": "avx512vbmi", "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512VNNI__": "avx512_vnni", "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq", "__AVX512BF16__": "avx512_bf16", "__AVX512FP16__": "avx512_fp16",
    "__GFNI__": "gfni", "__VPCLMULQDQ__": "vpclmulqdq",
}
BUILD_INFO = "_C_build.json"  # beside the extension, in the wheel too
# setup.py commands that compile the extension (an sdist or metadata needs no torch)
_COMPILING_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "install", "develop", "editable_wheel"}
NO_TORCH_MESSAGE = (
    "grpo_kernels: torch is not importable in this build environment, so the extension grpo_kernels._C "
    "(the 'cpu' and 'cuda' backends) cannot be built. An isolated build (plain `pip install .`, "
    "`python -m build`) does not see the torch you installed, and this package never installs a second "
    "one. Build against your torch with `pip install --no-build-isolation .` (or `python -m build "
    "--no-isolation`), or set GRPO_KERNELS_NO_EXT=1 to build the package without its extension."
)


def _x86_features(compiler, arch):
    """/proc/cpuinfo names of the x86 features `compiler` assumes for -march=`arch` (None when the
    compiler cannot be asked)."""
    try:
        out = subprocess.run([compiler, *_march_flags(arch), "-dM", "-E", "-x", "c++", "-"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    defined = {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}
    return sorted({flag for macro, flag in X86_FEATURE_MACROS.items() if macro in defined})


def _cxx_standard(torch_version):
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def _build_ext_class(base):
    class BuildExt(base):
        """Compiles each copy of the CPU kernels with its -march, links them into the extension, and
        writes BUILD_INFO beside it; rebuilds when the targets or torch changed."""

        info_path = None

        def build_extensions(self):
            import torch

            _generate_headers()
            # the build directory's copy (setuptools builds there, then copies to the source if --inplace)
            self.info_path = os.path.join(os.path.dirname(self.get_ext_fullpath("grpo_kernels._C")), BUILD_INFO)
            compiler = (getattr(self.compiler, "compiler_so", None) or ["c++"])[0]
            copies = [{"copy": name, "march": arch, "x86_features": _x86_features(compiler, arch)}
                      for name, arch in _cpu_copies()]
            # x86_features: what importing needs (the baseline); each copy's own in cpu_copies
            info = {"cpu_arch": "+".join(arch for _, arch in _cpu_copies()), "x86_features": copies[0]["x86_features"],
                    "cpu_copies": copies, "torch": torch.__version__}
            try:
                with open(self.info_path) as f:
                    self.force = self.force or json.load(f) != info  # an up-to-date .so of another target
            except (OSError, ValueError):
                self.force = True
            super().build_extensions()
            with open(self.info_path, "w") as f:
                json.dump(info, f, indent=1)

        def build_extension(self, ext):
            # the extension's sources are the baseline copy's (with the bindings); the other copies compile
            # here, with their -march and namespace, into their own directory (and ninja file): torch's
            # BuildExtension has added its flags to ext.extra_compile_args and made self.compiler.compile use ninja
            cxx = [flag for flag in ext.extra_compile_args["cxx"] if not flag.startswith("-march=")]
            macros = [macro for macro in ext.define_macros if macro[0] != "GRPO_CPU_COPY"]
            ext.extra_objects = []  # linked after the baseline's objects: the linker keeps the baseline's copy
            for name, arch in _cpu_copies()[1:]:  # of an inline function that several objects define
                ext.extra_objects += self.compiler.compile(
                    ext.cpu_kernel_sources, output_dir=os.path.join(self.build_temp, f"cpu-{name}"),
                    macros=macros + [("GRPO_CPU_COPY", name)], include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": cxx + _march_flags(arch)}, depends=ext.depends)
            super().build_extension(ext)

        def run(self):
            super().run()
            if self.inplace and self.info_path:
                package_dir = self.get_finalized_command("build_py").get_package_dir("grpo_kernels")
                self.copy_file(self.info_path, os.path.join(package_dir, BUILD_INFO))

    return BuildExt


def _extensions():
    if os.environ.get("GRPO_KERNELS_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if _COMPILING_COMMANDS.intersection(sys.argv[1:]):
            sys.exit(NO_TORCH_MESSAGE)
        return [], {}

    # the extension's sources: the bindings and the baseline copy of the kernels (the other copies compile in
    # BuildExt.build_extension, linked in as extra objects)
    kernel_sources = [path for path in _sources("csrc/cpu/*.cpp") if path not in BINDING_SOURCES]
    depends = kernel_sources + _sources("csrc/*/*.h") + _sources("csrc/*/*.cuh")
    copies = _cpu_copies()
    macros = [("GRPO_KERNELS_VERSION", f'"{_version()}"'),
              ("GRPO_KERNELS_CPU_ARCH", '"' + "+".join(arch for _, arch in copies) + '"'),
              ("GRPO_CPU_COPY", copies[0][0])]
    if copies == X86_CPU_COPIES:
        macros.append(("GRPO_CPU_DISPATCH", "1"))
    # -ffp-contract=off: every product is rounded as written (z = x / T as the reference rounds it);
    # the kernels ask for fused multiply-adds explicitly where they want them
    # -g0: Python's CFLAGS carry -g, ~20 MB of debug info in module.o and a quarter of its compile time
    # the C++ standard torch's headers need: C++20 from torch 2.14 (ATen.h stops on anything older)
    std = f"-std={_cxx_standard(torch.__version__)}"
    cxx = ["-O3", std, "-fopenmp", "-ffp-contract=off", "-g0"] + _march_flags(copies[0][1])
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
            BINDING_SOURCES + kernel_sources + _sources("csrc/cuda/*.cu"),
            define_macros=macros + [("GRPO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", std, "--use_fast_math"]},
            extra_link_args=["-fopenmp"], depends=depends,
        )
    else:
        ext = cpp_extension.CppExtension(
            "grpo_kernels._C", BINDING_SOURCES + kernel_sources, define_macros=macros, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"], depends=depends,
        )
    ext.cpu_kernel_sources = kernel_sources
    base = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)
    return [ext], {"build_ext": _build_ext_class(base)}


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__ too
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)

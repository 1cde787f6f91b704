"""Compile every csrc/cuda/*.cu for sm_90 with the machine's nvcc, without a GPU.

CI has no GPU, so this is what checks the CUDA kernels there: each file must
compile with the flags torch's BuildExtension and setup.py use, its kernels must
not spill registers, and the objects must define every entry point of
csrc/common/entry_points.h in grpo_kernels::cuda with the signatures of the CPU
kernels. Skipped when nvcc is absent. Files compile two at a time (about 20 s
of CPU each, a third of it the ATen headers: the sources include the narrow
ones, not <ATen/ATen.h>, which alone costs ~20 s); the per-file compile times
and the kernels' register counts are printed.
"""

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import time

import pytest
import torch
from torch.utils import cpp_extension

from grpo_kernels._extension import _C

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCH = "-gencode=arch=compute_90,code=sm_90"
WORKERS = 2


def _nvcc():
    candidates = [os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")] if cpp_extension.CUDA_HOME else []
    candidates.append(shutil.which("nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _flags() -> list[str]:
    """The nvcc command line of setup.py's CUDAExtension for one source (plus ptxas statistics)."""
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    flags = [ARCH, "-std=c++17", "-O3", "--use_fast_math", "-DGRPO_WITH_CUDA", "-Xcompiler", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-Xptxas", "-v"]
    flags += cpp_extension.COMMON_NVCC_FLAGS  # e.g. --expt-relaxed-constexpr, the half/bfloat16 operator switches
    flags += [f"-I{p}" for p in includes]
    # CPU wheels of torch ship the c10/cuda headers but not their generated config header
    if not any((pathlib.Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _compile(source: pathlib.Path, out_dir: pathlib.Path) -> dict:
    """nvcc on one source: exit status, wall and CPU seconds (nvcc and its tools), log, object path."""
    obj, log = out_dir / (source.stem + ".o"), out_dir / (source.stem + ".log")
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([NVCC, *_flags(), "-c", str(source), "-o", str(obj)], stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return dict(rc=os.waitstatus_to_exitcode(status), seconds=time.perf_counter() - start,
                cpu_seconds=usage.ru_utime + usage.ru_stime, log=log.read_text(), obj=obj)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {src.name: pool.submit(_compile, src, out_dir) for src in SOURCES}
        return {name: f.result() for name, f in futures.items()}


def _kernels(log: str) -> dict:
    """ptxas -v: kernel name -> (registers, spill store bytes, spill load bytes)."""
    stats = {}
    pattern = re.compile(
        r"Function properties for (\S+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
        r"loads\s+ptxas info\s+: Used (\d+) registers")
    for name, _stack, stores, loads, regs in pattern.findall(log):
        stats[name] = (int(regs), int(stores), int(loads))
    return stats


def _short(mangled: str) -> str:
    match = re.search(r"(\w+_kernel)I(.*?)E", mangled)
    return f"{match.group(1)}<{match.group(2)}>" if match else mangled


def test_sources_present():
    names = {src.name for src in SOURCES}
    assert {"build_info.cu", "token_logprobs.cu", "group_advantages.cu", "grpo_loss.cu",
            "fused_grpo_loss.cu"} <= names


@pytest.mark.parametrize("source", [src.name for src in SOURCES])
def test_compiles_for_sm90(builds, source):
    build = builds[source]
    assert build["rc"] == 0, build["log"][-6000:]
    errors = [line for line in build["log"].splitlines() if "csrc/" in line and "warning" in line]
    assert not errors, "\n".join(errors)  # our own sources compile without warnings


def test_kernels_do_not_spill(builds, capsys):
    lines, spilling = [], []
    for source, build in builds.items():
        stats = _kernels(build["log"])
        regs = sorted({r for r, _, _ in stats.values()})
        lines.append(f"{source}: {build['seconds']:.0f} s ({build['cpu_seconds']:.0f} s CPU), {len(stats)} kernels, "
                     f"registers {regs}")
        spilling += [f"{source}: {_short(k)} spills {s}/{lo} bytes" for k, (_, s, lo) in stats.items() if s or lo]
    with capsys.disabled():
        print("\nCUDA objects (sm_90): " + "; ".join(lines), file=sys.stderr)
    assert not spilling, "\n".join(spilling)


ENTRY_POINTS_H = (ROOT / "csrc" / "common" / "entry_points.h").read_text()


def _declared(namespace: str) -> list[str]:
    """The functions entry_points.h declares in ``namespace grpo_kernels::<namespace>`` (one per
    ``<return type> name(`` line)."""
    body = ENTRY_POINTS_H.split(f"namespace {namespace} {{", 1)[1].split(f"}}  // namespace {namespace}", 1)[0]
    return re.findall(r"^\S.*?\b(\w+)\($", body, re.M)


ENTRY_POINTS = sorted(_declared("cpu"))


def test_cpu_and_cuda_declare_the_same_entry_points():
    assert ENTRY_POINTS == sorted(_declared("cuda"))
    assert len(ENTRY_POINTS) == len(set(ENTRY_POINTS)) == 7, ENTRY_POINTS


def _symbols(path: pathlib.Path, namespace: str) -> dict:
    """Defined functions ``grpo_kernels::<namespace>::name(params)`` of an object or library: name -> params."""
    out = subprocess.run(["nm", "-C", "--defined-only", str(path)], capture_output=True, text=True).stdout
    prefix = f"grpo_kernels::{namespace}::"
    found = {}
    for line in out.splitlines():
        if f" T {prefix}" in line:
            signature = line.split(f" T {prefix}", 1)[1]
            name, params = signature.split("(", 1)
            found[name] = "(" + params
    return found


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm not found")
def test_objects_define_every_entry_point(builds):
    assert set(ENTRY_POINTS) >= {"token_logprobs_fwd", "token_logprobs_bwd", "group_normalize", "grpo_loss_fwd",
                                 "grpo_loss_bwd", "fused_grpo_loss_fwd"}
    defined = {}
    for build in builds.values():
        defined.update(_symbols(build["obj"], "cuda"))
    missing = [name for name in ENTRY_POINTS if name not in defined]
    assert not missing, f"grpo_kernels::cuda lacks {missing}"
    if _C is not None:  # the CPU kernels of the built extension: the same parameter lists
        # each copy of the CPU kernels is in its namespace grpo_kernels::cpu::<copy> (setup.py)
        cpu = _symbols(pathlib.Path(_C.__file__), "cpu::avx2") or _symbols(pathlib.Path(_C.__file__), "cpu::single")
        assert set(cpu) == set(ENTRY_POINTS) | {"kernels"}, sorted(cpu)  # and its table of them
        for name in ENTRY_POINTS:
            assert defined[name] == cpu[name], name

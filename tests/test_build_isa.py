"""The copies of the CPU kernels, one per instruction set (setup.py X86_CPU_COPIES): the extension runs
the most capable copy this CPU supports, GRPO_KERNELS_CPU_ISA picks another, and no AVX-512 instruction
lies outside the AVX-512 copy (an inline function that several copies define is kept once by the
linker: the baseline's, or an AVX2 CPU could execute AVX-512 code through it). Under valgrind, whose
CPU has no AVX-512, the baseline copy runs without being forced. That the copies give the same bits:
tests/test_cpu_backend.py."""

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import grpo_kernels as gk
from grpo_kernels import _extension

ROOT = Path(__file__).resolve().parents[1]
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")  # its tables, without building
RECORD = _extension._build_info()
COPIES = [copy["copy"] for copy in RECORD.get("cpu_copies", [])]
DISPATCH_BUILD = gk.extension_available() and COPIES == [name for name, _ in SETUP["X86_CPU_COPIES"]]

dispatch_build = pytest.mark.skipif(not DISPATCH_BUILD, reason="not a default x86-64 build of grpo_kernels._C")


def test_every_cpu_kernel_source_is_in_its_copys_namespace():
    """What a kernel source or header defines is compiled into each copy; outside grpo_kernels::cpu::GRPO_CPU_COPY
    it would be one function for all copies (the baseline's, kept by the linker)."""
    for path in sorted((ROOT / "csrc" / "cpu").glob("*")):
        if path.name == "module.cpp" or path.suffix not in (".h", ".cpp"):
            continue
        opened = re.findall(r"^namespace (\S+) \{", path.read_text(), re.M)
        assert opened and set(opened) == {"grpo_kernels::cpu::GRPO_CPU_COPY"}, (path.name, opened)


def _run(code, cpu_isa):
    env = {key: value for key, value in os.environ.items() if key != "GRPO_KERNELS_CPU_ISA"}
    env["GRPO_KERNELS_CPU_ISA"] = cpu_isa
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)


@dispatch_build
def test_the_record_names_each_copy_and_the_baseline_is_what_importing_needs():
    marches = [march for _, march in SETUP["X86_CPU_COPIES"]]
    assert RECORD["cpu_arch"] == "+".join(marches) == gk.extension_info()["cpu_arch"]
    assert [copy["march"] for copy in RECORD["cpu_copies"]] == marches
    baseline, *others = (set(copy["x86_features"]) for copy in RECORD["cpu_copies"])
    assert RECORD["x86_features"] == RECORD["cpu_copies"][0]["x86_features"]
    assert {"avx2", "fma"} <= baseline and not any(feature.startswith("avx512") for feature in baseline)
    for features in others:  # each copy needs more than the one before
        assert baseline < features
        baseline = features
    assert {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= set(RECORD["cpu_copies"][1]["x86_features"])


@dispatch_build
def test_the_most_capable_copy_this_cpu_supports_runs():
    """module.cpp checks the CPU with cpuid; the record's /proc/cpuinfo names must agree with it."""
    flags = gk.cpu_flags()
    if flags is None:
        pytest.skip("the CPU's flags cannot be read here")
    if os.environ.get("GRPO_KERNELS_CPU_ISA"):
        pytest.skip("GRPO_KERNELS_CPU_ISA picks the copy in this process")
    supported = [copy["copy"] for copy in RECORD["cpu_copies"] if set(copy["x86_features"]) <= flags]
    assert gk.extension_info()["cpu_isa"] == supported[-1]


@dispatch_build
def test_the_variable_refuses_a_name_without_a_copy():
    """(That it picks the baseline: tests/test_cpu_backend.py, whose runs on the AVX2 copy report it.)"""
    code = "import grpo_kernels as gk; print(gk.extension_info().get('cpu_isa'), 'cpu' in gk.available_backends())"
    unknown = _run(code, "sse2")
    assert unknown.returncode == 0, unknown.stderr
    assert unknown.stdout.split() == ["None", "False"]  # the package imports, without its extension
    assert "GRPO_KERNELS_CPU_ISA=sse2 names no copy" in unknown.stderr and ", ".join(reversed(COPIES)) in unknown.stderr
    assert "Rebuild" not in unknown.stderr


# Under valgrind the process sees a CPU without AVX-512 (its cpuid reports none, and it stops at the first
# AVX-512 instruction): import, dispatch and kernels as on an AVX2-only machine, with nothing forced.
VALGRIND_SCRIPT = r"""
import torch, grpo_kernels as gk
g = torch.Generator().manual_seed(0)
logits = (3 * torch.randn(3, 5, 1001, generator=g, dtype=torch.float64)).float()
ids = torch.randint(0, 1001, (3, 5), generator=g)
ids[1, 2] = -100
old = gk.token_logprobs(logits, ids, temperature=0.7, backend="reference") + 0.1 * torch.randn(3, 5, generator=g)
adv, mask = torch.randn(3, generator=g), torch.rand(3, 5, generator=g) > 0.2
results = []
for backend in ("cpu", "reference"):
    x = logits.clone().requires_grad_()
    logp = gk.token_logprobs(x, ids, temperature=0.7, backend=backend)
    out = gk.fused_grpo_loss(x, ids, old, adv, mask, temperature=0.7, beta=0.04, ref_logprobs=old + 0.1,
                             backend=backend)
    results.append([logp, out.loss, *torch.autograd.grad(out.loss + (logp * old).sum(), x)])
error = max(float(((a - b).abs() / (1 + b.abs())).max()) for a, b in zip(*results))
print(torch.backends.cpu.get_cpu_capability(), gk.extension_info()["cpu_isa"], error)
"""


@dispatch_build
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind not found")
def test_a_cpu_without_avx512_runs_the_baseline_copy_by_itself():
    """The run-time dispatch from cpuid (not GRPO_KERNELS_CPU_ISA) on a CPU without AVX-512, as valgrind
    presents one: the baseline copy, the reference's values, no AVX-512 instruction executed (about 30 s)."""
    env = {key: value for key, value in os.environ.items() if key != "GRPO_KERNELS_CPU_ISA"}
    run = subprocess.run(["valgrind", "--tool=none", "--error-exitcode=3", sys.executable, "-c", VALGRIND_SCRIPT],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    capability, isa, error = run.stdout.split()
    if capability.startswith("AVX512"):
        pytest.skip("this valgrind presents a CPU with AVX-512")
    assert isa == COPIES[0] == "avx2"
    assert float(error) < 1e-5


EVEX_PREFIXES = {"26", "2e", "36", "3e", "64", "65", "67", "f0"}  # may precede an EVEX (0x62) opcode byte


def _functions_with_avx512_instructions(library):
    """Functions (mangled names) of `library` holding an EVEX-encoded (AVX-512) instruction: name -> count."""
    listing = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    found, function = {}, None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 3:  # not an instruction (or the rest of a long one's bytes)
            continue
        code = fields[1].split()
        while code and code[0] in EVEX_PREFIXES:
            code = code[1:]
        if code and code[0] == "62":  # in 64-bit mode 0x62 opens an EVEX instruction
            found[function] = found.get(function, 0) + 1
    return found


@dispatch_build
@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("nm") is None, reason="binutils not found")
def test_avx512_instructions_only_in_the_avx512_copy():
    """A function other objects can call (global or weak: one definition kept for all) holds no AVX-512
    instruction unless it is in the AVX-512 copy's namespace; local functions (e.g. gcc's .constprop clones
    of a shared inline function) are called only from the object, and so the copy, that holds them."""
    library = Path(_extension._C.__file__)
    found = _functions_with_avx512_instructions(library)
    symbols = subprocess.run(["nm", "--defined-only", str(library)], capture_output=True, text=True, check=True).stdout
    shared = {fields[2] for fields in map(str.split, symbols.splitlines()) if len(fields) == 3 and fields[1].isupper()}
    in_copy = "12grpo_kernels3cpu6avx512"  # grpo_kernels::cpu::avx512 in a mangled name
    outside = {name: count for name, count in found.items() if name in shared and in_copy not in name}
    assert not outside, sorted(outside.items(), key=lambda item: -item[1])[:10]
    assert any(in_copy in name for name in found), "the AVX-512 copy holds no AVX-512 instruction"

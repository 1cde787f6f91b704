"""Packaging: the build never installs a torch, the sdist carries what a build needs, the supported
torch range is the tested one, and the extension is not imported on a CPU that lacks the x86
features its baseline copy of the CPU kernels was compiled for (grpo_kernels/_extension.py; the
features come from setup.py; the copies: tests/test_build_isa.py).

The sdist installed into a fresh venv with only torch is `make test-package` (too slow for here)."""

import os
import re
import runpy
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import _extension

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
BUILT = [Path("_C.cpython-311-x86_64-linux-gnu.so")]  # what _built_files finds in a built package
AVX512_BUILD = {"cpu_arch": "native", "x86_features": ["avx", "avx2", "avx512bw", "avx512f", "fma"], "torch": "2.13.0"}
AVX2_CPU = frozenset({"sse4_2", "avx", "avx2", "fma", "bmi2"})


class _Imported(Exception):
    """Raised by the stand-in for importing grpo_kernels._C."""


def _refuse_import():
    raise _Imported("grpo_kernels._C must not be imported here")


@pytest.fixture
def fake_build(monkeypatch):
    """_load() sees an extension built for AVX512_BUILD, whatever this checkout holds."""
    monkeypatch.setattr(_extension, "_built_files", lambda: BUILT)
    monkeypatch.setattr(_extension, "_build_info", lambda: dict(AVX512_BUILD))


def test_extension_is_not_imported_on_a_cpu_without_its_features(fake_build, monkeypatch):
    monkeypatch.setattr(_extension, "cpu_flags", lambda: AVX2_CPU)
    monkeypatch.setattr(_extension, "_import_extension", _refuse_import)
    with pytest.warns(RuntimeWarning) as record:
        assert _extension._load() is None
    assert len(record) == 1
    message = str(record[0].message)
    assert "avx512bw, avx512f" in message and "avx2," not in message  # the missing ones, nothing else
    assert "-march=native" in message
    assert _extension.NATIVE_REBUILD in message and _extension.PORTABLE_REBUILD in message


# A default x86-64 build: the x86-64-v3 baseline (all importing needs) and an x86-64-v4 copy
V3 = ["avx", "avx2", "bmi1", "bmi2", "f16c", "fma"]
DISPATCH_BUILD = {"cpu_arch": "x86-64-v3+x86-64-v4", "x86_features": V3, "torch": "2.13.0",
                  "cpu_copies": [{"copy": "avx2", "march": "x86-64-v3", "x86_features": V3},
                                 {"copy": "avx512", "march": "x86-64-v4", "x86_features": V3 + ["avx512f", "avx512vl"]}]}


@pytest.mark.parametrize("flags, imported", [(frozenset(V3), True), (frozenset(V3) | {"avx512f", "avx512vl"}, True),
                                             (frozenset({"avx", "sse4_2"}), False)], ids=["avx2", "avx512", "avx"])
def test_a_dispatching_build_needs_only_its_baseline(monkeypatch, flags, imported):
    monkeypatch.setattr(_extension, "_built_files", lambda: BUILT)
    monkeypatch.setattr(_extension, "_build_info", lambda: dict(DISPATCH_BUILD))
    monkeypatch.setattr(_extension, "cpu_flags", lambda: flags)
    monkeypatch.setattr(_extension, "_import_extension", _refuse_import)
    if imported:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(_Imported):
                _extension._load()
        return
    with pytest.warns(RuntimeWarning) as record:
        assert _extension._load() is None
    message = str(record[0].message)
    assert "-march=x86-64-v3 " in message and "lacks avx2, bmi1, bmi2, f16c, fma," in message


@pytest.mark.parametrize("flags", [AVX2_CPU | {"avx512f", "avx512bw", "avx512vl"}, None], ids=["has-all", "unreadable"])
def test_extension_is_imported_when_the_cpu_has_the_features_or_they_are_unknown(fake_build, monkeypatch, flags):
    monkeypatch.setattr(_extension, "cpu_flags", lambda: flags)
    monkeypatch.setattr(_extension, "_import_extension", _refuse_import)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(_Imported):
            _extension._load()


def test_a_build_without_the_record_is_imported(monkeypatch):
    monkeypatch.setattr(_extension, "_built_files", lambda: BUILT)
    monkeypatch.setattr(_extension, "_build_info", lambda: {})
    monkeypatch.setattr(_extension, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(_extension, "_import_extension", _refuse_import)
    with pytest.raises(_Imported):
        _extension._load()


def test_cpu_flags_reader(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse4_2 avx2 fma\n")
    assert _extension.cpu_flags(x86) == {"fpu", "sse4_2", "avx2", "fma"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert _extension.cpu_flags(arm) is None
    assert _extension.cpu_flags(tmp_path / "absent") is None


def test_auto_uses_the_reference_when_the_extension_is_withheld(fake_build, monkeypatch):
    from grpo_kernels import backends

    # the installation changes under a running process here: forget the choices made with the extension there
    monkeypatch.setattr(backends, "_AUTO_CHOSEN", {})
    monkeypatch.setattr(backends, "_CHECKED_MODULES", {})
    monkeypatch.setattr(_extension, "cpu_flags", lambda: AVX2_CPU)
    monkeypatch.setattr(_extension, "_import_extension", _refuse_import)
    with pytest.warns(RuntimeWarning, match="lacks"):
        monkeypatch.setattr(_extension, "_C", _extension._load())
    assert not gk.extension_available()
    assert "cpu" not in gk.available_backends()
    logits = torch.randn(2, 3, 11, dtype=torch.float64)
    ids = torch.randint(0, 11, (2, 3))
    torch.testing.assert_close(gk.token_logprobs(logits, ids, backend="auto"),
                               gk.token_logprobs(logits, ids, backend="reference"), rtol=0, atol=0)


def test_this_build_records_what_its_kernels_were_compiled_for():
    """The record that setup.py wrote against the ISA the compiled kernels report (their own macros)."""
    if not gk.extension_available():
        pytest.skip("the extension is not built")
    record = _extension._build_info()
    assert record, f"setup.py wrote no {_extension.BUILD_INFO.name} beside the extension"
    info = gk.extension_info()
    assert record["cpu_arch"] == info["cpu_arch"]
    assert record["torch"] == torch.__version__
    # the copy that runs: one named by its ISA (a default x86-64 build) or the only one (named by its -march)
    copies = {copy["copy"]: copy for copy in record["cpu_copies"]}
    isa = info["cpu_isa"]
    features = set((copies.get(isa) or copies["single"])["x86_features"])
    assert ("avx512f" in features) == isa.startswith("avx512")
    assert ("avx512_bf16" in features) == (isa == "avx512+bf16")
    assert ("avx2" in features) == (isa in ("avx512+bf16", "avx512", "avx2", "avx2-no-fma"))
    assert ("fma" in features) == (isa in ("avx512+bf16", "avx512", "avx2"))  # each AVX-512 target has FMA
    # built here and run here: every recorded feature is this CPU's (a wrong flag name would withhold the extension)
    assert _extension._missing_cpu_features(record, _extension.cpu_flags()) == []
    if len(copies) == 1 and not os.environ.get("GRPO_KERNELS_CPU_ISA"):  # a one-copy build runs its copy
        assert set(record["x86_features"]) == features


def _run_setup_extensions(argv, env_extra=None):
    """setup.py's _extensions() in a Python where torch cannot be imported (as in an isolated build)."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = {argv!r}; ns = runpy.run_path('setup.py', run_name='setup'); print(ns['_extensions']())")
    env = {"PATH": "/usr/bin:/bin", **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_build_without_torch_stops_and_names_the_ways_on():
    result = _run_setup_extensions(["setup.py", "bdist_wheel", "--dist-dir", "dist"])
    assert result.returncode != 0
    assert "--no-build-isolation" in result.stderr and "GRPO_KERNELS_NO_EXT=1" in result.stderr


@pytest.mark.parametrize("argv, env", [(["setup.py", "sdist"], {}), (["setup.py", "egg_info"], {}),
                                       (["setup.py", "bdist_wheel"], {"GRPO_KERNELS_NO_EXT": "1"})],
                         ids=["sdist", "metadata", "no-ext-wheel"])
def test_what_needs_no_extension_builds_without_torch(argv, env):
    result = _run_setup_extensions(argv, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "([], {})"


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_build_never_asks_for_torch():
    requires = _pyproject()["build-system"]["requires"]
    assert not [r for r in requires if re.match(r"torch\b", r)], requires


def test_the_lowest_supported_torch_is_the_one_ci_installs():
    """pyproject's torch>=X.Y is the minor version `make test` (and `make test-package`) installs."""
    (requirement,) = [d for d in _pyproject()["project"]["dependencies"] if re.match(r"torch\b", d)]
    lowest = re.fullmatch(r"torch>=(\d+\.\d+)", requirement)
    assert lowest, f"{requirement!r}: a lower bound only (a source build compiles against the torch installed)"
    tested = re.search(r"^TORCH_VERSION\s*\?=\s*(\d+\.\d+)\.\d+$", (ROOT / "Makefile").read_text(), re.M)
    assert tested and tested.group(1) == lowest.group(1)


def test_sdist_carries_the_sources_and_no_build_output(tmp_path):
    """The sdist's file list against the checkout's tracked sources."""
    pytest.importorskip("build")
    tracked = subprocess.run(["git", "ls-files", "csrc", "grpo_kernels", "docs"], cwd=ROOT, capture_output=True,
                             text=True)
    if tracked.returncode != 0 or not tracked.stdout.split():
        pytest.skip("not a git checkout")
    built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path),
                            str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (sdist,) = tmp_path.glob("grpo_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = set(tracked.stdout.split()) | {"README.md", "pyproject.toml", "setup.py", "MANIFEST.in"}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    outputs = [n for n in names if n.endswith((".so", ".o", ".pyc", "_C_build.json"))]
    assert not outputs, outputs


def test_the_cpu_copies_a_build_compiles(monkeypatch):
    """Default: on x86-64 one copy per X86_CPU_COPIES row, elsewhere one for the compiler's default target;
    GRPO_KERNELS_CPU_ARCH: one copy for that -march."""
    import platform

    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup")
    monkeypatch.delenv("GRPO_KERNELS_CPU_ARCH", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert setup["_cpu_copies"]() == setup["X86_CPU_COPIES"] == (("avx2", "x86-64-v3"), ("avx512", "x86-64-v4"))
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert setup["_cpu_copies"]() == ((setup["SINGLE_COPY"], ""),)
    monkeypatch.setenv("GRPO_KERNELS_CPU_ARCH", " native ")
    assert setup["_cpu_copies"]() == ((setup["SINGLE_COPY"], "native"),)
    assert setup["_march_flags"]("native") == ["-march=native"] and setup["_march_flags"]("") == []

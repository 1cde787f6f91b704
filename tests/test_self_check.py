"""On-device validation (grpo_kernels.self_check), "auto" on a validating device, the check command.

No GPU here: the CPU stands in for a CUDA device ("auto" on CPU tensors is made to validate the Triton
backend, which runs under the interpreter at the small sizes), through the same code path.
"""

import json
import multiprocessing
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import grpo_kernels as gk
import grpo_kernels.triton as triton_backend
from grpo_kernels import backends, check, self_check
from grpo_kernels.backends import Trust

CPU = torch.device("cpu")
OP = "token_logprobs"  # the op the stand-in tests use (its check takes about a second under the interpreter)

needs_triton = pytest.mark.skipif("triton" not in gk.available_backends() or os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="needs triton under the interpreter")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty verdict cache and no verdicts in memory."""
    monkeypatch.setenv(self_check.CACHE_DIR_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    self_check.forget()
    yield tmp_path / "cache"
    self_check.forget()


@pytest.fixture
def standin(cache, monkeypatch):
    """CPU tensors get the CUDA policy: "auto" uses triton only once validated, else the reference."""
    monkeypatch.setitem(backends._AUTO_PREFERENCE, "cpu",
                        (("triton", Trust.VALIDATE_ON_DEVICE), ("reference", Trust.TESTED)))
    calls = []
    validate = self_check.validate

    def counting(backend, op, device, *args, **kwargs):
        calls.append((backend, op))
        return validate(backend, op, device, *args, **kwargs)

    monkeypatch.setattr(self_check, "validate", counting)
    return calls


def _inputs():
    logits = torch.randn(5, 37, dtype=torch.float64)
    ids = torch.randint(0, 37, (5,))
    return logits, ids


def _broken(mode):
    """token_logprobs of the triton backend, broken: wrong numbers, a wrong gradient, or an exception."""
    good = triton_backend.token_logprobs

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g

    def broken(logits, token_ids, **kwargs):
        if mode == "raise":
            raise RuntimeError("boom: illegal memory access")
        out = good(logits, token_ids, **kwargs)
        logp, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
        logp = logp + 1e-3 if mode == "values" else WrongGrad.apply(logp)
        return (logp, *rest) if rest else logp

    return broken


# --------------------------------------------------------------------------- #
# validation itself
# --------------------------------------------------------------------------- #
def test_cases_cover_dtypes_edges_levels_and_the_large_vocabulary():
    size = self_check.sizes("cpu", CPU, large=True)
    assert size.large_vocab == 151936 and size.large_rows > 2 * torch.get_num_threads()
    size = self_check.Sizes(**{**size.__dict__, "large_vocab": 301})  # the same cases, faster to build
    names = {op: [(c.name, c.dtype) for c in self_check.cases(op, CPU, size)] for op in backends.OPS}
    for op, cs in names.items():
        assert {d for _, d in cs} == {torch.bfloat16, torch.float32}, op
        assert any(n.startswith("edge rows") for n, _ in cs) and any("V=301" in n for n, _ in cs), op
    for op in ("grpo_loss", "fused_grpo_loss", "fused_linear_grpo_loss"):
        assert any("token level" in n for n, _ in names[op]) and any("sequence level" in n for n, _ in names[op])
    for op in ("token_logprobs", "fused_grpo_loss"):
        assert any("not in place" in n for n, _ in names[op]) and any(", in place" in n for n, _ in names[op])
    edge = next(self_check.cases("fused_grpo_loss", CPU, size))
    logits, ids, _old, _adv, mask = edge.args
    assert torch.isinf(logits).any() and (ids == -100).any() and not mask[-1].any()
    assert logits.shape[-1] % 16 != 0  # no multiple of any block


def test_compare_per_entry_and_non_finite_entries_exactly():
    e = torch.tensor([float("-inf"), 1.0, 2.0], dtype=torch.float64)
    assert self_check.compare(e.clone(), e, 1e-5, 1e-5, 1.0) == (0.0, 0.0)
    err, ratio = self_check.compare(e + torch.tensor([0.0, 0.0, 1e-3], dtype=torch.float64), e, 1e-5, 1e-5, 1.0)
    assert err == pytest.approx(1e-3) and ratio == pytest.approx(1e-3 / (1e-5 * 2 + 1e-5 * 2))
    tiny = torch.tensor([1e-9, 1.0], dtype=torch.float64)  # gradients: atol scaled by the largest entry
    off = tiny * torch.tensor([1.5, 1.0], dtype=torch.float64)
    assert self_check.compare(off, tiny, 1e-6, 0.0, 0.0)[1] == pytest.approx(5e-4)
    for bad in (torch.tensor([0.0, 1.0, 2.0]), torch.tensor([float("nan"), 1.0, 2.0]), torch.ones(2)):
        assert self_check.compare(bad, e, 1e-5, 1e-5, 1.0)[1] == float("inf")


@needs_triton
def test_validation_passes_the_interpreted_kernels_and_keeps_the_random_state():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    verdict = self_check.validate("triton", OP, CPU)
    assert verdict.passed, verdict.summary()
    assert torch.equal(torch.get_rng_state(), state)
    assert {c.dtype for c in verdict.cases} == {"bfloat16", "float32"}
    assert all(c.ratio <= 1 for c in verdict.cases)


@needs_triton
@pytest.mark.parametrize("mode", ["values", "gradient", "raise"])
def test_validation_catches_a_broken_kernel(monkeypatch, mode):
    monkeypatch.setattr(triton_backend, "token_logprobs", _broken(mode))
    verdict = self_check.validate("triton", OP, CPU, dtypes=(torch.float32,))
    assert not verdict.passed
    if mode == "raise":
        assert "RuntimeError: boom" in verdict.summary()
    else:
        assert ("output 0" if mode == "values" else "grad 0") in verdict.summary()


def test_cpu_backend_passes_with_the_large_vocabulary():
    """The cpu backend (tested by CI) as a sanity check of the cases and tolerances: V = 151936 included."""
    if "cpu" not in gk.available_backends():
        pytest.skip("extension not built")
    verdict = self_check.validate("cpu", OP, CPU, size=self_check.sizes("cpu", CPU, large=True),
                                  dtypes=(torch.bfloat16,))
    assert verdict.passed, verdict.summary()
    assert any("V=151936" in c.case for c in verdict.cases)


# --------------------------------------------------------------------------- #
# "auto" on a validating device
# --------------------------------------------------------------------------- #
@needs_triton
def test_auto_validates_once_then_uses_the_kernel(standin):
    logits, ids = _inputs()
    out = gk.token_logprobs(logits, ids, temperature=0.7)
    torch.testing.assert_close(out, gk.token_logprobs(logits, ids, temperature=0.7, backend="reference"))
    assert standin == [("triton", OP)]
    assert backends.resolve_backend("auto", CPU, OP) == "triton"
    gk.token_logprobs(logits, ids)
    assert standin == [("triton", OP)]  # remembered in the process
    files = list(self_check.cache_dir().glob(f"triton-{OP}-cpu-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["passed"] is True
    self_check.forget()  # a later process: the file answers
    assert backends.resolve_backend("auto", CPU, OP) == "triton" and standin == [("triton", OP)]
    # without an op, "auto" picks only backends that need no check
    assert backends.resolve_backend("auto", CPU) == "reference"


@needs_triton
@pytest.mark.parametrize("mode", ["values", "raise"])
def test_a_broken_kernel_warns_once_falls_back_and_the_verdict_is_cached(standin, monkeypatch, mode):
    monkeypatch.setattr(triton_backend, "token_logprobs", _broken(mode))
    logits, ids = _inputs()
    expected = gk.token_logprobs(logits, ids, backend="reference")
    with pytest.warns(self_check.ValidationWarning) as record:
        out = gk.token_logprobs(logits, ids)
    torch.testing.assert_close(out, expected)  # the fallback: the reference
    assert len(record) == 1
    message = str(record[0].message)
    for part in ("'triton'", OP, "bfloat16", "python -m grpo_kernels.check --json", self_check.REPORT_TO):
        assert part in message
    assert ("boom" in message) if mode == "raise" else ("times the error allowed" in message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per process
        torch.testing.assert_close(gk.token_logprobs(logits, ids), expected)
    (path,) = self_check.cache_dir().glob(f"triton-{OP}-*.json")
    assert json.loads(path.read_text())["passed"] is False
    # a later process: the cached negative verdict, no new check, one warning naming the file
    self_check.forget()
    with pytest.warns(self_check.ValidationWarning, match="cached"):
        torch.testing.assert_close(gk.token_logprobs(logits, ids), expected)
    assert len(standin) == 1
    # an explicit kernel backend is never replaced, nor GRPO_KERNELS_BACKEND
    assert not torch.allclose(gk.token_logprobs(logits, ids, backend="triton"), expected) if mode == "values" else True
    monkeypatch.setenv("GRPO_KERNELS_BACKEND", "triton")
    assert backends.resolve_backend("auto", CPU, OP) == "triton"


@needs_triton
def test_a_check_that_runs_out_of_memory_is_not_cached(standin, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(triton_backend, "token_logprobs", oom)
    with pytest.warns(self_check.ValidationWarning, match="not cached"):
        assert backends.resolve_backend("auto", CPU, OP) == "reference"
    assert not list(self_check.cache_dir().glob("*.json"))
    assert backends.resolve_backend("auto", CPU, OP) == "reference" and len(standin) == 1  # for this process


@needs_triton
def test_a_version_change_validates_again(standin, monkeypatch):
    assert backends.resolve_backend("auto", CPU, OP) == "triton"
    env = self_check.environment(CPU)
    for key in ("device_name", "compute_capability", "torch", "cuda", "triton", "grpo_kernels", "extension"):
        assert key in env
    self_check.forget()
    monkeypatch.setattr(self_check, "__version__", "99.0")
    assert backends.resolve_backend("auto", CPU, OP) == "triton"
    assert len(standin) == 2
    self_check.forget()
    monkeypatch.setenv("GRPO_KERNELS_CPU_ARCH", "x86-64-v3")  # kernel settings (e.g. the Triton tuning) count too
    assert backends.resolve_backend("auto", CPU, OP) == "triton"
    assert len(standin) == 3
    assert len(list(self_check.cache_dir().glob("*.json"))) == 3


@needs_triton
def test_a_corrupt_cache_file_is_ignored_and_rewritten(standin):
    env = self_check.environment(CPU)
    path = self_check.cache_path("triton", OP, env)
    path.parent.mkdir(parents=True)
    path.write_text('{"backend": "triton", "passed": tr')
    assert self_check.read_verdict("triton", OP, env) is None
    assert backends.resolve_backend("auto", CPU, OP) == "triton"
    assert len(standin) == 1
    assert self_check.read_verdict("triton", OP, env).passed


def test_cache_location_and_off(monkeypatch, tmp_path):
    monkeypatch.delenv(self_check.CACHE_DIR_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert self_check.cache_dir() == tmp_path / "grpo_kernels"
    monkeypatch.setenv(self_check.CACHE_DIR_VARIABLE, "off")
    assert self_check.cache_dir() is None
    verdict = self_check.Verdict("triton", OP, "cpu", True, self_check.environment(CPU))
    assert self_check.write_verdict(verdict) is None
    assert self_check.read_verdict("triton", OP, verdict.environment) is None


def _write_many(folder, n):
    os.environ[self_check.CACHE_DIR_VARIABLE] = folder
    env = self_check.environment(CPU)
    for i in range(n):
        cases = [self_check.CaseResult(f"case {j}", "float32", 0.0, 1e-4, "", True) for j in range(50 + i % 7)]
        self_check.write_verdict(self_check.Verdict("triton", OP, "cpu", True, env, cases, seconds=float(i)))


def test_concurrent_writers_never_leave_a_broken_file(cache):
    """Four processes rewrite the same verdict file while this one reads it: every read parses."""
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(cache), 150)) for _ in range(4)]
    for p in procs:
        p.start()
    env = self_check.environment(CPU)
    reads = 0
    while any(p.is_alive() for p in procs):
        path = self_check.cache_path("triton", OP, env)
        if path.exists():
            assert self_check.read_verdict("triton", OP, env) is not None
            reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert self_check.read_verdict("triton", OP, env).passed
    assert [p.name for p in cache.iterdir()] == [self_check.cache_path("triton", OP, env).name]  # no temp files
    assert reads > 0


@needs_triton
def test_first_use_inside_a_cuda_graph_capture_uses_the_reference_for_that_call(standin, monkeypatch):
    monkeypatch.setattr(self_check, "_capturing", lambda device: True)
    with pytest.warns(self_check.ValidationWarning, match="capture"):
        assert backends.resolve_backend("auto", CPU, OP) == "reference"
    assert standin == [] and not list(self_check.cache_dir().glob("*.json"))
    monkeypatch.setattr(self_check, "_capturing", lambda device: False)
    assert self_check.prepare(CPU, ops=(OP,)) == {OP: "triton"}  # what to call before capturing
    monkeypatch.setattr(self_check, "_capturing", lambda device: True)
    assert backends.resolve_backend("auto", CPU, OP) == "triton"  # known verdicts need no run


@needs_triton
def test_first_use_inside_torch_compile_or_inference_mode_validates_eagerly(standin):
    torch._dynamo.reset()
    logits, ids = _inputs()
    expected = gk.token_logprobs(logits, ids, backend="reference")
    with torch.inference_mode():
        compiled = torch.compile(lambda x, y: gk.token_logprobs(x, y), backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(logits, ids), expected)
    assert standin == [("triton", OP)]
    assert self_check.read_verdict("triton", OP, self_check.environment(CPU)).passed
    torch._dynamo.reset()


# --------------------------------------------------------------------------- #
# the bounded-memory fallback of the fused-linear ops
# --------------------------------------------------------------------------- #
class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors allocated inside the block and alive at once (storages, counted once)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes = {}

    def _free(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key in self.sizes or storage.nbytes() == 0:
                    continue
                self.sizes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key)
        return out


def test_the_fused_linear_fallback_on_a_gpu_is_chunked(monkeypatch):
    """"auto"'s reference fallback on CUDA: the chunked driver over the reference's row ops (measured here with
    the CPU standing in): peak O(chunk_size × V), not the unchunked [N × V] logits; the same numbers."""
    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    monkeypatch.setitem(backends._AUTO_PREFERENCE, "cpu", (("reference", Trust.TESTED),))
    monkeypatch.setattr(backends, "_BOUNDED_FALLBACK", ("cpu",))
    B, T, V, H, chunk = 2, 128, 8192, 16, 8
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = (0.2 * torch.randn(V, H)).requires_grad_()
    ids = torch.randint(0, V, (B, T))
    old, adv, mask = -4 * torch.rand(B, T), torch.randn(B), torch.rand(B, T) > 0.2
    logits_bytes = B * T * V * 4
    peaks, grads = {}, {}
    for backend in ("auto", "reference"):
        hidden.grad = weight.grad = None
        with PeakMemory() as memory:
            out = gk.fused_linear_grpo_loss(hidden, weight, ids, old, adv, mask, chunk_size=chunk, backend=backend)
            out.loss.backward()
        peaks[backend] = memory.peak
        grads[backend] = (out.loss.detach(), hidden.grad, weight.grad)
        with PeakMemory() as memory:
            gk.linear_token_logprobs(hidden, weight, ids.view(-1, 1).view(B, T), chunk_size=chunk,
                                     backend=backend).sum().backward()
        peaks[backend + " logprobs"] = memory.peak
    for a, b in zip(grads["auto"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert peaks["reference"] >= logits_bytes and peaks["reference logprobs"] >= logits_bytes
    tile = chunk * V * 4
    bound = 8 * tile + 2 * (V * H + B * T * H) * 4  # the reference's temporaries on a tile, the accumulators
    assert peaks["auto"] <= bound and peaks["auto logprobs"] <= bound and bound < logits_bytes / 2


def test_auto_on_cuda_without_kernels_is_the_bounded_fallback(monkeypatch):
    """Which function "auto" gives for a CUDA device when no kernel backend passes (no device needed)."""
    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(self_check, "backend_usable", lambda backend, op, device: False)
    cuda = torch.device("cuda")
    for op in ("linear_token_logprobs", "fused_linear_grpo_loss"):
        fn = backends.backend_function("auto", cuda, op)
        assert fn.func.__module__ == "grpo_kernels.linear" and fn.keywords["backend"] == "reference"
        assert backends.backend_function("reference", cuda, op).__module__ == "grpo_kernels.reference"
    assert backends.resolve_backend("auto", cuda, "token_logprobs") == "reference"
    monkeypatch.setattr(self_check, "backend_usable", lambda backend, op, device: backend == "cuda")
    if "cuda" in gk.available_backends():
        assert backends.resolve_backend("auto", cuda, "token_logprobs") == "cuda"


# --------------------------------------------------------------------------- #
# the check command
# --------------------------------------------------------------------------- #
def test_check_command_table_json_and_exit_status(cache, tmp_path, capsys, monkeypatch):
    path = tmp_path / "report.json"
    assert check.main(["--ops", "group_advantages", "--devices", "cpu", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "all checks passed" in text and "group_advantages" in text and "torch" in text
    report = json.loads(path.read_text())
    assert report["passed"] is True and report["environment"]["torch"] == torch.__version__
    checked = {(v["backend"], v["op"]) for v in report["validation"]}
    assert checked == {(b, "group_advantages") for b in check.kernel_backends(CPU)}
    assert {r["backend"] for r in report["timing"]} >= {"reference"}
    assert all(r["ms"] > 0 for r in report["timing"] if r["backend"] in ("reference", "cpu"))
    assert report["auto"]["cpu"] == {"group_advantages": backends.resolve_backend("auto", CPU, "group_advantages")}
    assert "backend='auto' on cpu: group_advantages -> " in text
    # the verdicts went to the cache that "auto" reads
    assert len(list(cache.glob("*group_advantages*.json"))) == len(checked)

    if "cpu" in gk.available_backends():
        import grpo_kernels.native as native

        good = native.group_advantages
        monkeypatch.setattr(native, "group_advantages",
                            lambda rewards, **kw: tuple(t * 1.01 for t in good(rewards, **kw)))
        assert check.main(["--ops", "group_advantages", "--devices", "cpu", "--no-timing", "--json", str(path)]) == 1
        text = capsys.readouterr().out
        assert "FAIL" in text and "SOME CHECKS FAILED" in text and self_check.REPORT_TO in text
        assert json.loads(path.read_text())["passed"] is False


def test_check_module_runs_as_a_command(cache, tmp_path):
    env = dict(os.environ, **{self_check.CACHE_DIR_VARIABLE: str(cache)})
    command = [sys.executable, "-m", "grpo_kernels.check", "--ops", "group_advantages", "--devices", "cpu",
               "--no-timing", "--json", str(tmp_path / "r.json")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout and json.loads((tmp_path / "r.json").read_text())["passed"]


@pytest.mark.skipif("triton" not in gk.available_backends(), reason="needs triton")
def test_check_command_says_what_auto_picks_on_a_gpu_from_the_verdicts():
    cuda = torch.device("cuda", 0)

    def verdict(op, passed):
        return self_check.Verdict("triton", op, str(cuda), passed, {})

    verdicts = [verdict("token_logprobs", True), verdict("fused_grpo_loss", False)]
    assert check.auto_choice(cuda, "token_logprobs", verdicts) == "triton"
    assert check.auto_choice(cuda, "fused_grpo_loss", verdicts) == "reference"  # no cuda verdict either
    assert check.auto_choice(cuda, "grpo_loss", verdicts) == "reference"  # not checked
    assert check.auto_choice(CPU, "grpo_loss", []) == backends.resolve_backend("auto", CPU, "grpo_loss")


def test_check_command_budget_leaves_a_partial_report(cache, tmp_path, capsys):
    path = tmp_path / "report.json"
    argv = ["--ops", "group_advantages,grpo_loss", "--devices", "cpu", "--budget", "0", "--json", str(path)]
    assert check.main(argv) == 1
    assert "INCOMPLETE" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["complete"] is False and report["passed"] is False and not report["validation"]
    assert len(report["skipped"]) == 2 * (len(check.kernel_backends(CPU)) + 1)


def test_check_command_refuses_an_unknown_op(capsys):
    with pytest.raises(SystemExit) as exit_:
        check.main(["--ops", "nope"])
    assert exit_.value.code == 2 and "unknown op" in capsys.readouterr().err

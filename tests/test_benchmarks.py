"""The benchmark tooling works: a tiny runner run, the README renderer, the byte model, the result files'
fused-linear columns, the cost-growth sweep and its plot, Liger's chunked loss as a peer (the GPU script:
tests/test_gpu_run.py).

The benchmarks themselves (``pytest benchmarks/``) are not part of this suite.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import costs, measure, plots, render_readme, results, run
from benchmarks.cases import Case, make_inputs
from benchmarks.implementations import (LIGER_DIFFERENT_LOSSES, Unsupported, implementations, liger_chunk_size,
                                        liger_chunked)
from benchmarks.measure import Record, TimingPolicy, measure_case
from benchmarks.presets import DEFAULT_IMPLS, GROWTH_TOKENS, GROWTH_VOCABULARIES, PRESETS, growth
from benchmarks.workload import step

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict:
    """This environment without the Triton interpreter switch that conftest sets."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_runner_smoke_run_writes_results(tmp_path):
    command = [sys.executable, "-m", "benchmarks.run", "--preset", "cpu-small", "--cases", "group_advantages",
               "--impls", "liger", "ours-reference", "--quick", "--out", str(tmp_path)]
    subprocess.run(command, cwd=ROOT, env=_env(), check=True, timeout=120, capture_output=True)
    (result,) = tmp_path.glob("*.json")
    run = json.loads(result.read_text())
    skipped, record = run["records"]  # in the order of --impls (Liger takes no group_advantages)
    assert (skipped["impl"], skipped["status"], record["impl"]) == ("liger", "skipped", "ours-reference")
    assert record["status"] == "ok" and record["median_ms"] > 0 and record["max_err"] < 1e-5
    assert run["limits"]["copy_gbps"] > 0 and run["environment"]["torch"]
    assert len((tmp_path / "all.csv").read_text().splitlines()) == 3
    markdown = result.with_suffix(".md").read_text()
    assert "ours-reference" in markdown
    if run["environment"].get("extension_cpu_isa"):  # the README's CPU line names the kernels' vector path
        assert f"vector path {run['environment']['extension_cpu_isa']}" in markdown
    section = render_readme.section(render_readme.newest_per_device([result]))
    assert "group_advantages" in section and run["stem"] in section


@pytest.mark.parametrize("recorded, noted", [
    ({"extension_gradient_buffer_pages": "4 KiB (free page reporting: the host takes freed memory back)"}, True),
    ({"extension_gradient_buffer_pages": "2 MiB from 8 MiB up (transparent huge pages where enabled)"}, False),
    ({"free_page_reporting": True}, True),  # runs recorded before the extension said it
    ({}, False),
])
def test_the_environment_line_says_when_fresh_memory_comes_from_the_host(recorded, noted):
    run = {"preset": "cpu-small", "limits": {"copy_gbps": 40.0},
           "environment": dict(device="cpu", device_name="cpu", cpu_threads=2, load_average_1m=0.1,
                               date="2026-12-07T00:00:00Z", git_sha="abc", torch="2.13.0", **recorded)}
    assert ("hands free memory back to its host" in results.environment_line(run)) == noted


def test_render_replaces_only_between_markers():
    text = f"intro\n{render_readme.BEGIN}\nold numbers\n{render_readme.END}\noutro\n"
    rendered = render_readme.render(text, "new table")
    assert rendered == f"intro\n{render_readme.BEGIN}\nnew table\n{render_readme.END}\noutro\n"
    with pytest.raises(ValueError):
        render_readme.render("no markers", "x")


def test_readme_has_the_performance_markers():
    readme = (ROOT / "README.md").read_text()
    assert render_readme.BEGIN in readme and render_readme.END in readme


def test_fused_loss_moves_one_read_and_one_write_of_the_logits():
    case = Case(op="fused_grpo_loss", B=8, T=256, V=32000, dtype="bfloat16")
    logits = case.N * case.V * 2
    assert 2 * logits < costs.min_bytes(case) < 2 * logits * 1.001
    assert logits < costs.min_bytes(case.replace(backward=False)) < logits * 1.001


def _write_run(path: Path, device: str, preset: str, date: str, forced_isa: str = None, **environment) -> Path:
    environment.update(device=device, date=date, extension_cpu_isa_forced=forced_isa)
    path.write_text(json.dumps({"stem": path.stem, "preset": preset, "environment": environment, "records": []}))
    return path


def test_readme_keeps_the_newest_run_of_each_device_and_preset(tmp_path, monkeypatch):
    main_run = _write_run(tmp_path / "a.json", "cpu", "cpu-small", "2026-12-01T10:00:00Z")
    older = _write_run(tmp_path / "b.json", "cpu", "cpu-small", "2026-11-01T10:00:00Z")
    partial = _write_run(tmp_path / "c.json", "cpu", "cpu-growth", "2026-12-02T10:00:00Z")
    gpu = _write_run(tmp_path / "d.json", "cuda", "gpu-headline", "2026-11-02T10:00:00Z")
    baseline = _write_run(tmp_path / "e.json", "cpu", "cpu-small", "2026-12-03T10:00:00Z", forced_isa="avx2")
    runs = render_readme.newest_per_device([older, partial, baseline, main_run, gpu])
    assert [(r["environment"]["device"], r["preset"], r["stem"]) for r in runs] == [
        ("cpu", "cpu-small", "a"), ("cpu", "cpu-small", "e"), ("cpu", "cpu-growth", "c"),
        ("cuda", "gpu-headline", "d")]
    monkeypatch.setattr(render_readme, "environment_line", lambda run: f"{run['preset']} environment")
    section = render_readme.section(runs)  # the newer run on the forced AVX2 copy is linked, not the main table
    assert "`cpu-small` on the avx2 copy of the cpu kernels [e.md]" in section
    capped = _write_run(tmp_path / "f.json", "cpu", "cpu-small", "2026-12-04T10:00:00Z", forced_isa="avx2",
                        torch_cpu_capability="AVX2", isa_limits={"ATEN_CPU_CAPABILITY": "avx2"})
    runs = render_readme.newest_per_device([baseline, main_run, capped])  # benchmarks/avx2.sh's run supersedes e
    assert [r["stem"] for r in runs] == ["a", "f"]
    assert ("`cpu-small` on the avx2 copy of the cpu kernels, torch at AVX2 and MKL, oneDNN capped likewise (as on "
            "a CPU without AVX-512) [f.md]") in render_readme.section(runs)


def test_csv_of_an_older_record_layout_gets_the_new_columns(tmp_path):
    path = tmp_path / "all.csv"
    old = list(results.CSV_ENVIRONMENT) + [f for f in Record.fields() if f != "pct_matmul_floor"]
    path.write_text(",".join(old) + "\n" + ",".join("x" for _ in old) + "\n")
    record = Record(case="c", op="lm_head_grpo_loss", mode="fwd+bwd", B=1, T=2, N=2, V=3, H=4, dtype="float32",
                    entropy=False, loss_type="dapo", beta=0.0, impl="i", label="l", status="ok", pct_matmul_floor=97.5)
    results.append_csv(path, {"date": "d"}, [record])
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(results.CSV_ENVIRONMENT) + Record.fields()
    assert (rows[0]["pct_matmul_floor"], rows[0]["case"], rows[1]["pct_matmul_floor"]) == ("", "x", "97.5")
    path.write_text("unknown,columns\n")
    with pytest.raises(ValueError, match="another header"):
        results.append_csv(path, {}, [record])


def test_fused_linear_targets_in_the_cpu_presets():
    shapes = {(c.N, c.V, c.H, c.dtype) for c in PRESETS["cpu-linear"]()}
    assert shapes == {(2048, 32000, h, d) for h in (512, 1024) for d in ("float32", "bfloat16")}
    small = [(c.N, c.V, c.H, c.dtype) for c in PRESETS["cpu-small"]() if c.op == "lm_head_grpo_loss"]
    assert small == [(2048, 32000, 512, "float32"), (2048, 32000, 1024, "float32")]


def test_growth_preset_sweeps_tokens_and_vocabulary_on_the_cpu_backend(capsys):
    plan = run.main(["--preset", "cpu-growth", "--dry-run", "--device", "cpu"])
    cases = PRESETS["cpu-growth"]()
    assert plan["cases"] == [c.name for c in cases] and plan["impls"] == list(DEFAULT_IMPLS["cpu-growth"])
    for op in ("fused_grpo_loss", "lm_head_grpo_loss"):
        shapes = {(c.N, c.V) for c in cases if c.op == op}
        assert {n for n, _ in shapes} == set(GROWTH_TOKENS) and {v for _, v in shapes} == set(GROWTH_VOCABULARIES)
        assert min(GROWTH_TOKENS) == 512 and max(GROWTH_TOKENS) == 8192
        assert min(GROWTH_VOCABULARIES) == 8192 and max(GROWTH_VOCABULARIES) == 262144
    assert "GFLOP" in capsys.readouterr().out


def test_tiny_growth_run_reports_the_matmul_floor_and_plots_against_n_times_v(tmp_path):
    cpu = torch.device("cpu")
    cases = growth(tokens=(8, 16, 32), vocabularies=(32, 64, 128), hidden=16, sequence=8)
    assert len(cases) == 10  # 5 shapes (the middle one shared) × 2 ops
    impls = [i for i in implementations(cpu) if i.key in ("ours-reference", "ours-cpu", "ours-cpu-inplace")]
    records = [r for case in cases for r in measure_case(case, impls, cpu, TimingPolicy(1, 1, 0.0))]
    assert not [r for r in records if r.status == "error"]  # in place: on fused_grpo_loss, skips the LM head
    measured = [r for r in records if r.status == "ok"]
    assert {r.impl for r in measured} >= {"ours-reference"} and all(r.max_err < 1e-4 for r in measured)
    linear = [r for r in measured if r.op == "lm_head_grpo_loss"]
    assert linear and all(r.matmul_gflops > 0 and r.pct_matmul_floor > 0 for r in linear)
    assert all(r.matmul_dtype == "float32" for r in linear)
    assert all(r.matmul_floor_ms == pytest.approx(6 * r.N * r.V * r.H / r.matmul_gflops / 1e6) for r in linear)
    assert all(r.pct_matmul_floor is None for r in measured if r.op != "lm_head_grpo_loss")
    written = plots.write_plots(records, tmp_path, "tiny")
    assert tmp_path / "tiny-growth.png" in written and (tmp_path / "tiny-growth.png").stat().st_size > 0
    table = results.matmul_floor_table(records)
    assert table.count("lm_head_grpo_loss") == 5 and "%" in table


LIGER_AGREES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")


@pytest.mark.parametrize("loss_type", LIGER_AGREES)
def test_liger_chunked_peer_computes_our_loss(loss_type):
    """The peer's loss and gradients equal ours on the benchmarked LM-head case (tiny shapes, Liger's loss math
    eager: compiling it changes no value)."""
    pytest.importorskip("liger_kernel.chunked_loss")
    cpu = torch.device("cpu")
    case = Case(op="lm_head_grpo_loss", B=3, T=8, V=64, H=16, loss_type=loss_type,
                **({"epsilon_high": 5.0} if loss_type == "cispo" else {}))
    inputs = make_inputs(case, cpu)
    ours = next(i for i in implementations(cpu) if i.key == "ours-reference")
    peer = liger_chunked(compiled=False)
    expected = step(case, inputs, ours.build(case, inputs))()
    got = step(case, inputs, peer.build(case, inputs))()
    assert len(got) == len(expected) == 3  # loss, d hidden, d weight
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert peer.detail(case) == f"chunk_size={liger_chunk_size(case)} sequences ({liger_chunk_size(case) * 8} tokens)"


def test_liger_chunked_peer_refuses_where_its_semantics_differ():
    cpu = torch.device("cpu")
    peer = liger_chunked(compiled=False)
    case = Case(op="lm_head_grpo_loss", B=2, T=4, V=16, H=8)
    for other in (case.replace(loss_type="luspo"), case.replace(entropy=True), Case(op="fused_grpo_loss", B=2, T=4,
                                                                                      V=16)):
        with pytest.raises(Unsupported):
            peer.build(other, make_inputs(other, cpu))
    assert set(LIGER_DIFFERENT_LOSSES) == {"luspo"}


def test_cases_past_the_reference_limit_run_without_the_float64_check(monkeypatch):
    cpu = torch.device("cpu")
    case = Case(op="fused_grpo_loss", B=2, T=4, V=16)
    ours = [i for i in implementations(cpu) if i.key == "ours-reference"]
    (checked,) = measure_case(case, ours, cpu, TimingPolicy(1, 1, 0.0))
    monkeypatch.setattr(measure, "REFERENCE_MAX_ELEMENTS", case.N * case.V - 1)
    (unchecked,) = measure_case(case, ours, cpu, TimingPolicy(1, 1, 0.0))
    assert checked.max_err is not None and unchecked.status == "ok" and unchecked.max_err is None


def test_time_interleaved_alternates_and_isolates_failures():
    """Implementations are timed in alternating bursts (a slow spell falls on each), each to its own repeats; one
    that raises leaves the rounds with its exception and the others still finish."""
    from benchmarks.timing import Timing, time_interleaved

    calls: list[str] = []

    def fn(name):
        return lambda: calls.append(name)

    def boom():
        calls.append("boom")
        if calls.count("boom") == 3:
            raise RuntimeError("peer failed")

    results = time_interleaved([fn("a"), boom, fn("b")], torch.device("cpu"), min_repeats=5, max_repeats=5,
                               min_total_s=0.0, burst_s=0.0)
    assert isinstance(results[1], RuntimeError)
    assert all(isinstance(r, Timing) and r.repeats == 5 for r in (results[0], results[2]))
    # a burst: one untimed call, then (burst_s = 0) one timed call
    assert calls[:8] == ["a", "a", "boom", "boom", "b", "b", "a", "a"] and calls.count("a") == calls.count("b") == 10


def test_avx2_script_caps_torch_mkl_onednn_and_the_results_record_it():
    """benchmarks/avx2.sh runs the runner with every vector cap set and inductor's cache of its own; describe()
    records the caps and the capability torch runs at."""
    code = ("import os, torch; from benchmarks import environment as e; d = e.describe(torch.device('cpu')); "
            "print(d['isa_limits'], d['torch_cpu_capability'], d['extension_cpu_isa_forced'], "
            "os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    script = (ROOT / "benchmarks" / "avx2.sh").read_text().replace('exec "${PYTHON:-python}" -m benchmarks.run "$@"',
                                                                     'exec "${PYTHON:-python}" -c "$CODE"')
    env = dict(os.environ, PYTHON=sys.executable, CODE=code)
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ("{'ATEN_CPU_CAPABILITY': 'avx2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2', 'ONEDNN_MAX_CPU_ISA': 'AVX2'}"
            in out.stdout)
    assert " AVX2 avx2 " in out.stdout and "torchinductor_avx2_" in out.stdout
    listed = subprocess.run(["bash", str(ROOT / "benchmarks" / "avx2.sh"), "--preset", "cpu-small", "--dry-run"],
                            cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0 and "cases:" in listed.stdout, listed.stderr

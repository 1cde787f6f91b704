"""The staged GPU run without a GPU: benchmarks/gpu_run.sh's plan (stages, steps, time limits), a cut-off
stage that still returns its evidence (a stub stands in for python), the headline preset, benchmarks/tune.py's
sweep and verdicts, and the goal table of benchmarks/gpu_report.py."""

import os
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_report, tune
from benchmarks.cases import Case
from benchmarks.implementations import Implementation
from benchmarks.presets import HEADLINE, PRESETS
from benchmarks.workload import Workload
from grpo_kernels.triton import tuning

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
STAGE_LIMITS = {"a": 180, "b": 240, "tune": 150}
STAGE = re.compile(r"^stage (\w+): limit (\d+s|rest)")
STEP = re.compile(r"^\[(\w+)\] ([\w-]+) limit (\d+)?s?(rest)?: (.+)$")


def _dry_run(*args: str) -> list[str]:
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return out.splitlines()


def _plan(lines: list[str]) -> dict:
    """{stage: {"limit": seconds or "rest", "steps": [(name, cap or "rest", command)]}} in order."""
    plan, current = {}, None
    for line in lines:
        if m := STAGE.match(line):
            current = m.group(1)
            limit = m.group(2)
            plan[current] = {"limit": "rest" if limit == "rest" else int(limit[:-1]), "steps": []}
        elif m := STEP.match(line):
            assert m.group(1) == current, line
            plan[current]["steps"].append((m.group(2), int(m.group(3)) if m.group(3) else "rest", m.group(5)))
    return plan


def test_dry_run_plans_every_stage_within_its_limit(tmp_path):
    lines = _dry_run(str(tmp_path / "out"))
    plan = _plan(lines)
    assert list(plan) == ["a", "b", "tune", "c"]  # all = a, b, tune, c in that order
    for stage, limit in STAGE_LIMITS.items():
        assert plan[stage]["limit"] == limit
        assert all(cap == "rest" or 0 < cap <= limit for _, cap, _ in plan[stage]["steps"])
    assert plan["c"]["limit"] == "rest" and "DEADLINE 570s" in lines[0]
    steps = {stage: {name: command for name, _, command in p["steps"]} for stage, p in plan.items()}
    a = steps["a"]
    assert list(a)[:3] == ["wheels", "build", "environment"] and list(a)[-2:] == ["headline", "goals"]
    assert "--no-index" in a["wheels"] and "--no-deps" in a["wheels"]
    assert re.search(r"MAX_JOBS=\d+ TORCH_CUDA_ARCH_LIST=9\.0a .*setup\.py build_ext --inplace", a["build"])
    check = a.get("check") or a["gpu-tests"]
    assert re.search(r"-m grpo_kernels\.check .*--json \S+/check-[\d-]+\.json$", check) or "-m gpu" in check
    assert "--preset gpu-headline" in a["headline"] and "--time-budget" in a["headline"]
    for peer in ("ours-triton", "ours-cuda", "torch-compile", "trl-utils", "trl-lm-head", "liger"):
        assert f" {peer} " in a["headline"]
    assert "-m pytest" in steps["b"]["tests"] and steps["b"]["tests"].endswith(" tests")
    assert "-m benchmarks.tune --budget" in steps["tune"]["tune"]
    tune_budget = int(re.search(r"--budget (\d+)", steps["tune"]["tune"]).group(1))
    assert tune_budget <= STAGE_LIMITS["tune"] - 30  # the sweep's own budget leaves time to print and write
    assert "--preset gpu-rest" in steps["c"]["gpu-rest"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_of_chosen_stages_and_refusals():
    assert list(_plan(_dry_run("--stage", "b"))) == ["b"]
    assert list(_plan(_dry_run("--stage", "tune,a"))) == ["tune", "a"]
    for bad in (["--stage", "d"], ["--stage", "a,x"], ["--bogus"]):
        result = subprocess.run(["bash", str(SCRIPT), "--dry-run", *bad], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 2 and "gpu_run.sh:" in result.stderr


STUB = r"""#!/usr/bin/env bash
# Stands in for python3: records each call, fakes its result; the benchmark runner hangs until it is killed.
echo "call MAX_JOBS=${MAX_JOBS:-} ARCH=${TORCH_CUDA_ARCH_LIST:-} :: $*" >> "$STUB_LOG"
case "$*" in
    *"import xdist"*|*"import pytest_timeout"*) exit 1 ;;
    *"-m benchmarks.run"*)
        while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
        echo '{"records": []}' > "$out/partial-run.json"
        echo "measuring"
        exec sleep 60 ;;
    *"-m grpo_kernels.check"*)
        while [ $# -gt 0 ]; do [ "$1" = --json ] && echo '{}' > "$2"; shift; done ;;
    *) echo "fake $1" ;;
esac
"""


def test_a_cut_off_stage_still_returns_its_evidence(tmp_path):
    stub, stub_log, out, work = tmp_path / "python", tmp_path / "calls.log", tmp_path / "out", tmp_path / "work"
    stub.write_text(STUB)
    stub.chmod(0o755)
    (tmp_path / "wheels").mkdir()
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(stub_log), "GPU_RUN_WORK": str(work),
           "WHEELS": str(tmp_path / "wheels"), "LIMIT_A": "16", "MIN_STEP": "2", "MAX_JOBS": "16"}
    env["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0;10.0+PTX"  # an image's list: the build still compiles for one
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), "--stage", "a", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stdout + result.stderr  # the headline step ran into its limit
    assert elapsed < 16 + 8  # the stage's limit, the kill grace and the packing
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_run.log", "logs.tar.gz", "results.tar.gz"]  # what the device tool returns (≤ 8 files)
    with tarfile.open(out / "results.tar.gz") as archive:
        names = archive.getnames()
    assert "results/partial-run.json" in names  # written before the cut
    assert any(re.fullmatch(r"results/check-[\d-]+\.json", n) for n in names)
    with tarfile.open(out / "logs.tar.gz") as archive:
        assert {"logs/a-build.log", "logs/a-headline.log"} <= set(archive.getnames())
    log = (out / "gpu_run.log").read_text()
    assert re.search(r"\[a/headline\] stopped at its \d+s limit", log) and "measuring" in log
    assert re.search(r"^a +headline +timeout", log, re.M) and re.search(r"^a +goals +0 ", log, re.M)
    calls = stub_log.read_text()
    assert "call MAX_JOBS=16 ARCH=9.0a :: setup.py build_ext --inplace" in calls

    # Another stage on the same machine: the extension of these sources is not built again.
    stub_log.write_text("")
    result = subprocess.run(["bash", str(SCRIPT), "--stage", "b", str(out)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = stub_log.read_text()
    assert "setup.py" not in calls and re.search(r":: -m pytest .*--junitxml \S+ tests$", calls, re.M)


def test_headline_preset():
    fused, logprobs, lm_head = HEADLINE
    assert (fused.op, fused.backward, fused.N, fused.V, fused.dtype) == ("fused_grpo_loss", True, 16384, 151936,
                                                                         "bfloat16")
    assert (logprobs.op, logprobs.backward, logprobs.N, logprobs.V) == ("token_logprobs", False, 16384, 151936)
    assert (lm_head.op, lm_head.N, lm_head.H, lm_head.V, lm_head.dtype) == ("lm_head_grpo_loss", 16384, 4096, 151936,
                                                                            "bfloat16")
    gpu = PRESETS["gpu"]()
    assert gpu[:3] == list(HEADLINE) == PRESETS["gpu-headline"]() and len(set(gpu)) == len(gpu)
    assert PRESETS["gpu-rest"]() == gpu[3:]


def test_tune_dry_run_lists_a_valid_short_sweep(capsys):
    assert tune.main(["--dry-run"]) == []
    out = capsys.readouterr().out
    families = re.findall(r"^(\S+): (\S+) .*; (\d+) runs, (\d+) kernel builds$", out, re.M)
    assert [f[0] for f in families] == ["fused_grpo_loss", "token_logprobs.fwd", "linear", "token_logprobs.bwd"]
    assert {f[1] for f in families} >= {case.name for case in HEADLINE}
    total = int(re.search(r"(\d+) runs$", out.strip()).group(1))
    assert total == sum(int(f[2]) for f in families) <= 60  # about 2 s a run: under two minutes
    for sweep in tune.SWEEPS:
        assert {name for config in sweep.configs for name in config} <= set(tuning.KNOBS)
        assert len({tuple(sorted(c.items())) for c in sweep.configs}) == len(sweep.configs) and {} not in sweep.configs


def _row(ms, status="ok", config=None):
    config = config or {}
    return dict(config=config, label=tune._label(config), status=status, median_ms=ms, min_ms=ms, repeats=3,
                rel_diff=0.0)


def test_tune_verdict_needs_a_win_beyond_the_noise():
    sweep = tune.SWEEPS[0]
    fast = {"fused_grpo_loss.programs_per_sm": 2}
    wrong = {"fused_grpo_loss.num_warps": 4}
    win = tune._verdict(sweep, [_row(10.0), _row(8.0, config=fast), _row(5.0, "mismatch", wrong), _row(10.2)])
    assert win["best"]["config"] == fast and win["speedup"] == pytest.approx(1.25)
    assert win["noise"] == pytest.approx(0.02)
    noisy = tune._verdict(sweep, [_row(10.0), _row(8.0, config=fast), _row(13.0)])
    assert noisy["best"] is None  # the defaults' two runs differ by 30%: an 8 ms run proves nothing
    close = tune._verdict(sweep, [_row(10.0), _row(9.9, config=fast), _row(10.0)])
    assert close["best"] is None  # 1% is under the 2% floor
    assert tune.winners([win, noisy]) == fast
    table = tune.best_table([win, close])
    assert "1.250×" in table and "programs_per_sm=2" in table and "the defaults" in table


def test_tune_sweep_marks_failures_and_changed_numbers(monkeypatch):
    """The sweep's plumbing on CPU, a fake implementation standing in for the Triton backend: one knob value
    fails to launch, another changes the numbers; neither can win, and a spent budget runs nothing."""
    def build(case, inputs):
        def forward():
            warps = tuning.active().get("token_logprobs.fwd.num_warps")
            if warps == 2:
                raise RuntimeError("out of resources: shared memory")
            return (inputs.logits.detach().float().logsumexp(-1) * (1.5 if warps == 4 else 1.0),)
        return Workload(forward, ())

    monkeypatch.setattr(tune, "implementations", lambda device: [Implementation(tune.IMPL, "fake", build)])
    monkeypatch.setattr(tune, "REPEATS", dict(min_repeats=1, max_repeats=1, min_total_s=0.0))
    configs = tuple({"token_logprobs.fwd.num_warps": w} for w in (2, 4, 8))
    sweep = tune.Sweep("token_logprobs.fwd", Case(op="token_logprobs", B=2, T=4, V=64, backward=False), configs, "")
    result = tune.run_sweep(sweep, torch.device("cpu"), deadline=time.monotonic() + 60)
    rows = result["rows"]
    assert [r["config"] for r in rows] == [{}, *configs, {}]
    assert rows[1]["status"] == "error: RuntimeError: out of resources: shared memory"
    assert rows[2]["status"] == "mismatch" and rows[2]["rel_diff"] == pytest.approx(0.5)
    assert rows[3]["status"] == "ok" and rows[3]["rel_diff"] == 0.0 and result["default_ms"] > 0
    assert result["best"] in (None, rows[3])
    spent = tune.run_sweep(sweep, torch.device("cpu"), deadline=time.monotonic() - 1)
    assert {r["status"] for r in spent["rows"]} == {tune.SPENT} and spent["best"] is None
    # A budget spent inside the sweep still times the defaults again: the noise a winner needs.
    clock = iter([0.0, 0.0, 0.0, 0.0, 100.0, 100.0])  # the start, then one reading per configuration
    monkeypatch.setattr(tune, "_now", lambda: next(clock))
    cut = tune.run_sweep(sweep, torch.device("cpu"), deadline=50.0)
    assert [r["status"] for r in cut["rows"]] == ["ok", "error: RuntimeError: out of resources: shared memory",
                                                  "mismatch", tune.SPENT, "ok"]


def _record(case, impl, ms, **extra):
    return dict(case=case.name, impl=impl, status="ok", median_ms=ms, N=case.N, V=case.V, **extra)


def test_goal_table_reads_each_goal_off_the_records():
    fused, logprobs, lm_head = HEADLINE
    buffer_mib = fused.N * fused.V * 2 / 2**20
    records = [
        _record(logprobs, "ours-triton", 1.8, pct_copy=93.0),
        _record(fused, "ours-triton", 3.6, floor_ms=3.3, peak_mem_mb=buffer_mib),
        _record(fused, "ours-triton-inplace", 3.5, floor_ms=3.3, peak_mem_mb=10.0),
        _record(fused, "liger", 6.0),
        _record(lm_head, "ours-triton", 100.0),
        _record(lm_head, "trl-lm-head", 110.0),
    ]
    run = {"stem": "h100-run", "environment": {"device_name": "H100"}, "limits": {"copy_gbps": 3000},
           "records": records}
    table = gpu_report.goals_table(run)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "93.0%" in rows[gpu_report.GOALS[0].text] and rows[gpu_report.GOALS[0].text].endswith("| yes |")
    assert "1.06× the floor" in rows[gpu_report.GOALS[1].text]  # the in-place run, 3.5 / 3.3
    assert "1.71×" in rows[gpu_report.GOALS[2].text] and rows[gpu_report.GOALS[2].text].endswith("| yes |")
    assert rows[gpu_report.GOALS[3].text].endswith("| yes |") and rows[gpu_report.GOALS[4].text].endswith("| yes |")
    assert "1.10×" in rows[gpu_report.GOALS[5].text] and rows[gpu_report.GOALS[5].text].endswith("| NO |")
    empty = gpu_report.goals_table({**run, "records": []})
    assert empty.count("not measured") == len(gpu_report.GOALS)


def test_unpack_merges_the_csv_history(tmp_path):
    run, local = tmp_path / "run" / "results", tmp_path / "local"
    run.mkdir(parents=True)
    local.mkdir()
    header = "date,case,median_ms"
    (local / "all.csv").write_text(f"{header}\nold,a,1\nhere-meanwhile,b,2\n")
    (run / "all.csv").write_text(f"{header}\nold,a,1\ngpu,c,3\ngpu,d,4\n")
    (run / "h100-run.json").write_text("{}")
    (run / "h100-run-time-vs-V.png").write_bytes(bytes(range(256)))
    archive = tmp_path / "results.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run, arcname="results")
    written = gpu_report.unpack(archive, local)
    assert sorted(written) == ["all.csv (+2 rows)", "h100-run-time-vs-V.png", "h100-run.json"]
    assert (local / "all.csv").read_text().splitlines() == [header, "old,a,1", "here-meanwhile,b,2", "gpu,c,3",
                                                           "gpu,d,4"]
    assert (local / "h100-run-time-vs-V.png").read_bytes() == bytes(range(256))
    (run / "all.csv").write_text("other,header\n")
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(run, arcname="results")
    with pytest.raises(ValueError, match="another header"):
        gpu_report.unpack(archive, local)

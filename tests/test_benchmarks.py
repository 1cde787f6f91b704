"""The benchmark tooling works: a tiny runner run, the README renderer, the byte model (the GPU script:
tests/test_gpu_run.py).

The benchmarks themselves (``pytest benchmarks/``) are not part of this suite.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import costs, render_readme
from benchmarks.cases import Case

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
    assert "ours-reference" in result.with_suffix(".md").read_text()
    section = render_readme.section(render_readme.newest_per_device([result]))
    assert "group_advantages" in section and run["stem"] in section


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

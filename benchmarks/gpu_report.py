"""Reports of the staged GPU run (benchmarks/gpu_run.sh): environment facts, and the headline goals.

``python -m benchmarks.gpu_report facts PATH``: the environment of the CUDA device
(:func:`benchmarks.environment.describe` plus SM count, L2, memory, capability,
the extension's build facts, the Triton tuning overrides in force) as JSON.

``python -m benchmarks.gpu_report goals RESULT.json|FOLDER``: the goals of the
headline cases (:data:`GOALS`) against a run of the runner (a folder: its newest
run holding a headline case), as a markdown table with the measured figure next
to each goal. Exit status 0 whether or not goals are met: this is evidence, not a test.

``python -m benchmarks.gpu_report unpack results.tar.gz [FOLDER]``: the run's
result files into ``FOLDER`` (default ``benchmarks/results``); its ``all.csv``
rows that the folder's ``all.csv`` lacks are appended (rows written here since
the run started stay).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .presets import HEADLINE

FUSED_CASE, LOGPROBS_CASE, LM_HEAD_CASE = (case.name for case in HEADLINE)
MiB = 2**20


def _fastest(records: list[dict], case: str, prefix: str) -> Optional[dict]:
    """The fastest ``ok`` record of ``case`` among implementations whose key starts with ``prefix``."""
    rows = [r for r in records if r["case"] == case and r["status"] == "ok" and r["impl"].startswith(prefix)]
    return min(rows, key=lambda r: r["median_ms"], default=None)


def _record(records: list[dict], case: str, impl: str) -> Optional[dict]:
    return next((r for r in records if r["case"] == case and r["impl"] == impl and r["status"] == "ok"), None)


def _logits_mib(records: list[dict], case: str) -> Optional[float]:
    row = next((r for r in records if r["case"] == case), None)
    return None if row is None else row["N"] * row["V"] * 2 / MiB  # bf16


@dataclass(frozen=True)
class Goal:
    """One goal: what it says, and how to read (measured text, met or None when not measurable) off the records."""

    text: str
    target: str
    measure: Callable[[list[dict]], tuple[str, Optional[bool]]]


def _copy_share(records):
    ours = _fastest(records, LOGPROBS_CASE, "ours-")
    if ours is None:
        return "not measured", None
    return f"{ours['pct_copy']:.1f}% ({ours['impl']}, {ours['median_ms']:.3f} ms)", ours["pct_copy"] >= 90


def _floor_ratio(records):
    ours = _fastest(records, FUSED_CASE, "ours-")
    if ours is None or not ours.get("floor_ms"):
        return "not measured", None
    ratio = ours["median_ms"] / ours["floor_ms"]
    return f"{ratio:.2f}× the floor ({ours['impl']}, {ours['median_ms']:.3f} ms; floor {ours['floor_ms']:.3f} ms)", \
        ratio <= 1.15


def _speedup(case: str, peer_prefix: str, target: float):
    def measure(records):
        ours, peer = _fastest(records, case, "ours-"), _fastest(records, case, peer_prefix)
        if ours is None or peer is None:
            return "not measured", None
        ratio = peer["median_ms"] / ours["median_ms"]
        return (f"{ratio:.2f}× ({ours['impl']} {ours['median_ms']:.3f} ms vs {peer['impl']} "
                f"{peer['median_ms']:.3f} ms)"), ratio >= target
    return measure


def _extra_memory(impl: str, limit_buffers: float):
    def measure(records):
        row, buffer = _record(records, FUSED_CASE, impl), _logits_mib(records, FUSED_CASE)
        if row is None or row.get("peak_mem_mb") is None or buffer is None:
            return "not measured", None
        share = row["peak_mem_mb"] / buffer
        return f"{row['peak_mem_mb']:.0f} MiB = {share:.2f} logits buffers ({impl})", share <= limit_buffers
    return measure


GOALS: tuple[Goal, ...] = (
    Goal("token_logprobs forward, N=16384, V=151936 bf16: share of the measured copy bandwidth", "≥ 90%",
         _copy_share),
    Goal("fused_grpo_loss forward + backward: time over the one-read-one-write floor", "≤ 1.15×", _floor_ratio),
    Goal("fused_grpo_loss forward + backward: speed-up over Liger's triton_grpo_loss", "≥ 1.5×",
         _speedup(FUSED_CASE, "liger", 1.5)),
    Goal("fused_grpo_loss extra memory (Triton)", "≤ 1 logits buffer", _extra_memory("ours-triton", 1.0)),
    Goal("fused_grpo_loss extra memory, in place (Triton)", "≈ 0 (≤ 0.05 buffers)",
         _extra_memory("ours-triton-inplace", 0.05)),
    Goal("fused_linear_grpo_loss, H=4096: speed-up over TRL's chunked LM head + loss", "≥ 1.2×",
         _speedup(LM_HEAD_CASE, "trl-lm-head", 1.2)),
)


def goals_table(run: dict) -> str:
    """Markdown: each goal, its target, the measured figure and whether it is met."""
    lines = [f"Goals at the headline shapes, run `{run.get('stem', '?')}` "
             f"({run['environment'].get('device_name', '?')}, copy bandwidth "
             f"{(run.get('limits') or {}).get('copy_gbps') or float('nan'):.0f} GB/s):", "",
             "| goal | target | measured | met |", "|---|---|---|---|"]
    for goal in GOALS:
        measured, met = goal.measure(run["records"])
        verdict = "–" if met is None else "yes" if met else "NO"
        lines.append(f"| {goal.text} | {goal.target} | {measured} | {verdict} |")
    return "\n".join(lines)


def headline_run(path: Path) -> Optional[dict]:
    """The run in ``path`` (a result JSON), or the newest run in the folder ``path`` holding a headline case."""
    files = [path] if path.is_file() else sorted(path.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    headline = {case.name for case in HEADLINE}
    for file in files:
        run = json.loads(file.read_text())
        if any(r.get("case") in headline for r in run.get("records", ())):
            return run
    return None


def unpack(archive: Path, folder: Path) -> list[str]:
    """Extract ``archive`` (``results/...``) into ``folder``, merging ``all.csv`` row by row; the names written."""
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            if not member.isfile() or len(name.parts) != 2 or name.parts[0] != "results" or name.name.startswith("."):
                continue  # only the files directly in results/
            data = tar.extractfile(member).read()
            target = folder / name.name
            if name.name == "all.csv" and target.exists():
                have = target.read_text().splitlines()
                theirs = data.decode().splitlines()
                if theirs[:1] != have[:1]:
                    raise ValueError(f"{archive}: all.csv has another header than {target}")
                known = set(have)
                new = [row for row in theirs[1:] if row not in known]
                with target.open("a") as f:
                    f.writelines(row + "\n" for row in new)
                written.append(f"all.csv (+{len(new)} rows)")
            else:
                target.write_bytes(data)
                written.append(name.name)
    return written


def facts() -> dict:
    """The environment of the CUDA device, for the log of the GPU run."""
    import torch

    import grpo_kernels
    from grpo_kernels.triton import tuning

    from . import environment

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    return {
        **environment.describe(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "sm_count": props.multi_processor_count,
        "l2_mb": getattr(props, "L2_cache_size", 0) / 1e6,
        "memory_gib": props.total_memory / 2**30,
        "extension_info": grpo_kernels.extension_info(),
        "triton_tuning": tuning.active(),
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("facts", help="environment facts of the CUDA device as JSON").add_argument("path", type=Path)
    sub.add_parser("goals", help="the headline goals against a run").add_argument("path", type=Path)
    unpacking = sub.add_parser("unpack", help="a run's results.tar.gz into the results folder")
    unpacking.add_argument("archive", type=Path)
    unpacking.add_argument("folder", type=Path, nargs="?", default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.command == "unpack":
        print("\n".join(unpack(args.archive, args.folder)))
        return 0
    if args.command == "facts":
        found = facts()
        args.path.parent.mkdir(parents=True, exist_ok=True)
        args.path.write_text(json.dumps(found, indent=1, default=str) + "\n")
        print(json.dumps(found, indent=1, default=str))
        return 0
    run = headline_run(args.path)
    print(goals_table(run) if run else f"no run with a headline case in {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

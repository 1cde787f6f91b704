"""Result files of a run: the JSON, the long CSV history, the markdown tables.

``<out>/<device>-<date>-<HHMMSS>-<sha>.json``: environment, device limits, preset and
every :class:`~benchmarks.measure.Record`. ``<out>/all.csv``: one row per
record of every run (history accumulates; the environment in each row).
``<out>/<stem>.md``: the tables of one run.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Iterable, Optional

from .measure import Record

CSV_ENVIRONMENT = ("date", "git_sha", "preset", "device_name", "torch", "triton", "cuda", "cpu_threads")
BASELINES = {"trl-utils": "TRL", "trl-lm-head": "TRL fused LM head", "torch-compile": "torch.compile"}


def stem(environment: dict) -> str:
    """``<device>-<date>-<HHMMSS>-<sha>``, e.g. ``nvidia-h100-80gb-hbm3-2026-11-23-161502-450567b`` (UTC; seconds,
    so that two runs started in the same minute do not overwrite each other's files)."""
    device = environment["device"] if environment["device"] == "cpu" else environment["device_name"]
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    date = environment["date"]
    return f"{slug}-{date[:10]}-{date[11:13]}{date[14:16]}{date[17:19]}-{environment['git_sha']}"


def write_json(path: Path, run: dict) -> None:
    """The whole run: ``{"environment", "limits", "preset", "records"}``."""
    path.write_text(json.dumps(run, indent=1) + "\n")


def load(path: Path) -> dict:
    """A run written by :func:`write_json`, its records as :class:`Record`."""
    run = json.loads(path.read_text())
    run["records"] = [Record(**r) for r in run["records"]]
    return run


def csv_header() -> list[str]:
    """The columns of ``all.csv``: the environment's, then the record's."""
    return list(CSV_ENVIRONMENT) + Record.fields()


def upgrade_csv(path: Path, header: Optional[list[str]] = None) -> None:
    """Rewrite ``path`` with ``header`` (default :func:`csv_header`) when its own header names some of those
    columns only (an older record layout: the new columns stay empty in its rows); ValueError when it has a
    column ``header`` lacks."""
    header = header or csv_header()
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        f.seek(0)
        existing = next(csv.reader(f), [])
    if existing == header:
        return
    if not set(existing) <= set(header):
        raise ValueError(f"{path} has another header; move it aside to start a new history")
    partial = path.with_name(path.name + ".tmp")
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    partial.replace(path)


def append_csv(path: Path, environment: dict, records: Iterable[Record]) -> None:
    """Append one row per record, with the environment columns first; the header when the file is new (a file
    of an older record layout gets the new columns first, empty in its rows)."""
    header = csv_header()
    new = not path.exists()
    if not new:
        upgrade_csv(path, header)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        if new:
            writer.writeheader()
        for record in records:
            writer.writerow({**{k: environment.get(k) for k in CSV_ENVIRONMENT}, **vars(record)})


def fmt(value: Optional[float], digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, or a dash for None."""
    return "–" if value is None else f"{value:.{digits}g}"


def _ok(records: Iterable[Record]) -> list[Record]:
    return [r for r in records if r.status == "ok"]


def _speedup(record: Record, records: list[Record], baseline: str) -> str:
    base = next((r for r in _ok(records) if r.case == record.case and r.impl == baseline), None)
    return "–" if base is None else f"{base.median_ms / record.median_ms:.2f}×"


def environment_line(run: dict) -> str:
    """One line naming the device, code and software of a run, and its measured limits."""
    env, lim = run["environment"], run["limits"]
    software = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "trl", "liger-kernel") if env.get(k))
    isa = ""  # the cpu backend's vector path in this run (recorded since issue 19), and what the CPU offers
    if env.get("device") == "cpu" and env.get("extension_cpu_isa"):
        flags = " ".join(env.get("cpu_vector_flags") or []) or "none listed"
        isa = f"; cpu kernels' vector path {env['extension_cpu_isa']}, CPU flags {flags}"
        if env.get("torch_cpu_capability"):
            isa += f", torch's {env['torch_cpu_capability']}"
    # fresh buffers pay the host's page faults (docs/design.md, "Stores"); runs before the extension said so
    # recorded the VM's free page reporting itself
    if env.get("free_page_reporting") or "free page reporting" in (env.get("extension_gradient_buffer_pages") or ""):
        isa += "; a VM that hands free memory back to its host: fresh buffers are slow to fault in"
    return (f"{env['device_name']} ({env['cpu_threads']} CPU threads, load average {env['load_average_1m']:.1f} "
            f"at the start{isa}), {env['date']}, commit {env['git_sha']}, "
            f"preset `{run['preset']}`; {software}; copy bandwidth {lim['copy_gbps']:.1f} GB/s")


def detail_table(records: list[Record]) -> str:
    """Every measured record: time, bandwidth, shares of copy bandwidth, roofline and matmul floor, memory,
    error, speed-ups, and what the implementation chose (note)."""
    head = ("| case | implementation | median ms | GB/s | % copy BW | % roofline | % matmul floor "
            "| peak MiB above inputs | max err (out / grad) | "
            + " | ".join(f"× vs {v}" for v in BASELINES.values()) + " | note |")
    lines = [head, "|" + "---|" * (10 + len(BASELINES))]
    for r in _ok(records):
        speedups = " | ".join(_speedup(r, records, b) for b in BASELINES)
        lines.append(
            f"| `{r.case}` | {r.label} | {fmt(r.median_ms, 4)} | {fmt(r.gbps)} | {fmt(r.pct_copy)} "
            f"| {fmt(r.pct_roofline)} | {fmt(r.pct_matmul_floor)} | {fmt(r.peak_mem_mb, 4)} "
            f"| {fmt(r.max_err, 2)} / {fmt(r.max_err_grad, 2)} | {speedups} | {r.note} |"
        )
    return "\n".join(lines)


def matmul_floor_table(records: list[Record]) -> str:
    """The fused-linear (LM-head) cases against the matmul floor: per case, the rate of ``torch.mm`` of
    [N, H] × [H, V] measured in the run (in the faster exact dtype), the 6·N·V·H floor at that rate, and each implementation's median as a
    percentage of that floor (100% = at the floor); empty when the run has no such case."""
    linear = [r for r in _ok(records) if r.matmul_floor_ms is not None]
    if not linear:
        return ""
    impls = list(dict.fromkeys(r.impl for r in linear))
    head = ("| case | torch.mm GFLOP/s (dtype) | matmul floor ms | " + " | ".join(f"`{i}`" for i in impls) + " |")
    lines = [head, "|" + "---|" * (3 + len(impls))]
    for case in dict.fromkeys(r.case for r in linear):
        row = {r.impl: r for r in linear if r.case == case}
        first = next(iter(row.values()))
        cells = [f"{fmt(row[i].pct_matmul_floor)}%" if i in row else "–" for i in impls]
        lines.append(f"| `{case}` | {fmt(first.matmul_gflops)} ({first.matmul_dtype}) | {fmt(first.matmul_floor_ms, 4)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(records: list[Record]) -> str:
    """Median ms per case (rows) and implementation (columns, by key, with a legend below),
    and the speed-ups of the fastest grpo_kernels backend."""
    impls = list(dict.fromkeys(r.impl for r in _ok(records)))
    labels = {r.impl: r.label for r in records}
    cases = list(dict.fromkeys(r.case for r in _ok(records)))
    head = ("| case | " + " | ".join(f"`{i}`" for i in impls) + " | fastest grpo_kernels | "
            + " | ".join(f"× vs {v}" for v in BASELINES.values()) + " |")
    lines = [head, "|" + "---|" * (len(impls) + 2 + len(BASELINES))]
    for case in cases:
        row = {r.impl: r for r in _ok(records) if r.case == case}
        ours = min((r for r in row.values() if r.impl.startswith("ours-")), key=lambda r: r.median_ms, default=None)
        cells = [fmt(row[i].median_ms, 4) if i in row else "–" for i in impls]
        speedups = [_speedup(ours, records, b) if ours else "–" for b in BASELINES]
        lines.append(f"| `{case}` | " + " | ".join(cells) + f" | {ours.impl if ours else '–'} | "
                     + " | ".join(speedups) + " |")
    legend = "; ".join(f"`{i}`: {labels[i]}" for i in impls)
    return "\n".join(lines) + f"\n\n{legend}."


def not_measured(records: list[Record]) -> str:
    """The implementations that did not run, once per (implementation, reason)."""
    seen = dict.fromkeys((r.impl, r.status, r.note) for r in records if r.status != "ok")
    return "\n".join(f"- `{impl}` {status}: {note}" for impl, status, note in seen)


def markdown(run: dict) -> str:
    """The tables of one run (``<stem>.md``)."""
    records = run["records"]
    linear = matmul_floor_table(records)
    return "\n\n".join([
        f"# Benchmark run `{run['stem']}`", environment_line(run), "## Median ms", summary_table(records),
        *(["## Fused linear: % of the matmul floor (6·N·V·H at the torch.mm rate of the same shapes)", linear]
          if linear else []),
        "## Details", detail_table(records), "## Not measured", not_measured(records) or "(none)",
    ]) + "\n"

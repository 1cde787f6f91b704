"""PNG plots of a run (matplotlib, Agg backend), one line per implementation: time vs V, peak memory vs N,
and the cost growth (time and peak memory vs N·V, with the floor)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .cases import DTYPES  # noqa: E402
from .measure import Record  # noqa: E402

FLOOR = "roofline floor"
LOGITS = "[N, V] logits (what the unfused path stores)"
Value = Callable[[Record], Optional[float]]
Series = dict[str, list[tuple[float, float]]]


def _groups(records: list[Record], x: Value, y: Value, fixed: Callable[[Record], str],
            extra: dict[str, Value]) -> tuple[dict[str, Series], dict[str, str]]:
    """Per group of cases equal but for ``x`` (``fixed`` names the group): per implementation the points
    (x, y), and the dashed lines ``extra`` (name → value per record); the implementations' labels."""
    groups: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    labels = {name: name for name in extra}
    for r in records:
        if r.status == "ok" and y(r) is not None:
            groups[fixed(r)][r.impl].append((x(r), y(r)))
            labels[r.impl] = r.label
            for name, value in extra.items():
                if value(r) is not None:
                    groups[fixed(r)][name].append((x(r), value(r)))
    return groups, labels


def _draw(ax, title: str, series: Series, labels: dict[str, str], xlabel: str, ylabel: str, yscale: str) -> None:
    for impl, points in series.items():
        xs, ys = zip(*sorted(set(points)))
        style = dict(linestyle="--", color="black" if impl == FLOOR else "grey") if impl in (FLOOR, LOGITS) \
            else dict(marker="o")
        ax.plot(xs, ys, label=labels[impl], **style)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xscale="log")
    ax.set_yscale(yscale, **({"linthresh": 1.0} if yscale == "symlog" else {}))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _series_plot(records: list[Record], path: Path, x: str, y: Value, ylabel: str, fixed: Callable[[Record], str],
                 floor: Optional[Value] = None, log_y: bool = True) -> bool:
    """One panel per group of cases equal but for the field ``x``, one line per implementation (and ``floor``'s
    dashed line); False when no group has two values of ``x``."""
    groups, labels = _groups(records, lambda r: getattr(r, x), y, fixed, {FLOOR: floor} if floor else {})
    groups = {k: v for k, v in groups.items() if len({p[0] for s in v.values() for p in s}) >= 2}
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 4.5 * len(groups)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], groups.items()):
        _draw(ax, title, series, labels, x, ylabel, "log" if log_y else "linear")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _logits_mib(r: Record) -> float:
    return r.N * r.V * DTYPES[r.dtype].itemsize / 2**20


def growth_plot(records: list[Record], path: Path) -> bool:
    """Cost growth: per group of cases equal but for N and V (with both N and V swept), a row of two panels
    against N·V: median time with the roofline floor, and peak memory above the inputs with the size of the
    [N, V] logits; False when no group sweeps both."""
    def fixed(r: Record) -> str:
        return r.case.replace(f"/N={r.N}({r.B}x{r.T})", "/N=*").replace(f"/V={r.V}", "/V=*")

    swept = defaultdict(set)
    for r in records:
        if r.status == "ok":
            swept[fixed(r)].add((r.N, r.V))
    keep = {k for k, shapes in swept.items() if len({n for n, _ in shapes}) >= 2 and len({v for _, v in shapes}) >= 2}
    if not keep:
        return False
    tokens_times_vocabulary: Value = lambda r: r.N * r.V  # noqa: E731
    times, labels = _groups(records, tokens_times_vocabulary, lambda r: r.median_ms, fixed,
                            {FLOOR: lambda r: r.floor_ms})
    memory, memory_labels = _groups(records, tokens_times_vocabulary, lambda r: r.peak_mem_mb, fixed,
                                    {LOGITS: _logits_mib})
    labels.update(memory_labels)
    keep = sorted(keep)
    fig, axes = plt.subplots(len(keep), 2, figsize=(14, 4.5 * len(keep)), squeeze=False)
    for row, title in zip(axes, keep):
        _draw(row[0], title, times[title], labels, "N·V", "median ms", "log")
        if title in memory:  # symlog: an in-place backward can take 0 MiB above its inputs
            _draw(row[1], title, memory[title], labels, "N·V", "peak MiB above inputs", "symlog")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(records: list[Record], out_dir: Path, stem: str) -> list[Path]:
    """``<stem>-time-vs-V.png``, ``<stem>-memory-vs-N.png`` and ``<stem>-growth.png`` where the run has such
    series; the paths written."""
    written = []
    time_path, memory_path = out_dir / f"{stem}-time-vs-V.png", out_dir / f"{stem}-memory-vs-N.png"
    growth_path = out_dir / f"{stem}-growth.png"
    if _series_plot(records, time_path, "V", lambda r: r.median_ms, "median ms",
                    lambda r: r.case.replace(f"/V={r.V}", "/V=*"), floor=lambda r: r.floor_ms):
        written.append(time_path)
    if _series_plot(records, memory_path, "N", lambda r: r.peak_mem_mb, "peak MiB above inputs",
                    lambda r: r.case.replace(f"/N={r.N}({r.B}x{r.T})", "/N=*"), log_y=False):
        written.append(memory_path)
    if growth_plot(records, growth_path):
        written.append(growth_path)
    return written

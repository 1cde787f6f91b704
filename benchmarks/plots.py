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
    """One line per series (those named after :data:`FLOOR` / :data:`LOGITS` dashed; a V sweep's dotted, in
    the colour of the same implementation's N sweep)."""
    colours: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, points in series.items():
        xs, ys = zip(*sorted(set(points)))
        if name.startswith((FLOOR, LOGITS)):
            style = dict(linestyle=":" if "V swept" in name else "--",
                         color="black" if name.startswith(FLOOR) else "grey")
        else:
            colour = colours.setdefault(name.split(" (")[0], cycle[len(colours) % len(cycle)])
            style = dict(marker="s" if "V swept" in name else "o", linestyle=":" if "V swept" in name else "-",
                         color=colour)
        ax.plot(xs, ys, label=labels[name], **style)
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


def _sweeps(records: list[Record], fixed: Callable[[Record], str]) -> dict[str, tuple[int, int]]:
    """Per group that sweeps both N and V: the anchor (N₀, V₀), the N of its V sweep and the V of its N sweep
    (the values most shapes share)."""
    shapes: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for r in records:
        if r.status == "ok":
            shapes[fixed(r)].add((r.N, r.V))
    anchors = {}
    for group, points in shapes.items():
        ns, vs = [n for n, _ in points], [v for _, v in points]
        if len(set(ns)) >= 2 and len(set(vs)) >= 2:
            anchors[group] = (max(set(ns), key=ns.count), max(set(vs), key=vs.count))
    return anchors


def growth_plot(records: list[Record], path: Path) -> bool:
    """Cost growth: per group of cases equal but for N and V (with both swept), a row of two panels against
    N·V, the N sweep (at V₀) and the V sweep (at N₀) as separate lines: median time with the roofline floor,
    and peak memory above the inputs with the size of the [N, V] logits; False when no group sweeps both."""
    def fixed(r: Record) -> str:
        return r.case.replace(f"/N={r.N}({r.B}x{r.T})", "/N=*").replace(f"/V={r.V}", "/V=*")

    anchors = _sweeps(records, fixed)
    if not anchors:
        return False
    times: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    memory: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    labels: dict[str, str] = {}
    for r in records:
        group = fixed(r)
        if r.status != "ok" or group not in anchors:
            continue
        n0, v0 = anchors[group]
        for sweep, member in ((f"N swept, V={v0}", r.V == v0), (f"V swept, N={n0}", r.N == n0)):
            if not member:
                continue
            lines = {f"{r.impl} ({sweep})": (r.label, times, r.median_ms, memory, r.peak_mem_mb),
                     f"{FLOOR} ({sweep})": (f"{FLOOR} ({sweep})", times, r.floor_ms, None, None),
                     f"{LOGITS} ({sweep})": (f"{LOGITS} ({sweep})", memory, _logits_mib(r), None, None)}
            for key, (label, panel, value, second_panel, second_value) in lines.items():
                labels[key] = label if key.startswith((FLOOR, LOGITS)) else f"{label} ({sweep})"
                if value is not None:
                    panel[group][key].append((r.N * r.V, value))
                if second_panel is not None and second_value is not None:
                    second_panel[group][key].append((r.N * r.V, second_value))
    fig, axes = plt.subplots(len(anchors), 2, figsize=(15, 5 * len(anchors)), squeeze=False)
    for row, group in zip(axes, sorted(anchors)):
        _draw(row[0], group, times[group], labels, "N·V", "median ms", "log")
        # symlog: an in-place backward can take 0 MiB above its inputs
        _draw(row[1], group, memory[group], labels, "N·V", "peak MiB above inputs", "symlog")
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

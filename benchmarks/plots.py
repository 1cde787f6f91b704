"""PNG plots of a run (matplotlib, Agg backend): time vs V, peak memory vs N, per implementation."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .measure import Record  # noqa: E402

FLOOR = "roofline floor"


def _series_plot(
    records: list[Record], path: Path, x: str, y: Callable[[Record], Optional[float]], ylabel: str,
    fixed: Callable[[Record], str], floor: Optional[Callable[[Record], Optional[float]]] = None, log_y: bool = True,
) -> bool:
    """One panel per group of cases equal but for ``x``, one line per implementation (and ``floor``'s
    dashed line); False when no group has two values of ``x``."""
    groups: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    labels = {FLOOR: FLOOR}
    for r in records:
        if r.status == "ok" and y(r) is not None:
            groups[fixed(r)][r.impl].append((getattr(r, x), y(r)))
            labels[r.impl] = r.label
            if floor is not None and floor(r) is not None:
                groups[fixed(r)][FLOOR].append((getattr(r, x), floor(r)))
    groups = {k: v for k, v in groups.items() if len({p[0] for s in v.values() for p in s}) >= 2}
    if not groups:
        return False
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 4.5 * len(groups)), squeeze=False)
    for ax, (title, series) in zip(axes[:, 0], groups.items()):
        for impl, points in series.items():
            xs, ys = zip(*sorted(set(points)))
            style = dict(linestyle="--", color="black") if impl == FLOOR else dict(marker="o")
            ax.plot(xs, ys, label=labels[impl], **style)
        ax.set(title=title, xlabel=x, ylabel=ylabel, xscale="log", yscale="log" if log_y else "linear")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(records: list[Record], out_dir: Path, stem: str) -> list[Path]:
    """``<stem>-time-vs-V.png`` and ``<stem>-memory-vs-N.png`` where the run has such series; the paths written."""
    written = []
    time_path, memory_path = out_dir / f"{stem}-time-vs-V.png", out_dir / f"{stem}-memory-vs-N.png"
    if _series_plot(records, time_path, "V", lambda r: r.median_ms, "median ms",
                    lambda r: r.case.replace(f"/V={r.V}", "/V=*"), floor=lambda r: r.floor_ms):
        written.append(time_path)
    if _series_plot(records, memory_path, "N", lambda r: r.peak_mem_mb, "peak MiB above inputs",
                    lambda r: r.case.replace(f"/N={r.N}({r.B}x{r.T})", "/N=*"), log_y=False):
        written.append(memory_path)
    return written

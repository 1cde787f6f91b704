"""Wall time of a function on a device: warm-up excluded, median of repeats."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and minimum over ``repeats`` timed calls."""

    median_ms: float
    min_ms: float
    repeats: int


def _once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One call, timed with CUDA events on a GPU (host clock after a synchronize elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - begin)


def time_ms(
    fn: Callable[[], object], device: torch.device, *, warmup: int = 1, min_repeats: int = 3,
    max_repeats: int = 50, min_total_s: float = 1.0,
) -> Timing:
    """Time ``fn`` (already compiled/loaded by the caller or by the ``warmup`` calls).

    Repeats until both ``min_repeats`` calls and ``min_total_s`` seconds are
    done, at most ``max_repeats`` calls; outputs of a call are freed before the next.
    """
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples: list[float] = []
    while len(samples) < max_repeats and (len(samples) < min_repeats or sum(samples) < 1e3 * min_total_s):
        samples.append(_once_ms(fn, device))
    return Timing(statistics.median(samples), min(samples), len(samples))

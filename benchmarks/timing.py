"""Wall time of a function on a device: warm-up excluded, median of repeats; several functions timed in
alternating bursts so that a slow spell of a shared machine falls on all of them."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

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


def time_interleaved(
    fns: list[Callable[[], object]], device: torch.device, *, min_repeats: int = 3, max_repeats: int = 50,
    min_total_s: float = 1.0, burst_s: float = 0.1,
) -> list[Union[Timing, Exception]]:
    """Time each of ``fns`` (already warm) as :func:`time_ms` would, in rounds: each round gives each function
    not yet done a burst, one untimed call (the switch from another function: its allocator, cache and thread
    states) then timed calls for about ``burst_s`` seconds (at least one). The ratios of the medians then come
    from the same spells of the machine. A function that raises leaves the rounds; its entry is the exception."""
    samples: list[list[float]] = [[] for _ in fns]
    results: list[Optional[Union[Timing, Exception]]] = [None] * len(fns)

    def done(i: int) -> bool:
        n = len(samples[i])
        return n >= max_repeats or (n >= min_repeats and sum(samples[i]) >= 1e3 * min_total_s)

    active = list(range(len(fns)))
    while active:
        for i in list(active):
            burst = 0.0
            try:
                fns[i]()
                while True:
                    ms = _once_ms(fns[i], device)
                    samples[i].append(ms)
                    burst += ms
                    if burst >= 1e3 * burst_s or done(i):
                        break
            except Exception as error:  # noqa: BLE001 (the caller records it as this implementation's result)
                results[i] = error
                active.remove(i)
                continue
            if done(i):
                results[i] = Timing(statistics.median(samples[i]), min(samples[i]), len(samples[i]))
                active.remove(i)
    return results  # type: ignore[return-value]

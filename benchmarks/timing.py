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
    samples = _Samples(min_repeats, max_repeats, min_total_s)
    while not samples.done():
        samples.add(_once_ms(fn, device))
    return samples.timing()


class _Samples:
    """The timed calls of one function and the rule that ends them: at least ``min_repeats`` calls and
    ``min_total_s`` seconds, at most ``max_repeats`` calls (the total kept as it grows: up to 10000 calls)."""

    def __init__(self, min_repeats: int, max_repeats: int, min_total_s: float):
        self.ms: list[float] = []
        self.total_ms = 0.0
        self.min_repeats, self.max_repeats, self.min_total_ms = min_repeats, max_repeats, 1e3 * min_total_s

    def add(self, ms: float) -> None:
        self.ms.append(ms)
        self.total_ms += ms

    def done(self) -> bool:
        n = len(self.ms)
        return n >= self.max_repeats or (n >= self.min_repeats and self.total_ms >= self.min_total_ms)

    def timing(self) -> Timing:
        return Timing(statistics.median(self.ms), min(self.ms), len(self.ms))


def time_interleaved(
    fns: list[Callable[[], object]], device: torch.device, *, min_repeats: int = 3, max_repeats: int = 50,
    min_total_s: float = 1.0, burst_s: float = 0.1,
) -> list[Union[Timing, Exception]]:
    """Time each of ``fns`` (already warm) as :func:`time_ms` would, in rounds: each round gives each function
    not yet done a burst, one untimed call (the switch from another function: its allocator, cache and thread
    states) then timed calls for about ``burst_s`` seconds (at least one). The ratios of the medians then come
    from the same spells of the machine. A function that raises leaves the rounds; its entry is the exception."""
    samples = [_Samples(min_repeats, max_repeats, min_total_s) for _ in fns]
    results: list[Optional[Union[Timing, Exception]]] = [None] * len(fns)
    active = list(range(len(fns)))
    while active:
        for i in list(active):
            burst = 0.0
            try:
                fns[i]()
                while True:
                    ms = _once_ms(fns[i], device)
                    samples[i].add(ms)
                    burst += ms
                    if burst >= 1e3 * burst_s or samples[i].done():
                        break
            except Exception as error:  # noqa: BLE001 (the caller records it as this implementation's result)
                results[i] = error
                active.remove(i)
                continue
            if samples[i].done():
                results[i] = samples[i].timing()
                active.remove(i)
    return results  # type: ignore[return-value]

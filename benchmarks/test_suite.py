"""The pytest-benchmark suite: every op and mode × every implementation, on CUDA when present.

``make bench`` or ``pytest benchmarks/ [--benchmark-json=FILE]``. Never part of
``make test`` (which runs ``pytest tests``). Cases: :data:`benchmarks.presets.SUITES`
(small shapes on CPU); implementations that cannot run a case here are skipped
with the reason. ``extra_info`` holds the case's minimal bytes (see
:mod:`benchmarks.costs`) and the effective GB/s at the median.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import costs
from benchmarks.cases import Case, make_inputs
from benchmarks.implementations import Implementation, Unsupported, implementations
from benchmarks.presets import SUITES
from benchmarks.workload import step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = SUITES[DEVICE.type]()
IMPLEMENTATIONS = implementations(DEVICE)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=lambda i: i.key)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_benchmark(benchmark, case: Case, impl: Implementation) -> None:
    """Time one implementation on one case (forward, or forward + backward)."""
    inputs = make_inputs(case, DEVICE)
    try:
        run = step(case, inputs, impl.build(case, inputs))
    except Unsupported as reason:
        pytest.skip(str(reason))

    def synchronized() -> None:
        run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.group = case.name
    benchmark.extra_info.update(implementation=impl.label, min_bytes=costs.min_bytes(case))
    benchmark.pedantic(synchronized, rounds=5, warmup_rounds=1)
    benchmark.extra_info["gbps_at_median"] = costs.min_bytes(case) / benchmark.stats.stats.median / 1e9

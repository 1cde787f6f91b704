"""Errors of an implementation's outputs against the float64 reference."""

from __future__ import annotations

from typing import NamedTuple, Optional

from .workload import Outputs


class Errors(NamedTuple):
    """Largest absolute difference from the float64 reference: forward outputs, and gradients (None in fwd mode)."""

    forward: float
    gradient: Optional[float]


def max_errors(outputs: Outputs, expected: Outputs, n_forward: int) -> Errors:
    """Max |out - ref| over the first ``n_forward`` outputs, then over the gradients after them.

    NaN anywhere gives NaN (never a pass).
    """
    if len(outputs) != len(expected):
        raise ValueError(f"{len(outputs)} outputs, the reference has {len(expected)}")
    diffs = [(o.detach().double() - e.detach().double()).abs().max().item() for o, e in zip(outputs, expected)]
    gradient = diffs[n_forward:]
    return Errors(_max(diffs[:n_forward]), _max(gradient) if gradient else None)


def _max(values: list[float]) -> float:
    return float("nan") if any(v != v for v in values) else max(values)

"""Overrides of the Triton kernels' launch knobs, for tuning them on a GPU (``benchmarks/tune.py``).

The defaults stay next to their kernels; each launch reads its knobs through
:func:`knob`, which returns the override when one is set, else the default. An
override applies to every dtype and shape. Two ways to set them:

- the environment variable ``GRPO_KERNELS_TRITON_TUNING``, read at import:
  ``name=value`` pairs separated by commas, e.g.
  ``fused_grpo_loss.programs_per_sm=2,token_logprobs.fwd.num_warps=8``;
- :func:`overrides`, a context manager (what the tuner uses in one process).

Names outside :data:`KNOBS`, and values that are not positive integers (powers
of two for block sizes and warps), raise ``ValueError``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Mapping

ENV = "GRPO_KERNELS_TRITON_TUNING"

# name -> what it sets. Block sizes and warps must be powers of two.
KNOBS: dict[str, str] = {
    "token_logprobs.fwd.max_block_v": "logits per loop step of the token_logprobs forward kernel (row kernel)",
    "token_logprobs.fwd.num_warps": "warps per program of the token_logprobs forward kernel",
    "token_logprobs.bwd.max_block_v": "logits per loop step of the row gradient kernel (token_logprobs backward, "
                                      "fused-linear tile gradient)",
    "token_logprobs.bwd.num_warps": "warps per program of the row gradient kernel",
    "fused_grpo_loss.max_block_v": "logits per loop step of the single-pass fused loss kernel",
    "fused_grpo_loss.num_warps": "warps per program of the single-pass fused loss kernel",
    "fused_grpo_loss.programs_per_sm": "programs per SM of the fused loss kernel's persistent grid",
    "linear.block_n": "tokens per tile of the fused-linear kernels",
    "linear.block_v": "vocabulary entries per tile of the fused-linear kernels",
    "linear.block_k": "hidden units per tl.dot step of the fused-linear kernels",
    "linear.num_warps": "warps per program of the fused-linear kernels",
    "linear.num_stages": "software-pipelining stages of the fused-linear kernels",
    "linear.programs_per_sm": "programs per SM the fused-linear vocabulary splits aim at",
    "linear.min_splits": "fewest vocabulary splits of the fused-linear grid",
}
_POWERS_OF_TWO = ("max_block_v", "num_warps", "block_n", "block_v", "block_k")


def _checked(name: str, value: object) -> int:
    if name not in KNOBS:
        raise ValueError(f"unknown Triton tuning knob {name!r}; known: {', '.join(KNOBS)}")
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            raise ValueError(f"Triton tuning knob {name} must be a positive integer, got {value!r}")
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Triton tuning knob {name} must be a positive integer, got {value!r}")
    if name.rsplit(".", 1)[1] in _POWERS_OF_TWO and value & (value - 1):
        raise ValueError(f"Triton tuning knob {name} must be a power of two, got {value}")
    return value


def parse(text: str) -> dict[str, int]:
    """``"name=value,name=value"`` (the format of ``GRPO_KERNELS_TRITON_TUNING``) as a checked dict."""
    parsed = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV}: expected name=value, got {item!r}")
        try:
            parsed[name.strip()] = _checked(name.strip(), value)
        except ValueError as error:
            raise ValueError(f"{ENV}: {error}") from None
    return parsed


def format_overrides(values: Mapping[str, int]) -> str:
    """The inverse of :func:`parse`: a value for ``GRPO_KERNELS_TRITON_TUNING``."""
    return ",".join(f"{name}={_checked(name, value)}" for name, value in values.items())


_active: dict[str, int] = parse(os.environ.get(ENV, ""))


def knob(name: str, default: int) -> int:
    """The value of knob ``name`` at this launch: its override if one is set, else ``default``."""
    return _active.get(name, default)


def active() -> dict[str, int]:
    """The overrides in force (a copy)."""
    return dict(_active)


@contextlib.contextmanager
def overrides(values: Mapping[str, int]) -> Iterator[None]:
    """Override knobs (on top of those in force) inside the block; restores the previous ones after."""
    checked = {name: _checked(name, value) for name, value in values.items()}
    saved = dict(_active)
    _active.update(checked)
    try:
        yield
    finally:
        _active.clear()
        _active.update(saved)

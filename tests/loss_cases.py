"""The loss types and option combinations the tests sweep, derived from the library's tables.

A new row of ``grpo_kernels.loss_table.LOSS_TYPE_TABLE`` enters every grid below
without a test edit; a combination the grids skip is one validation refuses.
"""

from __future__ import annotations

import inspect

from grpo_kernels.kernel_options import LOSS_DEFAULTS
from grpo_kernels.loss_table import (
    CLIPPED_LOSS_TYPES,
    LOSS_TYPE_TABLE,
    LOSS_TYPES,
    SCALE_OUT_LOSS_TYPES,
)
from grpo_kernels.validation import check_loss_options

__all__ = ["CLIPPED_LOSS_TYPES", "LOSS_TYPES", "SCALE_OUT_LOSS_TYPES", "TOKEN_RATIO_LOSS_TYPES",
           "OWN_WEIGHT_LOSS_TYPES", "applicable"]

# Loss types with a per-token ratio: every option of the main grids applies to them (sequence level included).
TOKEN_RATIO_LOSS_TYPES = tuple(name for name, row in LOSS_TYPE_TABLE.items() if row.token_ratio)
# Loss types that form their own sequence weights (no sequence-level ratio).
OWN_WEIGHT_LOSS_TYPES = tuple(name for name, row in LOSS_TYPE_TABLE.items() if not row.token_ratio)

# The scalar options validation checks together (its keyword arguments).
_SCALAR_OPTIONS = tuple(inspect.signature(check_loss_options).parameters)


def applicable(loss_type: str, options: dict, level: str = None) -> bool:
    """Whether validation accepts ``options`` (keyword options of ``grpo_loss``; tensors and unknown keys are
    ignored) with ``loss_type`` (and ``importance_sampling_level=level`` when given)."""
    o = {**LOSS_DEFAULTS, **options, "loss_type": loss_type}
    if level is not None:
        o["importance_sampling_level"] = level
    try:
        check_loss_options(**{name: o[name] for name in _SCALAR_OPTIONS})
    except ValueError:
        return False
    return True

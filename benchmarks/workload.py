"""What one measurement runs: an implementation's forward, plus its backward in fwd+bwd mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .cases import Case, Inputs

Outputs = tuple[Tensor, ...]


def _identity(grads: Outputs) -> Outputs:
    return grads


@dataclass
class Workload:
    """An implementation bound to one case's inputs.

    Attributes:
        forward: computes the canonical outputs (see :mod:`benchmarks.cases`).
        wrt: the tensors the backward differentiates (the inputs' ``wrt``, or
            the implementation's own copies of them, e.g. a padded layout).
        grad_view: maps the gradients w.r.t. ``wrt`` to the canonical
            gradients (e.g. drops the padding); a view, no copy.
    """

    forward: Callable[[], Outputs]
    wrt: Outputs
    grad_view: Callable[[Outputs], Outputs] = field(default=_identity)


def step(case: Case, inputs: Inputs, workload: Workload) -> Callable[[], Outputs]:
    """The timed function: forward, then (fwd+bwd mode) the gradients w.r.t. ``workload.wrt``.

    The backward uses :func:`torch.autograd.grad`, so repeated calls never
    accumulate into ``.grad``; it feeds ``inputs.output_grads`` to the
    differentiable outputs. Returns the canonical outputs then the gradients.
    """
    n = case.differentiable_outputs()

    def run() -> Outputs:
        outputs = workload.forward()
        if not case.backward:
            return outputs
        grads = torch.autograd.grad(outputs[:n], workload.wrt, grad_outputs=inputs.output_grads[:n])
        return outputs + workload.grad_view(grads)

    return run

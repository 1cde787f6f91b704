"""The implementations compared: our backends (through the public ops) and the peers.

Each :class:`Implementation` builds a :class:`~benchmarks.workload.Workload`
for a case, or raises :class:`Unsupported` (with the reason) when it cannot run
that case here: a backend not built, a peer not importable, an op or option
the peer lacks, a device it does not run on. The runner records those as
skipped; the pytest-benchmark suite skips them.

- ``ours-<backend>``: ``grpo_kernels.<op>(..., backend=<backend>)`` (the LM-head
  case: ``fused_linear_grpo_loss``) for every backend in
  :func:`grpo_kernels.available_backends` that runs on the device (Triton only
  on CUDA: the interpreter is no benchmark). ``ours-<backend>-inplace``
  with ``inplace_backward=True`` where the public ops take that keyword (kernel backends).
- ``torch-compile``: ``torch.compile`` (inductor) of ``grpo_kernels.reference``'s ops.
- ``trl-utils``: TRL's ``selective_log_softmax`` / ``selective_log_softmax_and_entropy``
  from ``trl.trainer.utils`` (TRL's Triton kernel on CUDA, eager torch elsewhere),
  then, for the losses, an eager loss (our reference ``grpo_loss``, checked
  against TRL's ``_compute_loss`` by the parity tests) as in TRL's ``_compute_loss``.
- ``trl-lm-head``: TRL's fused LM head (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``,
  what ``GRPOTrainer`` runs) + the eager loss; ``lm_head_grpo_loss`` only.
- ``liger`` / ``liger-inplace``: Liger-Kernel's logits-level GRPO loss
  (``liger_kernel.transformers.grpo_loss.triton_grpo_loss``), CUDA only.
- ``liger-chunked``: Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (hidden states ×
  LM-head weight → loss, chunked PyTorch, its loss math under ``torch.compile``;
  CPU and CUDA), ``lm_head_grpo_loss`` only. Its ``chunk_size`` counts sequences
  (default 1); here each chunk holds :data:`LIGER_CHUNK_TOKENS` tokens (the record's
  note states the chunk size). Where its semantics differ from TRL 1.16 (and
  ours) it refuses the case: ``luspo`` (Liger scales every token's loss by the
  sequence length, padded tokens included: older TRL; TRL 1.16 masks them) and
  entropy (it computes none). The other loss types agree with ours
  (tests/test_benchmarks.py checks the benchmarked case).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

import grpo_kernels
from grpo_kernels import reference
from grpo_kernels.linear import default_chunk_size

from .cases import Case, Inputs, make_inputs
from .workload import Outputs, Workload, step


class Unsupported(Exception):
    """The implementation cannot run this case here; the message says why."""


@dataclass(frozen=True)
class Implementation:
    """A named way of computing the cases.

    Attributes:
        key: short stable id (CSV column, ``--impls`` filter, pytest ids).
        label: what it really is, for tables and plots.
        build: binds it to a case's inputs; raises :class:`Unsupported`.
        detail: what it chooses for a case (e.g. a chunk size), for the results; None: nothing to say.
    """

    key: str
    label: str
    build: Callable[[Case, Inputs], Workload]
    detail: Optional[Callable[[Case], str]] = None


class OpSet(NamedTuple):
    """The ops with grpo_kernels' signatures (a backend, or compiled reference functions)."""

    token_logprobs: Callable[..., Any]
    group_advantages: Callable[..., Any]
    grpo_loss: Callable[..., Any]
    fused_grpo_loss: Callable[..., Any]
    fused_linear_grpo_loss: Callable[..., Any]


def library_op(case_op: str) -> str:
    """The grpo_kernels op a case op exercises (the LM-head case: ``fused_linear_grpo_loss``)."""
    return "fused_linear_grpo_loss" if case_op == "lm_head_grpo_loss" else case_op


def _logits(inputs: Inputs) -> Tensor:
    """The logits of a logits case, or of the LM-head case materialized (hidden @ weightᵀ), as eager code does."""
    return inputs.logits if inputs.logits is not None else inputs.hidden @ inputs.weight.T


def _forward(case: Case, inputs: Inputs, ops: OpSet) -> Callable[[], Outputs]:
    """The canonical forward of ``case`` computed with ``ops``."""
    if case.op == "token_logprobs":
        def run() -> Outputs:
            out = ops.token_logprobs(
                inputs.logits, inputs.token_ids, temperature=case.temperature, return_entropy=case.entropy
            )
            return tuple(out) if case.entropy else (out,)
    elif case.op == "group_advantages":
        def run() -> Outputs:
            return (ops.group_advantages(inputs.rewards, group_size=case.G),)
    elif case.op == "grpo_loss":
        def run() -> Outputs:
            out = ops.grpo_loss(
                inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.mask,
                ref_logprobs=inputs.ref_logprobs, **case.loss_options(),
            )
            return (out.loss,)
    else:
        fused, head = (
            (ops.fused_linear_grpo_loss, (inputs.hidden, inputs.weight)) if case.op == "lm_head_grpo_loss"
            else (ops.fused_grpo_loss, (inputs.logits,))
        )

        def run() -> Outputs:
            out = fused(
                *head, inputs.token_ids, inputs.old_logprobs, inputs.advantages, inputs.mask,
                temperature=case.temperature, return_entropy=case.entropy, ref_logprobs=inputs.ref_logprobs,
                **case.loss_options(),
            )
            return (out.loss, out.entropy) if case.entropy else (out.loss,)
    return run


# --------------------------------------------------------------------------- #
# ours
# --------------------------------------------------------------------------- #
def _inplace_keyword() -> bool:
    """Whether the public logits ops take ``inplace_backward``."""
    return all(
        "inplace_backward" in inspect.signature(op).parameters
        for op in (grpo_kernels.token_logprobs, grpo_kernels.fused_grpo_loss)
    )


def _backend_ops(backend: str, inplace: bool) -> OpSet:
    logits_options = dict(backend=backend, **({"inplace_backward": True} if inplace else {}))
    return OpSet(
        token_logprobs=functools.partial(grpo_kernels.token_logprobs, **logits_options),
        group_advantages=functools.partial(grpo_kernels.group_advantages, backend=backend),
        grpo_loss=functools.partial(grpo_kernels.grpo_loss, backend=backend),
        fused_grpo_loss=functools.partial(grpo_kernels.fused_grpo_loss, **logits_options),
        fused_linear_grpo_loss=functools.partial(grpo_kernels.fused_linear_grpo_loss, backend=backend),
    )


@functools.lru_cache(maxsize=None)
def _backend_refusal(backend: str, case_op: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` does not run the cases of ``case_op`` on ``device`` (None when it does), from a tiny call."""
    op = library_op(case_op)
    if backend not in grpo_kernels.available_backends(op):
        return f"backend {backend!r} has no {op} in this installation"
    if backend == "triton" and device.type != "cuda":
        return "Triton is benchmarked on CUDA only (the CPU interpreter is no benchmark)"
    tiny = Case(op=case_op, B=2, T=4, V=16, H=8, G=2, backward=case_op != "group_advantages")
    inputs = make_inputs(tiny, device)
    try:
        step(tiny, inputs, Workload(_forward(tiny, inputs, _backend_ops(backend, False)), inputs.wrt))()
    except grpo_kernels.BackendUnavailableError as error:
        return str(error)
    return None


def _ours(backend: str, inplace: bool, device: torch.device) -> Implementation:
    def build(case: Case, inputs: Inputs) -> Workload:
        refusal = _backend_refusal(backend, case.op, device)
        if refusal:
            raise Unsupported(refusal)
        if inplace:
            if case.op not in ("token_logprobs", "fused_grpo_loss") or not case.backward:
                raise Unsupported("in-place backward: forward + backward from logits only")
            # A private copy, a non-leaf as the LM head's output is in training (the ops refuse to overwrite a
            # leaf's values with its gradient; a view would change identity when overwritten). Every call
            # overwrites the copy, not the shared inputs; the first call's outputs are checked for accuracy.
            inputs = Inputs(**{**vars(inputs), "logits": inputs.logits.clone()})
        return Workload(_forward(case, inputs, _backend_ops(backend, inplace)), inputs.wrt)

    def detail(case: Case) -> str:
        if case.op != "lm_head_grpo_loss":
            return ""
        tokens = default_chunk_size(case.V, case.H, case.torch_dtype, device)
        return f"chunk_size={tokens} tokens (grpo_kernels.linear.default_chunk_size)"

    suffix = " inplace_backward=True" if inplace else ""
    return Implementation(f"ours-{backend}" + ("-inplace" if inplace else ""),
                          f"grpo_kernels backend={backend}{suffix}", build, detail)


# --------------------------------------------------------------------------- #
# torch.compile of the reference
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=1)
def _compiled_reference() -> OpSet:
    """The reference ops under ``torch.compile`` (inductor), compiled once per process."""
    return OpSet(*(torch.compile(getattr(reference, name)) for name in OpSet._fields))


def _torch_compile() -> Implementation:
    def build(case: Case, inputs: Inputs) -> Workload:
        return Workload(_forward(case, inputs, _compiled_reference()), inputs.wrt)

    return Implementation("torch-compile", "torch.compile (inductor) of grpo_kernels.reference", build)


# --------------------------------------------------------------------------- #
# TRL
# --------------------------------------------------------------------------- #
def _import(module: str, package: str) -> ModuleType:
    """``module``, or :class:`Unsupported` when ``package`` (an optional peer) is not importable."""
    try:
        return __import__(module, fromlist=["_"])
    except Exception as error:  # a peer's import can fail on any of its own dependencies
        raise Unsupported(f"{package} not importable: {type(error).__name__}: {error}") from None


def _eager_loss(case: Case, inputs: Inputs, logp: Tensor, entropy: Optional[Tensor]) -> Outputs:
    """The per-token loss as TRL's ``_compute_loss`` does it, eagerly (reference ``grpo_loss``)."""
    out = reference.grpo_loss(
        logp, inputs.old_logprobs, inputs.advantages, inputs.mask, ref_logprobs=inputs.ref_logprobs,
        **case.loss_options(),
    )
    if entropy is None:
        return (out.loss,)
    return out.loss, reference.masked_mean_entropy(entropy, inputs.mask)


def _trl_utils(device: torch.device) -> Implementation:
    def build(case: Case, inputs: Inputs) -> Workload:
        if case.op not in ("token_logprobs", "fused_grpo_loss", "lm_head_grpo_loss"):
            raise Unsupported("TRL has no separate function for this op")
        utils = _import("trl.trainer.utils", "trl")
        loss = case.op != "token_logprobs"

        def forward() -> Outputs:
            logits = _logits(inputs)
            if not case.entropy:
                logp = utils.selective_log_softmax(logits, inputs.token_ids, temperature=case.temperature)
                return _eager_loss(case, inputs, logp, None) if loss else (logp,)
            logp, entropy = utils.selective_log_softmax_and_entropy(
                logits, inputs.token_ids, entropy_requires_grad=not loss, temperature=case.temperature
            )
            return _eager_loss(case, inputs, logp, entropy) if loss else (logp, entropy)

        return Workload(forward, inputs.wrt)

    path = "Triton on CUDA" if device.type == "cuda" else f"eager on {device.type.upper()}"
    return Implementation("trl-utils", f"TRL selective_log_softmax[_and_entropy] ({path}) + eager loss", build)


def _trl_lm_head(device: torch.device) -> Implementation:
    def build(case: Case, inputs: Inputs) -> Workload:
        if case.op != "lm_head_grpo_loss":
            raise Unsupported("TRL's fused LM head takes hidden states and the LM-head weight")
        chunked = _import("trl.kernels.chunked_logprob", "trl")
        chunk_size = _import("trl.trainer.utils", "trl")._CHUNKED_LOGPROB_CHUNK_SIZE  # GRPOTrainer's own
        outputs = ("entropy",) if case.entropy else ()

        def forward() -> Outputs:
            logp, entropy, *_ = chunked.ChunkedLogProbFunction.apply(
                inputs.hidden.reshape(case.N, case.H), inputs.weight, None, inputs.token_ids.reshape(case.N),
                case.temperature, chunk_size, None, 1.0, outputs,
            )
            shaped = None if entropy is None else entropy.view(case.B, case.T).detach()
            return _eager_loss(case, inputs, logp.view(case.B, case.T), shaped)

        return Workload(forward, inputs.wrt)

    path = "Triton on CUDA" if device.type == "cuda" else f"torch ops on {device.type.upper()}"
    return Implementation("trl-lm-head", f"TRL ChunkedLogProbFunction fused LM head ({path}) + eager loss", build)


# --------------------------------------------------------------------------- #
# Liger-Kernel
# --------------------------------------------------------------------------- #
def _liger(inplace: bool, device: torch.device) -> Implementation:
    def build(case: Case, inputs: Inputs) -> Workload:
        if case.op != "fused_grpo_loss":
            raise Unsupported("Liger's GRPO loss takes logits")
        if device.type != "cuda":
            raise Unsupported("Liger's Triton kernels run on CUDA only")
        if case.entropy:
            raise Unsupported("Liger's GRPO loss computes no entropy")
        liger = _import("liger_kernel.transformers.grpo_loss", "liger_kernel")
        # Liger takes [B, T+1, V] logits (the last position unused): lay them out so, outside the timing.
        padded = torch.cat([inputs.logits.detach(), inputs.logits.detach()[:, -1:]], dim=1).requires_grad_()
        options = case.loss_options()

        def forward() -> Outputs:
            loss, _ = liger.triton_grpo_loss(
                padded, inputs.old_logprobs, inputs.ref_logprobs, inputs.token_ids, inputs.advantages,
                inputs.mask, temperature=case.temperature, beta=options["beta"],
                eps_low=options["epsilon_low"], eps_high=options["epsilon_high"], inplace=inplace,
                loss_type=options["loss_type"], reduce=True,
            )
            return (loss,)

        return Workload(forward, (padded,), grad_view=lambda grads: (grads[0][:, :-1],))

    suffix = " inplace=True" if inplace else ""
    return Implementation("liger" + ("-inplace" if inplace else ""),
                          f"Liger-Kernel triton_grpo_loss (Triton){suffix}", build)


LIGER_CHUNK_TOKENS = 2048  # Liger's own row tile in its chunked log-prob (a chunk of fewer tokens fills it less)
LIGER_DIFFERENT_LOSSES = {
    "luspo": "Liger's luspo scales every token's loss by the sequence length with padded tokens included "
             "(older TRL); TRL 1.16 and grpo_kernels mask them",
}


def liger_chunk_size(case: Case) -> int:
    """The sequences per chunk given to ``LigerFusedLinearGRPOLoss``: :data:`LIGER_CHUNK_TOKENS` tokens' worth."""
    return max(1, LIGER_CHUNK_TOKENS // case.T)


def liger_chunked(compiled: bool = True) -> Implementation:
    """Liger's ``LigerFusedLinearGRPOLoss`` on the LM-head cases (``compiled``: its loss math under torch.compile,
    Liger's default)."""

    def build(case: Case, inputs: Inputs) -> Workload:
        if case.op != "lm_head_grpo_loss":
            raise Unsupported("LigerFusedLinearGRPOLoss takes hidden states and the LM-head weight")
        if case.entropy:
            raise Unsupported("LigerFusedLinearGRPOLoss computes no entropy")
        if case.loss_type in LIGER_DIFFERENT_LOSSES:
            raise Unsupported(LIGER_DIFFERENT_LOSSES[case.loss_type])
        chunked = _import("liger_kernel.chunked_loss", "liger_kernel")
        options = case.loss_options()
        loss_fn = chunked.LigerFusedLinearGRPOLoss(
            beta=options["beta"], compiled=compiled, use_ref_model=inputs.ref_logprobs is not None,
            chunk_size=liger_chunk_size(case), epsilon_low=options["epsilon_low"],
            epsilon_high=options["epsilon_high"], loss_type=options["loss_type"], max_completion_length=case.T,
            temperature=case.temperature,
        )

        def forward() -> Outputs:
            loss, _ = loss_fn(
                inputs.hidden, inputs.weight, inputs.token_ids, inputs.mask, inputs.advantages,
                ref_per_token_logps=inputs.ref_logprobs, old_per_token_logps=inputs.old_logprobs,
            )
            return (loss,)

        return Workload(forward, inputs.wrt)

    def detail(case: Case) -> str:
        size = liger_chunk_size(case)
        return f"chunk_size={size} sequences ({size * case.T} tokens)"

    compile_note = ", loss math under torch.compile" if compiled else ""
    return Implementation(
        "liger-chunked",
        f"Liger-Kernel LigerFusedLinearGRPOLoss (chunked PyTorch{compile_note}; "
        f"chunks of {LIGER_CHUNK_TOKENS} tokens)", build, detail,
    )


def reference_outputs(case: Case, inputs: Inputs) -> Outputs:
    """The canonical outputs (and gradients) of ``case`` by the reference in float64: what accuracy is judged by."""
    exact = inputs.upcast()
    return step(case, exact, Workload(_forward(case, exact, _backend_ops("reference", False)), exact.wrt))()


def implementations(device: torch.device) -> list[Implementation]:
    """Every implementation known, labelled for ``device`` (each may still refuse a case)."""
    backends = grpo_kernels.available_backends()
    ours = [_ours(b, False, device) for b in backends]
    if _inplace_keyword():  # the reference ignores the keyword: an in-place variant of it would be a duplicate
        ours += [_ours(b, True, device) for b in backends if b != "reference"]
    return ours + [
        _torch_compile(), _trl_utils(device), _trl_lm_head(device), _liger(False, device), _liger(True, device),
        liger_chunked(),
    ]

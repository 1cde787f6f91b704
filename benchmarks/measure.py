"""Measuring one case with every implementation: time, bandwidth, roofline share, memory, error."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import costs, limits, memory
from .accuracy import max_errors
from .cases import DTYPES, LOGITS_OPS, Case, make_inputs
from .implementations import Implementation, Unsupported, reference_outputs
from .timing import Timing, time_interleaved, time_ms
from .workload import Outputs, step


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time each implementation (see :func:`benchmarks.timing.time_ms`; on the CPU the implementations
    of a case are timed in alternating bursts, :func:`benchmarks.timing.time_interleaved`)."""

    min_repeats: int = 3
    max_repeats: int = 10000  # a sub-millisecond op gets ~1 s of calls too: a short burst of noise moves no median
    min_total_s: float = 1.0


@dataclass
class Record:
    """One implementation on one case: the row of the CSV and of the tables.

    ``status`` is ``ok``, ``skipped`` (the implementation does not run this
    case here; ``note`` says why), ``oom`` or ``error`` (``note`` holds it).
    Bandwidth: ``min_bytes`` (:mod:`benchmarks.costs`) over the median time;
    ``pct_copy``: that bandwidth over the measured copy bandwidth;
    ``pct_roofline``: the roofline floor over the median time.
    ``peak_mem_mb``: MiB above the inputs (:mod:`benchmarks.memory`).
    ``max_err`` / ``max_err_grad``: max |out - float64 reference| (None where the
    float64 reference is too large to run, see :data:`REFERENCE_MAX_ELEMENTS`).
    The fused-linear (LM-head) cases: ``matmul_gflops``, the rate of ``torch.mm`` of
    [N, H] × [H, V] measured in the same run in ``matmul_dtype``, the fastest exact
    path: on a GPU the faster of the case's dtype and float32; on the CPU float32
    (bfloat16/float16 operands convert to float32 exactly, while torch's CPU
    bfloat16 ``mm`` rounds its product to bfloat16: about 1e-2 of log-prob error,
    not the op's result, however fast AVX512-BF16 or AMX make it);
    on the CPU timed in the same alternating bursts as the case's implementations (a shared machine's
    spells move the floor and the times alike); ``matmul_floor_ms``, their matmul FLOPs (6·N·V·H fwd+bwd) at
    that rate;
    ``pct_matmul_floor``, that floor over the median time. ``note`` of a
    measured record: what the implementation chose for the case (e.g. a chunk size).
    """

    case: str
    op: str
    mode: str
    B: int
    T: int
    N: int
    V: int
    H: int
    dtype: str
    entropy: bool
    loss_type: str
    beta: float
    impl: str
    label: str
    status: str
    note: str = ""
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    repeats: Optional[int] = None
    min_bytes: int = 0
    min_flops: int = 0
    gbps: Optional[float] = None
    pct_copy: Optional[float] = None
    floor_ms: Optional[float] = None
    pct_roofline: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    max_err: Optional[float] = None
    max_err_grad: Optional[float] = None
    matmul_dtype: Optional[str] = None
    matmul_gflops: Optional[float] = None
    matmul_floor_ms: Optional[float] = None
    pct_matmul_floor: Optional[float] = None

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


# The float64 reference of a logits case on CPU holds several [N, V] float64 tensors: past this many logits
# (1 GiB of them in float64) it is not run (it would take most of a small machine's memory), and max_err is None.
REFERENCE_MAX_ELEMENTS = 1 << 27


def _expected(case: Case, inputs, device: torch.device) -> Optional[Outputs]:
    """The float64 reference outputs, or None when they do not fit in memory."""
    if device.type == "cpu" and case.op in LOGITS_OPS and case.N * case.V > REFERENCE_MAX_ELEMENTS:
        return None
    try:
        return tuple(t.detach() for t in reference_outputs(case, inputs))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def measure_case(
    case: Case, implementations: list[Implementation], device: torch.device, policy: TimingPolicy
) -> list[Record]:
    """Every implementation on ``case`` (same inputs, drawn once), one :class:`Record` each."""
    inputs = make_inputs(case, device)
    base = dict(
        case=case.name, op=case.op, mode=case.mode, B=case.B, T=case.T, N=case.N, V=case.V, H=case.H,
        dtype=case.dtype, entropy=case.entropy, loss_type=case.loss_type, beta=case.beta,
        min_bytes=costs.min_bytes(case), min_flops=costs.min_flops(case),
    )
    flops_rate = math.inf
    floor_mm = None  # on the CPU: the LM head's matmul (float32), timed with the implementations below
    if case.op == "lm_head_grpo_loss" and device.type == "cpu":
        base["matmul_dtype"] = "float32"  # the fastest exact dtype there
        floor_mm = limits.mm_call(device, torch.float32, case.N, case.H, case.V)  # (each burst warms it up)
    elif case.op == "lm_head_grpo_loss":  # the LM head's matmul at the case's shapes, in the fastest exact dtype
        rates = {name: limits.mm_flops_per_s(device, DTYPES[name], case.N, case.H, case.V)
                 for name in dict.fromkeys((case.dtype, "float32"))}
        base["matmul_dtype"] = max(rates, key=rates.get)
        flops_rate = rates[base["matmul_dtype"]]
        base["matmul_gflops"] = flops_rate / 1e9
        base["matmul_floor_ms"] = 1e3 * base["min_flops"] / flops_rate
    elif base["min_flops"]:
        flops_rate = limits.matmul_flops_per_s(device, case.torch_dtype)
    floor_s = costs.floor_seconds(case, limits.copy_bytes_per_s(device), flops_rate)
    expected: Optional[Outputs] = None
    reference_tried = False
    records = []
    waiting = []  # on the CPU: (record, impl, fn, peak) of the implementations timed together at the end

    def finish(record: Record, impl: Implementation, timing: Timing, peak: Optional[int]) -> None:
        record.median_ms, record.min_ms, record.repeats = timing.median_ms, timing.min_ms, timing.repeats
        record.gbps = record.min_bytes / timing.median_ms / 1e6
        record.pct_copy = 100 * record.gbps * 1e9 / limits.copy_bytes_per_s(device)
        record.floor_ms = 1e3 * floor_s
        record.pct_roofline = 100 * record.floor_ms / timing.median_ms
        record.peak_mem_mb = None if peak is None else peak / 2**20
        if record.matmul_floor_ms is not None:
            record.pct_matmul_floor = 100 * record.matmul_floor_ms / timing.median_ms
        record.note = impl.detail(case) if impl.detail else ""

    def failed(record: Record, error: Exception) -> None:
        if isinstance(error, Unsupported):
            record.status, record.note = "skipped", str(error)
        elif isinstance(error, torch.OutOfMemoryError):
            record.status, record.note = "oom", str(error).splitlines()[0]
        else:  # a peer failing on a case is a result, not the end of the run
            record.status, record.note = "error", f"{type(error).__name__}: {error}".splitlines()[0]

    repeats = dict(min_repeats=policy.min_repeats, max_repeats=policy.max_repeats, min_total_s=policy.min_total_s)
    for impl in implementations:
        record = Record(**base, impl=impl.key, label=impl.label, status="ok")
        try:
            fn = step(case, inputs, impl.build(case, inputs))
            outputs = fn()  # the first call: compilation and warm-up, then the accuracy check
            if not reference_tried:  # once per case, after the first implementation that runs it
                expected, reference_tried = _expected(case, inputs, device), True
            if expected is not None:
                n_forward = len(outputs) - (len(inputs.wrt) if case.backward else 0)
                record.max_err, record.max_err_grad = max_errors(outputs, expected, n_forward)
            del outputs
            peak = memory.peak_bytes_above(fn, device)
            if device.type == "cpu":  # a shared machine: timed in alternating bursts with the others, below
                waiting.append((record, impl, fn, peak))
            else:  # a GPU of its own, timed by events; one implementation's memory at a time
                finish(record, impl, time_ms(fn, device, warmup=0, **repeats), peak)
        except Exception as error:  # noqa: BLE001 (Unsupported, out of memory, a peer's failure: its record)
            failed(record, error)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        records.append(record)
    timings = time_interleaved([fn for _, _, fn, _ in waiting] + ([floor_mm] if floor_mm else []), device,
                               **repeats)
    if floor_mm is not None:  # the floor from the same spells of the machine as the implementations' times
        mm_timing = timings.pop()
        if isinstance(mm_timing, Exception):
            raise mm_timing
        flops_rate = limits.remember_mm_rate(device, torch.float32, case.N, case.H, case.V, mm_timing.median_ms)
        floor_s = costs.floor_seconds(case, limits.copy_bytes_per_s(device), flops_rate)
        for record in records:
            record.matmul_gflops = flops_rate / 1e9
            record.matmul_floor_ms = 1e3 * base["min_flops"] / flops_rate
    for (record, impl, _, peak), timing in zip(waiting, timings):
        if isinstance(timing, Exception):
            failed(record, timing)
        else:
            finish(record, impl, timing, peak)
    return records

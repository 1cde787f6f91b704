"""On-device validation of the kernel backends, with its verdicts cached on disk.

No GPU runs in this project's CI, so a kernel backend (``triton``, ``cuda``) is
checked on the user's own device before ``"auto"`` uses it there: the first
time a process asks ``"auto"`` for an op on such a device,
:func:`backend_usable` runs :func:`validate` (the backend's op against the
reference computed on the same device in float64, on the cases of
:func:`cases`) and stores the verdict in a JSON file keyed by the device and
the versions (:func:`environment`), so later processes read it instead.
(:func:`backend_usable` is installed as :mod:`grpo_kernels.backends`' device check by the package's
``__init__``: this module runs the backends, so it imports them and not the other way round.)

The cases: every op in bfloat16 and float32; a small case with edge rows
(−inf logits, ignored ids, a fully masked row, a vocabulary that is no multiple of a block) and a large one
(V = 151936, more rows than twice the device's multiprocessor count);
token- and sequence-level importance sampling; in place and not; forward
values and gradients. (Garbage at masked positions is left to the test suite.)

Cache: ``$GRPO_KERNELS_CACHE_DIR`` (``off`` disables it), else
``$XDG_CACHE_HOME/grpo_kernels``, else ``~/.cache/grpo_kernels``; one file
per (backend, op, environment), written atomically (a temporary file, then
``os.replace``) so that processes sharing a node never read half a file; a
file that does not parse or names another environment is ignored and
rewritten.

Validation runs eagerly, with gradients on, autocast off, outside any
inference mode and with its own random generator (the caller's random state
is untouched). Inside a ``torch.compile`` trace it runs at trace time on real
tensors (the backend choice is a constant of the graph). It cannot run while a
CUDA graph is being captured: :func:`backend_usable` then answers from the
cache only, and otherwise says no for that call; :func:`prepare` validates
before a capture.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from . import backends, reference
from ._extension import extension_info
from ._version import __version__
from .kernel_options import LOSS_DEFAULTS

CACHE_DIR_VARIABLE = "GRPO_KERNELS_CACHE_DIR"
CACHE_OFF = ("off", "0", "none", "false")
CACHE_FORMAT = 1  # bump when the file layout or the cases change: older verdicts are then ignored
REPORT_TO = "the grpo_kernels maintainers (an issue on the project's tracker)"

LARGE_VOCAB = 151936  # Qwen2/3's vocabulary

# Error allowed per input dtype, as ``|actual − expected| <= atol + rtol·|expected|`` per entry: for forward values
# (computed in float32 from the rounded inputs) ``atol`` is scaled by max(1, the tensor's largest magnitude); for
# gradients by the tensor's largest magnitude (their entries are ~1/V; d hidden and d weight are float32 sums over
# V or the tokens, whose rounding grows with the length). A bfloat16 gradient is rounded once (2^-8 relative),
# the rounding of a value next to a tie can go either way (2^-7), and a sum of separately rounded terms (the loss
# gradient formed in the forward plus an entropy bonus's in the backward) is off by a rounding of its largest
# term (2^-8 of the largest entry); the float32 cases hold the kernels to the fine print.
@dataclass(frozen=True)
class Tolerance:
    value_atol: float
    value_rtol: float
    grad_atol: float
    grad_rtol: float


TOLERANCES = {
    torch.float64: Tolerance(1e-10, 1e-10, 1e-10, 1e-10),
    torch.float32: Tolerance(2e-5, 2e-5, 2e-5, 1e-4),
    torch.bfloat16: Tolerance(2e-5, 2e-5, 2.0**-8, 2.0**-7),
    torch.float16: Tolerance(2e-5, 2e-5, 2.0**-11, 2.0**-10),
}

DTYPES = (torch.bfloat16, torch.float32)


class ValidationWarning(UserWarning):
    """A kernel backend failed its on-device check (or could not be checked); ``auto`` uses another backend."""


# --------------------------------------------------------------------------- #
# environment and cache
# --------------------------------------------------------------------------- #
def package_version(name: str) -> Optional[str]:
    """``name.__version__`` of an installed package (None when absent)."""
    try:
        module = __import__(name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


_NOT_KERNEL_SETTINGS = ("GRPO_KERNELS_CACHE_DIR", "GRPO_KERNELS_BACKEND", "GRPO_KERNELS_CHECK_VALUES")


def extension_facts() -> dict:
    """:func:`grpo_kernels.extension_info`, or the error that reading it raised."""
    try:
        return extension_info()
    except Exception as exc:  # a stale build lacking an entry point: part of the key, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"}


def environment(device: torch.device) -> dict:
    """What a verdict depends on: the device model and the software versions (no device index, no host name)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        name, capability, units = props.name, f"{props.major}.{props.minor}", props.multi_processor_count
    else:
        name, capability, units = platform.processor() or platform.machine(), None, torch.get_num_threads()
    return {
        "format": CACHE_FORMAT,
        "device_type": device.type,
        "device_name": name,
        "compute_capability": capability,
        "parallel_units": units,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "grpo_kernels": __version__,
        "extension": extension_facts(),
        # settings that change what the kernels run (e.g. the Triton tuning), not where verdicts go or who is used
        "settings": {k: v for k, v in sorted(os.environ.items())
                     if k.startswith("GRPO_KERNELS_") and k not in _NOT_KERNEL_SETTINGS},
    }


def cache_dir() -> Optional[Path]:
    """The verdict folder, or None when caching is off (``GRPO_KERNELS_CACHE_DIR=off``)."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured is not None:
        configured = configured.strip()
        return None if configured.lower() in CACHE_OFF or not configured else Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "grpo_kernels"


def cache_path(backend: str, op: str, env: dict) -> Optional[Path]:
    folder = cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{backend}-{op}-{env['device_type']}-{digest}.json"


def read_verdict(backend: str, op: str, env: dict) -> Optional[Verdict]:
    """The cached verdict, or None (no cache, no file, a file that does not parse or names another environment)."""
    path = cache_path(backend, op, env)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        if data["environment"] != env or data["backend"] != backend or data["op"] != op:
            return None
        return Verdict.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_verdict(verdict: Verdict) -> Optional[Path]:
    """Store ``verdict`` atomically (readers see the old file or the new one, never part); None if not stored."""
    path = cache_path(verdict.backend, verdict.op, verdict.environment)
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(verdict.to_dict(), f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        return None  # a read-only home: validate again next time rather than fail
    return path


# --------------------------------------------------------------------------- #
# verdicts
# --------------------------------------------------------------------------- #
@dataclass
class CaseResult:
    """One case of one op: its worst output or gradient (largest error in units of the error allowed there, which
    passes up to 1), that tensor's largest absolute error, and the exception if the backend raised."""

    case: str
    dtype: str
    max_error: float  # max |actual − expected| of the worst tensor
    ratio: float  # max |actual − expected| / (atol + rtol·|expected|) of the worst tensor: passes <= 1
    worst: str
    passed: bool
    error: Optional[str] = None
    seconds: float = 0.0


@dataclass
class Verdict:
    backend: str
    op: str
    device: str
    passed: bool
    environment: dict
    cases: list = field(default_factory=list)
    seconds: float = 0.0
    created: float = 0.0
    # False when the check could not be run to its end for a reason that is not the backend's (the device out of
    # memory, the reference failing): such a verdict is not cached
    conclusive: bool = True

    def failures(self) -> list:
        return [c for c in self.cases if not c.passed]

    def summary(self, dtype: Optional[str] = None) -> str:
        """The first failing case (of ``dtype``) in words (empty if none failed)."""
        failures = [c for c in self.failures() if dtype is None or c.dtype == dtype]
        if not failures:
            return ""
        c = failures[0]
        what = c.error if c.error else (f"{c.worst}: max error {c.max_error:.3g}, {c.ratio:.3g} times the error "
                                        f"allowed")
        more = f" (and {len(failures) - 1} more failing case(s))" if len(failures) > 1 else ""
        return f"{c.dtype}, case '{c.case}': {what}{more}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Verdict:
        cases = [CaseResult(**c) for c in data["cases"]]
        return cls(**{**data, "cases": cases})


# --------------------------------------------------------------------------- #
# cases
# --------------------------------------------------------------------------- #
@dataclass
class Case:
    """A call of ``op``: positional tensors ``args``, keyword ``options`` (tensors among them), the positions of
    the differentiable inputs, the names of the differentiable outputs."""

    op: str
    name: str
    dtype: torch.dtype
    args: tuple
    options: dict
    grad_args: tuple = ()
    grad_outputs: tuple = ()


@dataclass(frozen=True)
class Sizes:
    """Shapes of the cases: a small one with edge rows and a large-vocabulary one (``large_rows`` 0: none)."""

    rows: int
    vocab: int
    hidden: int
    chunk: int
    large_rows: int
    large_vocab: int


def sizes(backend: str, device: torch.device, large: Optional[bool] = None) -> Sizes:
    """The shapes for ``backend`` on ``device``: under the Triton interpreter small ones only (it is slow); else
    a large-vocabulary case with more rows than twice the parallel units (multiprocessors, or CPU threads)."""
    interpreted = backend == "triton" and device.type == "cpu"
    if large is None:
        large = not interpreted
    if interpreted:
        small = Sizes(rows=6, vocab=67, hidden=16, chunk=4, large_rows=0, large_vocab=0)
    else:
        small = Sizes(rows=9, vocab=4099, hidden=64, chunk=5, large_rows=0, large_vocab=0)
    if not large:
        return small
    units = environment(device)["parallel_units"] or 1
    return Sizes(**{**asdict(small), "large_rows": 2 * units + 7, "large_vocab": LARGE_VOCAB})


class _Maker:
    """Random inputs from a generator of its own (the caller's random state is untouched), drawn on ``device``
    (a GPU draws the large cases itself)."""

    def __init__(self, device: torch.device, seed: int):
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def randn(self, *shape, dtype=torch.float32, scale=1.0) -> Tensor:
        x = torch.randn(*shape, generator=self.gen, dtype=torch.float64, device=self.device)
        return (scale * x).to(dtype)

    def rand(self, *shape) -> Tensor:
        return torch.rand(*shape, generator=self.gen, dtype=torch.float64, device=self.device).to(torch.float32)

    def ids(self, high: int, *shape) -> Tensor:
        return torch.randint(0, high, shape, generator=self.gen, device=self.device)


def _edge_logits(m: _Maker, rows: int, vocab: int, dtype: torch.dtype, ids: Tensor) -> Tensor:
    """Logits with a row partly at −inf (not at its sampled id), a dominant logit, a wide spread."""
    x = m.randn(rows, vocab, scale=3.0)
    x[0, : vocab // 3] = float("-inf")
    x[0, ids.view(-1)[0]] = 0.5
    if rows > 1:
        x[1, ids.view(-1)[1]] = 40.0
    return x.to(dtype)


def _loss_inputs(m: _Maker, logp: Tensor, edge: bool):
    """old_logprobs, ref_logprobs (the policy's log-probs ``logp [B, T]`` plus noise, as in training: ratios on
    both sides of the clip range), advantages, mask; with ``edge``: a fully masked row."""
    B, T = logp.shape
    logp = logp.to(torch.float32)
    old = logp + 0.15 * m.randn(B, T)
    ref = logp + 0.15 * m.randn(B, T)
    adv = m.randn(B)
    mask = m.rand(B, T) > 0.25
    if edge:
        mask[-1] = False
    return old, ref, adv, mask


def _policy_logp(logits: Tensor, ids: Tensor, temperature: Union[float, Tensor]) -> Tensor:
    return reference.token_logprobs(logits.detach().double(), ids, temperature=temperature)


def _ids(m: _Maker, vocab: int, B: int, T: int, edge: bool) -> Tensor:
    ids = m.ids(vocab, B, T)
    if edge:
        ids[0, -1] = -100
    ids[0, 0] = max(ids[0, 0].item(), vocab // 3)  # not in the −inf span of the edge row
    return ids


def _rows_as(B_T: int) -> tuple[int, int]:
    B = max(1, min(8, B_T))
    return B, -(-B_T // B)


def _loss_options(level: str, **extra) -> dict:
    return dict(LOSS_DEFAULTS, beta=0.04, epsilon_high=0.28, importance_sampling_level=level, **extra)


def cases(op: str, device: torch.device, size: Sizes, dtypes=DTYPES) -> Iterator[Case]:
    """The validation cases of ``op`` on ``device`` (the same for every backend)."""
    for dtype in dtypes:
        m = _Maker(device, seed=zlib.crc32(f"{op} {dtype}".encode()))
        shapes = [("edge rows", size.rows, size.vocab, True)]
        if size.large_rows:
            shapes.append((f"V={size.large_vocab}", size.large_rows, size.large_vocab, False))
        for label, rows, vocab, edge in shapes:
            yield from _OP_CASES[op](m, label, rows, vocab, edge, dtype, size)


def timing_case(op: str, device: torch.device, size: Sizes, dtype: torch.dtype) -> Case:
    """One case of ``op`` without edge rows at ``size.rows`` × ``size.vocab`` (token level, not in place), for
    timing."""
    m = _Maker(device, seed=zlib.crc32(f"timing {op} {dtype}".encode()))
    return next(iter(_OP_CASES[op](m, f"{size.rows} rows, V={size.vocab}", size.rows, size.vocab, False, dtype,
                                   size)))


def _token_logprobs_cases(m, label, rows, vocab, edge, dtype, size):
    ids = _ids(m, vocab, 1, rows, edge).view(-1)
    logits = _edge_logits(m, rows, vocab, dtype, ids) if edge else m.randn(rows, vocab, dtype=dtype, scale=3.0)
    # the edge cases: a temperature per row (0.1 to 10: the kernels' per-row path)
    temperature = _row_temperatures(m, rows) if edge else 0.7
    for inplace in (False, True):
        name = f"{label}, {'in place' if inplace else 'not in place'}"
        options = dict(temperature=temperature, ignore_index=-100, return_entropy=True, inplace_backward=inplace)
        yield Case("token_logprobs", name, dtype, (logits, ids), options, grad_args=(0,), grad_outputs=(0, 1))


def _row_temperatures(m, *shape) -> Tensor:
    """Temperatures from 0.1 to 10 (log-uniform), one per row or sequence."""
    return torch.exp(math.log(0.1) + math.log(100.0) * m.rand(*shape))


def _group_advantages_cases(m, label, rows, vocab, edge, dtype, size):
    G = 4
    B = G * max(2, rows)
    rewards = m.randn(B).to(dtype)
    if edge:
        rewards[1] = float("nan")
        rewards[G:2 * G] = 1.0  # a constant group: std 0
    yield Case("group_advantages", f"{label}, group_size", dtype, (rewards,),
               dict(group_size=G, group_ids=None, scale="group", estimator="grpo", eps=1e-4, reward_weights=None,
                    multi_objective="sum_then_normalize", return_stats=True))
    gids = m.ids(B // G + 1, B) * 7
    yield Case("group_advantages", f"{label}, group_ids rloo", dtype, (rewards,),
               dict(group_size=None, group_ids=gids, scale="group", estimator="rloo", eps=1e-4, reward_weights=None,
                    multi_objective="sum_then_normalize", return_stats=True))


def _grpo_loss_cases(m, label, rows, vocab, edge, dtype, size):
    B, T = (rows, 33) if edge else (rows, 512)
    logprobs = (-3 * m.rand(B, T)).to(dtype)
    old, ref, adv, mask = _loss_inputs(m, logprobs, edge)
    for level in ("token", "sequence"):
        yield Case("grpo_loss", f"{label}, {level} level", dtype, (logprobs, old, adv, mask),
                   _loss_options(level, ref_logprobs=ref), grad_args=(0,), grad_outputs=("loss",))


def _fused_grpo_loss_cases(m, label, rows, vocab, edge, dtype, size):
    B, T = _rows_as(rows)
    ids = _ids(m, vocab, B, T, edge)
    logits = _edge_logits(m, B * T, vocab, dtype, ids) if edge else m.randn(B * T, vocab, dtype=dtype, scale=3.0)
    logits = logits.view(B, T, vocab)
    # the old log-probs at the loss's temperatures: ratios near 1 (a ratio past float32's range would make the
    # float64 reference's loss finite where the float32 kernels' is inf)
    temperature = _row_temperatures(m, B) if edge else 0.8
    old, ref, adv, mask = _loss_inputs(m, _policy_logp(logits, ids, temperature), edge)
    for level in ("token", "sequence"):
        for inplace in (False, True):
            name = f"{label}, {level} level, {'in place' if inplace else 'not in place'}"
            options = dict(temperature=temperature, ignore_index=-100,
                           return_entropy=True, inplace_backward=inplace, **_loss_options(level, ref_logprobs=ref))
            # in place, the logits hold the gradient: an entropy bonus cannot be differentiated then
            yield Case("fused_grpo_loss", name, dtype, (logits, ids, old, adv, mask), options, grad_args=(0,),
                       grad_outputs=("loss",) if inplace else ("loss", "entropy"))


def _head(m, rows, vocab, dtype, size, edge):
    H = size.hidden
    hidden = m.randn(rows, H, dtype=dtype)
    weight = m.randn(vocab, H, dtype=dtype, scale=H**-0.5 * 2)
    bias = m.randn(vocab, dtype=dtype, scale=0.5)
    if edge:
        bias[: vocab // 3] = float("-inf")
    options = dict(bias=bias, temperature=0.9, logit_scale=1.3 if edge else 1.0, softcap=20.0 if edge else None,
                   ignore_index=-100, return_entropy=True, chunk_size=size.chunk if edge else None)
    return hidden, weight, options


def _linear_token_logprobs_cases(m, label, rows, vocab, edge, dtype, size):
    ids = _ids(m, vocab, 1, rows, edge).view(-1)
    hidden, weight, options = _head(m, rows, vocab, dtype, size, edge)
    yield Case("linear_token_logprobs", label, dtype, (hidden, weight, ids), options, grad_args=(0, 1, "bias"),
               grad_outputs=(0, 1))


def _fused_linear_grpo_loss_cases(m, label, rows, vocab, edge, dtype, size):
    B, T = _rows_as(rows)
    ids = _ids(m, vocab, B, T, edge)
    hidden, weight, options = _head(m, B * T, vocab, dtype, size, edge)
    head = {k: options[k] for k in ("bias", "temperature", "logit_scale", "softcap")}
    logp = reference.linear_token_logprobs(hidden.double(), weight.double(), ids.view(-1),
                                           **dict(head, bias=head["bias"].double()))
    old, ref, adv, mask = _loss_inputs(m, logp.view(B, T), edge)
    for level in ("token", "sequence"):
        yield Case("fused_linear_grpo_loss", f"{label}, {level} level", dtype,
                   (hidden.view(B, T, -1), weight, ids, old, adv, mask),
                   dict(options, **_loss_options(level, ref_logprobs=ref)), grad_args=(0, 1, "bias"),
                   grad_outputs=("loss", "entropy"))


_OP_CASES: dict[str, Callable] = {
    "token_logprobs": _token_logprobs_cases,
    "group_advantages": _group_advantages_cases,
    "grpo_loss": _grpo_loss_cases,
    "fused_grpo_loss": _fused_grpo_loss_cases,
    "linear_token_logprobs": _linear_token_logprobs_cases,
    "fused_linear_grpo_loss": _fused_linear_grpo_loss_cases,
}
assert set(_OP_CASES) == set(backends.OPS)


# --------------------------------------------------------------------------- #
# running a case
# --------------------------------------------------------------------------- #
def _named_outputs(out) -> dict:
    if isinstance(out, Tensor):
        return {0: out}
    if hasattr(out, "_fields"):  # GRPOLossOutput
        return {name: t for name, t in zip(out._fields, out) if t is not None}
    return dict(enumerate(out))


def _prepare(case: Case, exact: bool) -> tuple[list, dict, list]:
    """Fresh inputs (float64 copies for the reference); the leaves that get gradients. In place, the op gets a
    copy made by autograd (as the logits of an LM head are), whose buffer it may overwrite."""
    def cast(t):
        if not isinstance(t, Tensor):
            return t
        t = t.detach()
        return t.to(torch.float64) if exact and t.is_floating_point() else t.clone()

    args, options = [cast(a) for a in case.args], {k: cast(v) for k, v in case.options.items()}
    leaves = []
    for key in case.grad_args:
        holder, index = (options, key) if isinstance(key, str) else (args, key)
        if holder[index] is not None:
            leaf = holder[index].requires_grad_(True)
            leaves.append((key, leaf))
            if case.options.get("inplace_backward"):
                holder[index] = leaf.clone()
    return args, options, leaves


def run_case(case: Case, fn: Callable, exact: bool) -> dict:
    """Outputs and gradients of ``fn`` on the case, by name; the backward of a fixed weighted sum of the
    differentiable outputs (weights 0.5…1.5, so that no gradient is a plain sum)."""
    args, options, leaves = _prepare(case, exact)
    outputs = _named_outputs(fn(*args, **options))
    results = {f"output {k}": v.detach() for k, v in outputs.items()}
    if leaves:
        total = 0
        for k in case.grad_outputs:
            out = outputs[k]
            w = torch.linspace(0.5, 1.5, max(out.numel(), 1), device=out.device, dtype=out.dtype).view(out.shape)
            total = total + (out * w).sum()
        grads = torch.autograd.grad(total, [leaf for _, leaf in leaves], allow_unused=True)
        for (key, _), g in zip(leaves, grads):
            if g is not None:
                results[f"grad {key}"] = g.detach()
    return results


def compare(actual: Tensor, expected: Tensor, atol: float, rtol: float, scale_floor: float) -> tuple[float, float]:
    """``(max |a − e|, max |a − e| / (atol·s + rtol·|e|))`` over the finite reference entries ``e``, with
    ``s = max(scale_floor, max |e|)``; ``(inf, inf)`` when the shapes differ or the non-finite entries (±inf, NaN)
    are not exactly the same."""
    if actual.shape != expected.shape:
        return math.inf, math.inf
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    finite = torch.isfinite(e)
    if not torch.equal(torch.isfinite(a), finite):
        return math.inf, math.inf
    if not finite.all():
        a_bad, e_bad = a[~finite], e[~finite]
        same = torch.where(torch.isnan(e_bad), torch.isnan(a_bad), a_bad == e_bad)
        if not same.all():
            return math.inf, math.inf
    if not finite.any():
        return 0.0, 0.0
    a, e = a[finite], e[finite]
    diff = (a - e).abs()
    scale = max(scale_floor, e.abs().max().item())
    allowed = atol * scale + rtol * e.abs()
    ratio = torch.where(allowed > 0, diff / allowed, torch.where(diff > 0, math.inf, 0.0)).max().item()
    return diff.max().item(), ratio


INCONCLUSIVE = "(not the backend's fault: the check could not run)"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"[:500]
    return f"{INCONCLUSIVE} {text}" if isinstance(exc, torch.OutOfMemoryError) else text


def check_case(case: Case, fn: Callable, reference_fn: Callable) -> CaseResult:
    """``fn`` against ``reference_fn`` in float64 on the case."""
    start = time.perf_counter()
    tol = TOLERANCES[case.dtype]
    dtype = str(case.dtype).replace("torch.", "")
    try:
        got = run_case(case, fn, exact=False)
    except Exception as exc:  # a kernel that raises is a failed check, not a crash of the caller
        return CaseResult(case.name, dtype, math.inf, math.inf, "", False, _describe(exc),
                          time.perf_counter() - start)
    try:
        expected = run_case(case, reference_fn, exact=True)
    except Exception as exc:
        return CaseResult(case.name, dtype, math.inf, math.inf, "", False, f"{INCONCLUSIVE} {_describe(exc)}",
                          time.perf_counter() - start)
    worst, worst_err, worst_ratio = "", 0.0, -1.0
    for name, e in expected.items():
        if name not in got:
            err, ratio = math.inf, math.inf
        elif name.startswith("grad"):
            err, ratio = compare(got[name], e, tol.grad_atol, tol.grad_rtol, 0.0)
        else:
            err, ratio = compare(got[name], e, tol.value_atol, tol.value_rtol, 1.0)
        if ratio > worst_ratio:
            worst, worst_err, worst_ratio = name, err, ratio
    extra = sorted(set(got) - set(expected))
    if extra:
        worst, worst_err, worst_ratio = f"unexpected {extra}", math.inf, math.inf
    return CaseResult(case.name, dtype, worst_err, worst_ratio, worst, worst_ratio <= 1.0, None,
                      time.perf_counter() - start)


@contextlib.contextmanager
def eager(device: torch.device):
    """Plain eager execution for the checks: gradients on, no inference mode, no autocast, on ``device``."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False))
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        yield


def validate(backend: str, op: str, device: torch.device, size: Optional[Sizes] = None, dtypes=DTYPES) -> Verdict:
    """Check ``backend``'s ``op`` on ``device`` against the float64 reference there (not cached: see
    :func:`backend_usable`)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    size = sizes(backend, device) if size is None else size
    start = time.perf_counter()
    results = []
    with eager(device):
        try:
            fn = backends.backend_function(backend, device, op)
        except Exception as exc:
            results.append(CaseResult("setup", "-", math.inf, math.inf, "", False,
                                      f"{type(exc).__name__}: {exc}"[:500]))
        else:
            reference_fn = backends.backend_function("reference", device, op)
            for case in cases(op, device, size, dtypes):
                results.append(check_case(case, fn, reference_fn))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # hand the check's memory back (it ran once, in the user's process)
    conclusive = not any(r.error and r.error.startswith(INCONCLUSIVE) for r in results)
    return Verdict(backend, op, str(device), all(r.passed for r in results), environment(device), results,
                   time.perf_counter() - start, time.time(), conclusive)


# --------------------------------------------------------------------------- #
# what "auto" asks
# --------------------------------------------------------------------------- #
_lock = threading.RLock()
_verdicts: dict = {}  # (backend, op, environment) -> bool, this process
_by_device: dict = {}  # (backend, op, device) -> bool, the same verdicts by device
_warned: set = set()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _warn_failed(verdict: Verdict, cached: Optional[Path]) -> None:
    key = (verdict.backend, verdict.op)
    if key in _warned:
        return
    _warned.add(key)
    where = f" (verdict cached in {cached}; delete it to check again)" if cached else ""
    if not verdict.conclusive:
        where = " in this process (not cached: the check could not run; `python -m grpo_kernels.check` runs it alone)"
    warnings.warn(
        f"grpo_kernels: backend {verdict.backend!r} failed its on-device check of {verdict.op} on "
        f"{verdict.environment['device_name']} ({verdict.summary()}); backend='auto' uses another backend for "
        f"{verdict.op}{where}. Please report it to {REPORT_TO} with the file written by "
        f"`python -m grpo_kernels.check --json report.json`.",
        ValidationWarning, stacklevel=4,
    )


def backend_usable(backend: str, op: str, device: torch.device) -> bool:
    """Whether ``backend`` passed its check of ``op`` on ``device``'s kind of device: from this process's memory,
    else the cache, else by running :func:`validate` now (and caching it). A failure warns once per process.

    During a CUDA graph capture nothing can run: without a known verdict the answer is no, for this call only.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    known = _by_device.get((backend, op, device))
    if known is not None:  # the per-call path: one dictionary lookup
        return known
    env = environment(device)
    key = (backend, op, json.dumps(env, sort_keys=True))
    with _lock:
        if key in _verdicts:
            _by_device[(backend, op, device)] = _verdicts[key]
            return _verdicts[key]
        verdict = read_verdict(backend, op, env)
        path = cache_path(backend, op, env) if verdict is not None else None
        if verdict is None:
            if _capturing(device):
                if ("capture", backend, op) not in _warned:
                    _warned.add(("capture", backend, op))
                    warnings.warn(
                        f"grpo_kernels: the first use of {op} with backend='auto' is inside a CUDA graph capture, "
                        f"where {backend!r} cannot be checked; the capture uses another backend. Call "
                        f"grpo_kernels.self_check.prepare() before capturing.", ValidationWarning, stacklevel=4)
                return False
            verdict = validate(backend, op, device)
            path = write_verdict(verdict) if verdict.conclusive else None
        _verdicts[key] = _by_device[(backend, op, device)] = verdict.passed
        if not verdict.passed:
            _warn_failed(verdict, path)
        return verdict.passed


def prepare(device: Optional[torch.device] = None, ops=backends.OPS) -> dict:
    """Settle what ``backend="auto"`` uses for ``ops`` on ``device`` (default: the current CUDA device) now,
    e.g. before a CUDA graph capture; returns ``{op: backend}``."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {op: backends.resolve_backend("auto", torch.device(device), op=op) for op in ops}


def forget() -> None:
    """Drop this process's verdicts and warnings (the disk cache stays): the next use asks the cache again."""
    with _lock:
        _verdicts.clear()
        _by_device.clear()
        _warned.clear()

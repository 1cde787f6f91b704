"""``python -m grpo_kernels.check`` (console script ``grpo-kernels-check``): is this installation correct here?

Runs the on-device validation of :mod:`grpo_kernels.self_check` for every
available kernel backend on every visible device (CPU: the ``cpu`` backend,
and ``triton`` under the interpreter at small sizes when ``TRITON_INTERPRET=1``;
each GPU: ``triton`` and ``cuda``), stores the verdicts in the cache that
``backend="auto"`` reads, times each op against the reference (and
``torch.compile`` of it), and prints one table plus the environment.
``--json PATH`` writes the same as a file to attach to a bug report (rewritten
after each step, so a run cut short leaves what it did). The exit status is 1
when any check failed or ``--budget`` left some undone, else 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Optional

import torch

from . import backends, self_check
from ._version import __version__

# Shapes of the timing runs (rows, vocabulary, hidden size), per device type.
TIMING_SIZES = {
    "cuda": self_check.Sizes(rows=4096, vocab=self_check.LARGE_VOCAB, hidden=1024, chunk=1, large_rows=0,
                             large_vocab=0),
    "cpu": self_check.Sizes(rows=256, vocab=32000, hidden=256, chunk=1, large_rows=0, large_vocab=0),
}
TIMING_DTYPE = torch.bfloat16
# Ops whose torch.compile'd reference is timed by default (compiling all six takes minutes on a CPU).
COMPILE_DEFAULT = {"cuda": ("token_logprobs", "fused_grpo_loss"), "cpu": ()}


def devices(types=("cuda", "cpu")) -> list[torch.device]:
    """The visible devices of ``types``, GPUs first (what ``auto`` checks at first use)."""
    found = []
    if "cuda" in types and torch.cuda.is_available():
        found += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return found + ([torch.device("cpu")] if "cpu" in types else [])


def kernel_backends(device: torch.device) -> list[str]:
    """The kernel backends to check on ``device``: those installed that run its tensors (Triton on a CPU only
    under the interpreter)."""
    installed = backends.available_backends()
    if device.type == "cuda":
        wanted = ["triton", "cuda"]
    else:
        wanted = ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
    return [b for b in wanted if b in installed]


def _interpreted(backend: str, device: torch.device) -> bool:
    return backend == "triton" and device.type == "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, min_seconds: float = 0.2, max_reps: int = 10,
              warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls (at most ``max_reps`` timed, about ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    while len(times) < max_reps and (len(times) < 3 or sum(times) < min_seconds):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def timings(device: torch.device, op: str, names: list[str], compile_reference: bool) -> list[dict]:
    """Forward + backward milliseconds of ``op`` on one large-ish case, per implementation, and the speed-up over
    the eager reference."""
    size = TIMING_SIZES[device.type]
    rows = []
    case = self_check.timing_case(op, device, size, TIMING_DTYPE)
    reference_fn = backends.backend_function("reference", device, op)
    impls: list[tuple[str, Callable]] = [("reference", reference_fn)]
    if compile_reference:
        impls.append(("torch.compile(reference)", torch.compile(reference_fn)))
    impls += [(b, backends.backend_function(b, device, op)) for b in names if not _interpreted(b, device)]
    base = None
    for label, fn in impls:
        row = dict(device=str(device), op=op, dtype=str(TIMING_DTYPE).replace("torch.", ""), backend=label,
                   case=case.name, ms=None, speedup=None, error=None)
        try:
            with self_check.eager(device):
                row["ms"] = time_call(lambda: self_check.run_case(case, fn, exact=False), device,
                                      warmup=2 if label.startswith("torch.compile") else 1)
        except Exception as exc:  # a failing implementation is reported, the others still timed
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if label == "reference":
            base = row["ms"]
        if base and row["ms"]:
            row["speedup"] = base / row["ms"]
        rows.append(row)
    return rows


def auto_choice(device: torch.device, op: str, verdicts: list[self_check.Verdict]) -> str:
    """What ``backend="auto"`` uses for ``op`` on ``device`` given these verdicts (the first candidate installed,
    providing the op, and tested or passed here)."""
    passed = {(v.backend, v.op) for v in verdicts if v.device == str(device) and v.passed}
    for name, trust in backends.auto_preference(device.type):
        if name not in backends.available_backends(op):
            continue
        if trust is backends.Trust.TESTED or (name, op) in passed:
            return name
    return "reference"


def report_environment() -> dict:
    return {
        "grpo_kernels": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": self_check.package_version("triton"),
        "extension": self_check.extension_facts(),
        "available_backends": backends.available_backends(),
        "variables": {k: v for k, v in os.environ.items() if k.startswith("GRPO_KERNELS") or k == "TRITON_INTERPRET"},
        "cache_dir": str(self_check.cache_dir()),
        "devices": [self_check.environment(d) for d in devices()],
    }


def _fmt(x: Optional[float], spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if x is None else format(x, spec)


def table(verdicts: list[self_check.Verdict], timing_rows: list[dict]) -> str:
    """One line per (device, op, dtype, backend): worst error over the cases, pass/fail, ms and speed-up."""
    lines = [f"{'device':8} {'op':24} {'dtype':9} {'backend':25} {'max err':>9} {'err/tol':>8} {'result':6} "
             f"{'ms':>9} {'speed-up':>8}"]
    timed = {(r["device"], r["op"], r["dtype"], r["backend"]): r for r in timing_rows}
    seen = set()
    for v in verdicts:
        dtypes = sorted({c.dtype for c in v.cases})
        for dtype in dtypes:
            cs = [c for c in v.cases if c.dtype == dtype]
            worst = max(cs, key=lambda c: c.ratio)
            ok = all(c.passed for c in cs)
            t = timed.get((v.device, v.op, dtype, v.backend), {})
            seen.add((v.device, v.op, dtype, v.backend))
            lines.append(f"{v.device:8} {v.op:24} {dtype:9} {v.backend:25} {worst.max_error:9.2e} "
                         f"{worst.ratio:8.2g} {'PASS' if ok else 'FAIL':6} {_fmt(t.get('ms'), '9.3f')} "
                         f"{_fmt(t.get('speedup'), '8.2f')}")
            if not ok:
                lines.append(f"{'':8}   {v.summary(dtype)}")
    for key, r in timed.items():
        if key not in seen:
            note = f"  {r['error']}" if r["error"] else ""
            lines.append(f"{r['device']:8} {r['op']:24} {r['dtype']:9} {r['backend']:25} {'':9} {'':8} {'':6} "
                         f"{_fmt(r['ms'], '9.3f')} {_fmt(r['speedup'], '8.2f')}{note}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m grpo_kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument("--ops", default=",".join(backends.OPS), help="comma-separated ops (default: all)")
    parser.add_argument("--no-timing", action="store_true", help="validate only")
    parser.add_argument("--compile", choices=("default", "all", "none"), default="default",
                        help="which ops' torch.compile'd reference to time (default: the two logits ops on a GPU, "
                             "none on a CPU, where compiling takes ~20 s per op)")
    parser.add_argument("--devices", default="cuda,cpu", help="device types to check (default: cuda,cpu)")
    parser.add_argument("--budget", type=float, metavar="SECONDS",
                        help="start no check or timing after this many seconds (what is left is listed as not run, "
                             "and the exit status is 1)")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in backends.OPS]
    if unknown:
        parser.error(f"unknown op(s) {unknown}; ops: {list(backends.OPS)}")
    device_types = tuple(t.strip() for t in args.devices.split(",") if t.strip())
    if not device_types or set(device_types) - {"cuda", "cpu"}:
        parser.error(f"--devices takes cuda and/or cpu, got {args.devices!r}")

    start = time.perf_counter()
    env = report_environment()
    print(f"grpo_kernels {__version__}, torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
          f"extension {env['extension'] or 'not built'}")
    for d in env["devices"]:
        print(f"device {d['device_type']}: {d['device_name']} (capability {d['compute_capability']}, "
              f"{d['parallel_units']} parallel units)")
    verdicts: list[self_check.Verdict] = []
    timing_rows: list[dict] = []
    skipped: list[str] = []
    report = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["python", "-m", "grpo_kernels.check", *(sys.argv[1:] if argv is None else argv)],
        "environment": env,
    }

    def save(done: bool) -> None:
        """The report so far (a timeout still leaves what was checked), replaced atomically."""
        if not args.json:
            return
        report.update(passed=all(v.passed for v in verdicts) and not skipped, complete=done and not skipped,
                      skipped=skipped, seconds=time.perf_counter() - start,
                      validation=[v.to_dict() for v in verdicts], timing=timing_rows)
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1, default=str)
        os.replace(tmp, args.json)

    def within_budget(what: str) -> bool:
        if args.budget is None or time.perf_counter() - start < args.budget:
            return True
        skipped.append(what)
        return False

    checked = []
    for device in devices(device_types):
        env_here = self_check.environment(device)
        if env_here in checked:  # another GPU of the same model: the same verdicts
            print(f"{device}: the same model as a device already checked, skipped")
            continue
        checked.append(env_here)
        names = kernel_backends(device)
        for backend in names:
            for op in ops:
                if backend in backends.available_backends(op) and within_budget(f"check {device} {backend} {op}"):
                    verdict = self_check.validate(backend, op, device)
                    self_check.write_verdict(verdict)
                    verdicts.append(verdict)
                    save(False)
        report.setdefault("auto", {})[str(device)] = {op: auto_choice(device, op, verdicts) for op in ops}
        for op in [] if args.no_timing else ops:
            if within_budget(f"timing {device} {op}"):
                compile_ops = {"default": COMPILE_DEFAULT[device.type], "all": ops, "none": ()}[args.compile]
                timing_rows += timings(device, op, names, op in compile_ops)
                save(False)
    passed = all(v.passed for v in verdicts) and not skipped
    print(table(verdicts, timing_rows))
    for device, backend in dict.fromkeys((v.device, v.backend) for v in verdicts):
        mine = [v for v in verdicts if (v.device, v.backend) == (device, backend)]
        slowest = max(mine, key=lambda v: v.seconds)
        print(f"check cost on {device}, {backend}: {sum(v.seconds for v in mine):.1f} s for {len(mine)} ops "
              f"(on a GPU the first use of an op with backend='auto' pays that op's share; slowest {slowest.op} "
              f"{slowest.seconds:.1f} s)")
    for device, choice in report.get("auto", {}).items():
        print(f"backend='auto' on {device}: " + ", ".join(f"{op} -> {b}" for op, b in choice.items())
              + (f" (GRPO_KERNELS_BACKEND={os.environ['GRPO_KERNELS_BACKEND']} overrides it)"
                 if os.environ.get("GRPO_KERNELS_BACKEND", "auto").strip() not in ("", "auto") else ""))
    seconds = time.perf_counter() - start
    if skipped:
        print(f"INCOMPLETE: --budget {args.budget} s ran out; not run: {', '.join(skipped)}")
    failed = not all(v.passed for v in verdicts)
    outcome = ("SOME CHECKS FAILED" if failed else "nothing checked" if not verdicts
               else "all checks passed" if not skipped else "the checks run passed")
    print(f"{outcome} "
          f"({len(verdicts)} backend x op checks, {seconds:.1f} s). max err: the largest absolute error of the "
          f"worst output or gradient; err/tol: that error in units of the error allowed (passes up to 1); ms: "
          f"forward + backward of one {str(TIMING_DTYPE).replace('torch.', '')} case; speed-up over the reference.")
    if not verdicts and not skipped:
        print(f"no kernel backend to check on {', '.join(device_types)} devices here (the reference needs none)")
    if failed:
        print(f"Please report failures to {self_check.REPORT_TO} with the file written by --json.")
    save(True)
    if args.json:
        print(f"report written to {args.json}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark runner: ``python -m benchmarks.run --preset cpu-small``.

Measures the device's copy bandwidth (and matmul rate where a case needs it),
then every case of the preset with every implementation (see
:mod:`benchmarks.implementations`), in the preset's order until the time
budget is spent, and writes into ``--out`` (default ``benchmarks/results``):
``<device>-<date>-<HHMMSS>-<sha>.json``, a row per record appended to ``all.csv``,
``<stem>.md`` and the PNG plots. Prints the summary table last.

Filters for quick runs: ``--cases SUBSTRING`` (a case runs when its name
contains any of them), ``--impls KEY`` (implementation keys; a preset may name
its own default, :data:`benchmarks.presets.DEFAULT_IMPLS`), ``--quick`` (one
timed call each). ``--dry-run`` lists the cases (with their byte and FLOP
floors) and the implementations, measures and writes nothing.
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import costs, environment, limits, memory, plots, results
from .implementations import implementations
from .measure import TimingPolicy, measure_case
from .presets import DEFAULT_IMPLS, PRESETS

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--cases", nargs="+", default=None, metavar="SUBSTRING",
                        help="run only the cases whose name contains one of these")
    parser.add_argument("--impls", nargs="+", default=None, metavar="KEY",
                        help="run only these implementations, in this order (e.g. ours-cpu trl-utils torch-compile)")
    parser.add_argument("--quick", action="store_true", help="one timed call per implementation (smoke runs)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cases and implementations; measure and write nothing")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no new case after this many seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the result files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run a preset; returns the run (as written to the JSON)."""
    args = _parse(argv)
    device = torch.device(args.device)
    cases = [c for c in PRESETS[args.preset]() if not args.cases or any(s in c.name for s in args.cases)]
    keys = args.impls or DEFAULT_IMPLS.get(args.preset)
    impls = [i for i in implementations(device) if not keys or i.key in keys]
    if keys:  # measured in the order given: a time budget cuts the last ones
        impls.sort(key=lambda i: list(keys).index(i.key))
    policy = TimingPolicy(1, 1, 0.0) if args.quick else TimingPolicy()
    if not cases or not impls:
        raise SystemExit("no case or no implementation left after the filters")
    if args.dry_run:
        print(_plan(cases, impls))
        return {"preset": args.preset, "cases": [c.name for c in cases], "impls": [i.key for i in impls]}

    env = {**environment.describe(device), "preset": args.preset}
    copy_gbps = limits.copy_bytes_per_s(device) / 1e9
    print(f"{env['device_name']}: copy bandwidth {copy_gbps:.1f} GB/s; {len(cases)} cases × {len(impls)} impls",
          flush=True)
    start, records = time.monotonic(), []
    signal.signal(signal.SIGTERM, _interrupt)  # a time limit's SIGTERM still writes what was measured
    try:
        for case in cases:
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                print(f"time budget spent: {case.name} and later cases not run", flush=True)
                break
            for record in measure_case(case, impls, device, policy):
                records.append(record)
                if record.status != "skipped":
                    print(f"{record.case:80s} {record.impl:24s} {record.status:5s} "
                          f"{results.fmt(record.median_ms, 4):>8s} ms {record.note}", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted: writing the {len(records)} records measured so far", flush=True)

    run = {
        "stem": results.stem(env), "preset": args.preset, "environment": env,
        "limits": {**limits.measured(device), "memory_method": memory.method(device)},
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results.write_json(args.out / f"{run['stem']}.json", {**run, "records": [vars(r) for r in records]})
    results.append_csv(args.out / "all.csv", env, records)
    (args.out / f"{run['stem']}.md").write_text(results.markdown(run))
    written = plots.write_plots(records, args.out, run["stem"])
    print("\n" + results.summary_table(records))
    print(f"\nwrote {args.out / run['stem']}.json/.md, all.csv, {', '.join(p.name for p in written) or 'no plots'}")
    return run


def _plan(cases: list, impls: list) -> str:
    """What a run would measure: each case with its byte and FLOP floors, then the implementations."""
    lines = [f"{len(cases)} cases:"]
    for case in cases:
        flops = costs.min_flops(case)
        lines.append(f"  {case.name:80s} {costs.min_bytes(case) / 1e6:10.1f} MB"
                     + (f" {flops / 1e9:10.1f} GFLOP" if flops else ""))
    lines.append(f"{len(impls)} implementations: " + ", ".join(i.key for i in impls))
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM handler: stop measuring as Ctrl-C would."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()

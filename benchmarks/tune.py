"""Sweep the Triton kernels' launch knobs at the headline shapes: ``python -m benchmarks.tune``.

For each kernel family (:data:`SWEEPS`), its headline case of
:data:`benchmarks.presets.HEADLINE` runs through the public op with
``backend="triton"`` under each configuration of its knobs
(:mod:`grpo_kernels.triton.tuning`: block size, warps, programs per SM, tiles,
splits). The defaults run first and again last: the spread of those two times
is the noise, and a configuration counts as better only when it beats the
defaults by more than that (and by 2%). Every configuration's outputs are
compared with the defaults' (a configuration that changes the numbers beyond
rounding is marked ``mismatch`` and never wins). Runs in under two minutes on
an H100 (``--budget``: no configuration starts after that many seconds).

Prints a table per family and the best configuration of each; ``--json PATH``
writes every measurement, ``--env PATH`` the ``GRPO_KERNELS_TRITON_TUNING``
value of the winners (empty when the defaults win everywhere), which
``benchmarks/gpu_run.sh --tuned`` exports for the stages after it.
``--dry-run`` lists the sweep without a GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from grpo_kernels.triton import tuning

from . import environment
from .cases import Case, make_inputs
from .implementations import implementations
from .presets import HEADLINE
from .timing import time_ms
from .workload import Outputs, step

NOISE_FLOOR = 0.02  # a winner must beat the defaults by more than this fraction (and than the measured noise)
# Largest max|out − default| / max|default| of a configuration's outputs still counted as rounding, by dtype.
ROUNDING = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4, torch.float64: 1e-10}
REPEATS = dict(min_repeats=3, max_repeats=20, min_total_s=0.2)  # per configuration, after one untimed call
IMPL = "ours-triton"
SPENT = "not run (budget spent)"
_now = time.monotonic  # the budget's clock


@dataclass(frozen=True)
class Sweep:
    """One kernel family: the case it is timed on and the knob settings tried (the defaults are added)."""

    family: str
    case: Case
    configs: tuple[dict[str, int], ...]
    note: str


def _grid(**values: Sequence[int]) -> tuple[dict[str, int], ...]:
    """Every combination of the knob values given."""
    names = list(values)
    return tuple(dict(zip(names, combo)) for combo in itertools.product(*values.values()))


def _tiles(*tiles: tuple[int, int, int, int, int]) -> tuple[dict[str, int], ...]:
    fields = ("block_n", "block_v", "block_k", "num_warps", "num_stages")
    return tuple({f"linear.{f}": v for f, v in zip(fields, tile)} for tile in tiles)


FUSED_CASE, LOGPROBS_CASE, LM_HEAD_CASE = HEADLINE
SWEEPS: tuple[Sweep, ...] = (
    Sweep("fused_grpo_loss", FUSED_CASE, _grid(**{
        "fused_grpo_loss.programs_per_sm": (1, 2, 4),
        "fused_grpo_loss.max_block_v": (4096, 8192, 16384),
        "fused_grpo_loss.num_warps": (8, 16),
    }), "single-pass kernel; forward + backward"),
    Sweep("token_logprobs.fwd", LOGPROBS_CASE, _grid(**{
        "token_logprobs.fwd.max_block_v": (2048, 4096, 8192, 16384),
        "token_logprobs.fwd.num_warps": (4, 8, 16),
    }), "one program per row"),
    Sweep("linear", LM_HEAD_CASE, _tiles(
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 4),
        (128, 128, 128, 8, 3), (64, 256, 64, 4, 3),
    ) + _grid(**{"linear.min_splits": (8, 32)}), "tl.dot tiles (block_n, block_v, block_k, warps, stages), splits"),
    Sweep("token_logprobs.bwd", LOGPROBS_CASE.replace(backward=True), _grid(**{
        "token_logprobs.bwd.max_block_v": (4096, 8192, 16384),
        "token_logprobs.bwd.num_warps": (8, 16),
    }), "row gradient kernel (also the fused-linear tile gradient); timed with the forward"),
)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=[s.family for s in SWEEPS], default=None,
                        help="sweep only these kernel families")
    parser.add_argument("--budget", type=float, default=110.0, metavar="SECONDS",
                        help="start no configuration after this many seconds (default 110)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write every measurement here")
    parser.add_argument("--env", type=Path, default=None, metavar="PATH",
                        help="write the winners as a GRPO_KERNELS_TRITON_TUNING value here")
    parser.add_argument("--dry-run", action="store_true", help="list the sweep and exit (no GPU needed)")
    return parser.parse_args(argv)


def _label(config: dict[str, int]) -> str:
    return tuning.format_overrides(config) if config else "(defaults)"


def _compiles(sweep: Sweep) -> int:
    """Distinct kernel builds the sweep needs (grid-only knobs reuse a build)."""
    grid_only = ("programs_per_sm", "min_splits")
    builds = {tuple(sorted((k, v) for k, v in c.items() if k.rsplit(".", 1)[1] not in grid_only))
              for c in sweep.configs}
    return len(builds | {()})


def dry_run(sweeps: Sequence[Sweep]) -> None:
    """Print the sweep: per family its case, configurations and builds; every configuration is checked."""
    total = 0
    for sweep in sweeps:
        for config in sweep.configs:
            tuning.parse(tuning.format_overrides(config))  # names and values as the launches will take them
        runs = len(sweep.configs) + 2  # the defaults first and last
        total += runs
        print(f"{sweep.family}: {sweep.case.name} ({sweep.note}); {runs} runs, {_compiles(sweep)} kernel builds")
        for config in ({},) + sweep.configs:
            print(f"  {_label(config)}")
    print(f"{len(sweeps)} families, {total} runs")


def _relative_differences(outputs: Outputs, expected: Outputs) -> list[float]:
    """max|a − b| / max|b| per output; chunked so a logits-sized gradient needs no float32 copy."""
    found = []
    for a, b in zip(outputs, expected):
        a, b = a.detach().reshape(-1), b.detach().reshape(-1)
        diff = scale = 0.0
        for start in range(0, a.numel(), 1 << 28):
            sa, sb = a[start:start + (1 << 28)].float(), b[start:start + (1 << 28)].float()
            diff = max(diff, (sa - sb).abs().max().item())
            scale = max(scale, sb.abs().max().item())
        found.append(diff / scale if scale else diff)
    return found


def _measure(fn, device: torch.device, expected: Optional[Outputs]) -> dict:
    """One configuration: an untimed call (its kernels compile) compared with ``expected``, then the timing.
    ``rel_diff``: the largest relative difference; ``within_rounding``: every output within its dtype's bound."""
    outputs = fn()
    found = dict(rel_diff=None, within_rounding=True)
    if expected is not None:
        differences = _relative_differences(outputs, expected)
        found = dict(rel_diff=max(differences), within_rounding=all(
            d <= ROUNDING[e.dtype] for d, e in zip(differences, expected)))  # NaN never passes
    del outputs
    timing = time_ms(fn, device, warmup=0, **REPEATS)
    return dict(median_ms=timing.median_ms, min_ms=timing.min_ms, repeats=timing.repeats, **found)


def run_sweep(sweep: Sweep, device: torch.device, deadline: float) -> dict:
    """Every configuration of ``sweep`` that starts before ``deadline`` (``time.monotonic``); the defaults'
    second run also after it, when a configuration ran (it is the noise estimate a winner needs)."""
    configs = ({},) + sweep.configs + ({},)
    if _now() > deadline:
        return _verdict(sweep, [dict(config=c, label=_label(c), status=SPENT) for c in configs])
    case = sweep.case
    inputs = make_inputs(case, device)
    impl = next(i for i in implementations(device) if i.key == IMPL)
    fn = step(case, inputs, impl.build(case, inputs))
    expected = tuple(t.detach() for t in fn())  # the defaults' outputs
    rows: list[dict] = []
    for position, config in enumerate(configs):
        row = dict(config=config, label=_label(config), status="ok")
        last_defaults = position == len(configs) - 1 and any(r["status"] != SPENT for r in rows[1:])
        if _now() > deadline and not last_defaults:
            row["status"] = SPENT
        else:
            try:
                with tuning.overrides(config):
                    row.update(_measure(fn, device, None if not config else expected))
                if not row["within_rounding"]:
                    row["status"] = "mismatch"
            except Exception as error:  # e.g. a tile that needs more shared memory than the SM has
                row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"  {row['label']:90s} {_ms(row.get('median_ms'))} ms  {row['status']}", flush=True)
    del fn, expected, inputs
    torch.cuda.empty_cache()
    return _verdict(sweep, rows)


def _ms(value: Optional[float]) -> str:
    return f"{value:9.4f}" if value is not None else "        –"


def _verdict(sweep: Sweep, rows: list[dict]) -> dict:
    """The family's result: the rows, the noise from the two default runs, the best configuration."""
    first, last = rows[0], rows[-1]
    default_ms = [r["median_ms"] for r in (first, last) if r["status"] == "ok"]
    reference = min(default_ms) if default_ms else None
    noise = (max(default_ms) - min(default_ms)) / min(default_ms) if len(default_ms) == 2 else None
    candidates = [r for r in rows[1:-1] if r["status"] == "ok"]
    best = min(candidates, key=lambda r: r["median_ms"], default=None)
    margin = max(NOISE_FLOOR, noise if noise is not None else math.inf)
    better = bool(best and reference and best["median_ms"] < reference * (1 - margin))
    return dict(family=sweep.family, case=sweep.case.name, note=sweep.note, rows=rows,
                default_ms=reference, noise=noise, best=best if better else None,
                speedup=reference / best["median_ms"] if better else None)


def best_table(results: Sequence[dict]) -> str:
    """Markdown: per family the defaults' time, the noise, the best configuration and its speed-up."""
    lines = ["| family | case | defaults ms | noise | best ms | speed-up | best configuration |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        best = r["best"]
        cells = [r["family"], f"`{r['case']}`", _ms(r["default_ms"]).strip(),
                 f"{100 * r['noise']:.1f}%" if r["noise"] is not None else "–",
                 _ms(best["median_ms"]).strip() if best else "–", f"{r['speedup']:.3f}×" if best else "–",
                 best["label"] if best else "the defaults"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def winners(results: Sequence[dict]) -> dict[str, int]:
    """The knob overrides of every family whose best configuration beat its defaults."""
    merged: dict[str, int] = {}
    for r in results:
        if r["best"]:
            merged.update(r["best"]["config"])
    return merged


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = _parse(argv)
    sweeps = [s for s in SWEEPS if not args.families or s.family in args.families]
    if args.dry_run:
        dry_run(sweeps)
        return []
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.tune needs a CUDA GPU (--dry-run lists the sweep without one)")
    if tuning.active():
        raise SystemExit(f"unset {tuning.ENV} first: the sweep starts from the defaults")
    device = torch.device("cuda")
    start = time.monotonic()
    deadline = start + args.budget
    results = []
    for sweep in sweeps:
        print(f"{sweep.family}: {sweep.case.name}", flush=True)
        try:
            results.append(run_sweep(sweep, device, deadline))
        except Exception as error:  # the defaults themselves failed: the other families still run
            print(f"  failed: {type(error).__name__}: {error}", flush=True)
            failed = dict(config={}, label="(defaults)", status=f"error: {type(error).__name__}: {error}"[:300])
            results.append(_verdict(sweep, [failed, failed]))
            torch.cuda.empty_cache()
    chosen = winners(results)
    print("\n" + best_table(results))
    print(f"\n{tuning.ENV}={tuning.format_overrides(chosen)}  ({time.monotonic() - start:.0f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        run = dict(environment=environment.describe(device), budget_s=args.budget,
                   seconds=time.monotonic() - start, winners=chosen, results=results)
        args.json.write_text(json.dumps(run, indent=1) + "\n")
    if args.env:
        args.env.parent.mkdir(parents=True, exist_ok=True)
        args.env.write_text(tuning.format_overrides(chosen) + "\n")
    return results


if __name__ == "__main__":
    main()

"""Scale-out cost on CPU: vocabulary-parallel token_logprobs and the data-parallel loss share over gloo.

    python -m benchmarks.distributed [--processes 2] [--tokens 2048] [--vocab 32000] [--out benchmarks/results]

Each of the P spawned processes runs one thread (the machine's cores are shared out). Measured, median of
``--repeats`` steps after a warm-up:

- ``single``: :func:`grpo_kernels.token_logprobs` forward + backward (with entropy) of the whole ``[N, V]``
  float32 logits in one process (one thread);
- ``vocab_parallel``: the same with ``vocab_group``, each rank holding ``V / P`` columns (the per-rank step,
  slowest rank);
- ``stats_all_gather``: the collective alone, ``[3, N]`` float32 per rank (what ``vocab_parallel`` sends);
- ``batch_share``: :func:`grpo_kernels.grpo_loss` (dapo) forward + backward on ``N / P`` tokens with and without
  ``batch_group`` (the difference is the data-parallel normalization: one all_gather of 8 numbers).

Writes ``<out>/<stem>-distributed.json`` (environment of :mod:`benchmarks.environment`, the records, bytes per
token row) and prints it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from .environment import describe
from .results import stem


def _median_ms(fn, repeats: int, barrier=None) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if barrier is not None:
            barrier()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _logprobs_step(logits: torch.Tensor, ids: torch.Tensor, **kwargs):
    import grpo_kernels as gk

    def step():
        x = logits.detach().requires_grad_()
        logp, ent = gk.token_logprobs(x, ids, return_entropy=True, backend="cpu", **kwargs)
        (logp.sum() + ent.sum()).backward()

    return step


def _worker(rank: int, world: int, rendezvous: str, args: dict, out: str) -> None:
    import torch.distributed as dist

    import grpo_kernels as gk

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    n, vocab, repeats = args["tokens"], args["vocab"], args["repeats"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=g)
    ids = torch.randint(0, vocab, (n,), generator=g)
    records = {}
    if rank == 0:
        records["single"] = _median_ms(_logprobs_step(logits, ids), repeats)
    dist.barrier()
    shard = logits[:, rank * vocab // world:(rank + 1) * vocab // world].contiguous()
    per_rank = _median_ms(_logprobs_step(shard, ids, vocab_group=group), repeats, dist.barrier)
    stats = torch.randn(3, n)
    gather = _median_ms(lambda: dist.all_gather([torch.empty_like(stats) for _ in range(world)], stats), repeats,
                        dist.barrier)
    rows = n // world
    logp = -torch.rand(rows, 256, generator=g)
    adv, mask = torch.randn(rows, generator=g), torch.ones(rows, 256, dtype=torch.bool)

    def loss_step(**kwargs):
        def step():
            x = logp.detach().requires_grad_()
            gk.grpo_loss(x, logp, adv, mask, backend="reference", **kwargs).loss.backward()
        return step

    local = _median_ms(loss_step(), repeats, dist.barrier)
    shared = _median_ms(loss_step(batch_group=group), repeats, dist.barrier)
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(vocab_parallel=per_rank, stats_all_gather=gather, batch_local=local,
                                          batch_share=shared))
    if rank == 0:
        for key in gathered[0]:
            records[key] = max(r[key] for r in gathered)
        Path(out).write_text(json.dumps(records))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    environment = describe(torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "records.json")
        mp.spawn(_worker, args=(args.processes, str(Path(tmp, "rendezvous")), vars(args) | {"out": None}, str(out)),
                 nprocs=args.processes)
        timings = json.loads(out.read_text())
    P = args.processes
    run = {
        "environment": environment,
        "benchmark": "distributed",
        "config": dict(processes=P, threads_per_process=1, tokens=args.tokens, vocab=args.vocab, dtype="float32",
                       repeats=args.repeats, backend="cpu (token_logprobs), reference (grpo_loss)"),
        "median_ms": timings,
        # what each rank receives per token row, in a ring all_gather: (P - 1) ranks × 3 float32
        "bytes_per_token_row": {"vocab_parallel_with_entropy": (P - 1) * 3 * 4, "vocab_parallel": (P - 1) * 2 * 4},
        "bytes_per_step": {"batch_share": (P - 1) * 8 * 4},
    }
    path = args.out / f"{stem(environment)}-distributed.json"
    path.write_text(json.dumps(run, indent=1) + "\n")
    print(json.dumps(run, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Scale-out over torch.distributed (grpo_kernels.distributed): vocabulary-parallel and data-parallel ops against
the single-process reference, on CPU with the gloo backend.

One process group per world size (2 and 4) is spawned once for the module (a fixture); every rank runs every
scenario against the float64 reference of the whole vocabulary / whole batch, which each rank computes itself
from the same seed, and records failures per scenario; each test below asserts one scenario on every rank.
Collectives time out after 60 s and the spawn is bounded, so a hang fails instead of blocking.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from pathlib import Path

import pytest
import torch

WORLD_SIZES = (2, 4)
SPAWN_TIMEOUT_S = 240
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=1e-5, rtol=1e-5)}
# gradients in bfloat16 are rounded to bfloat16 (8 bits of mantissa)
GRAD_TOL = {**TOL, torch.bfloat16: dict(atol=2e-3, rtol=1e-2)}


def shard_sizes(world: int) -> list[int]:
    """Unequal vocabulary shards (V = 13 at 2 ranks, 14 at 4)."""
    return {2: [5, 8], 4: [1, 4, 2, 7]}[world]


def batch_rows(world: int) -> list[int]:
    """Unequal numbers of sequences per rank (whole sequences)."""
    return {2: [2, 3], 4: [1, 2, 1, 2]}[world]


def close(actual, expected, tol, what: str) -> None:
    if expected is None:
        assert actual is None, f"{what}: expected None"
        return
    torch.testing.assert_close(actual.double(), expected.double(), **tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- #
# scenarios, run on every rank
# --------------------------------------------------------------------------- #
def _backends() -> list[str]:
    import grpo_kernels

    return [b for b in grpo_kernels.available_backends("token_logprobs") if b != "cuda"]


def _vocab_slice(rank: int, world: int) -> slice:
    sizes = shard_sizes(world)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _logits(B: int, T: int, V: int, dtype, generator) -> torch.Tensor:
    x = (torch.randn(B, T, V, generator=generator, dtype=torch.float64) * 3).to(dtype)
    x[0, 0, :3] = float("-inf")  # a whole (first) shard of -inf logits at 4 ranks, part of one at 2
    return x


def scenario_token_logprobs(rank: int, world: int, group) -> None:
    import grpo_kernels as gk
    from grpo_kernels import reference

    for backend in _backends():
        for dtype in (torch.float64, torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(1)
            V = sum(shard_sizes(world))
            x = _logits(2, 3, V, dtype, g)
            ids = torch.randint(0, V, (2, 3), generator=g)
            ids[0, 0] = 7  # finite target beside the -inf entries
            ids[1, 2] = -100
            g_logp, g_ent = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g,
                                                                                           dtype=torch.float64)
            full = x.double().requires_grad_()
            logp_ref, ent_ref = reference.token_logprobs(full, ids, temperature=0.7, return_entropy=True)
            (grad_ref,) = torch.autograd.grad((logp_ref * g_logp + ent_ref * g_ent).sum(), full)
            for inplace in (False, True):
                shard = x[..., _vocab_slice(rank, world)].clone().requires_grad_()
                what = f"{backend} {dtype} inplace={inplace}"
                logp, ent = gk.token_logprobs(shard.clone(), ids, temperature=0.7, return_entropy=True,
                                              vocab_group=group, backend=backend, inplace_backward=inplace)
                close(logp, logp_ref, TOL[dtype], f"logp {what}")
                close(ent, ent_ref, TOL[dtype], f"entropy {what}")
                (grad,) = torch.autograd.grad((logp * g_logp.to(logp.dtype) + ent * g_ent.to(ent.dtype)).sum(), shard)
                close(grad, grad_ref[..., _vocab_slice(rank, world)], GRAD_TOL[dtype], f"grad {what}")


def scenario_token_logprobs_temperature_tensor(rank: int, world: int, group) -> None:
    """A temperature per token (0.1 to 10, NaN at the ignored one) and per sequence, against the reference."""
    import grpo_kernels as gk
    from grpo_kernels import reference

    for backend in _backends():
        for dtype in (torch.float64, torch.float32):
            g = torch.Generator().manual_seed(11)
            V = sum(shard_sizes(world))
            x = _logits(2, 3, V, dtype, g)
            ids = torch.randint(0, V, (2, 3), generator=g)
            ids[1, 2] = -100
            per_token = torch.tensor([[0.1, 0.7, 10.0], [2.5, 1.0, float("nan")]], dtype=torch.float64)
            for temperature in (per_token, torch.tensor([0.3, 4.0])):
                full = x.double().requires_grad_()
                logp_ref, ent_ref = reference.token_logprobs(full, ids, temperature=temperature, return_entropy=True)
                (grad_ref,) = torch.autograd.grad((logp_ref + 0.5 * ent_ref).sum(), full)
                shard = x[..., _vocab_slice(rank, world)].clone().requires_grad_()
                what = f"{backend} {dtype} temperature {list(temperature.shape)}"
                logp, ent = gk.token_logprobs(shard, ids, temperature=temperature, return_entropy=True,
                                              vocab_group=group, backend=backend)
                close(logp, logp_ref, TOL[dtype], f"logp {what}")
                close(ent, ent_ref, TOL[dtype], f"entropy {what}")
                (grad,) = torch.autograd.grad((logp + 0.5 * ent).sum(), shard)
                close(grad, grad_ref[..., _vocab_slice(rank, world)], GRAD_TOL[dtype], f"grad {what}")


def _loss_inputs(B: int, T: int, generator, *, per_token_adv: bool = False):
    g = generator
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token_adv else torch.randn(B, generator=g,
                                                                                                  dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    return old, ref, adv, mask


def _loss_options(loss_type: str, level: str) -> dict:
    options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.05)
    if loss_type == "cispo":
        options["epsilon_high"] = 1.1
    return options


METRICS = ("kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "entropy")


def scenario_fused_vocab_parallel(rank: int, world: int, group) -> None:
    import grpo_kernels as gk
    from grpo_kernels import reference

    B, T, V = 2, 4, sum(shard_sizes(world))
    for backend in _backends():
        for loss_type, level in (("dapo", "token"), ("grpo", "sequence"), ("cispo", "token"), ("sapo", "token")):
            g = torch.Generator().manual_seed(2)
            x = _logits(B, T, V, torch.float32, g)
            ids = torch.randint(0, V, (B, T), generator=g)
            ids[0, 0] = 7
            old, ref, adv, mask = _loss_inputs(B, T, g)
            options = dict(_loss_options(loss_type, level), ref_logprobs=ref, temperature=0.9, return_entropy=True)
            full = x.double().requires_grad_()
            expected = reference.fused_grpo_loss(full, ids, old, adv, mask, **options)
            (grad_ref,) = torch.autograd.grad(expected.loss - 0.1 * expected.entropy, full)
            shard = x[..., _vocab_slice(rank, world)].clone().requires_grad_()
            out = gk.fused_grpo_loss(shard, ids, old.float(), adv.float(), mask, vocab_group=group, backend=backend,
                                     **{**options, "ref_logprobs": ref.float()})
            what = f"{backend} {loss_type}/{level}"
            for field in ("loss", "per_token_loss") + METRICS:
                close(getattr(out, field), getattr(expected, field), TOL[torch.float32], f"{field} {what}")
            (grad,) = torch.autograd.grad(out.loss - 0.1 * out.entropy, shard)
            close(grad, grad_ref[..., _vocab_slice(rank, world)], TOL[torch.float32], f"grad {what}")


def scenario_fused_linear_vocab_parallel(rank: int, world: int, group) -> None:
    """LM-head rows sharded: loss, metrics, the shard's weight and bias gradients, the summed hidden gradient."""
    import grpo_kernels as gk
    from grpo_kernels import reference

    B, T, H, V = 2, 3, 4, sum(shard_sizes(world))
    cols = _vocab_slice(rank, world)
    for backend in _backends():
        for loss_type, level, head in (("dapo", "token", {}), ("grpo", "sequence", dict(softcap=5.0, logit_scale=0.8)),
                                       ("bnpo", "token", dict(softcap=3.0))):
            g = torch.Generator().manual_seed(7)
            hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
            weight = torch.randn(V, H, generator=g, dtype=torch.float64)
            bias = torch.randn(V, generator=g, dtype=torch.float64)
            ids = torch.randint(0, V, (B, T), generator=g)
            ids[1, 1] = -100
            old, ref, adv, mask = _loss_inputs(B, T, g)
            options = dict(_loss_options(loss_type, level), ref_logprobs=ref, temperature=1.3, return_entropy=True,
                           **head)
            inputs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            expected = reference.fused_linear_grpo_loss(inputs[0], inputs[1], ids, old, adv, mask, bias=inputs[2],
                                                        **options)
            grads_ref = torch.autograd.grad(expected.loss - 0.1 * expected.entropy, inputs)
            mine = [hidden.float().requires_grad_(), weight[cols].float().requires_grad_(),
                    bias[cols].float().requires_grad_()]
            out = gk.fused_linear_grpo_loss(mine[0], mine[1], ids, old.float(), adv.float(), mask, bias=mine[2],
                                            vocab_group=group, backend=backend, chunk_size=4,
                                            **{**options, "ref_logprobs": ref.float()})
            what = f"{backend} {loss_type}/{level} {head}"
            for field in ("loss", "per_token_loss") + METRICS:
                close(getattr(out, field), getattr(expected, field), TOL[torch.float32], f"{field} {what}")
            grads = torch.autograd.grad(out.loss - 0.1 * out.entropy, mine)
            close(grads[0], grads_ref[0], TOL[torch.float32], f"hidden grad {what}")
            close(grads[1], grads_ref[1][cols], TOL[torch.float32], f"weight grad {what}")
            close(grads[2], grads_ref[2][cols], TOL[torch.float32], f"bias grad {what}")


def _batch_slices(world: int, T_full: int) -> list[tuple[slice, int]]:
    """Each rank's rows of the whole batch and its own (shorter or full) completion length."""
    rows = batch_rows(world)
    starts = [sum(rows[:r]) for r in range(world)]
    return [(slice(s, s + n), T_full - (r % 2)) for r, (s, n) in enumerate(zip(starts, rows))]


def scenario_grpo_loss_data_parallel(rank: int, world: int, group) -> None:
    import grpo_kernels as gk
    from grpo_kernels import reference
    from grpo_kernels.loss_table import SCALE_OUT_LOSS_TYPES

    T = 5
    B = sum(batch_rows(world))
    rows, T_r = _batch_slices(world, T)[rank]
    for backend in _backends():
        # the Triton interpreter is slow: two loss types there, every type on the other backends
        for loss_type in ("dapo", "grpo") if backend == "triton" else SCALE_OUT_LOSS_TYPES:
            for level in ("token", "sequence"):
                g = torch.Generator().manual_seed(3)
                old, ref, adv, mask = _loss_inputs(B, T, g)
                mask[:, T - 1] = mask[:, T - 1] & (torch.arange(B) % 2 == 0)  # odd-length ranks: last column empty
                for r, (rr, tr) in enumerate(_batch_slices(world, T)):
                    mask[rr, tr:] = False
                logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
                options = dict(_loss_options(loss_type, level), ref_logprobs=ref)
                expected = reference.grpo_loss(logp, old, adv, mask, **options)
                (grad_ref,) = torch.autograd.grad(expected.loss, logp)
                mine = logp.detach()[rows, :T_r].float().requires_grad_()
                out = gk.grpo_loss(mine, old[rows, :T_r].float(), adv[rows].float(), mask[rows, :T_r],
                                   batch_group=group, backend=backend,
                                   **{**options, "ref_logprobs": ref[rows, :T_r].float()})
                what = f"{backend} {loss_type}/{level}"
                losses = [torch.zeros(()) for _ in range(world)]
                torch.distributed.all_gather(losses, out.loss.detach(), group=group)
                close(torch.stack(losses).mean(), expected.loss, TOL[torch.float32], f"mean loss {what}")
                for field in METRICS[:4]:
                    close(getattr(out, field), getattr(expected, field), TOL[torch.float32], f"{field} {what}")
                (grad,) = torch.autograd.grad(out.loss, mine)
                # DDP averages the ranks' gradients: each rank's gradient is world × its share
                close(grad / world, grad_ref[rows, :T_r], TOL[torch.float32], f"grad {what}")


def scenario_fused_data_parallel(rank: int, world: int, group) -> None:
    """The backend's fused kernel as a data-parallel share, with a shared LM head as the 'model': DDP's averaged
    weight gradient equals the single-process one."""
    import grpo_kernels as gk
    from grpo_kernels import reference

    T, H, V = 4, 3, 6
    B = sum(batch_rows(world))
    rows, _ = _batch_slices(world, T)[rank]
    for backend in _backends():
        for loss_type in ("dapo", "grpo", "dr_grpo", "bnpo"):
            g = torch.Generator().manual_seed(4)
            hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
            weight = torch.randn(V, H, generator=g, dtype=torch.float64)
            ids = torch.randint(0, V, (B, T), generator=g)
            old, ref, adv, mask = _loss_inputs(B, T, g)
            options = dict(_loss_options(loss_type, "token"), ref_logprobs=ref, return_entropy=True)
            w = weight.clone().requires_grad_()
            expected = reference.fused_grpo_loss(hidden @ w.t(), ids, old, adv, mask, **options)
            (grad_ref,) = torch.autograd.grad(expected.loss - 0.1 * expected.entropy, w)
            w = weight.float().requires_grad_()
            out = gk.fused_grpo_loss(hidden[rows].float() @ w.t(), ids[rows], old[rows].float(), adv[rows].float(),
                                     mask[rows], batch_group=group, backend=backend,
                                     **{**options, "ref_logprobs": ref[rows].float()})
            what = f"{backend} {loss_type}"
            for field in METRICS:
                close(getattr(out, field), getattr(expected, field), TOL[torch.float32], f"{field} {what}")
            (grad,) = torch.autograd.grad(out.loss - 0.1 * out.entropy, w)
            torch.distributed.all_reduce(grad, group=group)
            close(grad / world, grad_ref, TOL[torch.float32], f"averaged weight grad {what}")


def scenario_packed_data_parallel(rank: int, world: int, group) -> None:
    """Packed sequences on each rank of a data-parallel group, against the padded whole batch."""
    import grpo_kernels as gk
    from grpo_kernels import reference
    from grpo_kernels.loss_table import SCALE_OUT_LOSS_TYPES

    B = sum(batch_rows(world))
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 5, (B,), generator=g)
    T = int(lengths.max())
    old, ref, adv, _ = _loss_inputs(B, T, g)
    mask = (torch.arange(T) < lengths[:, None]) & (torch.rand(B, T, generator=g) > 0.2)
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_()
    rows, _ = _batch_slices(world, T)[rank]
    valid = (torch.arange(T) < lengths[:, None])[rows]
    cu = torch.nn.functional.pad(lengths[rows].cumsum(0), (1, 0)).to(torch.int32)
    for loss_type in SCALE_OUT_LOSS_TYPES:
        for level in ("token", "sequence"):
            options = dict(_loss_options(loss_type, level), ref_logprobs=ref)
            expected = reference.grpo_loss(logp, old, adv, mask, **options)
            (grad_ref,) = torch.autograd.grad(expected.loss, logp)
            mine = logp.detach()[rows][valid].requires_grad_()
            out = gk.grpo_loss(mine, old[rows][valid], adv[rows], mask[rows][valid], cu_seqlens=cu,
                               batch_group=group, **{**options, "ref_logprobs": ref[rows][valid]})
            what = f"{loss_type}/{level}"
            losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
            torch.distributed.all_gather(losses, out.loss.detach(), group=group)
            close(torch.stack(losses).mean(), expected.loss, TOL[torch.float64], f"mean loss {what}")
            for field in METRICS[:4]:
                close(getattr(out, field), getattr(expected, field), TOL[torch.float64], f"{field} {what}")
            (grad,) = torch.autograd.grad(out.loss, mine)
            close(grad / world, grad_ref[rows][valid], TOL[torch.float64], f"grad {what}")


def scenario_vocab_and_batch_grid(rank: int, world: int, group) -> None:
    """4 ranks as a 2 × 2 grid: vocabulary shards within {0, 1} and {2, 3}, batch halves across them."""
    import torch.distributed as dist

    import grpo_kernels as gk
    from grpo_kernels import reference

    if world != 4:
        return
    vocab_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    batch_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    vocab_group, batch_group = vocab_groups[rank // 2], batch_groups[rank % 2]
    B, T, sizes = 3, 3, [4, 6]
    g = torch.Generator().manual_seed(6)
    x = _logits(B, T, sum(sizes), torch.float64, g)
    ids = torch.randint(0, sum(sizes), (B, T), generator=g)
    old, ref, adv, mask = _loss_inputs(B, T, g)
    rows = slice(0, 1) if rank // 2 == 0 else slice(1, 3)
    cols = slice(0, 4) if rank % 2 == 0 else slice(4, 10)
    for backend in _backends():
        for loss_type in ("dapo", "grpo"):
            options = dict(_loss_options(loss_type, "token"), ref_logprobs=ref, return_entropy=True)
            full = x.clone().requires_grad_()
            expected = reference.fused_grpo_loss(full, ids, old, adv, mask, **options)
            (grad_ref,) = torch.autograd.grad(expected.loss, full)
            shard = x[rows, :, cols].clone().requires_grad_()
            out = gk.fused_grpo_loss(shard, ids[rows], old[rows], adv[rows], mask[rows], vocab_group=vocab_group,
                                     batch_group=batch_group, backend=backend,
                                     **{**options, "ref_logprobs": ref[rows]})
            what = f"{backend} {loss_type}"
            for field in METRICS:
                close(getattr(out, field), getattr(expected, field), TOL[torch.float64], f"{field} {what}")
            (grad,) = torch.autograd.grad(out.loss, shard)
            close(grad / 2, grad_ref[rows, :, cols], TOL[torch.float64], f"grad {what}")


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")}


def _worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                scenario(rank, world, dist.group.WORLD)
                results[name] = None
            except Exception:  # recorded per scenario; a rank that fails a collective makes the others time out
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def outcomes(request, tmp_path_factory):
    """``{scenario: [error or None per rank]}`` of one spawned group of ``request.param`` processes."""
    import torch.multiprocessing as mp

    world = request.param
    base = tmp_path_factory.mktemp(f"world{world}")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    context = mp.start_processes(_worker, args=(world, str(base / "rendezvous"), str(base)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world} processes did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    per_rank = [json.loads((base / f"rank{r}.json").read_text()) for r in range(world)]
    return world, {name: [results[name] for results in per_rank] for name in SCENARIOS}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(outcomes, scenario):
    world, outcomes = outcomes
    if scenario == "vocab_and_batch_grid" and world != 4:
        pytest.skip("the 2 × 2 grid needs 4 processes")
    errors = [f"rank {rank}:\n{error}" for rank, error in enumerate(outcomes[scenario]) if error is not None]
    assert not errors, "\n".join(errors)

"""Triton fused-linear kernels: hidden states × LM head → log-probs, entropy, logits gradient; no N × V logits.

The math is :func:`grpo_kernels.reference.linear_token_logprobs` (and the
loss on top of it, :func:`grpo_kernels.reference.fused_linear_grpo_loss`).
For a token ``n`` (hidden state ``h``, id ``y``), vocabulary entry ``v``:

    x = s (h W_vᵀ + b_v)          (then x = c tanh(x / c) with a softcap c)
    z = x / T,   lse = log Σ_v e^{z_v},   logp = z_y − lse,   H = lse − Σ_v p_v z_v

Two kernels over tiles of ``BLOCK_N`` tokens × ``BLOCK_V`` vocabulary
entries whose logits are formed on chip by ``tl.dot`` over the hidden size in
``BLOCK_K`` steps, with float32 accumulation (float64 for float64 inputs),
then the epilogue of :func:`grpo_kernels.reference.linear_logits` and ``/ T``:

- ``_linear_stats_kernel`` (the forward): each program takes a token tile
  and a contiguous range of vocabulary tiles (a *split*) and keeps, per token,
  the online statistics of :mod:`.token_logprobs` over its range (max ``m``,
  ``Σ e^{z−m}``, ``Σ e^{z−m}(z−m)``), written as ``[3, splits, N]`` partials;
  the program whose tile holds ``y`` writes ``z_y``. A few torch ops merge
  the splits into ``lse``, ``logp`` and ``H`` (:func:`_merge`). Nothing of
  size ``N × V`` exists in memory. With WRITE_TILE it also writes the logits
  ``x`` (after the epilogue, before ``/ T``) of ``chunk_size`` tokens into a
  ``[chunk_size, V]`` buffer of the compute dtype.
- ``_linear_grad_kernel`` forms the same tiles again and, from the final
  ``lse`` (and ``H``) and per-token weights ``g_logp``, ``g_H``, writes the
  gradient of the affine logits ``a = h Wᵀ + b``:
  ``d a = s (1 − (x/c)²) / T · (g_logp (onehot_y − p) − g_H p (log p + H))``
  into a ``[chunk_size, V]`` buffer of the compute dtype.

Either way the driver then adds ``d hidden = d a · W``, ``d weight += d aᵀ · h``,
``d bias += Σ d a`` (``torch.matmul`` in the compute dtype,
the driver's accumulators). The autograd and the loss glue are those
of the chunked driver (:mod:`grpo_kernels.linear`), with :class:`TritonTiles`
as its tile provider:

- ``fused_linear_grpo_loss`` at token level (the weights ``dL/dlogp`` of a
  token known from its own log-prob) forms the gradient in the forward, in one
  sweep: per chunk, the stats kernel writes the logits tile, the merge gives
  the final ``lse``, and the row gradient kernel of :mod:`.token_logprobs`
  (``_token_logprobs_bwd_kernel``, with the chain through the scale and the
  softcap, ``1 − (x/c)²`` from ``x`` itself) turns the tile into ``d a`` in
  place (:func:`tile_gradient`): no logits formed twice.
- Wherever the weights are not known while a chunk's statistics are formed
  (the sequence level's second sweep, ``linear_token_logprobs``' backward, an
  entropy bonus's backward), the statistics of every token come from one
  launch of the stats kernel, without a tile, and the gradient kernel forms
  the tiles again from the known ``lse``, ``chunk_size`` tokens at a time.

Matmul FLOPs (one ``[N, H] × [H, V]`` product is ``2·N·V·H``):
``fused_linear_grpo_loss`` at token level 6·N·V·H (logits once: 2, d hidden
and d weight: 4); at sequence level 8·N·V·H (the logits again in the second
sweep, once every log-prob of a sequence is known); 6 more for an entropy
bonus's backward. ``linear_token_logprobs`` forward 2·N·V·H, forward +
backward 8·N·V·H (its tiles are not kept from the forward to the backward).

Precision: bf16/fp16 inputs go to the tensor cores as they are (exact
products, float32 sums); float32 inputs use ``tf32x3`` (three TF32 products
per element, about float32 accuracy; the interpreter multiplies in float32);
float64 uses float64 ``tl.dot``. The gradient products run in the compute
dtype, so no gradient is rounded to bfloat16 before the result.

Memory beyond the inputs: the ``[3, splits, N]`` partials and ``O(N)``
per-token vectors, one ``[chunk_size, V]`` buffer per gradient sweep (the
logits tile, then its gradient over it), and the driver's float32
accumulators; never ``N × V``.

Launch configuration: tile sizes per input dtype and the number of splits
(enough programs for the GPU, and at least a few vocabulary ranges so that
the ``GROUP_N`` token tiles of a group share each weight tile through L2)
are a starting point, to be tuned on a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import linear
from ..linear import LinearHead, Stats, WeightsFn
from ..reference import GRPOLossOutput
from .grpo_loss import compute_dtype, grpo_loss
from .token_logprobs import (backward_rows, device_guard, divide_rn, row_layout, scaled_logits, temperature_arguments,
                             token_logprobs)
from .tuning import knob

__all__ = ["TILES", "TileConfig", "TritonTiles", "fused_linear_grpo_loss", "linear_gradient", "linear_stats",
           "linear_token_logprobs", "tile_gradient"]


# --------------------------------------------------------------------------- #
# tile helpers
# --------------------------------------------------------------------------- #
@triton.jit
def _tanh(u):
    """tanh in the dtype of ``u``: an odd polynomial below |u| = 0.1 (no cancellation), else from e^{-2|u|}."""
    au = tl.abs(u)
    e = tl.exp(-2.0 * au)
    large = (1.0 - e) / (1.0 + e)
    # u (1 − u²/3 (1 − 2u²/5 (1 − 17u²/42 (1 − 62u²/153)))): the Taylor series to u⁹, integer constants only
    u2 = au * au
    q = 1.0 - u2 * 62.0 / 153.0
    q = 1.0 - u2 * 17.0 / 42.0 * q
    q = 1.0 - u2 * 2.0 / 5.0 * q
    q = 1.0 - u2 / 3.0 * q
    t = tl.where(au < 0.1, au * q, large)
    return tl.where(u < 0, -t, t)


@triton.jit
def _program_tile(token_tiles, splits, GROUP_N: tl.constexpr):
    """``(token tile, split)`` of this program: consecutive programs take the ``GROUP_N`` token tiles of a group
    for one split, then the next split, so the programs in flight share weight tiles (and token tiles) in L2."""
    pid = tl.program_id(0)
    per_group = GROUP_N * splits
    first = (pid // per_group) * GROUP_N
    size = tl.minimum(token_tiles - first, GROUP_N)
    r = pid % per_group
    return first + r % size, r // size


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, s_hn, s_hk, s_wv, s_wk, scale, softcap,
                 HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``(x, t)`` of a ``[BLOCK_N, BLOCK_V]`` tile: the logits ``x`` (before ``/ T``) and, with SOFTCAP,
    ``t = x / c = tanh(a s / c)``.

    Reads ``BLOCK_N × H`` hidden values and ``BLOCK_V × H`` weights (``BLOCK_K``
    columns at a time; out-of-range rows, columns and k give 0) and ``BLOCK_V`` biases.
    UPCAST: convert the operands to ACC before ``tl.dot`` (exact; see ``_upcast``).
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_ok = k < H
        h = tl.load(h_ptr + rows[:, None] * s_hn + k[None, :] * s_hk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + k[:, None] * s_wk + cols[None, :] * s_wv, mask=k_ok[:, None] & col_ok[None, :],
                      other=0.0)
        if UPCAST:
            h = h.to(ACC)
            w_t = w_t.to(ACC)
        acc = tl.dot(h, w_t, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(ACC)[None, :]
    x = acc * scale
    t = x
    if SOFTCAP:
        t = _tanh(x / softcap)
        x = softcap * t
    return x, t


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #
# Statistics. Program (token tile, split) reads the BLOCK_N hidden states of its tokens and the weights (and
# biases) of its split's vocabulary tiles, tiles_per_split × (BLOCK_N + BLOCK_V) × H values in all (the hidden
# states again for each vocabulary tile, from L2), and the ids; writes 3 partials per token (m, Σ e^{z−m},
# Σ e^{z−m}(z−m)) and z_y where y is in its range. Compute: 2·BLOCK_N·BLOCK_V·H FLOPs per vocabulary tile.
# WRITE_TILE: also writes the logits x (compute dtype) of its tokens × its split's vocabulary to the [n, V] tile,
# which the row gradient kernel then turns into d a in place (the fused loss's forward, no recomputation).
@triton.jit
def _linear_stats_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, part_ptr, zy_ptr, x_ptr,
    N, V, H, s_hn, s_hk, s_wv, s_wk, s_xn, token_tiles, splits, tiles_per_split,
    inv_t_hi, inv_t_lo, t_ptr, scale_arg: tl.float64, softcap_arg: tl.float64, ignore_index,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, RETURN_ENTROPY: tl.constexpr, WRITE_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, PER_ROW_T: tl.constexpr,
):
    tile_n, split = _program_tile(token_tiles, splits, GROUP_N)
    rows = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    inv_t = (tl.zeros([], dtype=ACC) + inv_t_hi) + inv_t_lo
    t_row = tl.zeros([BLOCK_N, 1], dtype=ACC) + 1.0  # per-row temperatures, read where the token counts
    if PER_ROW_T:
        t_row = tl.load(t_ptr + rows, mask=row_ok & (y != ignore_index), other=1.0).to(ACC)[:, None]
    scale = tl.full((), scale_arg, ACC)
    softcap = tl.full((), softcap_arg, ACC)

    m = tl.full([BLOCK_N], float("-inf"), dtype=ACC)  # running max of z
    s = tl.zeros([BLOCK_N], dtype=ACC)  # Σ e^{z − m}
    a = tl.zeros([BLOCK_N], dtype=ACC)  # Σ e^{z − m} (z − m)
    first = split * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))):
        cols = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        x, _t = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, s_hn, s_hk, s_wv, s_wk, scale,
                             softcap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, ACC, PRECISION, UPCAST)
        if WRITE_TILE:
            tl.store(x_ptr + rows[:, None] * s_xn + cols[None, :], x.to(x_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])
        z = tl.where(col_ok[None, :], scaled_logits(x, inv_t, t_row, PER_ROW_T), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # while every z so far is -inf (a -inf bias), shift by 0 instead: s = a = 0 stay 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift[:, None])
        if RETURN_ENTROPY:
            carried = tl.where(s > 0, m - shift, 0.0).to(ACC) * s
            a = alpha * (a + carried) + tl.sum(e * tl.where(e > 0, z - shift[:, None], 0.0).to(ACC), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        z_y = tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0).to(ACC), axis=1)
        tl.store(zy_ptr + rows, z_y, mask=row_ok & (y >= t * BLOCK_V) & (y < t * BLOCK_V + BLOCK_V))
    out = part_ptr + split * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + splits * N, s, mask=row_ok)
    tl.store(out + 2 * splits * N, a, mask=row_ok)


# Gradient. Program (token tile, split) reads what the stats kernel reads, plus lse, g_logp (and H, g_H) of its
# tokens; writes d a for its tokens × its split's vocabulary (BLOCK_N × BLOCK_V values of the compute dtype per
# tile, the only N × V-proportional traffic, bounded by the chunk). Ignored tokens get zeros.
@triton.jit
def _linear_grad_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr, da_ptr,
    N, V, H, s_hn, s_hk, s_wv, s_wk, s_dan, token_tiles, splits, tiles_per_split,
    inv_t_hi, inv_t_lo, t_ptr, scale_arg: tl.float64, softcap_arg: tl.float64, ignore_index,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, PER_ROW_T: tl.constexpr,
):
    tile_n, split = _program_tile(token_tiles, splits, GROUP_N)
    rows = (tile_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    counted = row_ok & (y != ignore_index)
    inv_t = (tl.zeros([], dtype=ACC) + inv_t_hi) + inv_t_lo
    t_row = tl.zeros([BLOCK_N, 1], dtype=ACC) + 1.0  # per-row temperatures, read where the token counts
    if PER_ROW_T:
        t_row = tl.load(t_ptr + rows, mask=counted, other=1.0).to(ACC)[:, None]
    scale = tl.full((), scale_arg, ACC)
    softcap = tl.full((), softcap_arg, ACC)
    # ignored tokens: lse = +inf, so p = 0 and d a = 0 however large their logits (e^z would overflow to inf)
    lse = tl.load(lse_ptr + rows, mask=counted, other=float("inf")).to(ACC)
    g_logp = tl.zeros([BLOCK_N], dtype=ACC)
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + rows, mask=counted, other=0.0).to(ACC)
    g_ent = tl.zeros([BLOCK_N], dtype=ACC)
    ent = tl.zeros([BLOCK_N], dtype=ACC)
    if HAS_G_ENT:
        g_ent = tl.load(g_ent_ptr + rows, mask=counted, other=0.0).to(ACC)
        ent = tl.load(ent_ptr + rows, mask=counted, other=0.0).to(ACC)

    first = split * tiles_per_split
    for t in range(first, tl.minimum(first + tiles_per_split, tl.cdiv(V, BLOCK_V))):
        cols = (t * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        col_ok = cols < V
        x, tc = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, s_hn, s_hk, s_wv, s_wk, scale,
                             softcap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, ACC, PRECISION, UPCAST)
        log_p = scaled_logits(x, inv_t, t_row, PER_ROW_T) - lse[:, None]
        p = tl.exp(log_p)
        dz = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
        if HAS_G_LOGP:
            dz = tl.where(cols[None, :] == y[:, None], g_logp[:, None], 0.0).to(ACC) - g_logp[:, None] * p
        if HAS_G_ENT:
            # -p (log p + H), with 0 where p = 0 (z = -inf: log p = -inf)
            dz = dz - g_ent[:, None] * p * tl.where(p > 0, log_p + ent[:, None], 0.0).to(ACC)
        if PER_ROW_T:
            da = divide_rn(dz, t_row) * scale
        else:
            da = dz * (inv_t * scale)
        if SOFTCAP:  # d/dy c tanh(y/c) = 1 − tanh²
            da = da * (1.0 - tc * tc)
        da = tl.where(counted[:, None], da, 0.0)  # an ignored token's hidden state may be garbage (NaN logits)
        tl.store(da_ptr + rows[:, None] * s_dan + cols[None, :], da.to(da_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------- #
# launch configuration
# --------------------------------------------------------------------------- #
class TileConfig(NamedTuple):
    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_k: int  # hidden units per tl.dot step
    num_warps: int
    num_stages: int


# GPU tiles by input dtype (a starting point, to be tuned on a GPU).
_GPU_CONFIGS = {
    torch.bfloat16: TileConfig(128, 128, 64, 8, 3),
    torch.float16: TileConfig(128, 128, 64, 8, 3),
    torch.float32: TileConfig(128, 128, 32, 8, 3),
    torch.float64: TileConfig(64, 64, 16, 4, 2),
}
# Under the interpreter: the smallest tiles tl.dot takes, so that tiny test shapes span several tiles.
_INTERPRETER_CONFIG = TileConfig(16, 16, 16, 1, 1)
# Tests set this to force a configuration.
CONFIG_OVERRIDE: Optional[TileConfig] = None
# Token tiles per group of consecutive programs (see _program_tile).
GROUP_N = 8
# Programs per SM the splits aim at, and the fewest splits (vocabulary ranges) worth a grid.
_PROGRAMS_PER_SM = 2
_MIN_SPLITS = 16
# Under the interpreter: two splits, so that the tests run the merge and the loop over vocabulary tiles.
_INTERPRETER_SPLITS = 2
# tl.dot input precision by input dtype: float32 inputs as three TF32 products (about float32 accuracy).
_PRECISION = {torch.float32: "tf32x3"}


def _upcast(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the operands go to ``tl.dot`` as float32: only bfloat16 under the interpreter, whose ``tl.dot``
    (Triton 3.9) multiplies the bit patterns of bfloat16 values as integers. bf16 → float32 is exact and bf16
    products are exact in float32, so the numbers are those of a bf16 ``tl.dot`` with float32 accumulation."""
    return dtype == torch.bfloat16 and device.type != "cuda"


def tile_config(dtype: torch.dtype, device: torch.device) -> TileConfig:
    if CONFIG_OVERRIDE is not None:
        return CONFIG_OVERRIDE
    cfg = _GPU_CONFIGS[dtype] if device.type == "cuda" else _INTERPRETER_CONFIG
    return TileConfig(*(knob(f"linear.{name}", value) for name, value in zip(TileConfig._fields, cfg)))


class _Grid(NamedTuple):
    token_tiles: int
    splits: int
    tiles_per_split: int

    @property
    def programs(self) -> int:
        return self.token_tiles * self.splits


def _grid(n: int, vocab: int, cfg: TileConfig, device: torch.device) -> _Grid:
    token_tiles = triton.cdiv(n, cfg.block_n)
    vocab_tiles = triton.cdiv(vocab, cfg.block_v)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        per_sm = knob("linear.programs_per_sm", _PROGRAMS_PER_SM)
        splits = max(knob("linear.min_splits", _MIN_SPLITS), triton.cdiv(per_sm * sms, token_tiles))
    else:
        splits = _INTERPRETER_SPLITS
    per_split = triton.cdiv(vocab_tiles, min(splits, vocab_tiles))
    return _Grid(token_tiles, triton.cdiv(vocab_tiles, per_split), per_split)


class _Launch(NamedTuple):
    """What both kernels take for the tokens ``rows`` of a head: tensors, sizes, options, constexprs."""

    hidden: Tensor  # [n, H], the inputs' dtype
    ids: Tensor  # [n], contiguous
    grid: _Grid
    args: tuple  # N, V, H, strides of hidden and weight
    options: tuple  # inv_t_hi, inv_t_lo, t_ptr, scale, softcap, ignore_index
    constexprs: dict
    meta: dict  # num_warps, num_stages


def _launch(head: LinearHead, rows: slice) -> _Launch:
    hidden = head.hidden[rows]
    n, (vocab, size) = hidden.shape[0], head.weight.shape
    cfg = tile_config(hidden.dtype, hidden.device)
    grid = _grid(n, vocab, cfg, hidden.device)
    temp = temperature_arguments(head.row_temperature(rows), (n,), hidden.dtype)
    constexprs = dict(HAS_BIAS=head.bias is not None, SOFTCAP=head.softcap is not None, BLOCK_N=cfg.block_n,
                      BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k, GROUP_N=GROUP_N, ACC=compute_dtype(hidden.dtype),
                      PRECISION=_PRECISION.get(hidden.dtype, "ieee"), UPCAST=_upcast(hidden.dtype, hidden.device),
                      PER_ROW_T=temp.PER_ROW_T)
    return _Launch(
        hidden, head.token_ids[rows].contiguous(), grid,
        (n, vocab, size, *hidden.stride(), *head.weight.stride()),
        (temp.inv_t_hi, temp.inv_t_lo, temp.pointer(hidden), head.logit_scale,
         1.0 if head.softcap is None else head.softcap, head.ignore_index),
        constexprs, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def _merge(part: Tensor, z_y: Tensor, ids: Tensor, ignore_index: int, return_entropy: bool) -> Stats:
    """``(logp, entropy or None, lse)`` of each token from the partials ``[3, splits, n]`` of its splits."""
    m, s, a = part.unbind(0)
    top = m.max(0).values
    shift = torch.where(top == float("-inf"), 0.0, top)
    alpha = torch.exp(m - shift)
    total = (alpha * s).sum(0)
    log_s = total.log()
    lse = shift + log_s
    ignored = ids == ignore_index
    zero = lse.new_zeros(())
    logp = torch.where(ignored, zero, z_y - lse)
    entropy = None
    if return_entropy:
        carried = torch.where(s > 0, m - shift, 0.0) * s
        entropy = torch.where(ignored, zero, log_s - (alpha * (a + carried)).sum(0) / total)
    return Stats(logp, entropy, lse)


# --------------------------------------------------------------------------- #
# launches
# --------------------------------------------------------------------------- #
def linear_stats(head: LinearHead, rows: slice, return_entropy: bool, tile: Optional[Tensor] = None) -> Stats:
    """``(logp, entropy or None, lse)`` ``[n]`` in the compute dtype of the tokens ``rows`` (one launch); with
    ``tile`` (``[n, V]`` contiguous, compute dtype), the logits ``x`` (before ``/ T``) written into it as well."""
    run = _launch(head, rows)
    n = run.hidden.shape[0]
    part = torch.empty((3, run.grid.splits, n), dtype=head.dtype, device=run.hidden.device)
    z_y = torch.empty(n, dtype=head.dtype, device=run.hidden.device)
    with device_guard(run.hidden):
        _linear_stats_kernel[(run.grid.programs,)](
            run.hidden, head.weight, run.hidden if head.bias is None else head.bias, run.ids, part, z_y,
            part if tile is None else tile, *run.args, 0 if tile is None else tile.stride(0), *run.grid,
            *run.options, RETURN_ENTROPY=return_entropy, WRITE_TILE=tile is not None, **run.constexprs, **run.meta,
        )
    return _merge(part, z_y, run.ids, head.ignore_index, return_entropy)


def linear_gradient(head: LinearHead, rows: slice, stats: Stats, g_logp: Optional[Tensor],
                    g_entropy: Optional[Tensor]) -> Tensor:
    """``d (h Wᵀ + b)`` ``[n, V]`` (compute dtype) of ``Σ g_logp·logp + g_H·H`` over the tokens ``rows``, from
    their ``lse`` (and entropy, needed with ``g_entropy``); ignored tokens get zeros."""
    run = _launch(head, rows)
    n, vocab = run.hidden.shape[0], head.weight.shape[0]
    da = torch.empty((n, vocab), dtype=head.dtype, device=run.hidden.device)
    lse = stats.lse.contiguous()
    ent, g_l, g_e = (lse if t is None else t.reshape(-1).contiguous()  # lse: a placeholder never read
                     for t in (stats.entropy if g_entropy is not None else None, g_logp, g_entropy))
    with device_guard(run.hidden):
        _linear_grad_kernel[(run.grid.programs,)](
            run.hidden, head.weight, run.hidden if head.bias is None else head.bias, run.ids, lse, ent, g_l, g_e, da,
            *run.args, da.stride(0), *run.grid, *run.options, HAS_G_LOGP=g_logp is not None,
            HAS_G_ENT=g_entropy is not None, **run.constexprs, **run.meta,
        )
    return da


def tile_gradient(head: LinearHead, rows: slice, tile: Tensor, stats: Stats, g_logp: Optional[Tensor],
                  g_entropy: Optional[Tensor]) -> Tensor:
    """``d (h Wᵀ + b)`` of ``Σ g_logp·logp + g_H·H`` over the tokens ``rows``, written over their logits ``tile``
    ``[n, V]`` (from :func:`linear_stats`) by the row gradient kernel of :mod:`.token_logprobs`: ``d x`` from
    the final ``lse`` (and entropy, needed with ``g_entropy``), chained through the softcap and the scale.
    One read and one write of the tile, no matmul; ignored tokens get zeros."""
    x = row_layout(tile)
    ids = head.token_ids[rows].contiguous()
    g_l, g_e = (None if t is None else t.reshape(-1).contiguous() for t in (g_logp, g_entropy))
    backward_rows(x, ids, stats.lse.contiguous(), None if g_e is None else stats.entropy.contiguous(), g_l, g_e,
                  head.row_temperature(rows), head.ignore_index, x, scale=head.logit_scale, softcap=head.softcap)
    return tile


class TritonTiles:
    """The tile provider of the Triton fused-linear ops (:class:`grpo_kernels.linear.Tiles`): statistics by the
    stats kernel, without any tile in memory. A gradient in the same sweep (the fused loss at token level): the
    stats kernel writes the chunk's logits too, which :func:`tile_gradient` turns into their gradient in place.
    A gradient from known statistics (a later sweep, a backward): the gradient kernel forms the tiles again."""

    tileless_stats = True

    @contextmanager
    def sweep(self, head: LinearHead) -> Iterator[LinearHead]:
        """Nothing held across a sweep: the head as it is."""
        yield head

    def __call__(self, head: LinearHead, rows: slice, h: Tensor, return_entropy: bool,
                 weights: Optional[WeightsFn], known: Optional[Stats]) -> tuple[Stats, Optional[Tensor]]:
        if weights is None:
            return linear_stats(head, rows, return_entropy) if known is None else known, None
        if known is not None:
            g_logp, g_entropy = weights(rows, known.logp)
            return known, linear_gradient(head, rows, known, g_logp, g_entropy)
        tile = torch.empty((h.shape[0], head.weight.shape[0]), dtype=head.dtype, device=h.device)
        stats = linear_stats(head, rows, return_entropy, tile)
        g_logp, g_entropy = weights(rows, stats.logp)
        return stats, tile_gradient(head, rows, tile, stats, g_logp, g_entropy)


TILES = TritonTiles()

# The row kernels the driver runs besides the tiles: the loss on the log-probs (and token_logprobs, by the
# driver's default provider).
_ROW_KERNELS = {"token_logprobs": token_logprobs, "grpo_loss": grpo_loss}


def _kernel(op: str):
    try:
        return _ROW_KERNELS[op]
    except KeyError:
        raise ValueError(f"the Triton fused-linear driver runs {sorted(_ROW_KERNELS)}, not {op!r}") from None


# --------------------------------------------------------------------------- #
# entry points
# --------------------------------------------------------------------------- #
def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`grpo_kernels.reference.linear_token_logprobs` with Triton kernels (inputs already validated).

    Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; ``chunk_size``
    tokens per gradient tile of the backward.
    """
    return linear.linear_token_logprobs(
        hidden, weight, token_ids, bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
        ignore_index=ignore_index, return_entropy=return_entropy, chunk_size=chunk_size, backend="triton",
        kernel=_kernel, tiles=TILES,
    )


def fused_linear_grpo_loss(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: Union[float, Tensor] = 1.0,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    **loss_options,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.fused_linear_grpo_loss` with Triton kernels (inputs already validated);
    ``loss_options`` are the keyword options of :func:`grpo_kernels.reference.grpo_loss`.

    ``loss`` and ``entropy`` are differentiable w.r.t. ``hidden``, ``weight``
    and ``bias`` (the gradient formed in the forward, ``chunk_size`` tokens per
    gradient tile); the other fields come without gradient.
    """
    return linear.fused_linear_grpo_loss(
        hidden, weight, token_ids, old_logprobs, advantages, mask, bias=bias, temperature=temperature,
        logit_scale=logit_scale, softcap=softcap, ignore_index=ignore_index, return_entropy=return_entropy,
        chunk_size=chunk_size, backend="triton", kernel=_kernel, tiles=TILES, **loss_options,
    )

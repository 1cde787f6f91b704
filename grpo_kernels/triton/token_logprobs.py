"""Triton ``token_logprobs``: one pass over each row of logits, forward and backward.

For a row ``x`` of ``V`` logits, inverse temperature ``1/T`` and target id ``y``
(see :func:`grpo_kernels.reference.token_logprobs`):

    z = x / T,   lse = log Σ_v e^{z_v},   logp = z_y - lse,   p = e^{z - lse},
    H = -Σ_v p_v log p_v = lse - Σ_v p_v z_v

The forward kernel streams the row once in ``BLOCK_V`` chunks and keeps an online
(rescaled) state relative to the running max ``m``:

    s = Σ e^{z_v - m},   a = Σ e^{z_v - m} (z_v - m)       (terms with z_v = -inf count 0)
    lse = m + log s,     H = log s - a / s

(``a`` is taken relative to ``m`` rather than as ``Σ e^{z-m} z`` so that ``H`` has no
cancellation between two numbers of the size of ``|z|``, e.g. for logits of 1e4.)
When the max moves from ``m`` to ``m'``: ``s' = α s``, ``a' = α (a + (m - m') s)`` with
``α = e^{m - m'}``.

The backward kernel re-reads the row once, using the saved ``lse`` (and ``H``):

    dx = g_logp (onehot_y - p) / T  +  g_H (-p ⊙ (log p + H)) / T

written in the logits dtype, optionally into the logits buffer itself
(``inplace_backward=True``). Ignored rows (``y == ignore_index``) give logp = H = 0
and a zero gradient, without reading the row.

Precision: float16/bfloat16/float32 logits are computed in float32 and give
float32 outputs; float64 logits are computed in float64 inside the kernels (so the
kernels need a GPU with float64 support, which every CUDA GPU has) and give
float64 outputs. A float temperature is passed as ``1/T`` in two float32 runtime arguments
(hi + lo; ``z = x · 1/T``), so a new temperature never recompiles and float64 keeps ~48 bits
of ``1/T``. A per-row temperature tensor (``PER_ROW_T``) is passed as a pointer to one
temperature per row in the compute dtype, read once per row that counts: ``z = x / T_r`` and
``dx = dz / T_r``, correctly rounded divisions (``div_rn``) as the reference divides, so new
values never recompile either.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..reference import broadcast_temperature
from .tuning import knob

__all__ = ["token_logprobs", "token_logprobs_triton", "TokenLogprobsFunction", "launch_config", "row_layout",
           "forward_rows", "backward_rows", "temperature_arguments"]


# --------------------------------------------------------------------------- #
# row helpers (shared with the fused loss kernel)
# --------------------------------------------------------------------------- #
@triton.jit
def divide_rn(a, b):
    """``a / b`` correctly rounded, as torch divides (float32 ``/`` may be approximate on a GPU; float64's is not)."""
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.math.div_rn(a, b)
    return q


@triton.jit
def scaled_logits(x, inv_t, t_row, PER_ROW_T: tl.constexpr):
    """``z = x / T``: ``x · (1/T)`` for a float temperature, ``x / T_r`` (correctly rounded) for a per-row one."""
    if PER_ROW_T:
        z = divide_rn(x, t_row)
    else:
        z = x * inv_t
    return z


@triton.jit
def row_log_softmax_stats(x_row, y, V, inv_t, RETURN_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
                          ACC: tl.constexpr, EVICTION: tl.constexpr, t_row=1.0, PER_ROW_T: tl.constexpr = False):
    """``(logp, lse, H)`` of one row: a single streaming read of its V logits (H = 0 unless RETURN_ENTROPY).
    Its temperature: ``inv_t`` = 1/T, or with PER_ROW_T the row's own ``t_row`` (see :func:`scaled_logits`)."""
    m = tl.full([], float("-inf"), dtype=ACC)  # running max of z
    s = tl.zeros([], dtype=ACC)  # Σ e^{z - m}
    a = tl.zeros([], dtype=ACC)  # Σ e^{z - m} (z - m)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = scaled_logits(tl.load(x_row + offs, mask=offs < V, other=float("-inf"), eviction_policy=EVICTION).to(ACC),
                          inv_t, t_row, PER_ROW_T)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every z so far is -inf, m_new is -inf: shift by 0 instead (s = a = 0 stay 0).
        shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        alpha = tl.exp(m - shift)  # 0 while m = -inf
        e = tl.exp(z - shift)  # 0 where z = -inf
        if RETURN_ENTROPY:
            # (m - shift) * s only when s > 0 (then m is finite); e·(z - m') = 0 where z = -inf.
            carried = tl.where(s > 0, m - shift, 0.0).to(ACC) * s
            a = alpha * (a + carried) + tl.sum(e * tl.where(e > 0, z - shift, 0.0).to(ACC), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    logp = scaled_logits(tl.load(x_row + y).to(ACC), inv_t, t_row, PER_ROW_T) - lse
    ent = tl.zeros([], dtype=ACC)
    if RETURN_ENTROPY:
        ent = log_s - a / s
    return logp, lse, ent


@triton.jit
def row_grad(x_row, dx_row, y, lse, ent, g_logp, g_ent, V, inv_t, scale, softcap,
             HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, ACCUMULATE: tl.constexpr, SOFTCAP: tl.constexpr,
             BLOCK_V: tl.constexpr, ACC: tl.constexpr, REVERSE: tl.constexpr, t_row=1.0,
             PER_ROW_T: tl.constexpr = False):
    """Write ``dx = g_logp (onehot_y − p)/T − g_H p (log p + H)/T`` for one row (added to dx with ACCUMULATE).
    The temperature as in :func:`row_log_softmax_stats` (``dz / T_r`` divided with PER_ROW_T).

    Times ``scale`` (1 for logits; ``s`` for the logits ``x = s a`` of a
    fused-linear tile) and, with SOFTCAP, ``1 − (x/c)²``: the chain through
    ``x = c tanh(s a / c)`` to the affine logits ``a``, from the value ``x`` itself.
    One read of the row (from the end backwards with REVERSE, so that the chunks
    read last by a preceding sweep, the likeliest still in L2, come first) and
    one write; each chunk is read before it is written, so ``dx_row`` may be ``x_row``.
    """
    n_chunks = tl.cdiv(V, BLOCK_V)
    for i in range(0, n_chunks):
        if REVERSE:
            start = (n_chunks - 1 - i) * BLOCK_V
        else:
            start = i * BLOCK_V
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        z = scaled_logits(x, inv_t, t_row, PER_ROW_T)
        log_p = z - lse
        p = tl.exp(log_p)
        dz = tl.zeros([BLOCK_V], dtype=ACC)
        if HAS_G_LOGP:
            dz = tl.where(offs == y, g_logp, 0.0).to(ACC) - g_logp * p
        if HAS_G_ENT:
            # -p (log p + H), with 0 where p = 0 (z = -inf: log p = -inf).
            dz = dz - g_ent * p * tl.where(p > 0, log_p + ent, 0.0).to(ACC)
        if PER_ROW_T:
            dx = divide_rn(dz, t_row) * scale
        else:
            dx = dz * (inv_t * scale)
        if SOFTCAP:  # d/du c tanh(u/c) = 1 − tanh² = 1 − (x/c)²
            t = x / softcap
            dx = dx * (1.0 - t * t)
        if ACCUMULATE:
            dx += tl.load(dx_row + offs, mask=mask, other=0.0).to(ACC)
        tl.store(dx_row + offs, dx.to(dx_row.dtype.element_ty), mask=mask)


@triton.jit
def row_zero(dx_row, V, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        tl.store(dx_row + offs, tl.zeros([BLOCK_V], dtype=dx_row.dtype.element_ty), mask=offs < V)


# --------------------------------------------------------------------------- #
# kernels
# --------------------------------------------------------------------------- #
# Forward. Program `row` (1-D grid over rows) reads: its token id y (1 int), the
# V logits of its row once (BLOCK_V at a time; plus the single logit x_y, already
# in cache or one extra sector); writes: logp (4 B, 8 B for float64), lse (4/8 B)
# and, with RETURN_ENTROPY, H (4/8 B). Memory traffic: one read of the logits +
# 8-12 bytes per row (16-24 for float64). Ignored rows read nothing but y.
# Row `row` of the logits starts at
#   (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
# (leading dims collapsed into at most two, all offsets in int64); the vocab dim
# has stride 1.
@triton.jit
def _token_logprobs_fwd_kernel(
    x_ptr, y_ptr, logp_ptr, ent_ptr, lse_ptr,
    n_inner, stride_outer, stride_inner, V,
    inv_t_hi, inv_t_lo, t_ptr, ignore_index,
    RETURN_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr, PER_ROW_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    y = tl.load(y_ptr + row).to(tl.int64)
    inv_t = (tl.zeros([], dtype=ACC) + inv_t_hi) + inv_t_lo

    logp = tl.zeros([], dtype=ACC)
    ent = tl.zeros([], dtype=ACC)
    lse = tl.zeros([], dtype=ACC)
    if y != ignore_index:
        t_row = tl.zeros([], dtype=ACC) + 1.0
        if PER_ROW_T:
            t_row = tl.load(t_ptr + row).to(ACC)
        logp, lse, ent = row_log_softmax_stats(x_row, y, V, inv_t, RETURN_ENTROPY, BLOCK_V, ACC, EVICTION="evict_first",
                                               t_row=t_row, PER_ROW_T=PER_ROW_T)
    tl.store(logp_ptr + row, logp.to(logp_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))
    if RETURN_ENTROPY:
        tl.store(ent_ptr + row, ent.to(ent_ptr.dtype.element_ty))


# Backward. Program `row` reads: y, lse, g_logp (with HAS_G_LOGP), H and g_H (with
# HAS_G_ENT) — a few bytes per row — and the V logits of its row once; writes the
# V entries of dx once (dx may be the logits buffer itself: each BLOCK_V chunk is
# read before it is overwritten, and nothing reads it afterwards). Memory traffic:
# one read + one write of the logits (+ one read of dx with ACCUMULATE), no second
# reduction (lse and H are saved). Ignored rows only write zeros (or nothing with ACCUMULATE).
# scale_arg and SOFTCAP / softcap_arg chain dx to a fused-linear tile's affine logits (see row_grad).
@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr, dx_ptr, y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    n_inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner, V,
    inv_t_hi, inv_t_lo, t_ptr, scale_arg: tl.float64, softcap_arg: tl.float64, ignore_index,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, ACCUMULATE: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr, ACC: tl.constexpr, PER_ROW_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    x_row = x_ptr + outer * stride_outer + inner * stride_inner
    dx_row = dx_ptr + outer * dx_stride_outer + inner * dx_stride_inner
    y = tl.load(y_ptr + row).to(tl.int64)
    if y == ignore_index:
        if not ACCUMULATE:
            row_zero(dx_row, V, BLOCK_V)
    else:
        inv_t = (tl.zeros([], dtype=ACC) + inv_t_hi) + inv_t_lo
        t_row = tl.zeros([], dtype=ACC) + 1.0
        if PER_ROW_T:
            t_row = tl.load(t_ptr + row).to(ACC)
        lse = tl.load(lse_ptr + row).to(ACC)
        g_logp = tl.zeros([], dtype=ACC)
        if HAS_G_LOGP:
            g_logp = tl.load(g_logp_ptr + row).to(ACC)
        g_ent = tl.zeros([], dtype=ACC)
        ent = tl.zeros([], dtype=ACC)
        if HAS_G_ENT:
            g_ent = tl.load(g_ent_ptr + row).to(ACC)
            ent = tl.load(ent_ptr + row).to(ACC)
        row_grad(x_row, dx_row, y, lse, ent, g_logp, g_ent, V, inv_t, tl.full((), scale_arg, ACC),
                 tl.full((), softcap_arg, ACC), HAS_G_LOGP, HAS_G_ENT, ACCUMULATE, SOFTCAP, BLOCK_V, ACC, REVERSE=False,
                 t_row=t_row, PER_ROW_T=PER_ROW_T)


# --------------------------------------------------------------------------- #
# launch configuration
# --------------------------------------------------------------------------- #
# Largest chunk of a row one loop iteration holds, by logits dtype (16 KiB of
# loads per iteration for 2-byte dtypes and float32, 16 KiB for float64).
_MAX_BLOCK_V = {torch.float16: 8192, torch.bfloat16: 8192, torch.float32: 4096, torch.float64: 2048}
# num_warps by BLOCK_V: (upper bound of BLOCK_V, num_warps), first match.
_NUM_WARPS = ((256, 1), (1024, 4), (4096, 8), (8192, 16))


def launch_config(vocab: int, dtype: torch.dtype, block_v: Optional[int] = None,
                  kernel: str = "token_logprobs.fwd") -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``vocab`` logits of ``dtype``.

    ``BLOCK_V = min(next_pow2(V), max for the dtype)``; the row is looped over in
    ``BLOCK_V`` chunks. ``block_v`` (a power of two) forces the chunk size, for tests.
    ``kernel`` names the knobs of :mod:`.tuning` (``<kernel>.max_block_v``, ``<kernel>.num_warps``)
    that override the defaults.
    """
    if block_v is None:
        block_v = min(triton.next_power_of_2(vocab), knob(f"{kernel}.max_block_v", _MAX_BLOCK_V[dtype]))
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    num_warps = next(w for bound, w in _NUM_WARPS if block_v <= bound) if block_v <= _NUM_WARPS[-1][0] else 16
    return block_v, knob(f"{kernel}.num_warps", num_warps)


class Rows(NamedTuple):
    """The rows of a ``[..., V]`` logits buffer as the kernels address them.

    Row ``r`` (row-major over the leading dims) starts at element
    ``(r // n_inner) * stride_outer + (r % n_inner) * stride_inner`` of ``x``; the
    vocab dim has stride 1.
    """

    x: Tensor
    n_inner: int
    stride_outer: int
    stride_inner: int

    @property
    def vocab(self) -> int:
        return self.x.shape[-1]

    @property
    def strides(self) -> tuple[int, int, int]:
        return self.n_inner, self.stride_outer, self.stride_inner

    def writable(self) -> bool:
        """No two rows share memory (a stride-0 expanded dim would make in-place writes race)."""
        return all(st != 0 for n, st in zip(self.x.shape, self.x.stride()) if n > 1)


def row_layout(logits: Tensor) -> Rows:
    """The :class:`Rows` of ``logits``: ``logits`` itself when its vocab dim has stride 1
    and its leading dims collapse into at most two strided dims; otherwise a contiguous copy."""
    vocab = logits.shape[-1]
    if vocab == 1 or logits.stride(-1) == 1:
        dims = [(n, st) for n, st in zip(logits.shape[:-1], logits.stride()[:-1]) if n != 1]
        merged: list[list[int]] = []
        for n, st in dims:
            if merged and merged[-1][1] == st * n:
                merged[-1] = [merged[-1][0] * n, st]
            else:
                merged.append([n, st])
        if len(merged) <= 2:
            merged = [[1, 0]] * (2 - len(merged)) + merged
            (_, stride_outer), (n_inner, stride_inner) = merged
            return Rows(logits, n_inner, stride_outer, stride_inner)
    return Rows(logits.contiguous(), 1, vocab, 0)


def gradient_rows(rows: Rows, inplace: bool) -> Rows:
    """Where a logits gradient goes: ``rows`` itself (in place, when rows do not alias) or a new dense
    buffer, addressed with the same ``n_inner`` (the kernels split row indices once, for both)."""
    if inplace and rows.writable():
        return rows
    dense = torch.empty(rows.x.shape, dtype=rows.x.dtype, device=rows.x.device)
    return Rows(dense, rows.n_inner, rows.n_inner * rows.vocab, rows.vocab)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def inverse_temperature(temperature: float) -> tuple[float, float]:
    """``1/T`` as float32 ``hi + lo`` (the kernels add them in their compute dtype)."""
    inv_t = 1.0 / float(temperature)
    hi = float(torch.tensor(inv_t, dtype=torch.float32))
    lo = float(torch.tensor(inv_t - hi, dtype=torch.float32))
    return hi, lo


class TemperatureArguments(NamedTuple):
    """A temperature as the kernels take it: ``inv_t_hi + inv_t_lo`` = 1/T of a float temperature, or
    ``per_row``, one temperature per row (``[n_rows]``, contiguous, the compute dtype) with ``PER_ROW_T``."""

    inv_t_hi: float
    inv_t_lo: float
    per_row: Optional[Tensor]

    def pointer(self, placeholder: Tensor) -> Tensor:
        """The ``t_ptr`` argument: ``per_row``, or ``placeholder`` (never read) for a float temperature."""
        return placeholder if self.per_row is None else self.per_row

    @property
    def PER_ROW_T(self) -> bool:  # noqa: N802 (the kernels' constexpr)
        return self.per_row is not None


def temperature_arguments(temperature: Union[float, Tensor], lead_shape: Sequence[int],
                          dtype: torch.dtype) -> TemperatureArguments:
    """The kernels' temperature for rows of ``[*lead_shape, V]`` logits of ``dtype``: a float as ``1/T`` (hi, lo);
    a tensor of shape ``lead_shape[:k]`` broadcast over the remaining row dims, in the compute dtype (as the
    reference rounds it), one per row."""
    if not isinstance(temperature, Tensor):
        return TemperatureArguments(*inverse_temperature(temperature), None)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = broadcast_temperature(temperature, tuple(lead_shape)).to(acc)
    return TemperatureArguments(1.0, 0.0, t.reshape(-1).contiguous())


def device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------- #
# launches
# --------------------------------------------------------------------------- #
def forward_rows(
    rows: Rows, ids: Tensor, temperature: Union[float, Tensor], ignore_index: int, return_entropy: bool,
    block_v: Optional[int] = None,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(logp, lse, entropy or None)``, each ``[n_rows]`` float32 (float64 for float64 logits).
    ``temperature``: a float, or a tensor broadcast over the rows' leading dims (:func:`temperature_arguments`)."""
    out_dtype = torch.float64 if rows.x.dtype == torch.float64 else torch.float32
    n_rows = ids.numel()
    logp = torch.empty(n_rows, dtype=out_dtype, device=rows.x.device)
    lse = torch.empty(n_rows, dtype=out_dtype, device=rows.x.device)
    ent = torch.empty(n_rows, dtype=out_dtype, device=rows.x.device) if return_entropy else None
    block, num_warps = launch_config(rows.vocab, rows.x.dtype, block_v)
    temp = temperature_arguments(temperature, rows.x.shape[:-1], rows.x.dtype)
    with device_guard(rows.x):
        _token_logprobs_fwd_kernel[(n_rows,)](
            rows.x, ids, logp, lse if ent is None else ent, lse, *rows.strides, rows.vocab,
            temp.inv_t_hi, temp.inv_t_lo, temp.pointer(lse), ignore_index,
            RETURN_ENTROPY=return_entropy, BLOCK_V=block, ACC=_acc_dtype(rows.x.dtype), PER_ROW_T=temp.PER_ROW_T,
            num_warps=num_warps,
        )
    return logp, lse, ent


def backward_rows(
    rows: Rows, ids: Tensor, lse: Tensor, ent: Optional[Tensor], g_logp: Optional[Tensor],
    g_ent: Optional[Tensor], temperature: Union[float, Tensor], ignore_index: int, out: Rows, *,
    accumulate: bool = False, block_v: Optional[int] = None, scale: float = 1.0, softcap: Optional[float] = None,
) -> None:
    """Write (or add, with ``accumulate``) the logits gradient for the per-row gradients
    ``g_logp`` and ``g_ent`` (``[n_rows]`` or None) into ``out`` (which may be ``rows``).

    ``scale`` and ``softcap``: rows of a fused-linear tile ``x = c tanh(s a / c)``
    (or ``s a``) get the gradient of the affine logits ``a``, from ``x`` alone."""
    block, num_warps = launch_config(rows.vocab, rows.x.dtype, block_v, "token_logprobs.bwd")
    has_g_ent = g_ent is not None
    temp = temperature_arguments(temperature, rows.x.shape[:-1], rows.x.dtype)
    with device_guard(rows.x):
        _token_logprobs_bwd_kernel[(ids.numel(),)](
            rows.x, out.x, ids, lse, ent if has_g_ent else lse,
            lse if g_logp is None else g_logp, lse if g_ent is None else g_ent,
            *rows.strides, out.stride_outer, out.stride_inner, rows.vocab,
            temp.inv_t_hi, temp.inv_t_lo, temp.pointer(lse), float(scale), 1.0 if softcap is None else float(softcap),
            ignore_index, HAS_G_LOGP=g_logp is not None, HAS_G_ENT=has_g_ent, ACCUMULATE=accumulate,
            SOFTCAP=softcap is not None, BLOCK_V=block, ACC=_acc_dtype(rows.x.dtype), PER_ROW_T=temp.PER_ROW_T,
            num_warps=num_warps,
        )


# --------------------------------------------------------------------------- #
# autograd
# --------------------------------------------------------------------------- #
class TokenLogprobsFunction(torch.autograd.Function):
    """``(logits, token_ids, temperature, ignore_index, return_entropy, inplace_backward, block_v)``
    → ``logp`` or ``(logp, entropy)``; differentiable w.r.t. ``logits`` only, once."""

    @staticmethod
    def forward(ctx, logits, token_ids, temperature, ignore_index, return_entropy, inplace_backward, block_v):
        rows = row_layout(logits)
        ids = token_ids.reshape(-1)
        logp, lse, ent = forward_rows(rows, ids, temperature, ignore_index, return_entropy, block_v)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(rows.x, ids, lse, ent)
        ctx.rows = rows._replace(x=None)
        ctx.options = (temperature, ignore_index, inplace_backward, block_v)
        lead_shape = logits.shape[:-1]
        if return_entropy:
            return logp.reshape(lead_shape), ent.reshape(lead_shape)
        return logp.reshape(lead_shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent=None):
        x, ids, lse, ent = ctx.saved_tensors
        if ent is None:
            g_ent = None
        if not ctx.needs_input_grad[0] or (g_logp is None and g_ent is None):
            return (None,) * 7
        temperature, ignore_index, inplace, block_v = ctx.options
        rows = ctx.rows._replace(x=x.detach())
        out = gradient_rows(rows, inplace)
        backward_rows(
            rows, ids, lse, ent,
            None if g_logp is None else g_logp.reshape(-1).contiguous(),
            None if g_ent is None else g_ent.reshape(-1).contiguous(),
            temperature, ignore_index, out, block_v=block_v,
        )
        if out.x is rows.x:  # the logits now hold their gradient: fail loudly if anything else saved them
            torch.autograd.graph.increment_version(rows.x)
        return out.x, None, None, None, None, None, None


# --------------------------------------------------------------------------- #
# entry points
# --------------------------------------------------------------------------- #
def token_logprobs_triton(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: Union[float, Tensor] = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    block_v: Optional[int] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`token_logprobs` with the internal options.

    ``inplace_backward=True`` writes the gradient into the logits buffer (the one
    the kernel read: ``logits`` itself unless it had to be made contiguous) and
    returns it as the gradient; ``logits`` must not be used after ``backward``.
    ``block_v`` forces the chunk size (a power of two), for tests.
    """
    if not isinstance(temperature, Tensor):
        temperature = float(temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite float, got {temperature}")
    return TokenLogprobsFunction.apply(
        logits, token_ids, temperature, int(ignore_index), bool(return_entropy), bool(inplace_backward), block_v
    )


def token_logprobs(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: Union[float, Tensor] = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Triton backend of :func:`grpo_kernels.reference.token_logprobs` (same semantics)."""
    return token_logprobs_triton(
        logits, token_ids, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
        inplace_backward=inplace_backward,
    )


# --------------------------------------------------------------------------- #
# row statistics and gradients for callers that combine rows themselves
# (the vocabulary-parallel ops of grpo_kernels.distributed)
# --------------------------------------------------------------------------- #
def row_statistics(
    logits: Tensor, ids: Tensor, temperature: Union[float, Tensor], ignore_index: int, return_entropy: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(logp, lse, entropy or None)`` of each row of ``logits [..., V]`` for ``ids [R]`` int64, each ``[R]``
    in the compute dtype (lse of ``logits / T``); ignored rows get 0 everywhere."""
    return forward_rows(row_layout(logits), ids, temperature, ignore_index, return_entropy)


def row_gradient(
    logits: Tensor, ids: Tensor, lse: Tensor, ent: Optional[Tensor], g_logp: Optional[Tensor],
    g_ent: Optional[Tensor], temperature: Union[float, Tensor], ignore_index: int, inplace: bool,
) -> Tensor:
    """``d logits = (g_logp (onehot_y − p) − g_ent p (log p + ent)) / T`` with ``p = exp(logits / T − lse)``
    for any given per-row ``lse`` and ``ent`` (an id outside ``[0, V)`` has no one-hot term); in place when
    ``inplace`` and the rows do not alias. Ignored rows get 0."""
    rows = row_layout(logits)
    out = gradient_rows(rows, inplace)
    backward_rows(rows, ids, lse, ent, g_logp, g_ent, temperature, ignore_index, out)
    return out.x

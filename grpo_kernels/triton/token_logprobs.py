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
float64 outputs. ``1/T`` is passed as two float32 runtime arguments (hi + lo), so a
new temperature never recompiles and float64 keeps ~48 bits of ``1/T``.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["token_logprobs", "token_logprobs_triton", "TokenLogprobsFunction", "launch_config"]


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
    inv_t_hi, inv_t_lo, ignore_index,
    RETURN_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + (row // n_inner) * stride_outer + (row % n_inner) * stride_inner
    y = tl.load(y_ptr + row).to(tl.int64)
    inv_t = (tl.zeros([], dtype=ACC) + inv_t_hi) + inv_t_lo

    logp = tl.zeros([], dtype=ACC)
    ent = tl.zeros([], dtype=ACC)
    lse = tl.zeros([], dtype=ACC)
    if y != ignore_index:
        m = tl.full([], float("-inf"), dtype=ACC)  # running max of z
        s = tl.zeros([], dtype=ACC)  # Σ e^{z - m}
        a = tl.zeros([], dtype=ACC)  # Σ e^{z - m} (z - m)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(ACC) * inv_t
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
        z_y = tl.load(x_row + y).to(ACC) * inv_t
        logp = z_y - lse
        if RETURN_ENTROPY:
            ent = log_s - a / s
    tl.store(logp_ptr + row, logp.to(logp_ptr.dtype.element_ty))
    tl.store(lse_ptr + row, lse.to(lse_ptr.dtype.element_ty))
    if RETURN_ENTROPY:
        tl.store(ent_ptr + row, ent.to(ent_ptr.dtype.element_ty))


# Backward. Program `row` reads: y, lse, g_logp (with HAS_G_LOGP), H and g_H (with
# HAS_G_ENT) — a few bytes per row — and the V logits of its row once; writes the
# V entries of dx once (dx may be the logits buffer itself: each BLOCK_V chunk is
# read before it is overwritten, and nothing reads it afterwards). Memory traffic:
# one read + one write of the logits, no second reduction (lse and H are saved).
# Ignored rows only write zeros.
@triton.jit
def _token_logprobs_bwd_kernel(
    x_ptr, dx_ptr, y_ptr, lse_ptr, ent_ptr, g_logp_ptr, g_ent_ptr,
    n_inner, stride_outer, stride_inner, dx_stride_outer, dx_stride_inner, V,
    inv_t_hi, inv_t_lo, ignore_index,
    HAS_G_LOGP: tl.constexpr, HAS_G_ENT: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row % n_inner
    x_row = x_ptr + outer * stride_outer + inner * stride_inner
    dx_row = dx_ptr + outer * dx_stride_outer + inner * dx_stride_inner
    y = tl.load(y_ptr + row).to(tl.int64)
    if y == ignore_index:
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(dx_row + offs, tl.zeros([BLOCK_V], dtype=dx_ptr.dtype.element_ty), mask=offs < V)
    else:
        inv_t = (tl.zeros([], dtype=ACC) + inv_t_hi) + inv_t_lo
        lse = tl.load(lse_ptr + row).to(ACC)
        g_logp = tl.zeros([], dtype=ACC)
        if HAS_G_LOGP:
            g_logp = tl.load(g_logp_ptr + row).to(ACC)
        g_ent = tl.zeros([], dtype=ACC)
        ent = tl.zeros([], dtype=ACC)
        if HAS_G_ENT:
            g_ent = tl.load(g_ent_ptr + row).to(ACC)
            ent = tl.load(ent_ptr + row).to(ACC)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC) * inv_t
            log_p = z - lse
            p = tl.exp(log_p)
            dz = tl.zeros([BLOCK_V], dtype=ACC)
            if HAS_G_LOGP:
                dz = tl.where(offs == y, g_logp, 0.0).to(ACC) - g_logp * p
            if HAS_G_ENT:
                # -p (log p + H), with 0 where p = 0 (z = -inf: log p = -inf).
                dz = dz - g_ent * p * tl.where(p > 0, log_p + ent, 0.0).to(ACC)
            dx = dz * inv_t
            tl.store(dx_row + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- #
# launch configuration
# --------------------------------------------------------------------------- #
# Largest chunk of a row one loop iteration holds, by logits dtype (16 KiB of
# loads per iteration for 2-byte dtypes and float32, 16 KiB for float64).
_MAX_BLOCK_V = {torch.float16: 8192, torch.bfloat16: 8192, torch.float32: 4096, torch.float64: 2048}
# num_warps by BLOCK_V: (upper bound of BLOCK_V, num_warps), first match.
_NUM_WARPS = ((256, 1), (1024, 4), (4096, 8), (8192, 16))


def launch_config(vocab: int, dtype: torch.dtype, block_v: Optional[int] = None) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``vocab`` logits of ``dtype``.

    ``BLOCK_V = min(next_pow2(V), max for the dtype)``; the row is looped over in
    ``BLOCK_V`` chunks. ``block_v`` (a power of two) forces the chunk size, for tests.
    """
    if block_v is None:
        block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V[dtype])
    elif block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    num_warps = next(w for bound, w in _NUM_WARPS if block_v <= bound) if block_v <= _NUM_WARPS[-1][0] else 16
    return block_v, num_warps


def _row_layout(logits: Tensor) -> tuple[Tensor, int, int, int]:
    """``(x, n_inner, stride_outer, stride_inner)`` addressing the rows of ``logits``.

    Row ``r`` (row-major over the leading dims) starts at element
    ``(r // n_inner) * stride_outer + (r % n_inner) * stride_inner`` of ``x``.
    ``x`` is ``logits`` itself when its vocab dim has stride 1 and its leading dims
    collapse into at most two strided dims; otherwise a contiguous copy.
    """
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
            return logits, n_inner, stride_outer, stride_inner
    x = logits.contiguous()
    return x, 1, vocab, 0


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _inverse_temperature(temperature: float) -> tuple[float, float]:
    """``1/T`` as float32 ``hi + lo`` (the kernels add them in their compute dtype)."""
    inv_t = 1.0 / float(temperature)
    hi = float(torch.tensor(inv_t, dtype=torch.float32))
    lo = float(torch.tensor(inv_t - hi, dtype=torch.float32))
    return hi, lo


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NullContext()


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- #
# autograd
# --------------------------------------------------------------------------- #
class TokenLogprobsFunction(torch.autograd.Function):
    """``(logits, token_ids, temperature, ignore_index, return_entropy, inplace_backward, block_v)``
    → ``logp`` or ``(logp, entropy)``; differentiable w.r.t. ``logits`` only, once."""

    @staticmethod
    def forward(ctx, logits, token_ids, temperature, ignore_index, return_entropy, inplace_backward, block_v):
        out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        lead_shape = logits.shape[:-1]
        vocab = logits.shape[-1]
        x, n_inner, stride_outer, stride_inner = _row_layout(logits)
        ids = token_ids.reshape(-1)
        n_rows = ids.numel()
        logp = torch.empty(n_rows, dtype=out_dtype, device=logits.device)
        lse = torch.empty(n_rows, dtype=out_dtype, device=logits.device)
        ent = torch.empty(n_rows, dtype=out_dtype, device=logits.device) if return_entropy else lse
        block, num_warps = launch_config(vocab, logits.dtype, block_v)
        inv_t_hi, inv_t_lo = _inverse_temperature(temperature)
        with _device_guard(logits):
            _token_logprobs_fwd_kernel[(n_rows,)](
                x, ids, logp, ent, lse,
                n_inner, stride_outer, stride_inner, vocab,
                inv_t_hi, inv_t_lo, ignore_index,
                RETURN_ENTROPY=return_entropy, BLOCK_V=block, ACC=_acc_dtype(logits.dtype),
                num_warps=num_warps,
            )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, ids, lse, ent if return_entropy else None)
        ctx.layout = (n_inner, stride_outer, stride_inner)
        ctx.logits_shape = logits.shape
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.block_v = block_v
        logp = logp.reshape(lead_shape)
        if return_entropy:
            return logp, ent.reshape(lead_shape)
        return logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_ent=None):
        if not ctx.needs_input_grad[0]:
            return (None,) * 7
        x, ids, lse, ent = ctx.saved_tensors
        has_g_logp = g_logp is not None
        has_g_ent = g_ent is not None and ent is not None
        if not (has_g_logp or has_g_ent):
            return (None,) * 7
        n_inner, stride_outer, stride_inner = ctx.layout
        vocab = x.shape[-1]
        n_rows = ids.numel()
        inplace = ctx.inplace_backward and _writable_rows(x)
        if inplace:
            dx = x.detach()
            dx_outer, dx_inner = stride_outer, stride_inner
        else:
            dx = torch.empty(ctx.logits_shape, dtype=x.dtype, device=x.device)
            dx_outer, dx_inner = n_inner * vocab, vocab
        g_logp = g_logp.reshape(-1).contiguous() if has_g_logp else lse
        g_ent = g_ent.reshape(-1).contiguous() if has_g_ent else lse
        block, num_warps = launch_config(vocab, x.dtype, ctx.block_v)
        inv_t_hi, inv_t_lo = _inverse_temperature(ctx.temperature)
        with _device_guard(x):
            _token_logprobs_bwd_kernel[(n_rows,)](
                x, dx, ids, lse, ent if has_g_ent else lse, g_logp, g_ent,
                n_inner, stride_outer, stride_inner, dx_outer, dx_inner, vocab,
                inv_t_hi, inv_t_lo, ctx.ignore_index,
                HAS_G_LOGP=has_g_logp, HAS_G_ENT=has_g_ent, BLOCK_V=block, ACC=_acc_dtype(x.dtype),
                num_warps=num_warps,
            )
        return dx, None, None, None, None, None, None


def _writable_rows(x: Tensor) -> bool:
    """No two rows share memory (a stride-0 expanded dim would make in-place writes race)."""
    return all(st != 0 for n, st in zip(x.shape, x.stride()) if n > 1)


# --------------------------------------------------------------------------- #
# entry points
# --------------------------------------------------------------------------- #
def token_logprobs_triton(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
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
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Triton backend of :func:`grpo_kernels.reference.token_logprobs` (same semantics)."""
    return token_logprobs_triton(
        logits, token_ids, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
    )

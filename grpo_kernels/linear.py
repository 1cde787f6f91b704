"""The fused-linear ops' driver: hidden states → log-probs, entropy, GRPO loss, never the ``[N, V]`` logits.

Formulas: :func:`grpo_kernels.reference.linear_token_logprobs` and
:func:`grpo_kernels.reference.fused_linear_grpo_loss`. This module holds the
autograd and loss glue of every backend except the reference, over a *tile
provider* (:class:`Tiles`) that turns ``chunk_size`` tokens at a time into
their log-probs, entropies and, given per-token weights, the gradient of the
affine logits ``h Wᵀ + b``. The default provider, :class:`RowOpTiles`, forms
each chunk's logits as a ``[n, V]`` tile and hands it to the backend's row
kernels (``token_logprobs`` with ``inplace_backward=True``, so the tile's
gradient overwrites the tile); a backend with kernels of its own for the
linear ops passes its provider (the Triton one,
:mod:`grpo_kernels.triton.linear_logprobs`, forms no logits tile for
statistics alone, keeps the per-token ``lse`` for the gradient sweeps that
start from known statistics, and writes a ``[chunk_size, V]`` tile only where
a gradient is formed). What follows describes :class:`RowOpTiles`.

A tile: ``x = (s h) Wᵀ + s b`` by ``torch.matmul`` in float32 (float64 for
float64 inputs) from the inputs cast to that dtype, so the product is never
rounded to bfloat16 (the logit scale ``s`` on the ``[n, H]`` and ``[V]``
operands, not on the tile); then ``x = c tanh(x / c)`` with a softcap. Its
gradient (from the row kernels' backward, ``w (onehot − p) / T`` for per-token
weights ``w``, given ``s w`` so that it is already w.r.t. ``h Wᵀ + b``) is
chained through the softcap in place and reduced into float32 accumulators:
``dh[rows] = dx W``, ``dW += dxᵀ h``, ``db += Σ_rows dx``. Passes over a
tile: written by the product, read by the row kernels' forward, read and
rewritten by their backward (the weights ``w`` multiply inside that pass),
read by the two gradient products; with a bias, one more read and write
(``+ s b``) and a read (``Σ_rows dx``); with a softcap, a few more. A weight
of another dtype is cast once per sweep on the CPU
(:meth:`RowOpTiles.sweep`), elsewhere in vocabulary blocks of at most a
tile's size. ``chunk_size`` defaults to :func:`default_chunk_size`.

``fused_linear_grpo_loss`` forms the gradient in the forward. Without a sequence
pass (token-level ratios; :func:`grpo_kernels.kernel_options.needs_sequence_pass`)
one sweep suffices: the loss is ``Σ_i dL/dS_i Σ_t m ℓ_{i,t}`` where ``dL/dS_i``
depends on the mask only (:func:`grpo_kernels.aggregation.sequence_weights`) and
``ℓ_{i,t}`` on the token's own log-prob only, so a chunk's weights ``w = dL/dlogp``
are the autograd derivative of the reference per-token loss on the chunk, known
as soon as the tile's log-sum-exp is. A sequence pass (GSPO, VESPO, GMPO, the
sequence-level rollout ratio, the off-policy mask) needs every log-prob of a
sequence first: a first sweep
forms the log-probs, ``w`` comes from the backend's ``grpo_loss`` backward,
and a second sweep recomputes the tiles for the gradient. The loss and the
metrics come from the backend's ``grpo_loss`` on the ``[B, T]`` log-probs.
The autograd backward only scales the accumulators by the incoming gradient
(and adds an entropy bonus's gradient by a recomputing sweep).
``linear_token_logprobs`` cannot know its gradient weights in the forward:
its backward recomputes the tiles, chunk by chunk.

Memory beyond the inputs: one or two ``[chunk_size, V]`` tiles (two with a
softcap, whose derivative needs the tile after the row kernels wrote its
gradient), the float32 accumulators of the gradients (``[N, H]``, ``[V, H]``,
``[V]``, held from the forward to the backward in the fused loss) and
``O(N)`` per-token vectors, and on the CPU a weight copy in the compute dtype
for a weight of another dtype (``V × H``, during a sweep); never ``N × V``. On
the CPU the tile buffer, the weight copy and the float32 accumulators of a
bf16/fp16 head are kept between calls (:mod:`grpo_kernels.workspace`, at most
512 MiB in all).

FLOPs of the matmuls (``N`` tokens, vocabulary ``V``, hidden size ``H``):
the fused loss at token level takes ``6 N V H`` (logits, ``d hidden``,
``d weight``: the chunk's tile spans the whole vocabulary, so its
log-sum-exp is final before its gradient is formed); at sequence level
``8 N V H`` (the logits twice); ``linear_token_logprobs`` forward + backward
``8 N V H``, like TRL's chunked LM head. The same holds for a provider whose
kernels tile the vocabulary on chip (the Triton one): it writes the chunk's
logits tile from its statistics kernel and forms the gradient over it once
the rows' log-sum-exp is final.
"""

from __future__ import annotations

import functools
import os
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator, NamedTuple, Optional, Protocol, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference, workspace
from .aggregation import sequence_weights
from .kernel_options import needs_sequence_pass
from .reference import GRPOLossOutput

# Default tokens per tile off the CPU (GPUs): this many elements per [chunk_size, V] tile (64 MiB in float32).
DEFAULT_TILE_ELEMENTS = 2**24
# The CPU's rule (default_chunk_size): rows per thread that the GEMMs need to amortize the per-chunk weight
# traffic, when the weight does not stay in the last-level cache, and when it does (a GEMM panel per thread);
# the measurement behind them: docs/design.md, "The chunk size".
CPU_ROWS_PER_THREAD = 512
CPU_CACHED_ROWS_PER_THREAD = 128
# The CPU's tile bound: at most this many bytes per tile, or the weight's size in the compute dtype when larger
# (the float32 d-weight accumulator the op holds anyway), so that memory stays O(chunk_size·V + V·H), never O(N·V);
# 128 MiB lets 2 threads have their 2 × 512 rows at V = 32000.
CPU_TILE_BYTES = 128 << 20

# Per-token weights (g_logp, g_H) of a chunk's log-probs and entropies in Σ g_logp·logp + g_H·H (None: no term),
# as a function of the chunk's rows and log-probs.
Weights = tuple[Optional[Tensor], Optional[Tensor]]
WeightsFn = Callable[[slice, Tensor], Weights]
# The backend's kernel of a row op, by op name: given by the caller (grpo_kernels.backends, or a kernel backend
# for its own kernels), so that this driver, which kernel backends import, never imports the backend registry.
KernelLookup = Callable[[str], Callable]


class Stats(NamedTuple):
    """Per-token statistics ``[n]`` in the compute dtype (``None`` where not formed)."""

    logp: Optional[Tensor]
    entropy: Optional[Tensor]
    lse: Optional[Tensor]  # log Σ_v e^{z_v} of z = x / T (kept by providers whose gradient sweeps start from it)

    def rows(self, rows: slice) -> Stats:
        return Stats(*(None if t is None else t[rows] for t in self))


class Tiles(Protocol):
    """A tile provider: what the driver asks of a backend for ``chunk_size`` tokens at a time.

    ``tileless_stats``: the statistics need no ``[n, V]`` buffer, so a sweep
    without gradient takes every token at once, and the statistics a gradient
    sweep needs are passed to it (``known``) rather than formed again.
    """

    tileless_stats: bool

    def __call__(self, head: LinearHead, rows: slice, h: Tensor, return_entropy: bool, weights: Optional[WeightsFn],
                 known: Optional[Stats]) -> tuple[Stats, Optional[Tensor]]:
        """``(stats of the tokens rows, d (h Wᵀ + b) [n, V] in the compute dtype or None)``.

        ``h`` is ``hidden[rows]`` in the compute dtype. With ``weights``, the
        gradient of ``Σ g_logp·logp + g_H·H`` for ``(g_logp, g_H) = weights(rows, logp)``
        is returned as well. ``known``: the rows' statistics from an earlier sweep, or None.
        """
        ...

    def sweep(self, head: LinearHead) -> ContextManager[LinearHead]:
        """The head a sweep over the chunks uses, with whatever the provider holds for the sweep's length."""
        ...


class LinearHead(NamedTuple):
    """The LM head, the sampled ids and the options that turn hidden states into tiles of transformed logits, and
    the backend whose row kernels the driver runs (shared with the tile providers of other modules)."""

    hidden: Tensor  # [N, H]
    weight: Tensor  # [V, H]
    bias: Optional[Tensor]  # [V]
    token_ids: Tensor  # [N]
    temperature: Union[float, Tensor]  # a float, or one per token [N] (read only where the token counts)
    logit_scale: float
    softcap: Optional[float]
    ignore_index: int
    chunk_size: int
    backend: str  # the backend's resolved name
    kernel: KernelLookup  # the backend's kernel of an op ("token_logprobs", "grpo_loss"), inputs validated
    tiles: Tiles

    @property
    def dtype(self) -> torch.dtype:
        return reference.compute_dtype(self.hidden)

    def row_temperature(self, rows: slice) -> Union[float, Tensor]:
        """The temperature of the tokens ``rows``: the float, or their slice ``[n]`` of the per-token tensor."""
        return self.temperature[rows] if isinstance(self.temperature, Tensor) else self.temperature

    def chunks(self) -> Iterator[slice]:
        n = self.hidden.shape[0]
        return (slice(start, min(start + self.chunk_size, n)) for start in range(0, n, self.chunk_size))

    def weight_blocks(self, rows: int) -> Iterator[tuple[slice, Tensor]]:
        """``(vocabulary slice, weight rows in the compute dtype)``: one view, or cast blocks no larger than a tile."""
        vocab, size = self.weight.shape
        if self.weight.dtype == self.dtype:
            yield slice(0, vocab), self.weight
            return
        block = max(1, rows * vocab // size)
        for start in range(0, vocab, block):
            cols = slice(start, min(start + block, vocab))
            yield cols, self.weight[cols].to(self.dtype)


@functools.lru_cache(maxsize=1)
def last_level_cache_bytes() -> Optional[int]:
    """The size of the CPU's last-level cache in bytes (Linux sysfs, then ``sysconf``), or None when unknown."""
    best: Optional[tuple[int, int]] = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        size = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text) if text.isdigit() else 0
        if kind in ("Unified", "Data") and size and (best is None or level > best[0]):
            best = (level, size)
    if best is not None:
        return best[1]
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError):
            continue
        if size > 0:
            return size
    return None


def default_chunk_size(vocab: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per ``[chunk_size, V]`` tile when the caller gives none (the inputs' ``dtype``, the tile's is the
    compute dtype).

    Off the CPU: a 64 MiB float32 tile (``DEFAULT_TILE_ELEMENTS // V``). On the CPU, from the thread count
    (``torch.get_num_threads()``, the GEMMs' threads) and the last-level cache: each chunk streams the weight
    through the logits and ``d hidden`` products and the ``d weight`` accumulator through its update, work that
    does not shrink with the chunk, so the chunk needs ``CPU_ROWS_PER_THREAD`` rows per thread for its
    ``6·c·V·H`` FLOPs to hide it (``CPU_CACHED_ROWS_PER_THREAD`` when the weight and the accumulator fit in half
    the cache and the streams hit it); the tile is bounded by ``CPU_TILE_BYTES`` or the weight's size in the
    compute dtype, whichever is larger, so memory stays O(chunk·V + V·H), never O(N·V).
    """
    if device.type != "cpu":
        return max(1, DEFAULT_TILE_ELEMENTS // vocab)
    item = reference.compute_dtype(torch.empty((), dtype=dtype)).itemsize
    cache = last_level_cache_bytes()
    cached = cache is not None and 2 * vocab * hidden_size * item <= cache // 2
    rows = torch.get_num_threads() * (CPU_CACHED_ROWS_PER_THREAD if cached else CPU_ROWS_PER_THREAD)
    bound = max(CPU_TILE_BYTES, vocab * hidden_size * item) // (vocab * item)
    return max(1, min(rows, bound))


def _head(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], token_ids: Tensor,
          temperature: Union[float, Tensor],
          logit_scale: float, softcap: Optional[float], ignore_index: int, chunk_size: Optional[int],
          backend: str, kernel: KernelLookup, tiles: Optional[Tiles]) -> LinearHead:
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0], weight.shape[1], hidden.dtype, hidden.device)
    temperature = (reference.broadcast_temperature(temperature, tuple(token_ids.shape)).reshape(-1)
                   if isinstance(temperature, Tensor) else float(temperature))
    return LinearHead(hidden.reshape(-1, hidden.shape[-1]), weight, bias, token_ids.reshape(-1), temperature,
                      float(logit_scale), None if softcap is None else float(softcap), int(ignore_index),
                      int(chunk_size), backend, kernel, RowOpTiles() if tiles is None else tiles)


def _tile(head: LinearHead, h: Tensor, buffer: Optional[Tensor] = None) -> Tensor:
    """The transformed logits ``[n, V]`` of the hidden states ``h [n, H]`` (already in the compute dtype), in the
    first ``n`` rows of ``buffer`` when given. The logit scale multiplies the operands, ``(s h) Wᵀ + s b``, not
    the tile (a pass over ``[n, V]`` saved)."""
    scale = head.logit_scale
    if scale != 1.0:
        h = h * scale
    if head.weight.dtype == head.dtype:
        tile = (torch.matmul(h, head.weight.t()) if buffer is None
                else torch.matmul(h, head.weight.t(), out=buffer[:h.shape[0]]))
    else:
        tile = h.new_empty((h.shape[0], head.weight.shape[0])) if buffer is None else buffer[:h.shape[0]]
        for cols, w in head.weight_blocks(h.shape[0]):
            tile[:, cols] = torch.matmul(h, w.t())
    if head.bias is not None:
        bias = head.bias.to(head.dtype)
        tile += bias if scale == 1.0 else bias * scale
    if head.softcap is not None:
        tile.div_(head.softcap).tanh_().mul_(head.softcap)
    return tile


class RowOpTiles:
    """The chunked driver's provider: a ``[n, V]`` logits tile by ``torch.matmul``, the backend's row ops on it.

    Statistics and gradient come from the same tile, so ``known`` is not used. During a sweep on the CPU
    (:meth:`sweep`) every chunk's tile is formed in one buffer and the weight is read in the compute dtype from
    one copy (a float32 copy of a bf16/fp16 weight, ``V·H·4`` bytes, made once per sweep): a new 64 MiB tile per
    chunk costs its page faults again, and a weight cast per chunk costs ``2·N/c`` casts instead of one. Both
    buffers are :mod:`grpo_kernels.workspace`'s, kept from one call to the next.
    """

    tileless_stats = False
    buffer: Optional[Tensor] = None  # the tile buffer during a CPU sweep (a class default: subclasses need no init)

    @contextmanager
    def sweep(self, head: LinearHead) -> Iterator[LinearHead]:
        """The head of one sweep: on the CPU with its weight in the compute dtype, and the tile buffer held until
        the sweep ends (never from the forward to the backward); both buffers from :mod:`grpo_kernels.workspace`."""
        if head.hidden.device.type != "cpu" or head.hidden.shape[0] == 0:
            yield head
            return
        rows, (vocab, size) = min(head.chunk_size, head.hidden.shape[0]), head.weight.shape
        with ExitStack() as buffers:
            if head.weight.dtype != head.dtype:
                weight = buffers.enter_context(workspace.cpu_buffer(vocab * size, head.dtype)).view(vocab, size)
                head = head._replace(weight=weight.copy_(head.weight))
            self.buffer = buffers.enter_context(workspace.cpu_buffer(rows * vocab, head.dtype)).view(rows, vocab)
            try:
                yield head
            finally:
                self.buffer = None

    def __call__(self, head: LinearHead, rows: slice, h: Tensor, return_entropy: bool, weights: Optional[WeightsFn],
                 known: Optional[Stats]) -> tuple[Stats, Optional[Tensor]]:
        tile = _tile(head, h, self.buffer)
        with torch.enable_grad() if weights is not None else nullcontext():
            tile.requires_grad_(weights is not None)
            out = self.token_logprobs(head, tile, rows, return_entropy)
        logp, entropy = out if return_entropy else (out, None)
        stats = Stats(logp.detach(), None if entropy is None else entropy.detach(), None)
        if weights is None:
            return stats, None
        g_logp, g_entropy = weights(rows, stats.logp)
        # d y / d(h Wᵀ + b) = s rides on the [n] incoming gradients (the row kernels' gradient is linear in them),
        # not on the [n, V] gradient: the tile's gradient below is w.r.t. h Wᵀ + b already
        pairs = [(o, (g if head.logit_scale == 1.0 else g * head.logit_scale).contiguous())
                 for o, g in ((logp, g_logp), (entropy, g_entropy)) if g is not None]
        (dx,) = torch.autograd.grad([o for o, _ in pairs], tile, [g for _, g in pairs])
        if head.softcap is not None:  # d/dy c tanh(y/c) = 1 − (x/c)²; the tile still holds x
            dx.mul_(tile.detach().div_(head.softcap).square_().neg_().add_(1.0))
            # an ignored token's x may be garbage (its hidden state): its dx row stays 0, selected, not 0 · NaN
            ignored = head.token_ids[rows] == head.ignore_index
            dx = torch.where(ignored[:, None], torch.zeros((), dtype=dx.dtype, device=dx.device), dx)
        return stats, dx

    def token_logprobs(self, head: LinearHead, tile: Tensor, rows: slice, return_entropy: bool):
        """The row op on the tile of the tokens ``rows``: the backend's ``token_logprobs``, its gradient written
        over the tile."""
        return head.kernel("token_logprobs")(
            tile, head.token_ids[rows], temperature=head.row_temperature(rows), ignore_index=head.ignore_index,
            return_entropy=return_entropy, inplace_backward=head.softcap is None,
        )

    def reduce_hidden_grad(self, grad: Tensor) -> None:
        """Combine ``d hidden`` of the ranks that share the tokens (none: the tile spans the whole vocabulary)."""


class _Grads:
    """Accumulators of the gradients of ``hidden``, ``weight``, ``bias`` (compute dtype; ``None`` where not needed)."""

    def __init__(self, head: LinearHead, needs: tuple[bool, bool, bool]):
        inputs = (head.hidden, head.weight, head.bias)
        self.dtypes = tuple(None if t is None else t.dtype for t in inputs)
        self.leases: list[workspace.CpuLease] = []
        self.hidden, self.weight, self.bias = (
            self._accumulator(t, head.dtype) if needed and t is not None else None for t, needed in zip(inputs, needs)
        )
        self.hidden_written = self.weight_written = False

    def _accumulator(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t``'s gradient accumulator in the compute ``dtype``. On the CPU uninitialized until a sweep writes it
        (beta = 0 there: no zero fill, no pass over [V, H]), and one that is not itself the result (the float32
        accumulator of a bf16 weight) is leased from :mod:`grpo_kernels.workspace` until :meth:`results`."""
        if t.device.type != "cpu":
            return torch.zeros(t.shape, dtype=dtype, device=t.device)
        if dtype == t.dtype:
            return torch.empty(t.shape, dtype=dtype)
        self.leases.append(workspace.CpuLease(t.numel(), dtype))
        return self.leases[-1].tensor.view(t.shape)

    def add(self, head: LinearHead, rows: slice, h: Tensor, dx: Tensor) -> None:
        """Add the contribution of the logits gradient ``dx [n, V]`` of the tokens ``rows`` (hidden states ``h``).
        In the first sweep each chunk writes its rows of ``d hidden`` and the first chunk writes ``d weight`` and
        ``d bias``. An ignored token's ``dx`` row is 0 and its hidden state is selected away (0 · NaN would reach
        ``d weight``)."""
        if self.hidden is not None:
            for i, (cols, w) in enumerate(head.weight_blocks(dx.shape[0])):
                self.hidden[rows].addmm_(dx[:, cols], w, beta=1.0 if self.hidden_written or i else 0.0)
        if self.weight is not None:
            ignored = head.token_ids[rows] == head.ignore_index
            if h.device.type != "cpu" or bool(ignored.any()):  # no host sync on a GPU
                h = torch.where(ignored[:, None], torch.zeros((), dtype=h.dtype, device=h.device), h)
            self.weight.addmm_(dx.t(), h, beta=1.0 if self.weight_written else 0.0)
        if self.bias is not None:
            if self.weight_written:
                self.bias += dx.sum(0)
            else:
                torch.sum(dx, 0, out=self.bias)
        self.weight_written = True

    def end_sweep(self) -> None:
        """After a sweep (every token's chunk added): zeros where it had no token at all."""
        if not self.weight_written:
            for g in (self.weight, self.bias):
                if g is not None:
                    g.zero_()
        self.hidden_written = self.weight_written = True

    def scale_(self, factor: Tensor) -> None:
        if factor.device.type == "cpu" and bool(factor == 1):  # exact as it is: no pass over [V, H] (no GPU sync)
            return
        for g in (self.hidden, self.weight, self.bias):
            if g is not None:
                g.mul_(factor.to(g.dtype))

    def results(self, shape: torch.Size, tiles: Tiles) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """The gradients in the inputs' dtypes, ``hidden``'s in its original ``shape`` (first combined over the
        ranks sharing the tokens, for a provider over a vocabulary shard)."""
        reduce_hidden_grad = getattr(tiles, "reduce_hidden_grad", None)
        if self.hidden is not None and reduce_hidden_grad is not None:
            reduce_hidden_grad(self.hidden)
        dh, dw, db = (None if g is None else g.to(dtype) for g, dtype in zip((self.hidden, self.weight, self.bias),
                                                                              self.dtypes))
        self.hidden = self.weight = self.bias = None
        for lease in self.leases:
            lease.release()
        return None if dh is None else dh.view(shape), dw, db


def _sweep(head: LinearHead, return_entropy: bool, *, weights: Optional[WeightsFn] = None,
           grads: Optional[_Grads] = None, known: Optional[Stats] = None) -> Stats:
    """One pass over the token chunks; returns the statistics ``[N]`` that the provider formed.

    With ``grads``, ``weights(rows, logp)`` gives the chunk's per-token weights
    ``(g_logp, g_H)`` and the gradient of ``Σ g_logp·logp + g_H·H`` w.r.t. the
    LM head's inputs is added to ``grads``. ``known``: statistics of every
    token from an earlier sweep, for providers that use them.
    """
    n = head.hidden.shape[0]
    out = Stats(*(torch.empty(n, dtype=head.dtype, device=head.hidden.device) for _ in range(3)))
    chunks = [slice(0, n)] if grads is None and head.tiles.tileless_stats else head.chunks()
    with head.tiles.sweep(head) as head:
        for rows in chunks:
            h = head.hidden[rows].to(head.dtype)
            stats, dx = head.tiles(head, rows, h, return_entropy, weights if grads is not None else None,
                                   None if known is None else known.rows(rows))
            for buffer, values in zip(out, stats):
                if values is not None:
                    buffer[rows] = values
            if dx is not None:
                grads.add(head, rows, h, dx)
    if grads is not None:
        grads.end_sweep()
    return Stats(*(buffer if values is not None else None for buffer, values in zip(out, stats)))


# --------------------------------------------------------------------------- #
# linear_token_logprobs
# --------------------------------------------------------------------------- #
class _LinearLogprobsFunction(torch.autograd.Function):
    """``(hidden, weight, bias, head)`` → ``(logp [N], entropy [N] or 0-d)``; the backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head: LinearHead, return_entropy: bool):
        stats = _sweep(head, return_entropy)
        ctx.set_materialize_grads(False)
        ctx.head = head._replace(hidden=None, weight=None, bias=None)
        ctx.shape = hidden.shape
        ctx.save_for_backward(hidden, weight, bias, stats.entropy, stats.lse)
        return (stats.logp, stats.entropy) if return_entropy else stats.logp

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_entropy=None):
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None
        hidden, weight, bias, entropy, lse = ctx.saved_tensors
        head = _head_with(ctx.head, hidden, weight, bias)
        grads = _Grads(head, ctx.needs_input_grad[:3])

        def weights(rows: slice, _logp: Tensor) -> Weights:
            return (None if g_logp is None else g_logp[rows], None if g_entropy is None else g_entropy[rows])

        _sweep(head, g_entropy is not None, weights=weights, grads=grads,
               known=None if lse is None else Stats(None, entropy, lse))
        return (*grads.results(ctx.shape, ctx.head.tiles), None, None)


def _head_with(head: LinearHead, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> LinearHead:
    return head._replace(hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight, bias=bias)


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
    backend: str,
    kernel: KernelLookup,
    tiles: Optional[Tiles] = None,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """:func:`grpo_kernels.reference.linear_token_logprobs` over ``backend`` (inputs validated), whose kernels
    ``kernel(op)`` gives; ``tiles``: the backend's tile provider (default :class:`RowOpTiles`, the chunked driver
    over its row ops)."""
    head = _head(hidden, weight, bias, token_ids, temperature, logit_scale, softcap, ignore_index, chunk_size,
                 backend, kernel, tiles)
    out = _LinearLogprobsFunction.apply(hidden, weight, bias, head, bool(return_entropy))
    shape = token_ids.shape
    return (out[0].view(shape), out[1].view(shape)) if return_entropy else out.view(shape)

# --------------------------------------------------------------------------- #
# fused_linear_grpo_loss
# --------------------------------------------------------------------------- #
def _per_token(t: Optional[Tensor], shape: torch.Size, dtype: torch.dtype) -> Optional[Tensor]:
    """A ``[B]``, ``[B, 1]`` or ``[B, T]`` tensor as one value per token ``[B·T, 1]`` in ``dtype``."""
    if t is None:
        return None
    t = t.to(dtype)
    return (t.unsqueeze(1) if t.ndim == 1 else t).expand(shape).reshape(-1, 1)


def _token_level_weights(head: LinearHead, keep: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor,
                         loss_options: dict) -> WeightsFn:
    """``weights(rows, logp)`` of the loss at token level: ``w = dL/dS_i · m · dℓ/dlogp`` per token."""
    B, T = keep.shape
    dtype = head.dtype
    seq_w = sequence_weights(keep.sum(-1).to(dtype), loss_options["loss_type"], T,
                             max_completion_length=loss_options["max_completion_length"],
                             num_items_in_batch=loss_options["num_items_in_batch"])
    token_w = (seq_w.reshape(-1, 1) * keep.to(dtype)).reshape(-1, 1)
    old, adv = _per_token(old_logprobs, keep.shape, dtype), _per_token(advantages, keep.shape, dtype)
    ref = _per_token(loss_options["ref_logprobs"], keep.shape, dtype)
    iw = _per_token(loss_options["importance_weights"], keep.shape, dtype)
    sampling = _per_token(loss_options["sampling_logprobs"], keep.shape, dtype)
    flat_keep = keep.reshape(-1, 1)
    # ℓ of a token does not depend on the aggregation options: the chunk's tokens as sequences of length 1.
    per_token = ("ref_logprobs", "importance_weights", "sampling_logprobs", "max_completion_length",
                 "num_items_in_batch")
    options = {name: value for name, value in loss_options.items() if name not in per_token}

    def pick(t: Optional[Tensor], rows: slice) -> Optional[Tensor]:
        return None if t is None else t[rows]

    def weights(rows: slice, logp: Tensor) -> Weights:
        with torch.enable_grad():
            lp = logp.reshape(-1, 1).requires_grad_()
            per_token_loss = reference.grpo_loss(
                lp, pick(old, rows), adv[rows], flat_keep[rows], ref_logprobs=pick(ref, rows),
                importance_weights=pick(iw, rows), sampling_logprobs=pick(sampling, rows), **options,
            ).per_token_loss
            (w,) = torch.autograd.grad(per_token_loss, lp, token_w[rows])
        return w.reshape(-1), None

    return weights


def _entropy_weights(entropy: Tensor, keep: Tensor, grad: Tensor) -> Tensor:
    """``d entropy_metric / d H`` times ``grad``, per token ``[B·T]``."""
    with torch.enable_grad():
        h = entropy.detach().requires_grad_()
        (g,) = torch.autograd.grad(reference.masked_mean_entropy(h, keep), h, grad)
    return g.reshape(-1)


class _FusedLinearGRPOLossFunction(torch.autograd.Function):
    """``(hidden, weight, bias, old, adv, mask, head, options)`` → loss, metrics; the gradient formed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, old_logprobs, advantages, mask, head: LinearHead, options):
        return_entropy, loss_options = options
        B, T = mask.shape
        keep = reference.fused_loss_mask(mask, head.token_ids.view(B, T), head.ignore_index)
        # masked tokens are ignored rows: their hidden states and logits are never used (padding may hold garbage)
        head = head._replace(token_ids=reference.kept_ids(head.token_ids, keep.reshape(-1), head.ignore_index))
        needs = ctx.needs_input_grad[:3]
        grads = _Grads(head, needs) if any(needs) else None
        token_level = not needs_sequence_pass(loss_options)  # each token's weight from its own log-prob
        grpo_loss = head.kernel("grpo_loss")
        if grads is not None and token_level:
            # one sweep: each tile's statistics, then at once its gradient
            weights = _token_level_weights(head, keep, old_logprobs, advantages, loss_options)
            stats = _sweep(head, return_entropy, weights=weights, grads=grads)
        else:
            stats = _sweep(head, return_entropy)
        if grads is not None and not token_level:
            with torch.enable_grad():
                lp = stats.logp.view(B, T).requires_grad_()
                (w,) = torch.autograd.grad(grpo_loss(lp, old_logprobs, advantages, keep, **loss_options).loss, lp)
            w = w.reshape(-1)
            _sweep(head, False, weights=lambda rows, _logp: (w[rows], None), grads=grads, known=stats)
        result = grpo_loss(stats.logp.view(B, T), old_logprobs, advantages, keep, **loss_options)
        entropy = stats.entropy

        entropy_out = result.loss.new_zeros(())
        if return_entropy:
            entropy = entropy.view(B, T)
            entropy_out = reference.masked_mean_entropy(entropy, keep)
        ctx.set_materialize_grads(False)
        ctx.grads = grads
        ctx.head = head._replace(hidden=None, weight=None, bias=None)
        ctx.shape = hidden.shape
        ctx.entropy = (entropy, keep) if return_entropy else None
        if return_entropy:
            ctx.save_for_backward(hidden, weight, bias, stats.lse)
        kl = result.kl if result.kl is not None else result.loss.new_zeros(())
        ctx.mark_non_differentiable(result.per_token_loss, kl, result.clip_ratio_low, result.clip_ratio_high,
                                    result.clip_ratio_region)
        return (result.loss, result.per_token_loss, kl, result.clip_ratio_low, result.clip_ratio_high,
                result.clip_ratio_region, entropy_out)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, _ptl, _kl, _low, _high, _region, g_entropy):
        if ctx.entropy is None:
            g_entropy = None
        if g_loss is None and g_entropy is None:
            return (None,) * 8
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_grpo_loss: its gradient accumulators were consumed by an earlier backward through this "
                "graph; a second backward (retain_graph=True) needs a new forward"
            )
        grads, ctx.grads = ctx.grads, None
        if g_loss is not None:
            grads.scale_(g_loss)
        if g_entropy is not None:  # an entropy bonus: a recomputing sweep adds its gradient
            hidden, weight, bias, lse = ctx.saved_tensors
            head = _head_with(ctx.head, hidden, weight, bias)
            if g_loss is None:
                grads = _Grads(head, ctx.needs_input_grad[:3])
            entropy, keep = ctx.entropy
            g_h = _entropy_weights(entropy, keep, g_entropy)
            known = None if lse is None else Stats(None, entropy.reshape(-1), lse)
            _sweep(head, True, weights=lambda rows, _logp: (None, g_h[rows]), grads=grads, known=known)
        return (*grads.results(ctx.shape, ctx.head.tiles), None, None, None, None, None)


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
    backend: str,
    kernel: KernelLookup,
    tiles: Optional[Tiles] = None,
    **loss_options,
) -> GRPOLossOutput:
    """:func:`grpo_kernels.reference.fused_linear_grpo_loss` over ``backend`` (inputs validated); ``tiles`` as in
    :func:`linear_token_logprobs`.

    ``loss`` (and ``entropy``) are differentiable w.r.t. ``hidden``, ``weight``
    and ``bias``; ``per_token_loss``, ``kl`` and the clip metrics come without
    gradient.
    """
    head = _head(hidden, weight, bias, token_ids, temperature, logit_scale, softcap, ignore_index, chunk_size,
                 backend, kernel, tiles)
    loss, per_token_loss, kl, low, high, region, entropy = _FusedLinearGRPOLossFunction.apply(
        hidden, weight, bias, old_logprobs, advantages, mask, head, (bool(return_entropy), loss_options)
    )
    return GRPOLossOutput(
        loss=loss,
        per_token_loss=per_token_loss,
        kl=kl if loss_options.get("ref_logprobs") is not None else None,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_region=region,
        entropy=entropy if return_entropy else None,
    )

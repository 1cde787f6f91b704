"""The losses when the logits are vocabulary-sharded, the batch is data-parallel, or the sequences are packed.

:mod:`grpo_kernels.ops` routes a call here when ``vocab_group``, ``batch_group`` or ``cu_seqlens`` is given.
The pieces: the log-probs of a vocabulary shard (:func:`grpo_kernels.distributed.token_logprobs`) or of the
backend's row kernels, the loss of the backend (``[B, T]``) or of :mod:`grpo_kernels.packed`, then this rank's
share of a data-parallel batch (:func:`grpo_kernels.distributed.batch_normalized`). Without a vocabulary group
or packing, the backend's fused loss kernel runs as it does alone. The inputs were validated.
"""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from . import backends, distributed, packed, reference
from .kernel_options import LOSS_DEFAULTS
from .reference import GRPOLossOutput


def _share(result: GRPOLossOutput, keep: Tensor, advantages: Tensor, batch_group, cu_seqlens: Optional[Tensor],
           loss_options: dict) -> GRPOLossOutput:
    """``result`` as this rank's share of the batch of ``batch_group`` (unchanged without a group)."""
    if batch_group is None:
        return result
    options = {**LOSS_DEFAULTS, **loss_options}
    level = options["importance_sampling_level"]
    if cu_seqlens is not None:
        seg = packed.segments(cu_seqlens, keep.numel())
        num_seqs, length, per_seq = seg.num_seqs, seg.longest, packed.per_seq_metrics(advantages, seg, level)
    else:
        num_seqs, length = keep.shape
        per_seq = level == "sequence" and (advantages.ndim == 1 or advantages.shape[1] == 1) and length != 1
    return distributed.batch_normalized(
        result, keep, num_seqs, length, batch_group, per_seq_metrics=per_seq,
        loss_type=options["loss_type"], max_completion_length=options["max_completion_length"],
        num_items_in_batch=options["num_items_in_batch"],
    )


def grpo_loss(logprobs: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor, mask: Tensor, *, batch_group,
              cu_seqlens: Optional[Tensor], backend: str, **loss_options) -> GRPOLossOutput:
    """:func:`grpo_kernels.ops.grpo_loss` on packed sequences and/or as a data-parallel share."""
    if cu_seqlens is not None:
        result = packed.grpo_loss(logprobs, old_logprobs, advantages, mask, cu_seqlens, **loss_options)
    else:
        result = backends.implementation(backend, logprobs.device, "grpo_loss")(logprobs, old_logprobs, advantages,
                                                                                  mask, **loss_options)
    return _share(result, mask, advantages, batch_group, cu_seqlens, loss_options)


def fused_grpo_loss(logits: Tensor, token_ids: Tensor, old_logprobs: Optional[Tensor], advantages: Tensor,
                    mask: Tensor, *, vocab_group, batch_group, cu_seqlens: Optional[Tensor], temperature: float,
                    ignore_index: int, return_entropy: bool, inplace_backward: bool, backend: str,
                    **loss_options) -> GRPOLossOutput:
    """:func:`grpo_kernels.ops.fused_grpo_loss` over a vocabulary shard, packed, and/or as a data-parallel share.

    With a vocabulary group or packing, the log-probs come first (the gradient is formed in the backward,
    into the logits' buffer with ``inplace_backward``), then the loss on them.
    """
    keep = reference.fused_loss_mask(mask, token_ids, ignore_index)
    if vocab_group is None and cu_seqlens is None:
        result = backends.implementation(backend, logits.device, "fused_grpo_loss")(
            logits, token_ids, old_logprobs, advantages, mask, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, inplace_backward=inplace_backward, **loss_options,
        )
        return _share(result, keep, advantages, batch_group, None, loss_options)
    row_options = dict(temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy,
                       inplace_backward=inplace_backward)
    ids = reference.kept_ids(token_ids, keep, ignore_index)  # masked rows read as ignored: never read
    if vocab_group is not None:
        out = distributed.token_logprobs(logits, ids, vocab_group=vocab_group, backend=backend, **row_options)
    else:
        out = backends.implementation(backend, logits.device, "token_logprobs")(logits, ids, **row_options)
    logp, entropy = out if return_entropy else (out, None)
    result = grpo_loss(logp, old_logprobs, advantages, keep, batch_group=None, cu_seqlens=cu_seqlens,
                       backend=backend, **loss_options)
    if entropy is not None:
        result = result._replace(entropy=reference.masked_mean_entropy(entropy, keep))
    return _share(result, keep, advantages, batch_group, cu_seqlens, loss_options)


def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, token_ids: Tensor, old_logprobs: Optional[Tensor],
                           advantages: Tensor, mask: Tensor, *, vocab_group, batch_group,
                           cu_seqlens: Optional[Tensor], head_options: dict, backend: str,
                           implementation: Callable, **loss_options) -> GRPOLossOutput:
    """:func:`grpo_kernels.ops.fused_linear_grpo_loss` over a shard of the LM head's rows (``weight [V_r, H]``,
    ``bias [V_r]``), packed, and/or as a data-parallel share. ``implementation``: the backend's own
    ``fused_linear_grpo_loss`` (used without a vocabulary group or packing)."""
    keep = reference.fused_loss_mask(mask, token_ids, head_options["ignore_index"])
    # packed: the log-probs first, masked rows read as ignored (never read)
    ids = token_ids if cu_seqlens is None else reference.kept_ids(token_ids, keep, head_options["ignore_index"])
    tiles = None if vocab_group is None else distributed.vocab_parallel_tiles(vocab_group, weight, ids,
                                                                              head_options["ignore_index"])
    if cu_seqlens is None:
        if tiles is None:
            result = implementation(hidden, weight, token_ids, old_logprobs, advantages, mask, **head_options,
                                    **loss_options)
        else:
            driver = backends.chunked_driver(backend, hidden.device, "fused_linear_grpo_loss")
            result = driver(hidden, weight, token_ids, old_logprobs, advantages, mask, **head_options, tiles=tiles,
                            **loss_options)
        return _share(result, keep, advantages, batch_group, None, loss_options)
    # packed: the log-probs (the backward recomputes the tiles), then the packed loss on them
    out = backends.chunked_driver(backend, hidden.device, "linear_token_logprobs")(hidden, weight, ids,
                                                                                   **head_options, tiles=tiles)
    logp, entropy = out if head_options["return_entropy"] else (out, None)
    result = grpo_loss(logp, old_logprobs, advantages, keep, batch_group=None, cu_seqlens=cu_seqlens,
                       backend=backend, **loss_options)
    if entropy is not None:
        result = result._replace(entropy=reference.masked_mean_entropy(entropy, keep))
    return _share(result, keep, advantages, batch_group, cu_seqlens, loss_options)

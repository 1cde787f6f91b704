"""The cost model: the fewest bytes each case must move, and the FLOPs it must do.

Bytes: every input read once, every output written once, and in fwd+bwd mode
the gradient of each differentiable input written once (and the incoming
output gradients read once). For the logits ops this is one read of the logits
(+ one write of their gradient): a kernel that forms the gradient in the
forward meets it; a backward that re-reads the logits moves 1.5× as much.
Per-token tensors are float32 (log-probs, advantages, output gradients),
int64 (token ids) and bool (mask); they are small next to the logits.

FLOPs: only the LM-head matmuls count (2·N·V·H forward, 4·N·V·H backward);
the softmax arithmetic of the logits ops is left out, so their floor is the
byte floor.

The roofline floor of a case is ``max(bytes / copy bandwidth, flops / matmul
rate)`` with both rates measured on the device in the same run
(:mod:`benchmarks.limits`; the LM-head cases' matmul rate is that of
``torch.mm`` at their own shapes, [N, H] × [H, V], in the fastest exact dtype:
on a GPU their dtype or float32, on the CPU float32, see ``measure.Record``). The LM-head cases'
matmul floor, ``6·N·V·H / that rate`` in fwd+bwd, is also reported on its own.
"""

from __future__ import annotations

from .cases import Case

FLOAT32, INDEX, MASK = 4, 8, 1


def min_bytes(case: Case) -> int:
    """The fewest bytes ``case`` must read and write (see the module docstring)."""
    itemsize = case.torch_dtype.itemsize
    n, b = case.N, case.B
    if case.op == "group_advantages":
        return 2 * FLOAT32 * b  # rewards in, advantages out
    per_token_in = n * (MASK + FLOAT32 * (1 + (case.beta != 0))) + FLOAT32 * b  # mask, old[, ref], advantages
    if case.op == "grpo_loss":
        read, written = per_token_in + FLOAT32 * n, FLOAT32 * n  # + log-probs in; per-token loss out
        grads = FLOAT32 * n  # d log-probs
    elif case.op == "token_logprobs":
        outputs = 1 + case.entropy
        read, written = itemsize * n * case.V + INDEX * n, FLOAT32 * n * outputs
        grads = itemsize * n * case.V + FLOAT32 * n * outputs  # d logits out, d outputs in
    elif case.op == "fused_grpo_loss":
        read, written = itemsize * n * case.V + INDEX * n + per_token_in, FLOAT32 * n
        grads = itemsize * n * case.V
    else:  # lm_head_grpo_loss
        parameters = itemsize * (n + case.V) * case.H  # hidden states and weight
        read, written = parameters + INDEX * n + per_token_in, FLOAT32 * n
        grads = parameters
    return read + written + (grads if case.backward else 0)


def min_flops(case: Case) -> int:
    """The matmul FLOPs ``case`` must do (the LM head's; 0 for the other ops)."""
    if case.op != "lm_head_grpo_loss":
        return 0
    return (6 if case.backward else 2) * case.N * case.V * case.H


def floor_seconds(case: Case, copy_bytes_per_s: float, matmul_flops_per_s: float) -> float:
    """The roofline floor of ``case``: its bytes at copy bandwidth or its FLOPs at the matmul rate."""
    return max(min_bytes(case) / copy_bytes_per_s, min_flops(case) / matmul_flops_per_s)

"""What a benchmark case is: the op, the mode, the shapes and options, and its inputs.

A case is one op (``token_logprobs``, ``group_advantages``, ``grpo_loss``,
``fused_grpo_loss``, or ``lm_head_grpo_loss``: hidden states × LM-head weight →
log-probs → loss, grpo_kernels' ``fused_linear_grpo_loss`` and the step TRL's
fused LM head does) in one mode (forward,
or forward + backward) at one shape and dtype. Every implementation of a case
gets the same inputs, drawn by :func:`make_inputs` on the device.

Canonical outputs (what implementations return, in this order, and what the
accuracy check compares): ``token_logprobs`` → ``(logp[, entropy])``;
``group_advantages`` → ``(advantages,)``; the losses → ``(loss[, entropy
metric])``; then, in forward + backward mode, the gradient w.r.t. each
differentiable input (logits; log-probs; hidden states and weight).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import grpo_kernels

OPS = ("token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss", "lm_head_grpo_loss")
LOGITS_OPS = ("token_logprobs", "fused_grpo_loss", "lm_head_grpo_loss")
LOSS_OPS = ("grpo_loss", "fused_grpo_loss", "lm_head_grpo_loss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

LOGIT_STD = 2.0  # spread of the drawn logits, about that of a trained LM's
LOGPROB_NOISE = 0.05  # old/ref log-probs = policy log-probs + this × N(0, 1)


@dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
        op: one of :data:`OPS`.
        backward: time forward + backward (else forward only).
        B, T: sequences and tokens per sequence (``group_advantages``: B completions).
        V: vocabulary size (logits ops).
        dtype: name in :data:`DTYPES` of the logits (hidden states and weight for the LM head).
        entropy: also compute the entropy (``token_logprobs``) or the entropy metric (losses).
        loss_type, beta, epsilon_low, epsilon_high: loss options (beta > 0 brings reference
            log-probs and the KL term; 0.2/0.28 is DAPO's clip-higher).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        H: hidden size (``lm_head_grpo_loss``).
        G: group size (``group_advantages``).
        temperature: sampling temperature the logits are divided by.
    """

    op: str
    backward: bool = True
    B: int = 8
    T: int = 256
    V: int = 32000
    dtype: str = "float32"
    entropy: bool = False
    loss_type: str = "dapo"
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    importance_sampling_level: str = "token"
    H: int = 0
    G: int = 8
    temperature: float = 1.0

    @property
    def N(self) -> int:
        """Tokens (rows of the logits)."""
        return self.B * self.T

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def mode(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def name(self) -> str:
        """A unique, readable id.

        E.g. ``fused_grpo_loss/fwd+bwd/dapo,beta=0.04,entropy/N=2048(8x256)/V=32000/float32``.
        """
        if self.op == "group_advantages":
            return f"{self.op}/{self.mode}/G={self.G}/B={self.B}/{self.dtype}"
        options = []
        if self.op in LOSS_OPS:
            options.append(f"{self.loss_type},beta={self.beta:g}")
            if self.importance_sampling_level != "token":
                options.append(self.importance_sampling_level)
        if self.entropy:
            options.append("entropy")
        if self.temperature != 1.0:
            options.append(f"temperature={self.temperature:g}")
        parts = [self.op, self.mode] + ([",".join(options)] if options else [])
        parts.append(f"N={self.N}({self.B}x{self.T})")
        if self.op in LOGITS_OPS:
            parts.append(f"V={self.V}" + (f",H={self.H}" if self.op == "lm_head_grpo_loss" else ""))
        parts.append(self.dtype)
        return "/".join(parts)

    def loss_options(self) -> dict:
        """The keyword options of :func:`grpo_kernels.grpo_loss` this case uses."""
        return dict(
            loss_type=self.loss_type, beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            importance_sampling_level=self.importance_sampling_level,
        )

    def differentiable_outputs(self) -> int:
        """How many leading canonical outputs the backward differentiates (the losses: the loss alone)."""
        return 1 if self.op in LOSS_OPS or not self.entropy else 2

    def replace(self, **changes) -> "Case":
        return dataclasses.replace(self, **changes)


@dataclass
class Inputs:
    """The tensors of one case (unused ones ``None``).

    ``wrt`` lists the differentiable inputs in gradient order; ``output_grads``
    the gradients fed to the differentiable outputs in the backward.
    """

    token_ids: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    advantages: Optional[Tensor] = None
    old_logprobs: Optional[Tensor] = None
    ref_logprobs: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    logprobs: Optional[Tensor] = None
    hidden: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    rewards: Optional[Tensor] = None
    output_grads: tuple[Tensor, ...] = ()

    @property
    def wrt(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.logits, self.logprobs, self.hidden, self.weight) if t is not None)

    def upcast(self) -> "Inputs":
        """A float64 copy (leaves requiring grad again) for the accuracy reference."""

        def up(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None or not t.is_floating_point():
                return t
            return t.detach().double().requires_grad_(t.requires_grad)

        fields = {f.name: up(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "output_grads"}
        return Inputs(**fields, output_grads=tuple(g.double() for g in self.output_grads))


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Random inputs of ``case`` on ``device`` (never zeros).

    Logits ~ N(0, 2²); completion lengths uniform in [T/2, T] (the mask);
    advantages ~ N(0, 1); old and reference log-probs are the policy's own
    log-probs plus N(0, 0.05²) noise, so that ratios sit around 1 as in training.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    B, T = case.B, case.T
    if case.op == "group_advantages":
        rewards = torch.rand(B, generator=g, device=device, dtype=case.torch_dtype)
        return Inputs(rewards=rewards)
    mask = torch.arange(T, device=device) < torch.randint(T // 2, T + 1, (B, 1), generator=g, device=device)
    inputs = Inputs(mask=mask, advantages=torch.randn(B, generator=g, device=device))
    if case.op == "grpo_loss":
        inputs.logprobs = (-2 * torch.rand(B, T, generator=g, device=device)).to(case.torch_dtype).requires_grad_()
        policy_logprobs = inputs.logprobs.detach()
    else:
        inputs.token_ids = torch.randint(0, case.V, (B, T), generator=g, device=device)
        if case.op == "lm_head_grpo_loss":
            inputs.hidden = _normal((B, T, case.H), 1.0, case, g, device)
            inputs.weight = _normal((case.V, case.H), LOGIT_STD / math.sqrt(case.H), case, g, device)
            logits = inputs.hidden.detach() @ inputs.weight.detach().T
        else:
            inputs.logits = _normal((B, T, case.V), LOGIT_STD, case, g, device)
            logits = inputs.logits.detach()
        with torch.no_grad():
            policy_logprobs = grpo_kernels.token_logprobs(
                logits, inputs.token_ids, temperature=case.temperature, backend="reference"
            )
    inputs.old_logprobs = policy_logprobs + LOGPROB_NOISE * torch.randn(B, T, generator=g, device=device)
    if case.beta:
        inputs.ref_logprobs = policy_logprobs + LOGPROB_NOISE * torch.randn(B, T, generator=g, device=device)
    if case.op == "token_logprobs":
        inputs.output_grads = tuple(
            torch.randn(B, T, generator=g, device=device) for _ in range(case.differentiable_outputs())
        )
    else:
        inputs.output_grads = (torch.ones((), device=device),)
    return inputs


def _normal(shape: tuple[int, ...], std: float, case: Case, g: torch.Generator, device: torch.device) -> Tensor:
    """A leaf of ``case``'s dtype drawn from N(0, std²), requiring grad."""
    t = torch.randn(shape, generator=g, device=device, dtype=torch.float32).mul_(std)
    return t.to(case.torch_dtype).requires_grad_()

"""Named lists of cases: the runner's presets and the pytest-benchmark suite's cases.

The first cases of a preset are its most important ones: the runner measures
them in order and stops at its time budget.
"""

from __future__ import annotations

from typing import Callable

from .cases import Case

FUSED = Case(op="fused_grpo_loss")  # forward + backward, dapo, beta 0.04 (with reference log-probs)


def _cpu_small() -> list[Case]:
    """Runs on a 2-core CPU in a few minutes; its first cases are the targets of the CPU backend."""
    target = FUSED.replace(B=8, T=256, V=32000)  # N = 2048 tokens
    return [
        target,
        target.replace(dtype="bfloat16"),
        target.replace(entropy=True),
        *(FUSED.replace(B=2, T=256, V=v) for v in (32000, 128256, 151936)),  # time vs V
        FUSED.replace(B=4, T=256, V=32000),  # memory vs N (with N = 512, 2048 above)
        Case(op="token_logprobs", B=4, T=256, V=32000, backward=False),
        *(Case(op="token_logprobs", B=4, T=256, V=32000, entropy=ent) for ent in (False, True)),
        Case(op="grpo_loss", B=64, T=1024),
        Case(op="group_advantages", B=65536, G=8, backward=False),
        *LINEAR[:2],  # the fused-linear targets in fp32: N = 2048, V = 32000, H = 512 and 1024
    ]


def _cpu_grpo_loss() -> list[Case]:
    """grpo_loss fwd+bwd, the issue-19 targets of the cpu backend: [64, 1024] and [8, 256], fp32 and bf16
    log-probs, dapo at both importance-sampling levels first, then the other loss families (a few minutes)."""
    shapes = ((64, 1024), (8, 256))
    first = [Case(op="grpo_loss", B=b, T=t, dtype=dtype, importance_sampling_level=level)
             for b, t in shapes for dtype in ("float32", "bfloat16") for level in ("token", "sequence")]
    families = [Case(op="grpo_loss", B=b, T=t, loss_type=loss_type, epsilon_high=5.0 if loss_type == "cispo" else 0.28)
                for b, t in shapes for loss_type in ("grpo", "cispo", "sapo", "vespo", "gmpo", "gpg")]
    return first + families


# The fused-linear targets (hidden [2048, H] × weight [32000, H] → loss, fwd+bwd), the cpu-linear preset: fp32
# first, bf16 after (its matmul is the slowest on CPUs without AVX-512 BF16: there all four take ~20 minutes).
LINEAR: tuple[Case, ...] = tuple(
    Case(op="lm_head_grpo_loss", B=8, T=256, V=32000, H=h, dtype=dtype)
    for dtype, hs in (("float32", (512, 1024)), ("bfloat16", (512, 1024))) for h in hs
)

GROWTH_TOKENS = (512, 1024, 2048, 4096, 8192)  # swept at the middle vocabulary (32000)
GROWTH_VOCABULARIES = (8192, 16384, 32000, 128256, 262144)  # swept at the middle token count (2048)
GROWTH_HIDDEN = 512


def growth(tokens: tuple[int, ...] = GROWTH_TOKENS, vocabularies: tuple[int, ...] = GROWTH_VOCABULARIES,
           hidden: int = GROWTH_HIDDEN, sequence: int = 256) -> list[Case]:
    """Cost growth of the fused loss and the fused linear op (fwd+bwd, fp32): N swept at the middle V, then V
    swept at the middle N (sequences of ``sequence`` tokens), fused loss first."""
    middle_n, middle_v = tokens[len(tokens) // 2], vocabularies[len(vocabularies) // 2]
    shapes = list(dict.fromkeys([(n, middle_v) for n in tokens] + [(middle_n, v) for v in vocabularies]))
    return [
        Case(op=op, B=n // sequence, T=sequence, V=v, H=hidden if op == "lm_head_grpo_loss" else 0)
        for op in ("fused_grpo_loss", "lm_head_grpo_loss") for n, v in shapes
    ]


# The headline cases of a GPU (N = 16384 tokens, Qwen 2.5's V = 151936, bf16): the issue-21 goals are stated
# at these shapes, benchmarks/gpu_run.sh's stage a measures them first, benchmarks/tune.py tunes at them.
HEADLINE: tuple[Case, ...] = (
    FUSED.replace(B=32, T=512, V=151936, dtype="bfloat16"),  # forward + backward
    Case(op="token_logprobs", B=32, T=512, V=151936, dtype="bfloat16", backward=False),
    Case(op="lm_head_grpo_loss", B=32, T=512, V=151936, H=4096, dtype="bfloat16"),  # fused_linear_grpo_loss
)


def _gpu() -> list[Case]:
    """An H100-class GPU, under about five minutes: the headline cases, then vocabularies of Llama 2, 3,
    Qwen 2.5, Gemma 3."""
    vocabularies = (32000, 128256, 151936, 262144)
    sweep = FUSED.replace(B=16, T=512)  # N = 8192 tokens
    cases = [
        *HEADLINE,
        *(sweep.replace(V=v, dtype="bfloat16") for v in vocabularies),
        *(FUSED.replace(B=b, T=512, V=151936, dtype="bfloat16") for b in (4, 8, 32)),  # memory vs N, up to 16384
        *(Case(op="token_logprobs", B=16, T=512, V=151936, dtype="bfloat16", backward=bwd, entropy=ent)
          for bwd in (False, True) for ent in (False, True)),
        sweep.replace(V=151936, dtype="bfloat16", entropy=True),
        sweep.replace(V=151936, dtype="bfloat16", backward=False),
        *(sweep.replace(V=v, dtype="float32") for v in vocabularies),
        Case(op="lm_head_grpo_loss", B=32, T=512, V=151936, H=4096, dtype="bfloat16"),  # N = 16384
        Case(op="grpo_loss", B=32, T=512),
        Case(op="group_advantages", B=65536, G=8, backward=False),
    ]
    return list(dict.fromkeys(cases))  # the headline cases once, first


def _gpu_rest() -> list[Case]:
    """The gpu preset without its headline cases (stage c of benchmarks/gpu_run.sh)."""
    return [case for case in _gpu() if case not in HEADLINE]


def _suite(scale: int, vocabulary: int, dtype: str) -> list[Case]:
    """The pytest-benchmark suite's cases: every op and mode, at ``scale`` × a small token count."""
    logits = dict(B=2 * scale, T=128, V=vocabulary, dtype=dtype)
    return [
        *(Case(op="token_logprobs", backward=bwd, entropy=ent, **logits)
          for bwd in (False, True) for ent in (False, True)),
        Case(op="group_advantages", B=4096 * scale, G=8, backward=False),
        Case(op="grpo_loss", B=16 * scale, T=512),
        FUSED.replace(backward=False, **logits),
        FUSED.replace(**logits),
        FUSED.replace(entropy=True, **logits),
    ]


PRESETS: dict[str, Callable[[], list[Case]]] = {
    "cpu-small": _cpu_small,
    "cpu-linear": lambda: list(LINEAR),
    "cpu-grpo-loss": _cpu_grpo_loss,
    "cpu-growth": growth,
    "gpu": _gpu,
    "gpu-headline": lambda: list(HEADLINE),
    "gpu-rest": _gpu_rest,
}
# The implementations a preset measures when ``--impls`` is not given (the others: all of them).
DEFAULT_IMPLS: dict[str, tuple[str, ...]] = {
    "cpu-growth": ("ours-cpu", "ours-cpu-inplace", "torch-compile"),
    "cpu-grpo-loss": ("ours-cpu", "torch-compile", "ours-reference"),
}
SUITES: dict[str, Callable[[], list[Case]]] = {
    "cpu": lambda: _suite(1, 32000, "float32"),
    "cuda": lambda: _suite(16, 151936, "bfloat16"),
}

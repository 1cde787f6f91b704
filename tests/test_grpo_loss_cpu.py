"""The cpu backend's vectorized grpo_loss kernels (csrc/cpu/loss_simd.h) against the reference: sequences
longer than a token block (512) with a tail that is no multiple of the 16 sum lanes, every loss type at both
ratio levels, each option that has its own code path in the kernels, bool and float masks, strided and
broadcast inputs, NaN at masked positions."""

from __future__ import annotations

import pytest
import torch

import grpo_kernels

from conftest import TOLERANCES
from loss_cases import LOSS_TYPES, applicable

pytestmark = pytest.mark.skipif("cpu" not in grpo_kernels.available_backends("grpo_loss"),
                                reason="the cpu backend is not built")

B, T = 3, 1100  # three blocks of 512 tokens, the last 76 (not a multiple of 16)

# Options with a code path of their own in the kernels (the plain path has none of them).
OPTIONS = (
    {},
    dict(log_ratio_clamp=0.03, kl_estimator="low_var_kl"),
    dict(delta=1.02, clip_ratio_c=3.0, use_bias_correction_kl=True, kl_estimator="k2"),
    dict(kl_estimator="k1", importance_weights="token"),
)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([T, 700, 1])
    mask = torch.arange(T) < lengths[:, None]
    logp = -2 * torch.rand(B, T, generator=g)
    old = logp + 0.05 * torch.randn(B, T, generator=g)
    ref = logp + 0.05 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    iw = 0.5 + torch.rand(B, T, generator=g)
    for t in (logp, old, ref, iw):
        t[~mask] = float("nan")  # garbage at masked positions
    return logp, old, ref, adv, mask, iw


def _run(backend, logp, old, adv, mask, **options):
    x = logp.detach().clone().requires_grad_()
    out = grpo_kernels.grpo_loss(x, old, adv, mask, backend=backend, **options)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


def _check(logp, old, adv, mask, **options):
    (want, want_grad), (got, got_grad) = (_run(b, logp, old, adv, mask, **options) for b in ("reference", "cpu"))
    tol = TOLERANCES[torch.float32]
    for name in ("loss", "per_token_loss", "kl", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        a, b = getattr(got, name), getattr(want, name)
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b.detach(), **tol, msg=name)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    assert torch.isfinite(got_grad).all() and (got_grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("case", range(len(OPTIONS)))
def test_long_sequences_match_the_reference(loss_type, level, case):
    options = dict(OPTIONS[case])
    if not applicable(loss_type, options, level):
        pytest.skip("validation refuses this combination")
    logp, old, ref, adv, mask, iw = _inputs(case)
    if options.pop("importance_weights", None):
        options["importance_weights"] = iw
    _check(logp, old, adv, mask, ref_logprobs=ref, beta=0.04, epsilon_low=0.2,
           epsilon_high=5.0 if loss_type == "cispo" else 0.28, loss_type=loss_type, importance_sampling_level=level,
           **options)


@pytest.mark.parametrize("layout", ["float_mask", "strided", "token_advantages", "no_old_no_ref"])
def test_layouts_match_the_reference(layout):
    logp, old, ref, adv, mask, _ = _inputs(7)
    options = dict(ref_logprobs=ref, beta=0.04, loss_type="grpo")
    if layout == "float_mask":
        mask = mask.float()
    elif layout == "strided":  # rows with a stride along T: read through the block buffers
        old = torch.stack([old, old], -1)[..., 0]
        options["ref_logprobs"] = torch.stack([ref, ref], -1)[..., 1]
    elif layout == "token_advantages":
        adv = adv[:, None] + 0.1 * torch.randn(B, T)
    elif layout == "no_old_no_ref":
        old, options = None, dict(loss_type="dapo")
    _check(logp, old, adv, mask, **options)

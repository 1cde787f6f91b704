"""grpo_kernels.integrations.openrlhf against OpenRLHF 0.11.2's own code.

OpenRLHF is installed without its dependencies (the Makefile's peer packages). ``openrlhf.models``'s
``__init__`` imports the actor (deepspeed, peft, transformers), so its ``models/loss.py`` and
``models/utils.py`` are loaded here as a package of their own, with a placeholder ``deepspeed`` module
while ``utils.py`` runs (it imports deepspeed for a function not used here). The reward shaping is
``RemoteExperienceMaker.compute_advantages_and_returns`` itself, taken from ``experience_maker.py``'s source
(its module imports Ray actors) and run on stand-in experiences. patch_openrlhf is checked on stand-in
modules holding OpenRLHF's class, and on a stand-in package with OpenRLHF's import chain of PolicyLoss.
Skipped when OpenRLHF is not installed.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import itertools
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from grpo_kernels.integrations import openrlhf as gk_orl

POLICY_LOSS_TYPES = gk_orl.POLICY_LOSS_TYPES
OP = "grpo_loss"  # the backend fixture: every backend implementing grpo_loss
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}
# OpenRLHF divides a sequence's sum by count + 1e-8, we by count: a relative 1e-8 (module docstring)
SEQ_MEAN_TOL = {torch.float64: dict(rtol=2e-8, atol=1e-12), torch.float32: TOL[torch.float32]}
B, T = 7, 9


# --------------------------------------------------------------------------- #
# OpenRLHF's own code
# --------------------------------------------------------------------------- #
@functools.lru_cache(maxsize=None)
def _openrlhf_dir() -> Path | None:
    spec = importlib.util.find_spec("openrlhf")  # its top-level __init__ is empty
    return None if spec is None else Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _openrlhf_models():
    """OpenRLHF's models/utils.py and models/loss.py as the package ``_openrlhf_models``."""
    root = _openrlhf_dir()
    package = types.ModuleType("_openrlhf_models")
    package.__path__ = [str(root / "models")]
    sys.modules["_openrlhf_models"] = package
    placeholder = "deepspeed" not in sys.modules and importlib.util.find_spec("deepspeed") is None
    if placeholder:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        utils = importlib.import_module("_openrlhf_models.utils")
        loss = importlib.import_module("_openrlhf_models.loss")
    finally:
        if placeholder:
            del sys.modules["deepspeed"]
    return utils, loss


@functools.lru_cache(maxsize=None)
def _experience_maker_methods():
    """``compute_advantages_and_returns`` and ``get_cumulative_returns`` of OpenRLHF's RemoteExperienceMaker."""
    utils, _ = _openrlhf_models()
    path = _openrlhf_dir() / "trainer" / "ppo_utils" / "experience_maker.py"
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RemoteExperienceMaker")
    wanted = [n for n in cls.body if isinstance(n, ast.FunctionDef)
              and n.name in ("compute_advantages_and_returns", "get_cumulative_returns")]
    namespace = dict(torch=torch, itertools=itertools, List=list, Tuple=tuple, Experience=object,
                     compute_reward=utils.compute_reward, logger=logging.getLogger("openrlhf-test"),
                     apply_length_penalties=lambda experiences, args: None)  # no length penalty configured
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["compute_advantages_and_returns"], namespace["get_cumulative_returns"]


@pytest.fixture(scope="module")
def orl():
    if _openrlhf_dir() is None:
        pytest.skip("openrlhf is not installed (make setup installs openrlhf==0.11.2 --no-deps)")
    utils, loss = _openrlhf_models()
    return types.SimpleNamespace(utils=utils, loss=loss)


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #
def make_batch(seed, dtype, *, empty_row=True, log_ratio_scale=0.3, rollout_scale=0.6):
    """log_probs (leaf), old, rollout, advantages [B, T], bool mask with a ragged tail and one empty row (2)."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * log_ratio_scale
    old = old + torch.randn(B, 1, generator=g, dtype=torch.float64) * log_ratio_scale  # GSPO's ratios spread too
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[::3] += torch.randn(B, T, generator=g, dtype=torch.float64)[::3] * 0.5  # some per-token advantages
    # beyond the dual clip (1.5) with A < 0: token 0 of row 0 (ratio e^0.7), and all of row 1 (GSPO's e^0.6)
    old[0, 0], adv[0, 0] = logp[0, 0] - 0.7, -1.0
    old[1], adv[1] = logp[1] - 0.6 + torch.randn(T, generator=g, dtype=torch.float64) * 0.1, -adv[1].abs() - 0.1
    rollout = old + torch.randn(B, T, generator=g, dtype=torch.float64) * rollout_scale
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    if empty_row:
        mask[2] = False
    old, rollout = old.clamp(max=-1e-4), rollout.clamp(max=-1e-4)
    return logp.to(dtype).requires_grad_(), old.to(dtype), rollout.to(dtype), adv.to(dtype), mask


# (level, mode, gating, threshold); the thresholds filter part of make_batch's units
CORRECTIONS = {
    "off": ("off", "mask", "ratio", (0.5, 5.0)),
    "tok-mask-ratio": ("token", "mask", "ratio", (0.7, 1.5)),
    "tok-clip-ratio": ("token", "clip", "ratio", (0.7, 1.5)),
    "tok-mask-ratio-wide": ("token", "mask", "ratio", (0.0, 1.5)),  # low < e^-20: computed outside the kernels
    "seq-mask-ratio": ("seq", "mask", "ratio", (0.8, 1.25)),
    "tok-mask-binary_kl": ("token", "mask", "binary_kl", (0.0, 0.02)),
    "tok-mask-tv": ("token", "mask", "tv", (0.0, 0.1)),
    "seq-mask-binary_kl": ("seq", "mask", "binary_kl", (0.0, 0.04)),
    "seq-mask-tv": ("seq", "mask", "tv", (-1.0, 0.12)),
}
BATCH_INFOS = {"local": {}, "dp2": dict(dp_size=2, batch_num_tokens=71.0, global_batch_size=13.0)}


def _options(correction, **kwargs):
    level, mode, gating, threshold = CORRECTIONS[correction]
    return dict(is_correction_level=level, is_correction_mode=mode, is_correction_gating=gating,
                is_correction_threshold=threshold, clip_eps_low=0.2, clip_eps_high=0.28, **kwargs)


def _run(module, logp, old, rollout, adv, mask, info, mask_arg=None):
    logp = logp.detach().clone().requires_grad_()
    out = module(logp, old, adv, action_mask=mask if mask_arg is None else mask_arg, rollout_log_probs=rollout,
                 **info)
    out[0].backward()
    return out, logp.grad


def assert_same(ours, theirs, grads, tol, *, what=""):
    names = ("loss", "clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")
    for name, a, b in zip(names, ours, theirs):
        if b is None:
            assert a is None, f"{what}{name}: OpenRLHF returns None"
            continue
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m: f"{what}{name}: {m}")
    torch.testing.assert_close(grads[0], grads[1], **tol, msg=lambda m: f"{what}grad: {m}")


def compare(orl, backend, dtype, seed=0, batch=None, info=(), **options):
    info = dict(info)
    logp, old, rollout, adv, mask = batch if batch is not None else make_batch(seed, dtype)
    theirs, their_grad = _run(orl.loss.PolicyLoss(**options), logp, old, rollout, adv, mask, info)
    ours, our_grad = _run(gk_orl.PolicyLoss(**options, backend=backend), logp, old, rollout, adv, mask, info)
    token_level = options.get("token_level_loss", True) and options.get("policy_loss_type") != "gspo"
    tol = TOL[dtype] if token_level else SEQ_MEAN_TOL[dtype]
    assert_same(ours, theirs, (our_grad, their_grad), tol)
    return ours


# --------------------------------------------------------------------------- #
# PolicyLoss: every valid option combination
# --------------------------------------------------------------------------- #
DUAL_CLIP = 1.5  # low enough that make_batch has tokens with A < 0 beyond it (test_dual_clip_is_exercised)
PPO_GRID = list(itertools.product([True, False], [None, DUAL_CLIP], CORRECTIONS, BATCH_INFOS))
# The Triton interpreter is slow (about 1 s a case): it runs these (token_level_loss, correction), f64, dual clip,
# no global normalizers; the reference and cpu backends run the whole grid.
TRITON_PPO = {(True, "off"), (True, "tok-mask-ratio"), (True, "tok-clip-ratio"), (False, "seq-mask-tv")}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("token_level_loss,dual_clip,correction,info", PPO_GRID)
def test_ppo_matches_openrlhf(orl, backend, dtype, token_level_loss, dual_clip, correction, info):
    if backend == "triton" and (dtype == torch.float32 or info != "local" or dual_clip is None
                                or (token_level_loss, correction) not in TRITON_PPO):
        pytest.skip("the Triton interpreter is slow: a subset")
    ours = compare(orl, backend, dtype, seed=len(correction), info=BATCH_INFOS[info],
                   **_options(correction, token_level_loss=token_level_loss, dual_clip=dual_clip))
    assert 0 < ours[1].item() < 1  # some tokens clipped, some not: the test compares something
    if correction != "off":  # the gate filters some units and keeps some
        assert 0 < ours[4].item() < 1


def test_dual_clip_is_exercised(orl):
    """The grids' dual clip changes OpenRLHF's loss and gradient on their batches (for ppo and gspo)."""
    for seed, policy_loss_type in ((0, "ppo"), (3, "gspo")):
        logp, old, rollout, adv, mask = make_batch(seed, torch.float64)
        results = [_run(orl.loss.PolicyLoss(dual_clip=c, policy_loss_type=policy_loss_type), logp, old, rollout,
                        adv, mask, {}) for c in (None, DUAL_CLIP)]
        assert results[0][0][0].item() != results[1][0][0].item()
        assert not torch.equal(results[0][1], results[1][1])


GSPO_GRID = list(itertools.product([True, False], [None, DUAL_CLIP], ["off", "tok-mask-ratio", "seq-mask-tv"],
                                   BATCH_INFOS))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("token_level_loss,dual_clip,correction,info", GSPO_GRID)
def test_gspo_matches_openrlhf(orl, backend, dtype, token_level_loss, dual_clip, correction, info):
    """GSPO: sequence ratio against old (correction off) or rollout log-probs (on), no IS coefficient."""
    if backend == "triton" and (dtype == torch.float32 or info != "local" or token_level_loss or dual_clip is None
                                or correction == "seq-mask-tv"):
        pytest.skip("the Triton interpreter is slow: a subset")
    ours = compare(orl, backend, dtype, seed=3, info=BATCH_INFOS[info], policy_loss_type="gspo",
                   **_options(correction, token_level_loss=token_level_loss, dual_clip=dual_clip))
    assert 0 < ours[1].item() < 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("correction", ["off", "tok-mask-ratio", "tok-clip-ratio", "seq-mask-ratio"])
def test_overflowing_ratios(orl, backend, dtype, correction):
    """Log-ratio differences of ±60 (policy vs old) and ±30 (old vs rollout): OpenRLHF's ±20 clamp, the
    rollout ratio's e^±30 against the band, the same in the kernels."""
    if backend == "triton" and (dtype == torch.float32 or correction not in ("off", "tok-clip-ratio")):
        pytest.skip("the Triton interpreter is slow: a subset")
    logp, old, rollout, adv, mask = make_batch(5, torch.float64)
    sign = torch.where(torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    old = old.clone()
    old[:, ::2] = logp.detach()[:, ::2] + 60 * sign[:, ::2]
    rollout = rollout.clone()
    rollout[:, 1::3] = old[:, 1::3] + 30 * sign[:, 1::3]
    batch = (logp.detach().to(dtype).requires_grad_(), old.to(dtype), rollout.to(dtype), adv.to(dtype), mask)
    for dual_clip in (None, 3.0):  # ratios of e^20 with A < 0: the dual clip bounds them
        compare(orl, backend, dtype, batch=batch, **_options(correction, dual_clip=dual_clip))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_gspo_large_sequence_ratios(orl, backend, dtype):
    """GSPO has no clamp: mean log-ratios of ±40 give ratios of e^±40, as OpenRLHF (clipped where A says so)."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is slow: covered by the reference and cpu backends")
    logp, old, rollout, adv, mask = make_batch(6, torch.float64)
    old = old.clone()
    old[0], old[3] = logp.detach()[0] - 40, logp.detach()[3] + 40
    adv = adv.clone()
    adv[0] = adv[0].abs() + 0.1  # ratio e^40 with A > 0: clipped, finite, zero gradient
    batch = (logp.detach().to(dtype).requires_grad_(), old.to(dtype), rollout.to(dtype), adv.to(dtype), mask)
    for dual_clip in (None, 3.0):
        compare(orl, backend, dtype, batch=batch, policy_loss_type="gspo", dual_clip=dual_clip)


def test_per_sequence_advantages(orl, backend):
    """Advantages [B, 1] (OpenRLHF broadcasts them): the clip ratio stays a token mean, GSPO's included."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is slow")
    logp, old, rollout, adv, mask = make_batch(11, torch.float64)  # GSPO's token and sequence means differ
    batch = (logp, old, rollout, adv[:, :1].contiguous(), mask)
    for policy_loss_type in POLICY_LOSS_TYPES:
        for token_level_loss in (True, False):
            ours = compare(orl, backend, torch.float64, batch=batch, policy_loss_type=policy_loss_type,
                           token_level_loss=token_level_loss, dual_clip=DUAL_CLIP, clip_eps_high=0.28)
            assert 0 < ours[1].item() < 1


@pytest.mark.parametrize("correction", ["tok-mask-ratio", "seq-mask-binary_kl"])
@pytest.mark.parametrize("policy_loss_type", POLICY_LOSS_TYPES)
def test_bfloat16_inputs(orl, backend, policy_loss_type, correction):
    """bfloat16 inputs: ours computes in float32, so it equals OpenRLHF run on the inputs converted to float32
    (OpenRLHF on bfloat16 computes in bfloat16); the gradient comes back in bfloat16."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is slow")
    logp, old, rollout, adv, mask = make_batch(4, torch.bfloat16)
    options = _options(correction, dual_clip=DUAL_CLIP, policy_loss_type=policy_loss_type)
    f32 = [t.detach().float() for t in (logp, old, rollout, adv)]
    theirs, their_grad = _run(orl.loss.PolicyLoss(**options), *f32, mask, {})
    ours, our_grad = _run(gk_orl.PolicyLoss(**options, backend=backend), logp, old, rollout, adv, mask, {})
    assert ours[0].dtype == torch.float32 and our_grad.dtype == torch.bfloat16
    assert_same(ours, theirs, (our_grad.float(), their_grad.bfloat16().float()), dict(rtol=1e-2, atol=1e-5))
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)


def test_action_mask_none(orl, backend):
    """No mask: every token counts (OpenRLHF supports it for the token-level ppo loss without batch_num_tokens)."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is slow")
    logp, old, rollout, adv, _ = make_batch(8, torch.float64)
    for correction in ("off", "tok-mask-ratio", "seq-mask-tv"):
        module_options = _options(correction, dual_clip=DUAL_CLIP)
        theirs, their_grad = _run(orl.loss.PolicyLoss(**module_options), logp, old, rollout, adv, None, {})
        ours, our_grad = _run(gk_orl.PolicyLoss(**module_options, backend=backend), logp, old, rollout, adv, None, {})
        assert_same(ours, theirs, (our_grad, their_grad), TOL[torch.float64], what=correction + ": ")


@pytest.mark.parametrize("info", [
    dict(dp_size=4, batch_num_tokens=torch.tensor(80.0), global_batch_size=torch.tensor(15.0)),  # as
    # OpenRLHF's get_loss_batch_info gives them: float32 0-d tensors
    dict(dp_size=2, batch_num_tokens=40.5),  # one normalizer only: the other mode ignores dp_size
    dict(dp_size=2, global_batch_size=6.5),
], ids=["tensors", "tokens-only", "sequences-only"])
def test_partial_and_tensor_normalizers(orl, backend, info):
    if backend == "triton":
        pytest.skip("the Triton interpreter is slow")
    for token_level_loss in (True, False):
        compare(orl, backend, torch.float64, seed=9, info=info, token_level_loss=token_level_loss,
                **_options("seq-mask-ratio"))


def test_masked_positions_hold_garbage(orl, backend):
    """NaN / ±inf at masked positions change nothing (OpenRLHF, multiplying by the mask, would give NaN):
    our results equal OpenRLHF's on the same inputs with finite values there."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is slow")
    logp, old, rollout, adv, mask = make_batch(10, torch.float64)
    dirty = [t.detach().clone() for t in (logp, old, rollout, adv)]
    for i, t in enumerate(dirty):
        t[~mask] = (float("nan"), float("inf"), -float("inf"), float("nan"))[i]
    for policy_loss_type, correction in (("ppo", "tok-mask-ratio"), ("ppo", "seq-mask-binary_kl"),
                                         ("ppo", "tok-mask-tv"), ("gspo", "tok-mask-ratio")):
        for token_level_loss in (True, False):
            options = _options(correction, dual_clip=DUAL_CLIP, token_level_loss=token_level_loss,
                               policy_loss_type=policy_loss_type)
            theirs, their_grad = _run(orl.loss.PolicyLoss(**options), logp, old, rollout, adv, mask, {})
            module = gk_orl.PolicyLoss(**options, backend=backend)
            ours, our_grad = _run(module, dirty[0].requires_grad_(), *dirty[1:], mask, {})
            assert torch.all(our_grad[~mask] == 0)
            tol = TOL[torch.float64] if token_level_loss and policy_loss_type == "ppo" else SEQ_MEAN_TOL[torch.float64]
            assert_same(ours, theirs, (our_grad, their_grad), tol, what=f"{policy_loss_type} {correction}: ")


@pytest.mark.parametrize("token_level_loss", [True, False])
def test_fully_masked_batch_differs_from_openrlhf(orl, backend, token_level_loss):
    """Documented difference: with no token at all, OpenRLHF's masked_mean divides 0 by 0 (NaN loss and
    metrics; seq level: the filter ratio counts every empty row as filtered, 1); ours gives 0 and a zero
    gradient, the filter ratio as OpenRLHF's."""
    logp, old, rollout, adv, mask = make_batch(11, torch.float64)
    mask = torch.zeros_like(mask)
    options = _options("seq-mask-ratio", token_level_loss=token_level_loss)
    theirs, _ = _run(orl.loss.PolicyLoss(**options), logp, old, rollout, adv, mask, {})
    ours, our_grad = _run(gk_orl.PolicyLoss(**options, backend=backend), logp, old, rollout, adv, mask, {})
    assert all(torch.isnan(t) for t in theirs[:4])
    assert theirs[4].item() == ours[4].item() == 1.0
    assert all(t.item() == 0.0 for t in ours[:4])
    assert torch.all(our_grad == 0)


def test_gates_run_in_the_kernels():
    """Every gate of the grids is computed by grpo_loss's rollout_is_gate, but a ratio band reaching e^±20 (there the
    kernels' ±20 clamp of the rollout log-ratios would change decisions: torch ops, is_correction)."""
    for name, (level, mode, gating, threshold) in CORRECTIONS.items():
        if level != "off":
            gate = gk_orl._kernel_gate(level, mode, gating, *threshold)
            assert (gate is None) == (name == "tok-mask-ratio-wide"), name
    assert gk_orl._kernel_gate("seq", "mask", "ratio", 0.5, 1e10) is None
    assert gk_orl._kernel_gate("token", "mask", "tv", -float("inf"), float("inf"))["rollout_is_max"] is None


@pytest.mark.parametrize("correction", ["tok-mask-tv", "seq-mask-binary_kl"])
def test_divergence_gate_clamps_kept_ratios(orl, backend, correction):
    """Documented difference: a kept token whose rollout log-ratio is beyond ±20 gets the weight e^±20 (the ppo
    loss's log_ratio_clamp), OpenRLHF's e^{log-ratio}: ours equals OpenRLHF's on inputs with that log-ratio at ±20."""
    if backend == "triton":
        pytest.skip("the Triton interpreter is slow: covered by the reference and cpu backends")
    logp, old, rollout, adv, mask = make_batch(13, torch.float64)
    old, rollout = old.clone(), rollout.clone()
    old[:, 0], rollout[:, 0] = -10.0, -40.0  # p, q ≈ 0: divergences ≈ 0, kept; ratio e^30
    level, mode, gating, threshold = CORRECTIONS[correction]
    filtered = gk_orl.is_correction(old, rollout, mask, level=level, mode=mode, gating=gating, threshold=threshold,
                                    weights=False).filtered
    row = int((~filtered[:, 0] & mask[:, 0]).nonzero()[0])  # a kept unit
    old[row + 1:, 0], rollout[row + 1:, 0] = old[row + 1:, 1], rollout[row + 1:, 1]
    options = _options(correction, dual_clip=DUAL_CLIP)
    ours, our_grad = _run(gk_orl.PolicyLoss(**options, backend=backend), logp, old, rollout, adv, mask, {})
    theirs, _ = _run(orl.loss.PolicyLoss(**options), logp, old, rollout, adv, mask, {})
    assert not torch.allclose(ours[0], theirs[0])
    at_clamp = rollout.clone()
    at_clamp[row, 0] = -30.0
    theirs, their_grad = _run(orl.loss.PolicyLoss(**options), logp, old, at_clamp, adv, mask, {})
    assert_same(ours[:3], theirs[:3], (our_grad, their_grad), TOL[torch.float64])


@pytest.mark.parametrize("correction", ["tok-mask-ratio", "seq-mask-ratio", "tok-mask-tv"])
def test_nan_rollout_log_prob_at_a_kept_token(orl, correction):
    """Documented difference: a NaN rollout log-prob at a token that counts keeps the token at rollout ratio 1
    (the kernels' convention for an unknown sampling log-prob), where OpenRLHF drops it; is_filter_ratio counts it
    filtered, as OpenRLHF's does. Ours equals OpenRLHF's run on the batch whose rollout log-prob there is the old
    one (ratio 1, kept), up to the filter metric."""
    logp, old, rollout, adv, mask = make_batch(3, torch.float64)
    row = int(mask[:, 0].nonzero()[0])
    nan_rollout, ratio_one = rollout.clone(), rollout.clone()
    nan_rollout[row, 0], ratio_one[row, 0] = float("nan"), old[row, 0]
    options = _options(correction)
    ours, our_grad = _run(gk_orl.PolicyLoss(**options, backend="cpu"), logp, old, nan_rollout, adv, mask, {})
    theirs_nan, _ = _run(orl.loss.PolicyLoss(**options), logp, old, nan_rollout, adv, mask, {})
    theirs_one, their_grad = _run(orl.loss.PolicyLoss(**options), logp, old, ratio_one, adv, mask, {})
    assert our_grad[row, 0] != 0 and torch.isfinite(ours[0])
    assert_same(ours[:3], theirs_one[:3], (our_grad, their_grad), TOL[torch.float64])
    torch.testing.assert_close(ours[4], theirs_nan[4])


def test_validation_matches_openrlhf(orl):
    bad = [dict(is_correction_level="sometimes"), dict(is_correction_mode="drop"),
           dict(is_correction_gating="kl"),
           dict(is_correction_level="seq", is_correction_mode="clip"),
           dict(is_correction_level="token", is_correction_mode="clip", is_correction_gating="tv",
                is_correction_threshold=(0.0, 0.1)),
           dict(is_correction_level="token", is_correction_gating="tv")]  # default (0.5, 5): lower bound > 0
    for options in bad:
        with pytest.raises(ValueError) as theirs:
            orl.loss.PolicyLoss(**options)
        with pytest.raises(ValueError) as ours:
            gk_orl.PolicyLoss(**options)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(AssertionError):
        orl.loss.PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1.0, got 1.0"):
        gk_orl.PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match="Invalid policy loss type: reinforce"):
        gk_orl.PolicyLoss(policy_loss_type="reinforce")
    logp, old, rollout, adv, mask = make_batch(12, torch.float64)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        gk_orl.PolicyLoss(is_correction_level="token")(logp, old, adv, mask)
    with pytest.raises(ValueError, match="dp_size"):
        gk_orl.PolicyLoss()(logp, old, adv, mask, dp_size=0)
    assert gk_orl.PolicyLoss(policy_loss_type="gspo").token_level_loss is False


def test_is_correction_direct():
    """is_correction's weights and filter, by hand from OpenRLHF's formulas, on a case with known outcome."""
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.5, 0.9]], dtype=torch.float64))
    rollout = torch.log(torch.tensor([[0.5, 0.25, 0.05], [0.5, 0.5, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[True, True, True], [True, True, False]])
    corr = gk_orl.is_correction(old, rollout, mask, level="token", mode="mask", threshold=(0.5, 5.0))
    torch.testing.assert_close(corr.weights[mask], torch.tensor([1.0, 2.0, 0.0, 0.5, 1.0], dtype=torch.float64))
    assert corr.filtered[mask].tolist() == [False, False, True, False, False]
    corr = gk_orl.is_correction(old, rollout, mask, level="token", mode="clip", threshold=(0.75, 5.0))
    torch.testing.assert_close(corr.weights[mask], torch.tensor([1.0, 2.0, 5.0, 0.75, 1.0], dtype=torch.float64))
    corr = gk_orl.is_correction(old, rollout, mask, level="seq", mode="mask", threshold=(0.5, 2.0))
    # geometric means: (1 * 2 * 10)^(1/3) = 2.71 (dropped), (0.5 * 1)^(1/2) = 0.71 (kept, per-token weights)
    assert corr.filtered.tolist() == [[True], [False]]
    torch.testing.assert_close(corr.weights[1, :2], torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert torch.all(corr.weights[0] == 0)
    corr = gk_orl.is_correction(old, rollout, mask, level="token", gating="tv", threshold=(0.0, 0.3))
    assert corr.filtered[mask].tolist() == [False, False, True, False, False]
    with pytest.raises(ValueError, match="token/seq"):
        gk_orl.is_correction(old, rollout, mask, level="off")


# --------------------------------------------------------------------------- #
# compute_approx_kl, reward shaping
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("estimator", gk_orl.KL_ESTIMATORS)
@pytest.mark.parametrize("unbiased_gradient", [False, True])
@pytest.mark.parametrize("with_old", [False, True])
def test_compute_approx_kl_matches_openrlhf(orl, estimator, unbiased_gradient, with_old):
    g = torch.Generator().manual_seed(14)
    logp = -torch.rand(6, 40, generator=g) * 4
    base = logp + torch.randn(6, 40, generator=g) * 3
    base[0, :8] = logp[0, :8] + torch.tensor([-60.0, -25, -15, -11, 11, 15, 25, 60])  # every clamp's side
    old = logp + torch.randn(6, 40, generator=g)
    old[1, :2] = logp[1, :2] - torch.tensor([5.0, -5.0])  # the IS weight's cap of 10
    upstream = torch.randn(6, 40, generator=g)
    results = []
    for fn in (orl.utils.compute_approx_kl, gk_orl.compute_approx_kl):
        x = logp.clone().requires_grad_()
        value = fn(x, base, log_probs_old=old if with_old else None, kl_estimator=estimator,
                   unbiased_gradient=unbiased_gradient)
        (value * upstream).sum().backward()
        results.append((value.detach(), x.grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="Unknown kl_estimator: k4"):
        gk_orl.compute_approx_kl(logp, base, kl_estimator="k4")


def _openrlhf_advantages(rewards_by_experience, masks, indices, n, estimator):
    """Advantages [b, T] per experience from OpenRLHF's compute_advantages_and_returns (kl 0, gamma 1)."""
    compute, cumulative = _experience_maker_methods()
    args = types.SimpleNamespace(
        rollout=types.SimpleNamespace(n_samples_per_prompt=n),
        algo=types.SimpleNamespace(advantage=types.SimpleNamespace(estimator=estimator, gamma=1.0,
                                                                   no_std_norm=False)),
        reward=types.SimpleNamespace(clip_range=None))
    maker = types.SimpleNamespace(strategy=types.SimpleNamespace(args=args), advantage_estimator=estimator,
                                  kl_ctl=types.SimpleNamespace(value=0.0))
    maker.get_cumulative_returns = functools.partial(cumulative, maker)
    experiences = [types.SimpleNamespace(rewards=r.clone(), index=idx, action_mask=m, kl=torch.zeros(m.shape),
                                         info={}, values=None)
                   for r, m, idx in zip(rewards_by_experience, masks, indices)]
    return [e.advantages for e in compute(maker, experiences)]


@pytest.mark.parametrize("estimator", gk_orl.REWARD_ESTIMATORS)
def test_reward_shaping_matches_openrlhf(orl, backend, estimator):
    if backend == "triton":
        pytest.skip("the Triton interpreter is slow: covered by the reference and cpu backends")
    n, prompts, length = 4, 5, 6
    g = torch.Generator().manual_seed(15)
    rewards = torch.randint(0, 3, (prompts * n,), generator=g).float() + torch.rand(prompts * n, generator=g)
    rewards[:n] = 1.0  # a group with one reward: std 0
    order = torch.randperm(prompts * n, generator=g)  # experiences hold samples in any order, with their index
    masks = torch.arange(length) < torch.randint(0, length + 1, (prompts * n, 1), generator=g)
    masks[order[0]] = False  # an experience with no action token
    chunks = [order[:7], order[7:15], order[15:]]
    theirs = _openrlhf_advantages([rewards[c] for c in chunks], [masks[c] for c in chunks],
                                  [c.tolist() for c in chunks], n, estimator)
    ours = gk_orl.outcome_advantages(rewards, masks, n, estimator, backend=backend)
    for c, their in zip(chunks, theirs):
        torch.testing.assert_close(ours[c], their, rtol=1e-5, atol=1e-5)
    shaped = gk_orl.normalize_rewards(rewards, n, estimator, backend=backend)
    assert shaped.dtype == torch.float32 and shaped.shape == rewards.shape


def test_reward_shaping_validation():
    with pytest.raises(ValueError, match="requires n_samples_per_prompt > 1"):
        gk_orl.normalize_rewards(torch.ones(4), 1, "group_norm")
    with pytest.raises(ValueError, match="estimator must be one of"):
        gk_orl.normalize_rewards(torch.ones(4), 2, "gae")
    with pytest.raises(ValueError, match=r"rewards must be \[B\]"):
        gk_orl.normalize_rewards(torch.ones(4, 1), 2)


# --------------------------------------------------------------------------- #
# patching OpenRLHF's trainer
# --------------------------------------------------------------------------- #
def test_patch_openrlhf_loaded(orl, monkeypatch):
    """OpenRLHF already imported: patch_openrlhf rebinds PolicyLoss where OpenRLHF's actor finds it, and undo()
    restores it. OpenRLHF's modules do not import here (deepspeed, peft, vllm): stand-ins hold its PolicyLoss
    under their names."""
    original = orl.loss.PolicyLoss
    models = types.ModuleType("openrlhf.models")
    actor = types.ModuleType("openrlhf.trainer.ray.ppo_actor")
    models.PolicyLoss = actor.PolicyLoss = original
    for name, module in (("openrlhf.models.loss", orl.loss), ("openrlhf.models", models),
                         ("openrlhf.trainer.ray.ppo_actor", actor)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(orl.loss, "PolicyLoss", original)  # restored after the test whatever happens
    patch = gk_orl.patch_openrlhf()
    assert patch.modules == list(gk_orl.PATCH_TARGETS) and patch.hook is None
    assert orl.loss.PolicyLoss is models.PolicyLoss is actor.PolicyLoss is gk_orl.PolicyLoss
    # the actor's call (ppo_actor.py): keyword arguments only
    loss_fn = actor.PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=None, token_level_loss=True,
                               policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
                               is_correction_gating="ratio", is_correction_threshold=[0.5, 5.0])
    assert loss_fn.backend == "auto"
    patch.undo()
    assert orl.loss.PolicyLoss is models.PolicyLoss is actor.PolicyLoss is original
    with gk_orl.patch_openrlhf(backend="cpu"):
        assert actor.PolicyLoss(dual_clip=3.0).backend == "cpu"
        assert issubclass(actor.PolicyLoss, gk_orl.PolicyLoss)
    assert actor.PolicyLoss is original


FAKE_OPENRLHF = {  # OpenRLHF's import chain of PolicyLoss, reduced to it
    "openrlhf/__init__.py": "",
    "openrlhf/models/__init__.py": "from .loss import PolicyLoss\n",
    "openrlhf/models/loss.py": "class PolicyLoss:\n    pass\n",
    "openrlhf/trainer/__init__.py": "",
    "openrlhf/trainer/ray/__init__.py": "",
    "openrlhf/trainer/ray/ppo_actor.py": "from openrlhf.models import PolicyLoss\n",
}


def _hooks():
    return [f for f in sys.meta_path if type(f).__module__ == gk_orl.__name__]


def test_patch_openrlhf_before_import(tmp_path, monkeypatch):
    """OpenRLHF not imported yet (a fresh Ray worker): patch_openrlhf imports nothing; the actor module imported
    later gets our PolicyLoss; undo() removes the hook and restores OpenRLHF's class."""
    for relative, text in FAKE_OPENRLHF.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n == "openrlhf" or n.startswith("openrlhf.")]:
        monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)
    try:
        patch = gk_orl.patch_openrlhf(backend="cpu")
        assert patch.modules == [] and not [n for n in sys.modules if n.startswith("openrlhf")]
        assert _hooks() == [patch.hook]
        actor = importlib.import_module("openrlhf.trainer.ray.ppo_actor")
        assert issubclass(actor.PolicyLoss, gk_orl.PolicyLoss) and actor.PolicyLoss(dual_clip=2.0).backend == "cpu"
        assert patch.modules == list(gk_orl.PATCH_TARGETS)
        original = patch.original
        assert original.__module__ == "openrlhf.models.loss"
        patch.undo()
        assert _hooks() == []
        assert actor.PolicyLoss is sys.modules["openrlhf.models"].PolicyLoss is original
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
        for hook in _hooks():
            sys.meta_path.remove(hook)


def test_import_does_not_import_openrlhf(monkeypatch):
    """The integration imports OpenRLHF only in patch_openrlhf: a fresh import of it leaves openrlhf unimported."""
    for name in [n for n in sys.modules if n == "openrlhf" or n.startswith("openrlhf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "grpo_kernels.integrations.openrlhf")
    monkeypatch.setattr(sys.modules["grpo_kernels.integrations"], "openrlhf", gk_orl)  # restored afterwards
    importlib.import_module("grpo_kernels.integrations.openrlhf")
    assert not [n for n in sys.modules if n == "openrlhf" or n.startswith("openrlhf.")]

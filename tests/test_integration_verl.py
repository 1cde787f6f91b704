"""grpo_kernels.integrations.verl: verl 0.9.1's policy losses and advantage estimators, computed by our ops.

Always checked against the encodings of verl's formulas in ``test_verl_parity.py``;
also against verl's own functions (``verl.trainer.ppo.core_algos``) when verl is
importable, skipped otherwise. verl imports without its heavy dependencies when
installed with ``pip install --no-deps`` together with a few small packages (see
the integration's report / the Makefile's peer packages).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from test_verl_parity import (
    F32,
    F64,
    make_groups,
    make_policy_batch,
    verl_geo_mean_pg,
    verl_gpg_pg,
    verl_grpo_advantage,
    verl_gspo_pg,
    verl_ratio_metrics,
    verl_rloo_advantage,
    verl_sapo_pg,
    verl_vanilla_pg,
)

from grpo_kernels.integrations import verl as gk_verl

OP = "grpo_loss"  # the backend fixture: every backend implementing grpo_loss
MODES = gk_verl.LOSS_AGG_MODES
POLICIES = list(gk_verl.POLICY_LOSSES)
TOKEN_MODES = ("token-mean", "token-sum")  # gpg's: our gpg aggregates a token sum over a token count
SUPPORTED = [(policy, mode) for policy in POLICIES for mode in MODES if policy != "gpg" or mode in TOKEN_MODES]
# verl's config.global_batch_info: none (one rank, local counts), or a rank of a 2-way data-parallel step
BATCH_INFOS = {
    "local": {},
    "dp2": dict(dp_size=2, batch_num_tokens=53, global_batch_size=11, loss_scale_factor=16),
}
CLIP = dict(clip_ratio=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5, tau_pos=1.0, tau_neg=1.3)


def _config(info: dict) -> dict:
    return dict(CLIP, global_batch_info=dict(info))


def _batch(seed, dtype=torch.float64, empty_rows=False, outcome=True):
    """log_prob, old, adv, mask; ``outcome``: one advantage per row (as GRPO gives), spread × mask."""
    log_prob, old, _, adv, mask = make_policy_batch(seed, dtype=dtype, empty_rows=empty_rows)
    if outcome:
        adv = adv[:, :1] * mask
    return log_prob, old, adv, mask


def _weights(policy, mask, seed, dtype=torch.float64):
    """Rollout importance weights in (0, 2): per token, or per sequence for GSPO (see
    test_gspo_gradient_differs_only_for_token_factors)."""
    iw = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype) * 2
    return iw[:, :1].expand_as(mask) if policy == "gspo" else iw


def expected(policy, log_prob, old, adv, mask, mode, info, is_weights=None):
    """verl's (loss, metrics) from the encodings of its formulas."""
    agg = dict(dp_size=info.get("dp_size", 1), batch_num_tokens=info.get("batch_num_tokens"),
               global_batch_size=info.get("global_batch_size"), scale=info.get("loss_scale_factor"))
    low, high, c = CLIP["clip_ratio"], CLIP["clip_ratio_high"], CLIP["clip_ratio_c"]
    if policy == "vanilla":
        loss, _ = verl_vanilla_pg(log_prob, old, adv, mask, mode, eps_low=low, eps_high=high, dual_c=c,
                                  is_weights=is_weights, **agg)
        return loss, verl_ratio_metrics(log_prob, old, adv, mask, low, high, dual_c=c)
    if policy == "gspo":
        loss, _ = verl_gspo_pg(log_prob, old, adv, mask, mode, eps_low=low, eps_high=high, is_weights=is_weights,
                               **agg)
        return loss, verl_ratio_metrics(log_prob, old, adv, mask, low, high, dual_c=None, level="sequence")
    if policy == "geo_mean":
        return verl_geo_mean_pg(log_prob, old, adv, mask, low, high, is_weights=is_weights)
    if policy == "gpg":
        return verl_gpg_pg(log_prob, adv, mask, mode, is_weights=is_weights, **agg)[0], {}
    assert policy == "sapo"
    agg.pop("batch_num_tokens")
    loss, _ = verl_sapo_pg(log_prob, old, adv, mask, CLIP["tau_pos"], CLIP["tau_neg"], is_weights=is_weights, **agg)
    metrics = verl_ratio_metrics(log_prob, old, adv, mask)
    return loss, dict(metrics, **{"actor/pg_clipfrac": 0.0, "actor/pg_clipfrac_lower": 0.0})


def _tolerance(dtype, policy, mode):
    if dtype == torch.float32:
        return F32
    # verl's seq-mean-token-mean (always used by sapo) divides by (count + 1e-8), which is count itself for a
    # bool mask (the sum is int64, + 1e-8 is float32): a relative 1e-8 (more after cancellation in the sum;
    # O(1) inputs, so an absolute 1e-8 bounds it). geo_mean does so twice, once inside exp(mean log-ratio).
    if policy == "geo_mean":
        return dict(rtol=1e-7, atol=1e-8)
    return dict(rtol=1e-8, atol=1e-8) if mode == "seq-mean-token-mean" or policy == "sapo" else F64


def _check_metrics(ours: dict, theirs: dict, dtype):
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        # verl's masked means divide by (count + 1e-8), ours by count
        rel, abs_ = (1e-7, 1e-9) if dtype == torch.float64 else (1e-5, 1e-6)
        assert ours[key] == pytest.approx(value, rel=rel, abs=abs_), key
        assert isinstance(ours[key], float)


def _run_both(policy, fn_ours, fn_theirs, log_prob, dtype, mode):
    """Loss and gradient w.r.t. log_prob of both; returns (ours, theirs) metrics after checking the rest."""
    a, b = log_prob.clone().requires_grad_(True), log_prob.clone().requires_grad_(True)
    loss, metrics = fn_ours(a)
    ref_loss, ref_metrics = fn_theirs(b)
    loss.backward()
    ref_loss.backward()
    tol = _tolerance(dtype, policy, mode)
    assert loss.dtype == log_prob.dtype and loss.ndim == 0
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), **tol)
    torch.testing.assert_close(a.grad, b.grad, **tol)
    assert b.grad.abs().sum() > 0
    _check_metrics(metrics, ref_metrics, dtype)


# --------------------------------------------------------------------------- #
# policy losses against the encoded formulas
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("info", list(BATCH_INFOS))
@pytest.mark.parametrize("weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("empty_rows", [False, True], ids=["full", "empty_rows"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("policy,mode", SUPPORTED)
def test_policy_loss(policy, mode, dtype, empty_rows, weights, info):
    seed = 100 * POLICIES.index(policy) + 10 * MODES.index(mode) + 2 * empty_rows + weights
    log_prob, old, adv, mask = _batch(seed, dtype, empty_rows)
    iw = _weights(policy, mask, seed, dtype) if weights else None
    fn = gk_verl.POLICY_LOSSES[policy]
    config, batch_info = _config(BATCH_INFOS[info]), BATCH_INFOS[info]
    _run_both(policy,
              lambda lp: fn(old, lp, adv, mask, mode, config, iw, backend="reference"),
              lambda lp: expected(policy, lp, old, adv, mask, mode, batch_info, iw),
              log_prob, dtype, mode)


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_loss_backends(policy, backend):
    """Every backend through the integration (one aggregation mode each, bool mask, empty rows)."""
    mode = "seq-mean-token-mean" if policy in ("gspo", "sapo") else "token-mean"
    log_prob, old, adv, mask = _batch(7, torch.float32, empty_rows=True)
    fn = gk_verl.POLICY_LOSSES[policy]
    _run_both(policy,
              lambda lp: fn(old, lp, adv, mask.bool(), mode, _config({}), backend=backend),
              lambda lp: expected(policy, lp, old, adv, mask, mode, {}),
              log_prob, torch.float32, mode)


@pytest.mark.parametrize("policy", ["vanilla", "sapo"])
def test_log_ratio_clamp(policy):
    """verl clamps the log-ratio to ±20 before exp (vanilla, sapo): no gradient through clamped tokens."""
    log_prob, old, adv, mask = _batch(8)
    old = old.clone()
    old[0, 0], old[2, 0] = log_prob[0, 0] - 30.0, log_prob[2, 0] + 25.0  # log-ratios +30 and -25
    adv = adv.clone()
    adv[2] = adv[2].abs()  # A > 0 at ratio e^-25: the unclipped term, e^-20 with the clamp (a 2e-9 difference)
    fn = gk_verl.POLICY_LOSSES[policy]
    _run_both(policy,
              lambda lp: fn(old, lp, adv, mask, "token-mean", _config({}), backend="reference"),
              lambda lp: expected(policy, lp, old, adv, mask, "token-mean", {}),
              log_prob, torch.float64, "token-mean")


def test_vanilla_with_token_advantages_and_verl_default_config():
    """Per-token advantages (GAE-style) and config=None: verl's defaults (clip 0.2, clip_ratio_c 3)."""
    log_prob, old, adv, mask = _batch(3, outcome=False)
    _run_both("vanilla",
              lambda lp: gk_verl.vanilla_policy_loss(old, lp, adv, mask, backend="reference"),
              lambda lp: (verl_vanilla_pg(lp, old, adv, mask)[0], verl_ratio_metrics(lp, old, adv, mask)),
              log_prob, torch.float64, "token-mean")


@pytest.mark.parametrize("factor", ["token_advantages", "token_weights"])
def test_gspo_gradient_differs_only_for_token_factors(factor):
    """Where A (or the rollout weight) varies along a sequence, verl's GSPO-token gradient (each token through
    its own log-prob) differs from our sequence ratio's (through the mean log-ratio); the loss value and each
    sequence's gradient total agree. With one factor per sequence they agree everywhere (test_policy_loss)."""
    log_prob, old, adv, mask = _batch(4, outcome=factor != "token_advantages")
    iw = _weights("vanilla", mask, 4) if factor == "token_weights" else None
    a, b = log_prob.clone().requires_grad_(True), log_prob.clone().requires_grad_(True)
    loss, _ = gk_verl.gspo_policy_loss(old, a, adv, mask, "token-mean", _config({}), iw, backend="reference")
    ref, _ = verl_gspo_pg(b, old, adv, mask, "token-mean", eps_low=0.2, eps_high=0.28, is_weights=iw)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), **F64)
    torch.testing.assert_close(a.grad.sum(-1), b.grad.sum(-1), **F64)
    assert not torch.allclose(a.grad, b.grad)


@pytest.mark.parametrize("policy", ["sapo", "geo_mean"])
def test_loss_agg_mode_not_used(policy):
    """As in verl: sapo always reduces with seq-mean-token-mean, geo_mean takes the mean over sequences."""
    log_prob, old, adv, mask = _batch(5, empty_rows=True)
    fn = gk_verl.POLICY_LOSSES[policy]
    losses = [fn(old, log_prob, adv, mask, mode, backend="reference")[0] for mode in MODES]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=0, atol=0)


@pytest.mark.parametrize("policy", POLICIES)
def test_masked_garbage_changes_nothing(policy, backend):
    """NaN / ±inf at masked positions of every input change no loss, gradient or metric (verl multiplies by the
    mask, so its own metrics would be NaN there: ours select the kept tokens)."""
    mode = "token-mean"
    log_prob, old, adv, mask = _batch(9, torch.float32, empty_rows=True)
    mask = mask.bool()
    dirty = []
    for clean, junk in ((log_prob, float("nan")), (old, float("inf")), (adv, float("-inf"))):
        dirty.append(torch.where(mask, clean, torch.full_like(clean, junk)))
    fn = gk_verl.POLICY_LOSSES[policy]
    results = []
    for lp, o, a in ((log_prob, old, adv), dirty):
        lp = lp.clone().requires_grad_(True)
        loss, metrics = fn(o, lp, a, mask, mode, _config({}), backend=backend)
        loss.backward()
        results.append((loss.detach(), torch.where(mask, lp.grad, 0.0), metrics))
    (loss, grad, metrics), (dirty_loss, dirty_grad, dirty_metrics) = results
    torch.testing.assert_close(dirty_loss, loss, rtol=0, atol=0)
    torch.testing.assert_close(dirty_grad, grad, rtol=0, atol=0)
    assert dirty_metrics == metrics and all(v == v for v in metrics.values())


def test_fully_masked_batch_gives_zero_loss():
    log_prob, old, adv, mask = _batch(6)
    mask = torch.zeros_like(mask)
    for policy, fn in gk_verl.POLICY_LOSSES.items():
        for mode in TOKEN_MODES if policy == "gpg" else MODES:
            loss, metrics = fn(old, log_prob, adv, mask, mode, backend="reference")
            assert loss.item() == 0.0, (policy, mode)
            assert metrics.get("actor/ppo_kl", 0.0) == 0.0


def test_bad_options():
    log_prob, old, adv, mask = _batch(0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        gk_verl.vanilla_policy_loss(old, log_prob, adv, mask, "token_mean")
    for mode, needed in (("token-mean", "batch_num_tokens"), ("seq-mean-token-sum", "global_batch_size")):
        with pytest.raises(ValueError, match=needed):
            gk_verl.vanilla_policy_loss(old, log_prob, adv, mask, mode, {"global_batch_info": {"dp_size": 2}})
    with pytest.raises(ValueError, match="not available for this policy loss"):
        gk_verl.gpg_policy_loss(old, log_prob, adv, mask, "seq-mean-token-mean")
    with pytest.raises(ValueError, match="clip_ratio_c"):
        gk_verl.vanilla_policy_loss(old, log_prob, adv, mask, config={"clip_ratio_c": 1.0})


# --------------------------------------------------------------------------- #
# advantages
# --------------------------------------------------------------------------- #
GROUP_SIZES = [(3, 1, 4, 1), (8, 8, 8), (1,), (5, 2, 1, 6)]


def _index(index, kind):
    """verl's uid column: numpy strings (verl's default), numpy ints, or a torch tensor."""
    if kind == "str":
        return np.array([f"uid-{i:04x}" for i in index], dtype=object)
    return torch.as_tensor(index) if kind == "tensor" else np.asarray(index)


@pytest.mark.parametrize("index_kind", ["str", "int", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["std", "no_std"])
@pytest.mark.parametrize("sizes", GROUP_SIZES, ids=str)
def test_grpo_advantage(sizes, norm, dtype, index_kind):
    rewards, mask, index = make_groups(sum(sizes) + norm, sizes, dtype)
    if len(sizes) > 1:
        rewards[index == index[0]] = 0.0  # a group of equal scores (std 0), or a lone row with score 0
    adv, returns = gk_verl.grpo_advantage(rewards, mask, _index(index, index_kind), norm_adv_by_std_in_grpo=norm,
                                          backend="reference")
    ref = verl_grpo_advantage(rewards, mask, index, std_normalize=norm)
    assert adv is returns and adv.dtype == dtype and adv.shape == mask.shape
    torch.testing.assert_close(adv, ref, **(F64 if dtype == torch.float64 else F32))
    lone = np.unique(index, return_counts=True)
    lone = torch.as_tensor(np.isin(index, lone[0][lone[1] == 1]))
    assert torch.equal(adv[lone], ref[lone])  # verl's singleton rule, bit for bit


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_advantage_reads_the_config(norm):
    """verl's trainer calls a registered estimator with ``config`` (AlgoConfig) and no norm_adv_by_std_in_grpo."""
    rewards, mask, index = make_groups(2, (4, 1, 3))
    adv, _ = gk_verl.grpo_advantage(token_level_rewards=rewards, response_mask=mask, index=index,
                                    config={"norm_adv_by_std_in_grpo": norm}, backend="reference")
    torch.testing.assert_close(adv, verl_grpo_advantage(rewards, mask, index, std_normalize=norm), **F64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("sizes", GROUP_SIZES, ids=str)
def test_rloo_advantage(sizes, dtype):
    rewards, mask, index = make_groups(3 + sum(sizes), sizes, dtype)
    adv, returns = gk_verl.rloo_advantage(rewards, mask, _index(index, "str"), backend="reference")
    ref = verl_rloo_advantage(rewards, mask, index)
    assert adv is returns and adv.dtype == dtype
    torch.testing.assert_close(adv, ref, **(F64 if dtype == torch.float64 else F32))


def test_advantage_backends(backend):
    rewards, mask, index = make_groups(9, (3, 1, 4, 2), torch.float32)
    adv, _ = gk_verl.grpo_advantage(rewards, mask, _index(index, "str"), backend=backend)
    torch.testing.assert_close(adv, verl_grpo_advantage(rewards, mask, index), **F32)


# --------------------------------------------------------------------------- #
# verl itself (skipped when verl does not import)
# --------------------------------------------------------------------------- #
def test_import_does_not_import_verl():
    code = "import sys, grpo_kernels.integrations.verl; assert 'verl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture(scope="module")
def verl_core():
    core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    gk_verl.register()
    gk_verl.register()  # again: harmless
    return core


def _actor_config(info: dict):
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=1, global_batch_info=dict(info),
                       **CLIP)


def test_registered_names(verl_core):
    for name in gk_verl.POLICY_LOSSES:
        assert verl_core.get_policy_loss_fn(gk_verl.PREFIX + name) is gk_verl.POLICY_LOSSES[name]
    for name in gk_verl.ADVANTAGE_ESTIMATORS:
        assert verl_core.get_adv_estimator_fn(gk_verl.PREFIX + name) is gk_verl.ADVANTAGE_ESTIMATORS[name]


@pytest.mark.parametrize("info", list(BATCH_INFOS))
@pytest.mark.parametrize("weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("policy,mode", SUPPORTED)
def test_policy_loss_against_verl(verl_core, policy, mode, dtype, weights, info):
    log_prob, old, adv, mask = _batch(50 + MODES.index(mode), dtype, empty_rows=True)
    mask = mask.bool()
    iw = _weights(policy, mask, 1, dtype) if weights else None
    config = _actor_config(BATCH_INFOS[info])
    ours, theirs = verl_core.get_policy_loss_fn(gk_verl.PREFIX + policy), verl_core.get_policy_loss_fn(policy)
    _run_both(policy,
              lambda lp: ours(old, lp, adv, mask, mode, config, iw),
              lambda lp: theirs(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                                loss_agg_mode=mode, config=config, rollout_is_weights=iw),
              log_prob, dtype, mode)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["std", "no_std"])
@pytest.mark.parametrize("sizes", GROUP_SIZES, ids=str)
def test_grpo_advantage_against_verl(verl_core, sizes, norm, dtype):
    from verl.trainer.config import AlgoConfig

    rewards, mask, index = make_groups(sum(sizes), sizes, dtype)
    uids = _index(index, "str")
    theirs, _ = verl_core.compute_grpo_outcome_advantage(rewards, mask, uids, norm_adv_by_std_in_grpo=norm)
    # as verl's trainer calls a registered estimator: only the config says whether to divide by the std
    estimator = verl_core.get_adv_estimator_fn(gk_verl.PREFIX + "grpo")
    ours, _ = estimator(token_level_rewards=rewards, response_mask=mask, config=AlgoConfig(
        norm_adv_by_std_in_grpo=norm), index=uids)
    torch.testing.assert_close(ours, theirs, **(F64 if dtype == torch.float64 else F32))
    lone = torch.as_tensor(np.isin(index, [k for k in set(index) if (index == k).sum() == 1]))
    assert torch.equal(ours[lone], theirs[lone])


@pytest.mark.parametrize("sizes", GROUP_SIZES, ids=str)
def test_rloo_advantage_against_verl(verl_core, sizes):
    rewards, mask, index = make_groups(sum(sizes), sizes)
    uids = _index(index, "str")
    theirs, _ = verl_core.compute_rloo_outcome_advantage(rewards, mask, uids)
    ours, _ = verl_core.get_adv_estimator_fn(gk_verl.PREFIX + "rloo")(rewards, mask, index=uids)
    torch.testing.assert_close(ours, theirs, **F64)

"""Parity with verl 0.9.1 (``verl.trainer.ppo.core_algos``): the formulas, restated.

verl is not a dependency and is not imported: ``import verl.trainer.ppo.core_algos``
runs ``verl/__init__.py``, which imports ``ray`` and ``tensordict``, and the module
chain further needs ``omegaconf``, ``codetiming``, ``orjson`` and ``wandb``. So the
functions below restate verl's, statement by statement, under verl's names:

- :func:`compute_grpo_outcome_advantage` ↔ ``group_advantages(group_ids=index, eps=1e-6)``,
  ``norm_adv_by_std_in_grpo=False`` ↔ ``scale="none"``;
- :func:`compute_rloo_outcome_advantage` ↔ ``estimator="rloo", scale="none"``;
- :func:`compute_policy_loss_vanilla` (dual clip, ``clip_ratio_c``) ↔ ``grpo_loss(clip_ratio_c=...)``;
- :func:`agg_loss` modes ↔ loss types (token-mean ↔ bnpo, seq-mean-token-mean ↔ grpo,
  seq-mean-token-sum ↔ luspo, seq-mean-token-sum-norm ↔ dr_grpo);
- :func:`kl_penalty` ``k1``/``kl``, ``k2``/``mse``, ``low_var_kl``/``k3`` ↔ ``kl_estimator``
  ``k1``, ``k2``, ``low_var_kl`` (verl's ``k3`` is the clamped estimator: our ``low_var_kl``);
- the actor loss of ``verl.workers.utils.losses.ppo_loss``: ``pg_loss + kl_loss_coef * agg_loss(kl)``
  ↔ ``grpo_loss(beta=kl_loss_coef, kl_estimator=...)``.

Deliberate differences (pinned by tests below): a singleton group gets advantage
0 here, verl gives ``score / (1 + eps)`` (mean 0, std 1); verl's seq-mean modes
leave fully masked rows out of the mean over sequences, ours (TRL's) count them;
verl's seq-mean-token-mean divides by ``count + 1e-8``. verl clamps the
log-ratio to [-20, 20] before ``exp``; the inputs here keep ``|log-ratio| < 20``.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.reference import kl_estimate

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------- #
# verl 0.9.1 core_algos, restated (dp_size = 1, no global batch info)
# --------------------------------------------------------------------------- #
def masked_sum(values, mask, axis=None):
    """verl.utils.torch_functional.masked_sum"""
    valid_values = torch.where(mask.bool(), values, 0.0)
    return (valid_values * mask).sum(axis=axis)


def masked_mean(values, mask, axis=None):
    """verl.utils.torch_functional.masked_mean"""
    return masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6,
                                   norm_adv_by_std_in_grpo=True):
    """core_algos.compute_grpo_outcome_advantage"""
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            else:
                scores_tensor = torch.stack(id2score[idx])
                id2mean[idx] = torch.mean(scores_tensor)
                id2std[idx] = torch.std(scores_tensor)
        for i in range(bsz):
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def compute_rloo_outcome_advantage(token_level_rewards, response_mask, index, epsilon=1e-6):
    """core_algos.compute_rloo_outcome_advantage"""
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean = {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
            else:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
        for i in range(bsz):
            response_num = len(id2score[index[i]])
            if response_num > 1:
                scores[i] = scores[i] * response_num / (response_num - 1) - id2mean[index[i]] * response_num / (
                    response_num - 1
                )
        scores = scores.unsqueeze(-1) * response_mask
    return scores, scores


def agg_loss(loss_mat, loss_mask, loss_agg_mode, loss_scale_factor=None):
    """core_algos.agg_loss with dp_size=1, batch_num_tokens=None, global_batch_size=None"""
    if loss_agg_mode == "token-mean":
        batch_num_tokens = loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / batch_num_tokens
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        loss = masked_sum(seq_losses, seq_mask) / seq_mask.sum()
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss /= loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        return masked_sum(seq_losses, seq_mask) / seq_mask.sum()
    raise ValueError(loss_agg_mode)


def compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                                clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=None, clip_ratio_c=3.0,
                                rollout_is_weights=None):
    """core_algos.compute_policy_loss_vanilla (the ActorConfig fields as keyword arguments).

    Returns ``(pg_loss, pg_metrics, pg_losses)``; verl returns the first two.
    """
    cliprange_low = clip_ratio_low if clip_ratio_low is not None else clip_ratio
    cliprange_high = clip_ratio_high if clip_ratio_high is not None else clip_ratio
    assert clip_ratio_c > 1.0
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float(), response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    pg_loss = agg_loss(loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
    pg_metrics = {
        "actor/pg_clipfrac": pg_clipfrac.detach().item(),
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": pg_clipfrac_lower.detach().item(),
    }
    return pg_loss, pg_metrics, pg_losses


def kl_penalty(logprob, ref_logprob, kl_penalty):
    """core_algos.kl_penalty = kl_penalty_forward for names without the straight-through '+' suffix"""
    if kl_penalty in ("kl", "k1"):
        return logprob - ref_logprob
    if kl_penalty == "abs":
        return (logprob - ref_logprob).abs()
    if kl_penalty in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if kl_penalty in ("low_var_kl", "k3"):
        kl = ref_logprob - logprob
        kl = torch.clamp(kl, min=-20, max=20)
        ratio = torch.exp(kl)
        kld = (ratio - kl - 1).contiguous()
        return torch.clamp(kld, min=-10, max=10)
    raise NotImplementedError(kl_penalty)


def ppo_loss_with_kl(old_log_prob, log_prob, ref_log_prob, advantages, response_mask, loss_agg_mode, kl_loss_type,
                     kl_loss_coef, **policy_options):
    """verl.workers.utils.losses.ppo_loss: vanilla policy loss, then ``+ agg_loss(kl) * kl_loss_coef``."""
    pg_loss, _, _ = compute_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
                                                **policy_options)
    kld = kl_penalty(logprob=log_prob, ref_logprob=ref_log_prob, kl_penalty=kl_loss_type)
    kl_loss = agg_loss(loss_mat=kld, loss_mask=response_mask, loss_agg_mode=loss_agg_mode)
    return pg_loss + kl_loss * kl_loss_coef, kl_loss


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #
def make_groups(seed, sizes, dtype=torch.float64, length=5):
    """Scores of groups of the given sizes, uid labels shuffled, the score on each row's last valid token."""
    g = torch.Generator().manual_seed(seed)
    labels = [40 + 7 * k for k, n in enumerate(sizes) for _ in range(n)]  # arbitrary, non-contiguous values
    perm = torch.randperm(len(labels), generator=g)
    index = np.array(labels)[perm.numpy()]
    batch = len(labels)
    scores = torch.randn(batch, generator=g, dtype=torch.float64)
    scores[:2] = (scores[:2] > 0).to(scores.dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    mask = (torch.arange(length) < lengths[:, None]).to(dtype)
    token_level_rewards = torch.zeros(batch, length, dtype=torch.float64)
    token_level_rewards[torch.arange(batch), lengths - 1] = scores
    return token_level_rewards.to(dtype), mask, index


def make_policy_batch(seed, batch=6, length=7, dtype=torch.float64, empty_rows=False):
    """Log-ratios in (-2.5, 2.5): ratios from 0.08 to 12, past every clip bound, yet |log-ratio| < 20."""
    g = torch.Generator().manual_seed(seed)
    log_prob = torch.empty(batch, length, dtype=dtype).uniform_(0.02, 1.0, generator=g).log()
    old = log_prob - torch.empty(batch, length, dtype=dtype).uniform_(-2.5, 2.5, generator=g)
    ref = log_prob + 0.6 * torch.randn(batch, length, generator=g, dtype=dtype)
    adv = torch.randn(batch, length, generator=g, dtype=dtype)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    if empty_rows:
        lengths[[1, 4]] = 0
    mask = (torch.arange(length) < lengths[:, None]).to(dtype)
    mask[0, 0] = 1.0
    old[0, 0], adv[0, 0] = log_prob[0, 0] - 2.0, -1.0  # ratio e^2 > clip_ratio_c with A < 0: the dual clip acts
    return log_prob, old, ref, adv, mask


# --------------------------------------------------------------------------- #
# advantages
# --------------------------------------------------------------------------- #
SIZES = [(2, 3, 4, 5), (8, 8, 8), (2, 2), (6, 3, 7, 2, 4)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["std", "no_std"])
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_grpo_outcome_advantage(sizes, norm, dtype):
    rewards, mask, index = make_groups(sum(sizes), sizes, dtype)
    rewards[index == index[0]] = 0.0  # one group with all-equal scores (std 0)
    expected, _ = compute_grpo_outcome_advantage(rewards, mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=norm)
    ours = gk.group_advantages(rewards.sum(-1), group_ids=torch.as_tensor(index), eps=1e-6,
                               scale="group" if norm else "none", backend="reference")
    torch.testing.assert_close(ours[:, None] * mask, expected, **(F64 if dtype == torch.float64 else F32))
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_rloo_outcome_advantage(sizes, dtype):
    rewards, mask, index = make_groups(3 * sum(sizes), sizes, dtype)
    expected, _ = compute_rloo_outcome_advantage(rewards, mask, index)
    ours = gk.group_advantages(rewards.sum(-1), group_ids=torch.as_tensor(index), estimator="rloo", scale="none",
                               backend="reference")
    torch.testing.assert_close(ours[:, None] * mask, expected, **(F64 if dtype == torch.float64 else F32))


@pytest.mark.parametrize("norm", [True, False])
def test_singleton_group_is_a_deliberate_difference(norm):
    """verl: a singleton group has mean 0, std 1, so its advantage is score / (1 + eps) (or the score); ours: 0."""
    rewards, mask, index = make_groups(5, (3, 1, 4))
    lone = index == 47
    assert lone.sum() == 1
    expected, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
    ours = gk.group_advantages(rewards.sum(-1), group_ids=torch.as_tensor(index), eps=1e-6,
                               scale="group" if norm else "none", backend="reference")
    torch.testing.assert_close(ours[~lone][:, None] * mask[~lone], expected[~lone], **F64)
    assert ours[lone].item() == 0.0
    score = rewards[lone].sum().item()
    # (verl's std 1 is a float32 tensor, so 1 + eps is float32(1 + 1e-6))
    assert expected[lone][0, 0].item() == pytest.approx(score / (1 + 1e-6) if norm else score, rel=1e-7)


# --------------------------------------------------------------------------- #
# policy loss: dual clip, aggregation, rollout importance weights
# --------------------------------------------------------------------------- #
AGG_TO_LOSS_TYPE = {
    "token-mean": "bnpo",
    "seq-mean-token-mean": "grpo",
    "seq-mean-token-sum": "luspo",
    "seq-mean-token-sum-norm": "dr_grpo",
}


@pytest.mark.parametrize("agg", list(AGG_TO_LOSS_TYPE))
@pytest.mark.parametrize("clip_ratio_c", [3.0, 1.5])
@pytest.mark.parametrize("clip_ratio_high", [None, 0.28])
@pytest.mark.parametrize("weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("adv_shape", ["BT", "B"])
def test_policy_loss_vanilla(agg, clip_ratio_c, clip_ratio_high, weights, adv_shape):
    seed = 10 * list(AGG_TO_LOSS_TYPE).index(agg) + int(clip_ratio_c) + (clip_ratio_high is None)
    log_prob, old, _, adv, mask = make_policy_batch(seed)
    if adv_shape == "B":
        adv = adv[:, 0]
    iw = torch.rand(mask.shape, dtype=mask.dtype, generator=torch.Generator().manual_seed(1)) * 2 if weights else None
    assert (log_prob - old).abs().max() < 20  # verl's log-ratio clamp is inactive

    verl_lp = log_prob.clone().requires_grad_(True)
    verl_adv = adv if adv.ndim == 2 else adv[:, None].expand_as(mask)
    pg_loss, _, pg_losses = compute_policy_loss_vanilla(old, verl_lp, verl_adv, mask, agg, clip_ratio=0.2,
                                                        clip_ratio_high=clip_ratio_high, clip_ratio_c=clip_ratio_c,
                                                        rollout_is_weights=iw)
    pg_loss.backward()

    our_lp = log_prob.clone().requires_grad_(True)
    out = gk.grpo_loss(our_lp, old, adv, mask, epsilon_low=0.2, epsilon_high=clip_ratio_high,
                       clip_ratio_c=clip_ratio_c, loss_type=AGG_TO_LOSS_TYPE[agg], importance_weights=iw,
                       backend="reference")
    out.loss.backward()
    # seq-mean-token-mean divides each sequence by (its token count + 1e-8): each sequence's term is off by a
    # relative 1e-8 at most (more for the sum, after cancellation); O(1) inputs, so an absolute 1e-8 bounds it
    tol = dict(rtol=1e-8, atol=1e-8) if agg == "seq-mean-token-mean" else F64
    torch.testing.assert_close(out.loss, pg_loss.detach(), **tol)
    torch.testing.assert_close(our_lp.grad, verl_lp.grad, **tol)
    keep = mask.bool()
    torch.testing.assert_close(out.per_token_loss[keep], pg_losses.detach()[keep], **F64)
    # the dual clip is active somewhere (A < 0, ratio > clip_ratio_c)
    assert ((verl_adv < 0) & ((log_prob - old).exp() > clip_ratio_c) & keep).any()


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_fully_masked_rows_in_seq_mean_modes(agg):
    """verl leaves fully masked sequences out of the mean over sequences; ours (TRL) count them: a factor B/B'."""
    log_prob, old, _, adv, mask = make_policy_batch(8, empty_rows=True)
    pg_loss, _, _ = compute_policy_loss_vanilla(old, log_prob, adv, mask, agg)
    out = gk.grpo_loss(log_prob, old, adv, mask, clip_ratio_c=3.0, loss_type=AGG_TO_LOSS_TYPE[agg],
                       backend="reference")
    batch, nonempty = mask.shape[0], (mask.sum(-1) > 0).sum().item()
    assert nonempty < batch
    torch.testing.assert_close(out.loss * batch / nonempty, pg_loss, rtol=1e-8, atol=1e-8)
    assert not torch.isclose(out.loss, pg_loss, rtol=1e-3)


def test_token_mean_with_fully_masked_rows():
    """token-mean ↔ bnpo holds with fully masked rows too."""
    log_prob, old, _, adv, mask = make_policy_batch(9, empty_rows=True)
    pg_loss, _, _ = compute_policy_loss_vanilla(old, log_prob, adv, mask, "token-mean")
    out = gk.grpo_loss(log_prob, old, adv, mask, clip_ratio_c=3.0, loss_type="bnpo", backend="reference")
    torch.testing.assert_close(out.loss, pg_loss, **F64)


# --------------------------------------------------------------------------- #
# KL estimators
# --------------------------------------------------------------------------- #
VERL_TO_OURS = [("kl", "k1"), ("k1", "k1"), ("mse", "k2"), ("k2", "k2"), ("low_var_kl", "low_var_kl"),
                ("k3", "low_var_kl")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("verl_name,ours", VERL_TO_OURS)
def test_kl_penalty(verl_name, ours, dtype):
    g = torch.Generator().manual_seed(3)
    logprob = torch.empty(200, dtype=torch.float64).uniform_(-8, 0, generator=g)
    diff = torch.cat([torch.linspace(-25, 25, 101, dtype=torch.float64), 0.5 * torch.randn(99, generator=g)])
    ref = (logprob + diff).to(dtype)
    logprob = logprob.to(dtype)
    a = logprob.clone().requires_grad_(True)
    b = logprob.clone().requires_grad_(True)
    expected = kl_penalty(a, ref, verl_name)
    got = kl_estimate(b, ref, ours)
    tol = F64 if dtype == torch.float64 else F32
    torch.testing.assert_close(got, expected, **tol)
    w = torch.randn(200, generator=g, dtype=torch.float64).to(dtype)
    (expected * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, **tol)


def test_verl_k3_is_our_low_var_kl_not_our_k3():
    """verl's "k3" clamps (like its "low_var_kl"); our "k3" is TRL's unclamped k3. Same where no clamp acts."""
    logprob = torch.zeros(8, dtype=torch.float64)
    ref = torch.tensor([-25.0, -3.0, -0.5, 0.0, 0.5, 2.0, 3.0, 25.0], dtype=torch.float64)
    verl_k3 = kl_penalty(logprob, ref, "k3")
    ours_k3 = kl_estimate(logprob, ref, "k3")
    small = ours_k3 < 10
    assert small.sum() == 5
    torch.testing.assert_close(ours_k3[small], verl_k3[small], **F64)
    assert (ours_k3[~small] > 10).all() and (verl_k3[~small] == 10).all()
    torch.testing.assert_close(kl_estimate(logprob, ref, "low_var_kl"), verl_k3, **F64)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("verl_name,ours", [("k1", "k1"), ("k2", "k2"), ("low_var_kl", "low_var_kl")])
def test_actor_loss_with_kl_loss(verl_name, ours, agg):
    """``ppo_loss``: pg_loss + kl_loss_coef * agg_loss(kl) ↔ grpo_loss(beta, kl_estimator); kl metric too."""
    log_prob, old, ref, adv, mask = make_policy_batch(12)
    ref = ref.clone()
    ref[0, 0] = log_prob[0, 0] - 15.0  # one token where low_var_kl's clamps act
    coef = 0.04
    verl_lp = log_prob.clone().requires_grad_(True)
    loss, _ = ppo_loss_with_kl(old, verl_lp, ref, adv, mask, agg, verl_name, coef, clip_ratio_c=3.0)
    loss.backward()
    our_lp = log_prob.clone().requires_grad_(True)
    out = gk.grpo_loss(our_lp, old, adv, mask, ref_logprobs=ref, beta=coef, kl_estimator=ours, clip_ratio_c=3.0,
                       loss_type=AGG_TO_LOSS_TYPE[agg], backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_lp.grad, verl_lp.grad, **F64)
    # our kl metric = the masked token mean of verl's per-token kl_penalty
    kld = kl_penalty(log_prob, ref, verl_name)
    torch.testing.assert_close(out.kl, masked_sum(kld, mask) / mask.sum(), **F64)


def test_grid_is_not_trivial():
    """The policy-loss inputs clip on both sides and hit the dual clip; the KL inputs hit low_var_kl's clamps."""
    log_prob, old, _, adv, mask = make_policy_batch(0)
    ratio = (log_prob - old).exp()[mask.bool()]
    assert (ratio < 0.8).any() and (ratio > 3.0).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    for sizes in SIZES:
        _, _, index = make_groups(0, sizes)
        assert len(set(index.tolist())) == len(sizes) and min(np.unique(index, return_counts=True)[1]) >= 2

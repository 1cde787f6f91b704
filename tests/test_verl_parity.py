"""Parity with verl 0.9.1 (``verl.trainer.ppo.core_algos``): its formulas, encoded here.

verl is not a dependency and is not imported: ``import verl.trainer.ppo.core_algos``
runs ``verl/__init__.py``, which imports ``ray`` and ``tensordict``, and the module
chain further needs ``omegaconf``, ``codetiming``, ``orjson`` and ``wandb``. So the
helpers below are our own encodings of the behaviour of verl's functions (written
from the formulas, vectorized; not verl's code), each compared against ours:

- :func:`verl_grpo_advantage` (``compute_grpo_outcome_advantage``) ↔
  ``group_advantages(group_ids=index, eps=1e-6)``; ``std_normalize=False`` ↔ ``scale="none"``;
- :func:`verl_rloo_advantage` (``compute_rloo_outcome_advantage``) ↔ ``estimator="rloo", scale="none"``;
- :func:`verl_vanilla_pg` (``compute_policy_loss_vanilla``, dual clip) ↔ ``grpo_loss(clip_ratio_c=...)``;
- :func:`verl_aggregate` (``agg_loss``) modes ↔ loss types (token-mean ↔ bnpo,
  seq-mean-token-mean ↔ grpo, seq-mean-token-sum ↔ luspo, seq-mean-token-sum-norm ↔ dr_grpo);
- :func:`verl_kl_term` (``kl_penalty``) ``k1``/``kl``, ``k2``/``mse``, ``low_var_kl``/``k3`` ↔
  ``kl_estimator`` ``k1``, ``k2``, ``low_var_kl`` (verl's ``k3`` is the clamped estimator: our ``low_var_kl``);
- :func:`verl_actor_loss` (the actor loss of ``verl.workers.utils.losses.ppo_loss``) ↔
  ``grpo_loss(beta=kl_loss_coef, kl_estimator=...)``.

Also used by ``test_integration_verl.py`` (our verl policy losses, with verl's global
batch normalizers): :func:`verl_gspo_pg` (``compute_policy_loss_gspo``),
:func:`verl_sapo_pg` (``compute_policy_loss_sapo``), :func:`verl_geo_mean_pg`
(``compute_policy_loss_geo_mean``), :func:`verl_gpg_pg` (``compute_policy_loss_gpg``),
:func:`verl_ratio_metrics` (the
``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower`` metrics).

Deliberate differences (pinned by tests below): a singleton group gets advantage
0 here, verl gives ``score / (1 + eps)`` (mean 0, std 1); verl's seq-mean modes
leave fully masked rows out of the mean over sequences, ours (TRL's) count them;
verl's seq-mean-token-mean divides by ``count + 1e-8``. verl clamps the
log-ratio to [-20, 20] before ``exp``; the inputs here keep ``|log-ratio| < 20``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import grpo_kernels as gk
from grpo_kernels.reference import kl_estimate

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-6)


# --------------------------------------------------------------------------- #
# verl 0.9.1 behaviour, encoded from its formulas (dp_size = 1, no global batch info)
# --------------------------------------------------------------------------- #
def _row_group_stats(score, index):
    """Per row: size n, mean and unbiased (n - 1) std of the row's group, in ``score``'s dtype.

    ``same[i, j]`` is 1 where rows i and j carry the same group id (any ids numpy can
    compare with ``==``); the std of a group of one comes out 0 (callers replace it).
    """
    ids = np.asarray(index)
    same = torch.as_tensor(ids[:, None] == ids[None, :]).to(score.dtype)
    n = same.sum(-1)
    mean = (same @ score) / n
    sq_dev = same * (score[None, :] - mean[:, None]).square()
    std = (sq_dev.sum(-1) / (n - 1).clamp(min=1)).sqrt()
    return n, mean, std


def verl_grpo_advantage(token_rewards, mask, index, eps=1e-6, std_normalize=True):
    """Models verl's ``compute_grpo_outcome_advantage``.

    A row's score is the sum of its token rewards. Against its group (rows sharing an
    id) it becomes (score - group mean) / (group std + eps), the std unbiased, or just
    score - group mean without std normalization. A group of one counts as mean 0,
    std 1, verl's std being a tensor of the default dtype (float32): its denominator is
    1 + eps rounded to float32. The per-row value is then spread over the row's valid
    tokens (× mask).
    """
    with torch.no_grad():
        score = token_rewards.sum(-1)
        n, mean, std = _row_group_stats(score, index)
        alone = n == 1
        mean = torch.where(alone, torch.zeros_like(mean), mean)
        lone_denominator = (torch.tensor(1.0) + eps).to(score.dtype)
        denominator = torch.where(alone, lone_denominator, std + eps)
        adv = (score - mean) / denominator if std_normalize else score - mean
        return adv[:, None] * mask


def verl_rloo_advantage(token_rewards, mask, index):
    """Models verl's ``compute_rloo_outcome_advantage``.

    Leave-one-out baseline: in a group of n > 1 rows, score minus the mean of the other
    n - 1 scores, i.e. n / (n - 1) · (score - group mean); a row alone in its group keeps
    its raw score. Spread over the row's valid tokens (× mask).
    """
    with torch.no_grad():
        score = token_rewards.sum(-1)
        n, mean, _ = _row_group_stats(score, index)
        loo = n / (n - 1).clamp(min=1) * (score - mean)
        adv = torch.where(n > 1, loo, score)
        return adv[:, None] * mask


def verl_aggregate(per_token, mask, mode, scale=None, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """Models verl's ``agg_loss`` on one data-parallel rank of ``dp_size``.

    token-mean: Σ m·ℓ / N · dp with N = ``batch_num_tokens`` (default: Σ m over this
    batch); token-sum: Σ m·ℓ · dp. The seq-mean modes first reduce each row, then sum
    over the rows that have at least one valid token and divide by ``global_batch_size``
    (default: the number of such rows), times dp: seq-mean-token-sum uses Σ_t m·ℓ,
    seq-mean-token-mean uses Σ_t m·ℓ / (Σ_t m + 1e-8), and seq-mean-token-sum-norm is
    seq-mean-token-sum divided by ``scale`` (verl's ``loss_scale_factor``, default: T,
    the padded length).
    """
    weighted = per_token * mask
    if mode == "token-mean":
        return weighted.sum() / (mask.sum() if batch_num_tokens is None else batch_num_tokens) * dp_size
    if mode == "token-sum":
        return weighted.sum() * dp_size
    row_total, row_count = weighted.sum(-1), mask.sum(-1)
    if mode == "seq-mean-token-mean":
        per_row = row_total / (row_count + 1e-8)
    elif mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        per_row = row_total
    else:
        raise ValueError(mode)
    rows = (row_count > 0).sum() if global_batch_size is None else global_batch_size
    result = per_row[row_count > 0].sum() / rows * dp_size
    if mode == "seq-mean-token-sum-norm":
        result = result / (mask.shape[-1] if scale is None else scale)
    return result


def verl_vanilla_pg(logp, old_logp, adv, mask, mode="token-mean", eps_low=0.2, eps_high=None, dual_c=3.0,
                    is_weights=None, **batch_info):
    """Models verl's ``compute_policy_loss_vanilla`` (PPO clip with dual clip).

    ratio = exp(clamp(logp - old_logp, ±20)). Per token, the clipped surrogate is
    max(-A·ratio, -A·clip(ratio, 1 - eps_low, 1 + eps_high)) (eps_high defaults to
    eps_low); where A < 0 it is further capped at -A·dual_c. Optionally scaled by the
    rollout importance weights, then reduced with :func:`verl_aggregate` (``batch_info``:
    its ``dp_size``, ``batch_num_tokens``, ``global_batch_size``, ``scale``).
    Returns (loss, per-token loss).
    """
    eps_high = eps_low if eps_high is None else eps_high
    ratio = (logp - old_logp).clamp(-20.0, 20.0).exp()
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    per_token = torch.where(adv < 0, torch.minimum(surrogate, -adv * dual_c), surrogate)
    if is_weights is not None:
        per_token = per_token * is_weights
    return verl_aggregate(per_token, mask, mode, **batch_info), per_token


def verl_masked_mean(values, mask):
    """Models ``verl_F.masked_mean``: Σ m·x / (Σ m + 1e-8)."""
    return (values * mask).sum() / (mask.sum() + 1e-8)


def verl_ratio_metrics(logp, old_logp, adv, mask, eps_low=0.2, eps_high=None, dual_c=3.0, level="token"):
    """Models the metrics of verl's ``vanilla`` (``level="token"``) and ``gspo`` (``"sequence"``, ``dual_c=None``).

    ppo_kl: masked mean of old_logp - logp (clamped to ±20 at token level, as verl
    clamps there only). The ratio: the token's exp(clamped log-ratio), or the sequence's
    exp(min(mean log-ratio, 10)). pg_clipfrac: masked mean of the tokens where the clipped
    surrogate is the larger one (-A·clip(ratio) > -A·ratio); pg_clipfrac_lower: where
    A < 0 and that surrogate exceeds the dual-clip cap -A·dual_c (0 without ``dual_c``).
    """
    eps_high = eps_low if eps_high is None else eps_high
    with torch.no_grad():
        log_ratio = logp - old_logp
        if level == "token":
            log_ratio = log_ratio.clamp(-20.0, 20.0)
            ratio = log_ratio.exp()
        else:
            mean_log_ratio = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            ratio = mean_log_ratio.clamp(max=10.0).exp()[:, None].expand_as(log_ratio)
        plain, clipped = -adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
        lower = torch.zeros(()) if dual_c is None else verl_masked_mean(
            ((torch.maximum(plain, clipped) > -adv * dual_c) & (adv < 0)).to(mask.dtype), mask)
        return {"actor/pg_clipfrac": verl_masked_mean((clipped > plain).to(mask.dtype), mask).item(),
                "actor/ppo_kl": verl_masked_mean(-log_ratio, mask).item(),
                "actor/pg_clipfrac_lower": lower.item()}


def verl_gspo_pg(logp, old_logp, adv, mask, mode="seq-mean-token-mean", eps_low=0.2, eps_high=None,
                 is_weights=None, **batch_info):
    """Models verl's ``compute_policy_loss_gspo`` (GSPO-token).

    The sequence ratio s_i = exp(Σ_t m·(logp - old_logp) / max(1, Σ_t m)) is the value of
    every token's ratio, but a token's gradient flows only through its own log-prob:
    log ratio = sg[log s_i] + logp - sg[logp], capped at 10. Clipped surrogate as in
    vanilla, without the dual clip; × rollout weights; :func:`verl_aggregate`.
    Returns (loss, per-token loss).
    """
    eps_high = eps_low if eps_high is None else eps_high
    mean_log_ratio = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    token_log_ratio = (mean_log_ratio.detach()[:, None] + logp - logp.detach()).clamp(max=10.0)
    ratio = token_log_ratio.exp()
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    if is_weights is not None:
        per_token = per_token * is_weights
    return verl_aggregate(per_token, mask, mode, **batch_info), per_token


def verl_sapo_pg(logp, old_logp, adv, mask, tau_pos=1.0, tau_neg=1.05, is_weights=None, **batch_info):
    """Models verl's ``compute_policy_loss_sapo``: soft gate instead of the clip.

    ratio = exp(clamp(logp - old_logp, ±20)), τ = tau_pos where A > 0 else tau_neg,
    per token -σ(τ·(ratio - 1))·4/τ·A, × rollout weights; always reduced with
    seq-mean-token-mean. Returns (loss, per-token loss).
    """
    ratio = (logp - old_logp).clamp(-20.0, 20.0).exp()
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    per_token = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    if is_weights is not None:
        per_token = per_token * is_weights
    return verl_aggregate(per_token, mask, "seq-mean-token-mean", **batch_info), per_token


def verl_geo_mean_pg(logp, old_logp, adv, mask, eps_low=0.2, eps_high=None, is_weights=None):
    """Models verl's ``compute_policy_loss_geo_mean`` (GMPO) and its metrics.

    Log-ratios (not clamped) are clipped to [-eps_low, eps_high] only on the side that
    the advantage's sign makes pessimistic: sign(A)·min(sign(A)·r, sign(A)·clip(r)).
    Per sequence (n = Σ_t m): ratio = exp(Σ_t m·r̃ / (n + 1e-8)), advantage
    Σ_t m·A / (n + 1e-8), loss -advantage·ratio, times the geometric mean of the rollout
    weights exp(Σ_t m·log(w + 1e-10) / (n + 1e-8)); the loss is the plain mean over the
    batch (no loss_agg_mode). Metrics: clipped tokens (r ≠ clip(r)) with A > 0
    (pg_clipfrac) / A < 0 (pg_clipfrac_lower); ppo_kl. Returns (loss, metrics).
    """
    eps_high = eps_low if eps_high is None else eps_high
    log_ratio = logp - old_logp
    sign = torch.sign(adv)
    clipped_log_ratio = log_ratio.clamp(-eps_low, eps_high)
    pessimistic = sign * torch.minimum(sign * log_ratio, sign * clipped_log_ratio)
    n = mask.sum(-1) + 1e-8
    seq_loss = -((adv * mask).sum(-1) / n) * ((pessimistic * mask).sum(-1) / n).exp()
    if is_weights is not None:
        seq_loss = seq_loss * ((is_weights + 1e-10).log() * mask).sum(-1).div(n).exp()
    with torch.no_grad():
        clipped = (log_ratio != clipped_log_ratio).to(mask.dtype)
        metrics = {"actor/pg_clipfrac": verl_masked_mean(clipped * (adv > 0), mask).item(),
                   "actor/ppo_kl": verl_masked_mean(-log_ratio, mask).item(),
                   "actor/pg_clipfrac_lower": verl_masked_mean(clipped * (adv < 0), mask).item()}
    return seq_loss.mean(), metrics


def verl_gpg_pg(logp, adv, mask, mode="token-mean", is_weights=None, **batch_info):
    """Models verl's ``compute_policy_loss_gpg``: -logp·A per token (× rollout weights), :func:`verl_aggregate`.
    Returns (loss, per-token loss)."""
    per_token = -logp * adv
    if is_weights is not None:
        per_token = per_token * is_weights
    return verl_aggregate(per_token, mask, mode, **batch_info), per_token


def verl_kl_term(logp, ref_logp, name):
    """Models verl's ``kl_penalty`` (names without the straight-through '+' suffix).

    With δ = logp - ref_logp: k1/kl gives δ; k2/mse gives δ²/2; low_var_kl/k3 takes
    d = clamp(-δ, ±20) and gives exp(d) - d - 1 clamped to [-10, 10].
    """
    delta = logp - ref_logp
    if name in ("k1", "kl"):
        return delta
    if name in ("k2", "mse"):
        return delta.square() / 2
    if name in ("low_var_kl", "k3"):
        d = (-delta).clamp(-20.0, 20.0)
        return (d.exp() - d - 1).clamp(-10.0, 10.0)
    raise NotImplementedError(name)


def verl_actor_loss(logp, old_logp, ref_logp, adv, mask, mode, kl_name, kl_coef, **pg_options):
    """Models the actor loss of verl's ``verl.workers.utils.losses.ppo_loss``.

    The vanilla policy loss plus kl_coef times the KL term reduced with the same mode.
    Returns (total loss, aggregated KL).
    """
    pg_loss, _ = verl_vanilla_pg(logp, old_logp, adv, mask, mode, **pg_options)
    kl = verl_aggregate(verl_kl_term(logp, ref_logp, kl_name), mask, mode)
    return pg_loss + kl_coef * kl, kl


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
    expected = verl_grpo_advantage(rewards, mask, index, eps=1e-6, std_normalize=norm)
    ours = gk.group_advantages(rewards.sum(-1), group_ids=torch.as_tensor(index), eps=1e-6,
                               scale="group" if norm else "none", backend="reference")
    torch.testing.assert_close(ours[:, None] * mask, expected, **(F64 if dtype == torch.float64 else F32))
    assert expected.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
def test_rloo_outcome_advantage(sizes, dtype):
    rewards, mask, index = make_groups(3 * sum(sizes), sizes, dtype)
    expected = verl_rloo_advantage(rewards, mask, index)
    ours = gk.group_advantages(rewards.sum(-1), group_ids=torch.as_tensor(index), estimator="rloo", scale="none",
                               backend="reference")
    torch.testing.assert_close(ours[:, None] * mask, expected, **(F64 if dtype == torch.float64 else F32))


@pytest.mark.parametrize("norm", [True, False])
def test_singleton_group_is_a_deliberate_difference(norm):
    """verl: a singleton group has mean 0, std 1, so its advantage is score / (1 + eps) (or the score); ours: 0."""
    rewards, mask, index = make_groups(5, (3, 1, 4))
    lone = index == 47
    assert lone.sum() == 1
    expected = verl_grpo_advantage(rewards, mask, index, std_normalize=norm)
    ours = gk.group_advantages(rewards.sum(-1), group_ids=torch.as_tensor(index), eps=1e-6,
                               scale="group" if norm else "none", backend="reference")
    torch.testing.assert_close(ours[~lone][:, None] * mask[~lone], expected[~lone], **F64)
    assert ours[lone].item() == 0.0
    score = rewards[lone].sum().item()
    # rel=1e-7 also admits verl's float32 1 + eps (its std 1 is a float32 tensor): float32(1 + 1e-6)
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
    pg_loss, pg_losses = verl_vanilla_pg(verl_lp, old, verl_adv, mask, agg, eps_low=0.2, eps_high=clip_ratio_high,
                                         dual_c=clip_ratio_c, is_weights=iw)
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
    pg_loss, _ = verl_vanilla_pg(log_prob, old, adv, mask, agg)
    out = gk.grpo_loss(log_prob, old, adv, mask, clip_ratio_c=3.0, loss_type=AGG_TO_LOSS_TYPE[agg],
                       backend="reference")
    batch, nonempty = mask.shape[0], (mask.sum(-1) > 0).sum().item()
    assert nonempty < batch
    torch.testing.assert_close(out.loss * batch / nonempty, pg_loss, rtol=1e-8, atol=1e-8)
    assert not torch.isclose(out.loss, pg_loss, rtol=1e-3)


def test_token_mean_with_fully_masked_rows():
    """token-mean ↔ bnpo holds with fully masked rows too."""
    log_prob, old, _, adv, mask = make_policy_batch(9, empty_rows=True)
    pg_loss, _ = verl_vanilla_pg(log_prob, old, adv, mask, "token-mean")
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
    expected = verl_kl_term(a, ref, verl_name)
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
    verl_k3 = verl_kl_term(logprob, ref, "k3")
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
    loss, _ = verl_actor_loss(verl_lp, old, ref, adv, mask, agg, verl_name, coef, dual_c=3.0)
    loss.backward()
    our_lp = log_prob.clone().requires_grad_(True)
    out = gk.grpo_loss(our_lp, old, adv, mask, ref_logprobs=ref, beta=coef, kl_estimator=ours, clip_ratio_c=3.0,
                       loss_type=AGG_TO_LOSS_TYPE[agg], backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_lp.grad, verl_lp.grad, **F64)
    # our kl metric = the masked token mean of verl's per-token kl_penalty
    kld = verl_kl_term(log_prob, ref, verl_name)
    torch.testing.assert_close(out.kl, (kld * mask).sum() / mask.sum(), **F64)


def test_grid_is_not_trivial():
    """The policy-loss inputs clip on both sides and hit the dual clip; the KL inputs hit low_var_kl's clamps."""
    log_prob, old, _, adv, mask = make_policy_batch(0)
    ratio = (log_prob - old).exp()[mask.bool()]
    assert (ratio < 0.8).any() and (ratio > 3.0).any() and ((ratio > 0.8) & (ratio < 1.2)).any()
    for sizes in SIZES:
        _, _, index = make_groups(0, sizes)
        assert len(set(index.tolist())) == len(sizes) and min(np.unique(index, return_counts=True)[1]) >= 2


# --------------------------------------------------------------------------- #
# loss variants: GMPO (geo_mean), GPG, the ±20 log-ratio clamp, rollout importance sampling
# --------------------------------------------------------------------------- #
def verl_rollout_is_weights(old_logp, rollout_logp, mask, level, upper, lower=None):
    """Models verl's ``compute_rollout_correction_weights``: log-ratio old - rollout clamped to ±20 (summed over
    the sequence's valid tokens first at sequence level), exp, × mask; truncated at ``upper`` (TIS), or zero
    outside [lower, upper] (IcePop) when ``lower`` is given."""
    log_ratio = old_logp - rollout_logp
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True)
    weights = log_ratio.clamp(-20.0, 20.0).exp().expand_as(mask) * mask
    if lower is None:
        return weights.clamp(max=upper)
    return torch.where((weights >= lower) & (weights <= upper), weights, torch.zeros_like(weights))


@pytest.mark.parametrize("weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("clip", [(0.2, None), (0.4, 0.3)], ids=["sym", "asym"])
@pytest.mark.parametrize("empty_rows", [False, True])
def test_policy_loss_geo_mean(weights, clip, empty_rows):
    """loss_type="gmpo" ↔ ``compute_policy_loss_geo_mean``: loss, gradient, pg_clipfrac(_lower)."""
    log_prob, old, _, adv, mask = make_policy_batch(21 + empty_rows, empty_rows=empty_rows)
    iw = torch.rand(mask.shape, dtype=mask.dtype, generator=torch.Generator().manual_seed(2)) * 2 if weights else None
    low, high = clip
    verl_lp = log_prob.clone().requires_grad_(True)
    loss, metrics = verl_geo_mean_pg(verl_lp, old, adv, mask, low, high, is_weights=iw)
    loss.backward()
    our_lp = log_prob.clone().requires_grad_(True)
    out = gk.grpo_loss(our_lp, old, adv, mask, epsilon_low=low, epsilon_high=high, loss_type="gmpo",
                       importance_weights=iw, backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_lp.grad, verl_lp.grad, **F64)
    # verl's masked mean divides by Σ m + 1e-8
    assert out.clip_ratio_high.item() == pytest.approx(metrics["actor/pg_clipfrac"], rel=1e-8, abs=0)
    assert out.clip_ratio_low.item() == pytest.approx(metrics["actor/pg_clipfrac_lower"], rel=1e-8, abs=0)
    assert 0 < out.clip_ratio_low.item() and 0 < out.clip_ratio_high.item()


@pytest.mark.parametrize("weights", [False, True], ids=["no_is", "rollout_is"])
@pytest.mark.parametrize("adv_shape", ["BT", "B"])
def test_policy_loss_gpg(weights, adv_shape):
    """loss_type="gpg" ↔ ``compute_policy_loss_gpg`` with token-mean aggregation."""
    log_prob, _, _, adv, mask = make_policy_batch(31, empty_rows=True)
    if adv_shape == "B":
        adv = adv[:, 0]
    iw = torch.rand(mask.shape, dtype=mask.dtype, generator=torch.Generator().manual_seed(3)) * 2 if weights else None
    verl_adv = adv if adv.ndim == 2 else adv[:, None].expand_as(mask)
    verl_lp = log_prob.clone().requires_grad_(True)
    loss, per_token = verl_gpg_pg(verl_lp, verl_adv, mask, "token-mean", is_weights=iw)
    loss.backward()
    our_lp = log_prob.clone().requires_grad_(True)
    out = gk.grpo_loss(our_lp, None, adv, mask, loss_type="gpg", importance_weights=iw, backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_lp.grad, verl_lp.grad, **F64)
    torch.testing.assert_close(out.per_token_loss[mask.bool()], per_token.detach()[mask.bool()], **F64)


@pytest.mark.parametrize("level,lower", [("token", None), ("token", 0.5), ("sequence", None), ("sequence", 0.2)])
def test_vanilla_with_log_ratio_clamp_and_rollout_is(level, lower):
    """verl's vanilla loss as it is: log-ratio clamped to ±20 (``log_ratio_clamp=20``), dual clip, rollout
    weights from old/rollout log-probs (``rollout_is_mode``: truncate without a lower bound, IcePop's mask with
    one; verl's ±20 safety bound on the rollout log-ratio is ``log_ratio_clamp`` too)."""
    log_prob, old, _, adv, mask = make_policy_batch(41)
    g = torch.Generator().manual_seed(4)
    rollout = old + 0.4 * torch.randn(old.shape, generator=g, dtype=old.dtype)
    old = old.clone()
    old[1, 0], mask[1, 0] = log_prob[1, 0] + 25.0, 1.0  # |log-ratio| > 20: the clamp acts
    rollout[2, 0], mask[2, 0] = old[2, 0] + 30.0, 1.0  # a rollout log-ratio past the safety bound
    upper = 2.0 if level == "token" else 5.0
    iw = verl_rollout_is_weights(old, rollout, mask, level, upper, lower)
    verl_lp = log_prob.clone().requires_grad_(True)
    pg_loss, _ = verl_vanilla_pg(verl_lp, old, adv, mask, "token-mean", dual_c=3.0, is_weights=iw)
    pg_loss.backward()
    mode = f"{level}_{'truncate' if lower is None else 'mask'}"
    our_lp = log_prob.clone().requires_grad_(True)
    out = gk.grpo_loss(our_lp, old, adv, mask, clip_ratio_c=3.0, loss_type="bnpo", log_ratio_clamp=20.0,
                       sampling_logprobs=rollout, rollout_is_mode=mode, rollout_is_min=lower, rollout_is_max=upper,
                       backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, pg_loss.detach(), **F64)
    torch.testing.assert_close(our_lp.grad, verl_lp.grad, **F64)
    assert our_lp.grad[1, 0] == 0  # clamped log-ratio: no gradient

"""group_advantages: against a plain-Python loop implementation, for every option; properties."""

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import grpo_kernels as gk

OP = "group_advantages"

NAN = float("nan")


def divide(a, b):
    """IEEE division as torch does it: x/0 = ±inf, 0/0 = NaN."""
    if b == 0:
        return NAN if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def python_advantages(rewards, groups, scale="group", estimator="grpo", eps=1e-4):
    """One reward per row, groups = list of group labels; plain Python floats."""
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    valid_all = [r for r in rewards if not math.isnan(r)]
    batch_std = statistics.stdev(valid_all) if len(valid_all) > 1 else NAN
    out = [0.0] * len(rewards)
    for rows in members.values():
        vals = [rewards[i] for i in rows if not math.isnan(rewards[i])]
        n = len(vals)
        mean = sum(vals) / n if n else NAN
        std = statistics.stdev(vals) if n > 1 else NAN
        for i in rows:
            r = rewards[i]
            if math.isnan(r):
                continue
            if estimator == "rloo":
                if n < 2:
                    continue
                a = r - (sum(vals) - r) / (n - 1)
            else:
                a = r - mean
            if scale == "group":
                a = divide(a, std + eps)
            elif scale == "batch":
                a = divide(a, batch_std + eps)
            out[i] = 0.0 if math.isnan(a) else a
    return out


def python_group_stats(rewards, groups):
    labels = sorted(set(groups))
    means, stds = [], []
    for g in labels:
        vals = [r for r, h in zip(rewards, groups) if h == g and not math.isnan(r)]
        means.append(sum(vals) / len(vals) if vals else NAN)
        stds.append(statistics.stdev(vals) if len(vals) > 1 else NAN)
    return means, stds


REWARDS = [1.0, 0.0, 1.0, 0.5, 2.0, 2.0, 2.0, 2.0, -1.0, 3.0, NAN, 0.25]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("group_size", [1, 2, 3, 4, 6, 12])
@pytest.mark.parametrize("eps", [1e-4, 1e-6, 0.0])
def test_contiguous_groups(backend, scale, estimator, group_size, eps):
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    adv = gk.group_advantages(rewards, group_size=group_size, scale=scale, estimator=estimator, eps=eps,
                              backend=backend)
    groups = [i // group_size for i in range(len(REWARDS))]
    expected = python_advantages(REWARDS, groups, scale, estimator, eps)
    if eps == 0.0:  # a zero-std group divides 0 by 0 -> NaN -> 0, like any undefined advantage
        assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_ids(backend, scale, estimator):
    groups = [7, 3, 7, 3, 9, 3, 7, -2, 9, 3, 7, 100]
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    adv, mean, std = gk.group_advantages(rewards, group_ids=torch.tensor(groups), scale=scale,
                                         estimator=estimator, return_stats=True, backend=backend)
    torch.testing.assert_close(adv, torch.tensor(python_advantages(REWARDS, groups, scale, estimator),
                                                 dtype=torch.float64))
    means, stds = python_group_stats(REWARDS, groups)
    torch.testing.assert_close(mean, torch.tensor(means, dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(std, torch.tensor(stds, dtype=torch.float64), equal_nan=True)


def test_group_ids_equal_contiguous(backend):
    rewards = torch.randn(12)
    a = gk.group_advantages(rewards, group_size=4, return_stats=True, backend=backend)
    b = gk.group_advantages(rewards, group_ids=torch.arange(12) // 4, return_stats=True, backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_stats_contiguous(backend):
    rewards = torch.tensor(REWARDS)
    _, mean, std = gk.group_advantages(rewards, group_size=3, return_stats=True, backend=backend)
    means, stds = python_group_stats(REWARDS, [i // 3 for i in range(12)])
    torch.testing.assert_close(mean, torch.tensor(means), equal_nan=True)
    torch.testing.assert_close(std, torch.tensor(stds), equal_nan=True)


def test_nan_and_singletons_get_zero(backend):
    rewards = torch.tensor([NAN, 1.0, 2.0, 5.0, NAN, NAN, 4.0])
    adv = gk.group_advantages(rewards, group_ids=torch.tensor([0, 0, 0, 1, 2, 2, 2]), backend=backend)
    assert adv[0] == 0  # NaN reward
    assert adv[3] == 0  # singleton group
    assert adv[6] == 0  # the only valid reward of its group
    assert adv[4] == adv[5] == 0
    assert adv[1] < 0 < adv[2]


def test_all_nan(backend):
    adv = gk.group_advantages(torch.full((4,), NAN), group_size=2, backend=backend)
    assert (adv == 0).all()


def test_dtypes(backend):
    ints = torch.tensor([1, 0, 0, 1, 1, 1])
    adv = gk.group_advantages(ints, group_size=3, backend=backend)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, gk.group_advantages(ints.float(), group_size=3, backend=backend))
    assert gk.group_advantages(ints.double(), group_size=3, backend=backend).dtype == torch.float64
    assert gk.group_advantages(ints.bfloat16(), group_size=3, backend=backend).dtype == torch.float32


# ----------------------------------------------------------------------------- several rewards
MULTI = [
    [1.0, 0.5, NAN],
    [0.0, NAN, 1.0],
    [1.0, 1.0, 0.0],
    [NAN, NAN, NAN],  # unscorable
    [0.5, 0.0, 2.0],
    [2.0, 1.0, 1.0],
    [0.0, 0.0, 0.0],
    [1.0, NAN, 0.5],
]
WEIGHTS = [1.0, 0.5, 2.0]


def python_nansum_rows(rows, weights):
    out = []
    for row in rows:
        if all(math.isnan(v) for v in row):
            out.append(NAN)
        else:
            out.append(sum(w * v for w, v in zip(weights, row) if not math.isnan(v)))
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_sum_then_normalize(backend, scale, estimator, weights):
    summed = python_nansum_rows(MULTI, weights or [1.0] * 3)
    groups = [i // 4 for i in range(8)]
    adv, mean, std = gk.group_advantages(
        torch.tensor(MULTI, dtype=torch.float64), group_size=4, scale=scale, estimator=estimator,
        reward_weights=None if weights is None else torch.tensor(weights, dtype=torch.float64),
        return_stats=True, backend=backend,
    )
    torch.testing.assert_close(adv, torch.tensor(python_advantages(summed, groups, scale, estimator),
                                                 dtype=torch.float64))
    means, stds = python_group_stats(summed, groups)
    torch.testing.assert_close(mean, torch.tensor(means, dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(std, torch.tensor(stds, dtype=torch.float64), equal_nan=True)


@pytest.mark.parametrize("weights", [None, WEIGHTS])
def test_normalize_then_sum(backend, weights):
    weights = weights or [1.0] * 3
    groups = [i // 4 for i in range(8)]
    columns = [python_advantages([row[k] for row in MULTI], groups) for k in range(3)]
    # python_advantages gives 0 for undefined entries, and so does ignoring NaN in the weighted sum
    combined = [
        NAN if all(math.isnan(v) for v in MULTI[i]) else sum(w * columns[k][i] for k, w in enumerate(weights))
        for i in range(8)
    ]
    valid = [c for c in combined if not math.isnan(c)]
    mu, sd = sum(valid) / len(valid), statistics.stdev(valid)
    expected = [0.0 if math.isnan(c) else (c - mu) / (sd + 1e-4) for c in combined]
    adv = gk.group_advantages(torch.tensor(MULTI, dtype=torch.float64), group_size=4,
                              reward_weights=torch.tensor(weights, dtype=torch.float64),
                              multi_objective="normalize_then_sum", backend=backend)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))


def test_single_column_equals_1d(backend):
    rewards = torch.randn(8)
    torch.testing.assert_close(
        gk.group_advantages(rewards[:, None], group_size=4, backend=backend),
        gk.group_advantages(rewards, group_size=4, backend=backend),
    )


# ----------------------------------------------------------------------------- properties
group_rewards = st.integers(2, 6).flatmap(
    lambda g: st.tuples(
        st.just(g),
        st.lists(st.floats(-100, 100), min_size=g, max_size=g).flatmap(
            lambda first: st.lists(
                st.lists(st.floats(-100, 100), min_size=g, max_size=g), min_size=0, max_size=3
            ).map(lambda rest: [first] + rest)
        ),
    )
)


@given(group_rewards, st.sampled_from(["group", "batch", "none"]), st.sampled_from(["grpo", "rloo"]))
def test_groups_sum_to_zero(data, scale, estimator):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    adv = gk.group_advantages(rewards, group_size=g, scale=scale, estimator=estimator)
    sums = adv.view(-1, g).sum(-1)
    assert (sums.abs() <= 1e-6 * (1 + adv.abs().view(-1, g).sum(-1))).all()


@given(group_rewards, st.floats(-1e3, 1e3))
def test_shift_invariance(data, shift):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    a = gk.group_advantages(rewards, group_size=g, scale="none")
    b = gk.group_advantages(rewards + shift, group_size=g, scale="none")
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@given(group_rewards)
def test_rloo_is_rescaled_grpo(data):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    grpo = gk.group_advantages(rewards, group_size=g, scale="none")
    rloo = gk.group_advantages(rewards, group_size=g, scale="none", estimator="rloo")
    torch.testing.assert_close(rloo, grpo * g / (g - 1), atol=1e-9, rtol=1e-9)


@given(group_rewards)
def test_group_scale_gives_unit_std(data):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    adv = gk.group_advantages(rewards, group_size=g, eps=0.0).view(-1, g)
    spread = rewards.view(-1, g).std(-1)
    for row, s in zip(adv, spread):
        if s == 0:
            assert (row == 0).all()
        elif s > 1e-6:  # (tiny spreads lose precision in float64)
            torch.testing.assert_close(row.std(), torch.tensor(1.0, dtype=torch.float64))


@given(group_rewards, st.randoms(use_true_random=False))
def test_permutation_equivariance(data, rng):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    ids = torch.arange(len(rewards)) // g
    perm = list(range(len(rewards)))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    a = gk.group_advantages(rewards, group_ids=ids)
    b = gk.group_advantages(rewards[perm], group_ids=ids[perm])
    torch.testing.assert_close(a[perm], b, atol=1e-9, rtol=1e-9)


def test_reward_weights_as_a_list(backend):
    rewards = torch.tensor(MULTI)
    as_list = gk.group_advantages(rewards, group_size=4, reward_weights=WEIGHTS, backend=backend)
    as_tuple = gk.group_advantages(rewards, group_size=4, reward_weights=tuple(WEIGHTS), backend=backend)
    as_tensor = gk.group_advantages(rewards, group_size=4, reward_weights=torch.tensor(WEIGHTS), backend=backend)
    torch.testing.assert_close(as_list, as_tensor)
    torch.testing.assert_close(as_tuple, as_tensor)

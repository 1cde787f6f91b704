"""group_advantages: against a plain-Python loop implementation, for every option; properties."""

import math
import statistics

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from triton_compile import run_compile_script

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
def test_groups_sum_to_zero(backend, data, scale, estimator):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    adv = gk.group_advantages(rewards, group_size=g, scale=scale, estimator=estimator, backend=backend)
    sums = adv.view(-1, g).sum(-1)
    assert (sums.abs() <= 1e-6 * (1 + adv.abs().view(-1, g).sum(-1))).all()


@given(group_rewards, st.floats(-1e3, 1e3))
def test_shift_invariance(backend, data, shift):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    a = gk.group_advantages(rewards, group_size=g, scale="none", backend=backend)
    b = gk.group_advantages(rewards + shift, group_size=g, scale="none", backend=backend)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@given(group_rewards)
def test_rloo_is_rescaled_grpo(backend, data):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    grpo = gk.group_advantages(rewards, group_size=g, scale="none", backend=backend)
    rloo = gk.group_advantages(rewards, group_size=g, scale="none", estimator="rloo", backend=backend)
    torch.testing.assert_close(rloo, grpo * g / (g - 1), atol=1e-9, rtol=1e-9)


@given(group_rewards)
def test_group_scale_gives_unit_std(backend, data):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    adv = gk.group_advantages(rewards, group_size=g, eps=0.0, backend=backend).view(-1, g)
    values = rewards.view(-1, g)
    for row, vals, s in zip(adv, values, values.std(-1)):
        if (vals == vals[0]).all():  # (not s == 0: the std of e.g. [0, 1e-188] underflows to 0)
            assert (row == 0).all()
        elif s > 1e-6:  # (tiny spreads lose precision in float64)
            torch.testing.assert_close(row.std(), torch.tensor(1.0, dtype=torch.float64))


@given(group_rewards, st.randoms(use_true_random=False))
def test_permutation_equivariance(backend, data, rng):
    g, groups = data
    rewards = torch.tensor([r for grp in groups for r in grp], dtype=torch.float64)
    ids = torch.arange(len(rewards)) // g
    perm = list(range(len(rewards)))
    rng.shuffle(perm)
    perm = torch.tensor(perm)
    a = gk.group_advantages(rewards, group_ids=ids, backend=backend)
    b = gk.group_advantages(rewards[perm], group_ids=ids[perm], backend=backend)
    torch.testing.assert_close(a[perm], b, atol=1e-9, rtol=1e-9)


def test_reward_weights_as_a_list(backend):
    rewards = torch.tensor(MULTI)
    as_list = gk.group_advantages(rewards, group_size=4, reward_weights=WEIGHTS, backend=backend)
    as_tuple = gk.group_advantages(rewards, group_size=4, reward_weights=tuple(WEIGHTS), backend=backend)
    as_tensor = gk.group_advantages(rewards, group_size=4, reward_weights=torch.tensor(WEIGHTS), backend=backend)
    torch.testing.assert_close(as_list, as_tensor)
    torch.testing.assert_close(as_tuple, as_tensor)


# ----------------------------------------------------------------------------- kernel-shaped cases
def _rewards_with_nans(n, dtype=torch.float64, nan_fraction=0.1):
    rewards = (torch.randn(n, dtype=torch.float64) * 2 + 1).to(dtype)
    rewards[torch.rand(n) < nan_fraction] = NAN
    return rewards


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_many_groups(backend, estimator):
    rewards = _rewards_with_nans(4000)  # 1000 groups of 4
    groups = [i // 4 for i in range(4000)]
    expected = torch.tensor(python_advantages(rewards.tolist(), groups, estimator=estimator), dtype=torch.float64)
    means, stds = python_group_stats(rewards.tolist(), groups)
    adv, mean, std = gk.group_advantages(rewards, group_size=4, estimator=estimator, return_stats=True,
                                         backend=backend)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(mean, torch.tensor(means, dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(std, torch.tensor(stds, dtype=torch.float64), equal_nan=True)
    # the same groups as shuffled ids
    perm = torch.randperm(4000)
    ids = torch.tensor(groups)[perm] * 7 - 2000
    adv = gk.group_advantages(rewards[perm], group_ids=ids, estimator=estimator, backend=backend)
    torch.testing.assert_close(adv, expected[perm])
    # float32
    adv32 = gk.group_advantages(rewards.float(), group_size=4, estimator=estimator, backend=backend)
    assert adv32.dtype == torch.float32
    torch.testing.assert_close(adv32.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_group_ids_large_and_negative(backend, ids_dtype):
    info = torch.iinfo(ids_dtype)
    labels = [info.min, info.max, -1, 0, 5 - 2**30, 2**30]
    groups = [labels[i % 6] for i in [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0, 0, 2, 1, 5, 3, 4]]
    rewards = _rewards_with_nans(len(groups))
    adv, mean, std = gk.group_advantages(rewards, group_ids=torch.tensor(groups, dtype=ids_dtype),
                                         scale="batch", return_stats=True, backend=backend)
    torch.testing.assert_close(adv, torch.tensor(python_advantages(rewards.tolist(), groups, scale="batch"),
                                                 dtype=torch.float64))
    means, stds = python_group_stats(rewards.tolist(), groups)  # sorted ids: info.min first
    torch.testing.assert_close(mean, torch.tensor(means, dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(std, torch.tensor(stds, dtype=torch.float64), equal_nan=True)


def test_infinities_like_reference(backend):
    inf = math.inf
    rewards = torch.tensor([1.0, inf, 2.0, 3.0, -inf, 1.0, 0.0, 0.0, inf, inf])
    for scale in ["group", "batch", "none"]:
        for estimator in ["grpo", "rloo"]:
            got = gk.group_advantages(rewards, group_size=2, scale=scale, estimator=estimator, return_stats=True,
                                      backend=backend)
            expected = gk.group_advantages(rewards, group_size=2, scale=scale, estimator=estimator,
                                           return_stats=True, backend="reference")
            for x, y in zip(got, expected):  # nan_to_num: NaN -> 0, ±inf -> ±max float
                torch.testing.assert_close(x, y, equal_nan=True)


def _triton_module():
    if "triton" not in gk.available_backends(OP):
        pytest.skip("no Triton backend for group_advantages here")
    import importlib

    return importlib.import_module("grpo_kernels.triton.group_advantages")


@pytest.mark.parametrize("tile", [(4, 2), (2, 1), (8, 4)])
@pytest.mark.parametrize("by", ["size", "ids"])
@pytest.mark.parametrize("multi", [None, "sum_then_normalize", "normalize_then_sum"])
def test_triton_groups_longer_than_a_block(monkeypatch, tile, by, multi):
    """Force tiny tiles so that segments span several BLOCK steps and programs hold several groups."""
    module = _triton_module()
    monkeypatch.setattr(module, "_TILES", ((math.inf, *tile),))
    rewards = _rewards_with_nans(66 * 2).view(66, 2)
    if multi is None:
        rewards = rewards[:, 0]  # a strided view
    sizes = [11, 1, 30, 2, 22]  # group_ids: uneven segments, interleaved
    groups = [i // 11 for i in range(66)] if by == "size" else [
        g for g, n in zip([40, -3, 7, 0, 12], sizes) for _ in range(n)][::-1]
    if by == "ids":
        perm = torch.randperm(66)
        groups = [groups[i] for i in perm]
    options = dict(group_size=11) if by == "size" else dict(group_ids=torch.tensor(groups))
    if multi is not None:
        options.update(multi_objective=multi, reward_weights=[1.0, -0.5])
    for scale in ["group", "batch", "none"]:
        for estimator in ["grpo", "rloo"]:
            got = gk.group_advantages(rewards, scale=scale, estimator=estimator, return_stats=True, backend="triton",
                                      **options)
            expected = gk.group_advantages(rewards, scale=scale, estimator=estimator, return_stats=True,
                                           backend="reference", **options)
            for x, y in zip(got, expected):
                torch.testing.assert_close(x, y, equal_nan=True)


def test_triton_outputs_are_not_differentiable():
    _triton_module()
    rewards = torch.randn(8, 2, requires_grad=True)
    for multi in ["sum_then_normalize", "normalize_then_sum"]:
        for out in gk.group_advantages(rewards, group_size=4, multi_objective=multi, return_stats=True,
                                       backend="triton"):
            assert not out.requires_grad
    assert not gk.group_advantages(rewards[:, 0], group_size=4, backend="triton").requires_grad


def test_triton_kernels_compile_for_hopper():
    """The interpreter is lenient about types: compile the kernels' variants to sm_90 cubins (no GPU needed)."""

    _triton_module()
    script = r'''
import importlib
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
m = importlib.import_module("grpo_kernels.triton.group_advantages")
target = GPUTarget("cuda", 90, 32)
variants = [  # (rewards, compute, contiguous, scale, rloo, write_adv, finalize, stats, GROUPS, BLOCK)
    ("fp32", "fp32", True, 0, False, True, True, True, 256, 4),
    ("fp64", "fp64", False, 1, True, True, True, True, 1, 1024),
    ("bf16", "fp32", False, 2, False, True, False, False, 16, 64),
    ("i64", "fp32", True, 1, True, False, False, True, 2, 512),
]
for rdt, cdt, contiguous, scale, rloo, write_adv, finalize, stats, groups, block in variants:
    sig = dict(r_ptr="*" + rdt, stride_rb="i64", stride_rk="i64", adv_ptr="*" + cdt, stride_ab="i64",
               stride_ak="i64", mean_ptr="*" + cdt, std_ptr="*" + cdt, perm_ptr="*i64", offsets_ptr="*i64",
               eps_ptr="*" + cdt, batch_std_ptr="*" + cdt, num_groups="i32", group_size="i32")
    consts = dict(COMPUTE=tl.float64 if cdt == "fp64" else tl.float32, CONTIGUOUS=contiguous, SCALE=scale,
                  RLOO=rloo, WRITE_ADV=write_adv, FINALIZE=finalize, WRITE_STATS=stats,
                  MAX_FLOAT=1.7976931348623157e308 if cdt == "fp64" else 3.4028234663852886e38,
                  GROUPS=groups, BLOCK=block)
    sig.update({name: "constexpr" for name in consts})
    kernel = compile(ASTSource(m._segment_kernel, sig, constexprs=consts), target=target, options=dict(num_warps=4))
    assert "div.full" not in kernel.asm["ptx"] and "sqrt.approx" not in kernel.asm["ptx"]  # IEEE-rounded
for cdt in ["fp32", "fp64"]:
    sig = dict(r_ptr="*" + cdt, stride_rb="i64", stride_rk="i64", std_ptr="*" + cdt, B="i32",
               COMPUTE="constexpr", BLOCK="constexpr")
    compile(ASTSource(m._nan_std_kernel, sig, constexprs=dict(COMPUTE=tl.float64 if cdt == "fp64" else tl.float32,
                                                            BLOCK=1024)),
            target=target, options=dict(num_warps=4))
print("compiled")
'''
    run_compile_script(script)

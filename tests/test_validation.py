"""Every bad input raises a ValueError/TypeError naming the argument, before any computation."""

import math

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import validation
from grpo_kernels.kernel_options import LOSS_DEFAULTS

B, T, V = 2, 3, 5


def loss_inputs():
    return dict(
        logprobs=-torch.rand(B, T), old_logprobs=-torch.rand(B, T), advantages=torch.randn(B),
        mask=torch.ones(B, T, dtype=torch.bool),
    )


def fused_inputs():
    return dict(
        logits=torch.randn(B, T, V), token_ids=torch.randint(0, V, (B, T)), old_logprobs=-torch.rand(B, T),
        advantages=torch.randn(B), mask=torch.ones(B, T, dtype=torch.bool),
    )


def call_loss(**over):
    kw = loss_inputs()
    kw.update(over)
    return gk.grpo_loss(kw.pop("logprobs"), kw.pop("old_logprobs"), kw.pop("advantages"), kw.pop("mask"), **kw)


def call_fused(**over):
    kw = fused_inputs()
    kw.update(over)
    return gk.fused_grpo_loss(kw.pop("logits"), kw.pop("token_ids"), kw.pop("old_logprobs"), kw.pop("advantages"),
                              kw.pop("mask"), **kw)


# ----------------------------------------------------------------------------- token_logprobs
TOKEN_CASES = [
    (dict(logits=[[1.0]]), TypeError, "logits must be a torch.Tensor"),
    (dict(logits=torch.zeros(3, 5, dtype=torch.long)), TypeError, "logits must be a floating-point"),
    (dict(token_ids=torch.zeros(3, dtype=torch.float32)), TypeError, "token_ids must be an integer"),
    (dict(token_ids=torch.zeros(3, dtype=torch.bool)), TypeError, "token_ids must be an integer"),
    (dict(token_ids=torch.zeros(4, dtype=torch.long)), ValueError, r"token_ids must have shape logits.shape\[:-1\]"),
    (dict(token_ids=torch.zeros(3, 1, dtype=torch.long)), ValueError, "token_ids must have shape"),
    (dict(logits=torch.tensor(1.0), token_ids=torch.tensor(0)), ValueError, "logits must have shape"),
    (dict(logits=torch.zeros(3, 0), token_ids=torch.zeros(3, dtype=torch.long)), ValueError, "V >= 1"),
    (dict(logits=torch.zeros(0, 5), token_ids=torch.zeros(0, dtype=torch.long)), ValueError, "empty batch"),
    (dict(token_ids=torch.tensor([0, 5, 1])), ValueError, r"token_ids must be in \[0, V\) = \[0, 5\).*found 5"),
    (dict(token_ids=torch.tensor([0, -1, 1])), ValueError, "found -1"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (dict(temperature=math.nan), ValueError, "temperature must be finite"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite"),
    (dict(temperature="1"), TypeError, "temperature must be a real number"),
    (dict(temperature=torch.tensor(1)), TypeError, "temperature must be a floating-point tensor"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (dict(return_entropy=1), TypeError, "return_entropy must be a bool"),
    (dict(inplace_backward="yes"), TypeError, "inplace_backward must be a bool"),
    (dict(backend="nope"), ValueError, "backend must be 'auto' or one of"),
    (dict(backend=3), TypeError, "backend must be a str"),
]


@pytest.mark.parametrize("over,error,match", TOKEN_CASES, ids=[c[2][:40] for c in TOKEN_CASES])
def test_token_logprobs_errors(over, error, match):
    kw = dict(logits=torch.randn(3, 5), token_ids=torch.tensor([0, 4, 1]))
    kw.update(over)
    with pytest.raises(error, match=match):
        gk.token_logprobs(kw.pop("logits"), kw.pop("token_ids"), **kw)


def test_ignore_index_is_allowed_out_of_range():
    out = gk.token_logprobs(torch.randn(3, 5), torch.tensor([-100, 4, -100]))
    assert out[0] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_token_logprobs_device_mismatch():
    with pytest.raises(ValueError, match="token_ids is on"):
        gk.token_logprobs(torch.randn(3, 5, device="cuda"), torch.tensor([0, 1, 2]))


def test_device_mismatch_with_meta_tensor():
    with pytest.raises(ValueError, match="advantages is on meta but logprobs is on cpu"):
        call_loss(advantages=torch.randn(B, device="meta"))


# ----------------------------------------------------------------------------- group_advantages
GROUP_CASES = [
    (dict(rewards=[1.0, 2.0]), TypeError, "rewards must be a torch.Tensor"),
    (dict(rewards=torch.ones(4, dtype=torch.bool)), TypeError, "rewards must be a floating-point or integer"),
    (dict(rewards=torch.ones(2, 2, 2)), ValueError, r"rewards must have shape \[B\] or \[B, K\]"),
    (dict(rewards=torch.ones(())), ValueError, r"rewards must have shape \[B\]"),
    (dict(rewards=torch.ones(0)), ValueError, "empty batch"),
    (dict(rewards=torch.ones(4, 0)), ValueError, "empty batch"),
    (dict(group_size=None), ValueError, "exactly one of group_size"),
    (dict(group_ids=torch.zeros(4, dtype=torch.long)), ValueError, "exactly one of group_size"),
    (dict(group_size=3), ValueError, "group_size=3 must divide the batch size B=4"),
    (dict(group_size=0), ValueError, "group_size must be >= 1"),
    (dict(group_size=2.0), TypeError, "group_size must be an int"),
    (dict(group_size=None, group_ids=torch.zeros(3, dtype=torch.long)), ValueError, r"group_ids must have shape \[B\]"),
    (dict(group_size=None, group_ids=torch.zeros(4)), TypeError, "group_ids must be an integer"),
    (dict(scale="std"), ValueError, "scale must be one of"),
    (dict(estimator="ppo"), ValueError, "estimator must be one of"),
    (dict(multi_objective="mean"), ValueError, "multi_objective must be one of"),
    (dict(eps=-1e-4), ValueError, "eps must be >= 0"),
    (dict(eps=math.nan), ValueError, "eps must be finite"),
    (dict(reward_weights=torch.ones(1)), ValueError, r"reward_weights needs rewards of shape \[B, K\]"),
    (dict(rewards=torch.ones(4, 2), reward_weights=torch.ones(3)), ValueError, r"reward_weights must have shape \[K\]"),
    (dict(rewards=torch.ones(4, 2), reward_weights=torch.ones(2, dtype=torch.long)), TypeError,
     "reward_weights must be a floating-point"),
    (dict(rewards=torch.ones(4, 2), reward_weights=torch.tensor([1.0, math.inf])), ValueError,
     "reward_weights must be finite"),
    (dict(return_stats="yes"), TypeError, "return_stats must be a bool"),
    (dict(rewards=torch.ones(4, 2), reward_weights=[1.0]), ValueError, "reward_weights must have K = 2 entries"),
    (dict(rewards=torch.ones(4, 2), reward_weights=[1.0, math.nan]), ValueError, r"reward_weights\[1\] must be finite"),
    (dict(rewards=torch.ones(4, 2), reward_weights=[1.0, "2"]), TypeError, r"reward_weights\[1\] must be a real"),
]


@pytest.mark.parametrize("over,error,match", GROUP_CASES, ids=[c[2][:40] for c in GROUP_CASES])
def test_group_advantages_errors(over, error, match):
    kw = dict(rewards=torch.randn(4), group_size=2)
    kw.update(over)
    with pytest.raises(error, match=match):
        gk.group_advantages(kw.pop("rewards"), **kw)


# ----------------------------------------------------------------------------- grpo_loss
LOSS_CASES = [
    (dict(logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "logprobs must be a floating-point"),
    (dict(logprobs=-torch.rand(B * T)), ValueError, r"logprobs must have shape \[B, T\]"),
    (dict(logprobs=-torch.rand(0, T), old_logprobs=None, mask=torch.ones(0, T)), ValueError, "empty batch"),
    (dict(logprobs=-torch.rand(B, 0)), ValueError, "empty batch"),
    (dict(old_logprobs=-torch.rand(B, T + 1)), ValueError, r"old_logprobs must have shape \[B, T\]"),
    (dict(old_logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "old_logprobs must be a floating-point"),
    (dict(advantages=torch.randn(B + 1)), ValueError, r"advantages must have shape \[B\], \[B, 1\] or \[B, T\]"),
    (dict(advantages=torch.randn(B, T, 1)), ValueError, "advantages must have shape"),
    (dict(advantages=torch.ones(B, dtype=torch.long)), TypeError, "advantages must be a floating-point"),
    (dict(advantages=None), TypeError, "advantages must be a torch.Tensor"),
    (dict(mask=torch.ones(B, T + 1)), ValueError, r"mask must have shape \[B, T\]"),
    (dict(mask=torch.full((B, T), 0.5)), ValueError, "mask must contain only 0 and 1"),
    (dict(mask=torch.full((B, T), 2)), ValueError, "mask must contain only 0 and 1"),
    (dict(mask=torch.ones(B, T, dtype=torch.complex64)), TypeError, "mask must be a bool or 0/1"),
    (dict(ref_logprobs=-torch.rand(B, 1)), ValueError, r"ref_logprobs must have shape \[B, T\]"),
    (dict(beta=0.04), ValueError, "beta=0.04 needs ref_logprobs"),
    (dict(beta=-0.1, ref_logprobs=-torch.rand(B, T)), ValueError, "beta must be >= 0"),
    (dict(beta=math.inf, ref_logprobs=-torch.rand(B, T)), ValueError, "beta must be finite"),
    (dict(epsilon_low=1.0), ValueError, "epsilon_low must be < 1"),
    (dict(epsilon_low=-0.1), ValueError, "epsilon_low must be >= 0"),
    (dict(epsilon_low=math.nan), ValueError, "epsilon_low must be finite"),
    (dict(epsilon_high=-0.2), ValueError, "epsilon_high must be >= 0"),
    (dict(epsilon_high=math.inf), ValueError, "epsilon_high must be finite"),
    (dict(delta=0.0), ValueError, "delta must be > 0"),
    (dict(delta=1.5, loss_type="cispo"), ValueError, "delta applies to the clipped loss types"),
    (dict(clip_ratio_c=1.0), ValueError, "clip_ratio_c must be > 1"),
    (dict(clip_ratio_c=3.0, loss_type="sapo"), ValueError, "clip_ratio_c applies to the clipped loss types"),
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level must be one of"),
    (dict(kl_estimator="k4"), ValueError, "kl_estimator must be one of"),
    (dict(use_bias_correction_kl=None), TypeError, "use_bias_correction_kl must be a bool"),
    (dict(importance_weights=torch.ones(B, T + 2)), ValueError, "importance_weights must have shape"),
    (dict(max_completion_length=0), ValueError, "max_completion_length must be >= 1"),
    (dict(max_completion_length=2.5), TypeError, "max_completion_length must be an int"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch must be >= 1"),
    (dict(num_items_in_batch=math.nan), ValueError, "num_items_in_batch must be finite"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch must be a number or a one-element"),
    (dict(num_items_in_batch="7"), TypeError, "num_items_in_batch must be a real number"),
    (dict(sapo_temperature_pos=0.0), ValueError, "sapo_temperature_pos must be > 0"),
    (dict(sapo_temperature_neg=math.inf), ValueError, "sapo_temperature_neg must be finite"),
    # loss variants: VESPO, GMPO, GPG, rollout importance sampling, off-policy mask, log-ratio clamp
    (dict(loss_type="vespo", importance_sampling_level="sequence"), ValueError, "importance_sampling_level must be"),
    (dict(loss_type="gmpo", importance_sampling_level="sequence"), ValueError, "importance_sampling_level must be"),
    (dict(loss_type="gpg", importance_sampling_level="sequence"), ValueError, "importance_sampling_level must be"),
    (dict(loss_type="gmpo", use_bias_correction_kl=True), ValueError, "use_bias_correction_kl is not defined"),
    (dict(loss_type="vespo", importance_weights=torch.ones(B)), ValueError, r"must have shape \[B, T\]"),
    (dict(loss_type="gpg", delta=2.0), ValueError, "delta applies to the clipped loss types"),
    (dict(vespo_k_pos=-1.0), ValueError, "vespo_k_pos must be >= 0"),
    (dict(vespo_lambda_neg=math.nan), ValueError, "vespo_lambda_neg must be finite"),
    (dict(vespo_lambda_pos="3"), TypeError, "vespo_lambda_pos must be a real number"),
    (dict(rollout_is_mode="token", sampling_logprobs=-torch.rand(B, T)), ValueError, "rollout_is_mode must be one of"),
    (dict(rollout_is_mode="token_truncate"), ValueError, "needs sampling_logprobs"),
    (dict(rollout_is_mode="token_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_min=-0.5), ValueError,
     "rollout_is_min must be >= 0"),
    (dict(rollout_is_mode="token_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_max=0.0), ValueError,
     "rollout_is_max must be > 0"),
    (dict(rollout_is_mode="token_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_max=math.inf), ValueError,
     "rollout_is_max must be finite"),
    (dict(rollout_is_mode="sequence_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_min=2.0,
          rollout_is_max=1.5), ValueError, r"rollout_is_min \(2.0\) must be less than rollout_is_max"),
    (dict(rollout_is_mode="sequence_truncate", sampling_logprobs=-torch.rand(B, T), rollout_is_max=None), ValueError,
     "set rollout_is_min or rollout_is_max"),
    (dict(rollout_is_mode="sequence_truncate", sampling_logprobs=-torch.rand(B, T), loss_type="vespo"), ValueError,
     "rollout_is_mode must be 'token_truncate' or 'token_mask'"),
    (dict(rollout_is_mode="sequence_mask", sampling_logprobs=-torch.rand(B, T), loss_type="gmpo"), ValueError,
     "rollout_is_mode must be 'token_truncate' or 'token_mask'"),
    # rollout gates (OpenRLHF's): masks only, geometric_mean at sequence level, a mode to gate
    (dict(rollout_is_mode="token_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_gate="kl"), ValueError,
     "rollout_is_gate must be one of"),
    (dict(rollout_is_gate="tv", sampling_logprobs=-torch.rand(B, T)), ValueError,
     "rollout_is_gate='tv' gates the rollout importance sampling: set rollout_is_mode"),
    (dict(rollout_is_mode="token_truncate", sampling_logprobs=-torch.rand(B, T), rollout_is_gate="binary_kl"),
     ValueError, "rollout_is_gate='binary_kl' masks, it does not truncate: .*rollout_is_mode='token_truncate'"),
    (dict(rollout_is_mode="sequence_truncate", sampling_logprobs=-torch.rand(B, T), rollout_is_gate="geometric_mean"),
     ValueError, "rollout_is_gate='geometric_mean' masks, it does not truncate"),
    (dict(rollout_is_mode="token_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_gate="geometric_mean"),
     ValueError, "'geometric_mean' is a sequence statistic .*equals the ratio"),
    (dict(rollout_is_mode="sequence_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_gate="geometric_mean",
          rollout_is_min=-0.5), ValueError, "rollout_is_min must be >= 0"),
    (dict(rollout_is_mode="token_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_gate="tv",
          rollout_is_min=0.2, rollout_is_max=0.1), ValueError, r"rollout_is_min \(0.2\) must be less than"),
    (dict(rollout_is_mode="token_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_gate="tv",
          rollout_is_max=math.inf), ValueError, "rollout_is_max must be finite"),
    (dict(rollout_is_mode="sequence_mask", sampling_logprobs=-torch.rand(B, T), rollout_is_gate="tv",
          loss_type="vespo"), ValueError, "rollout_is_mode must be 'token_truncate' or 'token_mask'"),
    (dict(sampling_logprobs=-torch.rand(B, T + 1)), ValueError, r"sampling_logprobs must have shape \[B, T\]"),
    (dict(sampling_logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "sampling_logprobs must be a floating"),
    (dict(off_policy_mask_threshold=-0.1), ValueError, "off_policy_mask_threshold must be >= 0"),
    (dict(off_policy_mask_threshold=math.inf), ValueError, "off_policy_mask_threshold must be finite"),
    (dict(log_ratio_clamp=0.0), ValueError, "log_ratio_clamp must be > 0"),
    (dict(log_ratio_clamp=math.nan), ValueError, "log_ratio_clamp must be finite"),
]


@pytest.mark.parametrize("over,error,match", LOSS_CASES, ids=[c[2][:40] for c in LOSS_CASES])
def test_grpo_loss_errors(over, error, match):
    with pytest.raises(error, match=match):
        call_loss(**over)


def test_memoized_option_checks_tell_equal_values_of_other_types_apart():
    """Options that passed pass again without a check; a value equal to a valid one but of a type the check
    refuses (1 for True, 1.0 for an int) is still checked; a failed check is not memoized."""
    call_loss(use_bias_correction_kl=True, max_completion_length=4)
    call_loss(use_bias_correction_kl=True, max_completion_length=4)  # memoized
    for over in (dict(use_bias_correction_kl=1, max_completion_length=4),
                 dict(use_bias_correction_kl=True, max_completion_length=4.0)):
        with pytest.raises(TypeError):
            call_loss(**over)
    with pytest.raises(ValueError, match="beta"):
        call_loss(beta=-1.0)
    with pytest.raises(ValueError, match="beta"):  # a failed check is not memoized
        call_loss(beta=-1.0)


FUSED_CASES = [
    (dict(logits=torch.randn(B * T, V), token_ids=torch.zeros(B * T, dtype=torch.long)), ValueError,
     r"logits must have shape \[B, T, V\]"),
    (dict(token_ids=torch.full((B, T), V)), ValueError, "token_ids must be in"),
    (dict(temperature=0), ValueError, "temperature must be > 0"),
    (dict(advantages=torch.randn(B, T + 1)), ValueError, "advantages must have shape"),
    (dict(mask=torch.ones(B, T - 1)), ValueError, "mask must have shape"),
    (dict(beta=0.1), ValueError, "needs ref_logprobs"),
    (dict(loss_type="grpo ", ), ValueError, "loss_type must be one of"),
    (dict(inplace_backward=None), TypeError, "inplace_backward must be a bool"),
    (dict(rollout_is_mode="sequence_mask"), ValueError, "needs sampling_logprobs"),
    (dict(loss_type="gpg", importance_sampling_level="sequence"), ValueError, "importance_sampling_level must be"),
]


@pytest.mark.parametrize("over,error,match", FUSED_CASES, ids=[c[2][:40] for c in FUSED_CASES])
def test_fused_grpo_loss_errors(over, error, match):
    with pytest.raises(error, match=match):
        call_fused(**over)


def test_validation_runs_before_any_computation(monkeypatch):
    """A bad input never reaches the backend."""
    from grpo_kernels import reference

    def boom(*args, **kwargs):
        raise AssertionError("backend reached")

    for name in ("token_logprobs", "grpo_loss", "fused_grpo_loss", "group_advantages"):
        monkeypatch.setattr(reference, name, boom)
    with pytest.raises(ValueError):
        gk.token_logprobs(torch.randn(3, 5), torch.tensor([0, 9, 1]))
    with pytest.raises(ValueError):
        call_loss(loss_type="nope")
    with pytest.raises(ValueError):
        call_fused(temperature=-1.0)
    with pytest.raises(ValueError):
        gk.group_advantages(torch.randn(4), group_size=3)


def test_value_checks_can_be_disabled(monkeypatch):
    monkeypatch.setenv("GRPO_KERNELS_CHECK_VALUES", "0")
    call_loss(mask=torch.full((B, T), 0.5))  # not checked: the caller opted out of the device sync
    monkeypatch.setenv("GRPO_KERNELS_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match="mask must contain only 0 and 1"):
        call_loss(mask=torch.full((B, T), 0.5))


# ----------------------------------------------------------------------------- fused linear
H = 4


def linear_inputs():
    return dict(hidden=torch.randn(B, T, H), weight=torch.randn(V, H), token_ids=torch.randint(0, V, (B, T)))


def call_linear(**over):
    kw = linear_inputs()
    kw.update(over)
    return gk.linear_token_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("token_ids"), **kw)


def call_fused_linear(**over):
    kw = dict(linear_inputs(), old_logprobs=-torch.rand(B, T), advantages=torch.randn(B),
              mask=torch.ones(B, T, dtype=torch.bool))
    kw.update(over)
    return gk.fused_linear_grpo_loss(kw.pop("hidden"), kw.pop("weight"), kw.pop("token_ids"), kw.pop("old_logprobs"),
                                     kw.pop("advantages"), kw.pop("mask"), **kw)


LINEAR_CASES = [
    (dict(hidden=[[1.0]]), TypeError, "hidden must be a torch.Tensor"),
    (dict(hidden=torch.ones(B, T, H, dtype=torch.long)), TypeError, "hidden must be a floating-point tensor"),
    (dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "weight must have the dtype of hidden"),
    (dict(bias=torch.randn(V, dtype=torch.bfloat16)), TypeError, "bias must have the dtype of hidden"),
    (dict(token_ids=torch.zeros(B, T)), TypeError, "token_ids must be an integer tensor"),
    (dict(weight=torch.randn(V * H)), ValueError, r"weight must have shape \[V, H\]"),
    (dict(weight=torch.randn(V, H + 1)), ValueError, "weight must have H = hidden.shape"),
    (dict(weight=torch.randn(0, H)), ValueError, "non-empty vocabulary"),
    (dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \[V\]"),
    (dict(token_ids=torch.zeros(B, T + 1, dtype=torch.long)), ValueError, "token_ids must have shape"),
    (dict(hidden=torch.randn(0, H), token_ids=torch.zeros(0, dtype=torch.long)), ValueError, "empty batch"),
    (dict(weight=torch.randn(V, H, device="meta")), ValueError, "weight is on meta but hidden is on cpu"),
    (dict(bias=torch.randn(V, device="meta")), ValueError, "bias is on meta but hidden is on cpu"),
    (dict(token_ids=torch.full((B, T), V)), ValueError, "token_ids must be in"),
    (dict(token_ids=torch.full((B, T), -1)), ValueError, "token_ids must be in"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite"),
    (dict(logit_scale=0.0), ValueError, "logit_scale must be > 0"),
    (dict(logit_scale=math.nan), ValueError, "logit_scale must be finite"),
    (dict(logit_scale="2"), TypeError, "logit_scale must be a real number"),
    (dict(softcap=0.0), ValueError, "softcap must be > 0"),
    (dict(softcap=-30.0), ValueError, "softcap must be > 0"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
    (dict(ignore_index=None), TypeError, "ignore_index must be an int"),
    (dict(return_entropy=1), TypeError, "return_entropy must be a bool"),
]


@pytest.mark.parametrize("over,error,match", LINEAR_CASES, ids=[c[2][:40] for c in LINEAR_CASES])
def test_linear_token_logprobs_errors(over, error, match):
    with pytest.raises(error, match=match):
        call_linear(**over)


FUSED_LINEAR_CASES = [
    (dict(hidden=torch.randn(B * T, H), token_ids=torch.zeros(B * T, dtype=torch.long)), ValueError,
     r"hidden must have shape \[B, T, H\]"),
    (dict(weight=torch.randn(V, H + 1)), ValueError, "weight must have H = hidden.shape"),
    (dict(softcap=0), ValueError, "softcap must be > 0"),
    (dict(chunk_size=-3), ValueError, "chunk_size must be >= 1"),
    (dict(advantages=torch.randn(B + 1)), ValueError, "advantages must have shape"),
    (dict(mask=torch.ones(B, T - 1)), ValueError, "mask must have shape"),
    (dict(old_logprobs=torch.randn(B, T).long()), TypeError, "old_logprobs must be a floating-point tensor"),
    (dict(beta=0.1), ValueError, "needs ref_logprobs"),
    (dict(loss_type="ppo"), ValueError, "loss_type must be one of"),
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level must be one of"),
    (dict(delta=2.0, loss_type="cispo"), ValueError, "delta applies to the clipped loss types"),
]


@pytest.mark.parametrize("over,error,match", FUSED_LINEAR_CASES, ids=[c[2][:40] for c in FUSED_LINEAR_CASES])
def test_fused_linear_grpo_loss_errors(over, error, match):
    with pytest.raises(error, match=match):
        call_fused_linear(**over)


def test_fused_linear_validation_runs_before_any_computation(monkeypatch):
    from grpo_kernels import linear, reference

    def boom(*args, **kwargs):
        raise AssertionError("computation reached")

    for module in (linear, reference):
        monkeypatch.setattr(module, "linear_token_logprobs", boom)
        monkeypatch.setattr(module, "fused_linear_grpo_loss", boom)
    for backend in gk.available_backends("fused_linear_grpo_loss"):
        with pytest.raises(ValueError, match="softcap"):
            call_linear(softcap=-1.0, backend=backend)
        with pytest.raises(ValueError, match="token_ids must be in"):
            call_fused_linear(token_ids=torch.full((B, T), V), backend=backend)


# Tensor options a valid call of the same options keeps (present, valid), the others left at their defaults.
_VALID_TENSOR_OPTIONS = dict(ref_logprobs=lambda: -torch.rand(B, T), sampling_logprobs=lambda: -torch.rand(B, T),
                             importance_weights=lambda: torch.ones(B, T))


@pytest.mark.parametrize("over,error,match", LOSS_CASES, ids=[c[2][:40] for c in LOSS_CASES])
def test_grpo_loss_errors_after_the_same_options_passed(over, error, match):
    """A call whose options passed validation before takes the cpu backend's own tensor checks (in C++): every
    bad tensor still raises validation's error, before any kernel."""
    twin = {name: (_VALID_TENSOR_OPTIONS[name]() if isinstance(value, torch.Tensor) else value)
            for name, value in over.items() if name not in ("logprobs", "old_logprobs", "advantages", "mask")
            and not (name == "num_items_in_batch" and isinstance(value, torch.Tensor))}
    try:
        call_loss(**twin)  # the same options with valid tensors: their key passes when the options are valid
    except (ValueError, TypeError):
        pass
    with pytest.raises(error, match=match):
        call_loss(**over)


@pytest.mark.parametrize("named", ["auto", "cpu"])
def test_bad_values_raise_after_the_same_options_passed(named):
    """The value checks too: a non-binary mask, a non-finite advantage that counts (not one that is masked)."""
    if named == "cpu" and "cpu" not in gk.available_backends("grpo_loss"):
        pytest.skip("the cpu backend is not built")
    call_loss(backend=named, beta=0.02, ref_logprobs=-torch.rand(B, T))
    call_loss(backend=named, beta=0.02, ref_logprobs=-torch.rand(B, T), advantages=torch.tensor([math.nan, 1.0]),
              mask=torch.tensor([[False] * T, [True] * T]))  # masked out: passes
    for over, match in ((dict(mask=torch.full((B, T), 2.0)), "mask must contain only 0 and 1"),
                        (dict(advantages=torch.tensor([1.0, math.inf])), "advantages must be finite"),
                        (dict(advantages=torch.full((B, T), math.nan)), "advantages must be finite")):
        with pytest.raises(ValueError, match=match):
            call_loss(backend=named, beta=0.02, ref_logprobs=-torch.rand(B, T), **over)


def test_option_keys_key_tensors_by_presence_and_values_by_type():
    """One key for what is derived from the options alone (validation's verdict, the kernels' setup): a tensor
    option by its presence, a value with its type; a tensor num_items_in_batch has no call key (its value is
    checked at each call), and an option of another type no key at all."""
    options = dict(LOSS_DEFAULTS, beta=0.04, ref_logprobs=-torch.rand(B, T))
    key = validation.loss_options_key(options)
    assert key is not None and key == validation.grpo_loss_call_key(options)
    assert validation.loss_options_key(dict(options, ref_logprobs=torch.zeros(B, T))) == key
    assert validation.loss_options_key(dict(options, ref_logprobs=None)) != key
    assert validation.loss_options_key(dict(options, beta=1)) != validation.loss_options_key(dict(options, beta=1.0))
    assert validation.loss_options_key(dict(options, ref_logprobs=True)) is None  # not a tensor: no key
    assert validation.loss_options_key(dict(options, beta=[0.04])) is None
    counted = dict(options, num_items_in_batch=torch.tensor(7.0))
    assert validation.loss_options_key(counted) is not None and validation.grpo_loss_call_key(counted) is None
    assert validation.grpo_loss_call_key(dict(options, num_items_in_batch=7)) is not None

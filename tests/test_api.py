"""Public API surface: backends and their selection, GRPOLoss, exports."""

import types

import pytest
import torch

import grpo_kernels as gk


def test_exports():
    for name in ("token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss", "GRPOLoss",
                 "GRPOLossOutput", "available_backends", "BackendUnavailableError", "__version__"):
        assert hasattr(gk, name), name
    assert set(gk.__all__) <= set(dir(gk))


def test_available_backends():
    names = gk.available_backends()
    assert names[0] == "reference"
    assert set(names) <= {"reference", "triton", "cpu", "cuda"}
    for op in ("token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss"):
        assert "reference" in gk.available_backends(op)
        assert set(gk.available_backends(op)) <= set(names)
    with pytest.raises(ValueError, match="op must be one of"):
        gk.available_backends("softmax")


CALLS = {
    "token_logprobs": lambda b: gk.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), backend=b),
    "group_advantages": lambda b: gk.group_advantages(torch.randn(4), group_size=2, backend=b),
    "grpo_loss": lambda b: gk.grpo_loss(-torch.rand(2, 3), None, torch.randn(2), torch.ones(2, 3), backend=b),
    "fused_grpo_loss": lambda b: gk.fused_grpo_loss(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
                                                    None, torch.randn(2), torch.ones(2, 3), backend=b),
}


@pytest.mark.parametrize("name", ["triton", "cpu", "cuda"])
@pytest.mark.parametrize("op", list(CALLS))
def test_unavailable_backend_raises_clearly(name, op):
    if name in gk.available_backends(op):
        pytest.skip(f"{name} implements {op} here")
    if name in gk.available_backends():
        match = f"backend '{name}' does not implement {op} yet"
    else:
        match = f"backend '{name}'.*not available.*available: "
    with pytest.raises(gk.BackendUnavailableError, match=match):
        CALLS[op](name)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from grpo_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(gk.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backends._check_device("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends._check_device("triton", torch.device("cpu"))


def test_env_overrides_auto(monkeypatch):
    logits, ids = torch.randn(2, 3), torch.tensor([0, 1])
    monkeypatch.setenv("GRPO_KERNELS_BACKEND", "reference")
    gk.token_logprobs(logits, ids)
    monkeypatch.setenv("GRPO_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="GRPO_KERNELS_BACKEND must be"):
        gk.token_logprobs(logits, ids)
    # an explicit backend wins over the environment
    gk.token_logprobs(logits, ids, backend="reference")


def test_auto_remembers_only_a_choice_made_without_an_on_device_check(monkeypatch):
    """"auto" chooses once per device and op where no on-device check took part (a per-call saving), again after
    its preference list changed, and on every call where a check did (a later verdict may differ)."""
    from grpo_kernels import backends
    from grpo_kernels.backends import Trust

    monkeypatch.delenv("GRPO_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_AUTO_CHOSEN", {})
    cpu, op = torch.device("cpu"), "grpo_loss"
    chosen = backends.resolve_backend("auto", cpu, op)
    assert chosen == ("cpu" if "cpu" in gk.available_backends(op) else "reference")
    original = backends._auto

    def choose_again(device, op):
        calls.append(op)
        return original(device, op)

    calls = []
    monkeypatch.setattr(backends, "_auto", choose_again)
    assert backends.resolve_backend("auto", cpu, op) == chosen and calls == []
    monkeypatch.setitem(backends._AUTO_PREFERENCE, "cpu", (("reference", Trust.TESTED),))
    assert [backends.resolve_backend("auto", cpu, op) for _ in range(2)] == ["reference"] * 2 and calls == [op]

    verdicts = iter([False, True])
    monkeypatch.setattr(backends, "_device_check", lambda backend, op, device: next(verdicts))
    monkeypatch.setitem(backends._AUTO_PREFERENCE, "cpu",
                        (("triton", Trust.VALIDATE_ON_DEVICE), ("reference", Trust.TESTED)))
    if "triton" not in gk.available_backends(op):
        pytest.skip("needs the triton package (the candidate that asks the check)")
    assert backends.resolve_backend("auto", cpu, op) == "reference"  # the check said no: not remembered
    assert backends.resolve_backend("auto", cpu, op) == "triton"


def test_auto_calls_the_selected_backend(monkeypatch):
    from grpo_kernels import backends

    calls = []
    module = backends._module(backends.resolve_backend("auto", torch.device("cpu")))
    original = module.token_logprobs

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "token_logprobs", spy)
    gk.token_logprobs(torch.randn(2, 3), torch.tensor([0, 1]), temperature=2)
    assert calls == [dict(temperature=2.0, ignore_index=-100, return_entropy=False, inplace_backward=False)]


def test_loss_output_is_a_named_tuple_of_tensors():
    out = gk.grpo_loss(-torch.rand(2, 3), None, torch.randn(2), torch.ones(2, 3))
    assert isinstance(out, gk.GRPOLossOutput) and isinstance(out, tuple)
    for name in ("loss", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"):
        value = getattr(out, name)
        assert isinstance(value, torch.Tensor) and value.ndim == 0
    assert out.kl is None and out.entropy is None


# ----------------------------------------------------------------------------- GRPOLoss
def inputs():
    logp = -torch.rand(3, 4, dtype=torch.float64)
    return logp, logp + 0.1, torch.randn(3, dtype=torch.float64), torch.ones(3, 4), logp - 0.2


def test_module_matches_function():
    logp, old, adv, mask, ref = inputs()
    fn = gk.GRPOLoss(loss_type="grpo", beta=0.04, epsilon_high=0.28)
    a = fn(logp, old, adv, mask, ref_logprobs=ref)
    b = gk.grpo_loss(logp, old, adv, mask, ref_logprobs=ref, loss_type="grpo", beta=0.04, epsilon_high=0.28)
    for x, y in zip(a, b):
        if x is not None:
            torch.testing.assert_close(x, y)
    assert "beta=0.04" in repr(fn)


def test_module_from_logits_uses_temperature():
    logits = torch.randn(3, 4, 7, dtype=torch.float64)
    ids = torch.randint(0, 7, (3, 4))
    _, old, adv, mask, _ = inputs()
    fn = gk.GRPOLoss(temperature=0.7, loss_type="bnpo")
    a = fn.from_logits(logits, ids, old, adv, mask, return_entropy=True)
    b = gk.fused_grpo_loss(logits, ids, old, adv, mask, temperature=0.7, loss_type="bnpo", return_entropy=True)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(a.entropy, b.entropy)


def test_module_validates_at_construction():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        gk.GRPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        gk.GRPOLoss(temperature=0.0)
    with pytest.raises(TypeError, match="unknown options.*'epsilon'"):
        gk.GRPOLoss(epsilon=0.2)
    with pytest.raises(TypeError, match="unknown options.*'ref_logprobs'"):
        gk.GRPOLoss(ref_logprobs=torch.zeros(1))


def test_module_from_trl_config():
    config = types.SimpleNamespace(
        beta=0.04, epsilon=0.1, epsilon_high=0.28, loss_type="dr_grpo", importance_sampling_level="sequence",
        use_bias_correction_kl=True, max_completion_length=16, sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05, delta=2.0, temperature=0.9, off_policy_mask_threshold=0.5, vespo_k_pos=1.5,
    )
    fn = gk.GRPOLoss.from_trl_config(config)
    assert fn.temperature == 0.9
    assert fn.options == dict(
        beta=0.04, epsilon_low=0.1, epsilon_high=0.28, loss_type="dr_grpo", importance_sampling_level="sequence",
        use_bias_correction_kl=True, max_completion_length=16, sapo_temperature_pos=1.0,
        sapo_temperature_neg=1.05, delta=2.0, off_policy_mask_threshold=0.5, vespo_k_pos=1.5, vespo_lambda_pos=3.0,
        vespo_k_neg=3.0, vespo_lambda_neg=2.0,
    )
    # TRL ignores delta for cispo; so does the conversion
    config.loss_type = "cispo"
    assert "delta" not in gk.GRPOLoss.from_trl_config(config).options

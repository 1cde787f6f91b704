"""Every public op takes the spec's options, with the spec's defaults.

The 25 loss options are written out on purpose in ``grpo_kernels.ops`` (so
users see them in their editor); these tests keep every copy equal to
``grpo_kernels.reference`` and the loss table, so none can drift.
"""

import inspect

import pytest

import grpo_kernels as gk
from grpo_kernels import kernel_options, loss_table, ops, reference, validation

# Keyword options of the public ops that the spec has no counterpart of: where the op runs and how it scales out.
PUBLIC_ONLY = {"backend", "batch_group", "cu_seqlens", "vocab_group", "process_group"}


def keyword_options(fn) -> dict:
    """name -> default of ``fn``'s keyword-only parameters (an overloaded op: its implementation's)."""
    params = inspect.signature(inspect.unwrap(fn)).parameters
    return {name: p.default for name, p in params.items() if p.kind is p.KEYWORD_ONLY}


def positional(fn) -> list:
    params = inspect.signature(inspect.unwrap(fn)).parameters
    return [name for name, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def spec_options(op: str) -> dict:
    """The spec's keyword options of ``op``; the fused losses take the loss options of ``reference.grpo_loss``."""
    options = {k: v for k, v in keyword_options(getattr(reference, op)).items()}
    if op in ("fused_grpo_loss", "fused_linear_grpo_loss"):
        options.update(kernel_options.LOSS_DEFAULTS)
    return options


@pytest.mark.parametrize("op", ["token_logprobs", "group_advantages", "grpo_loss", "fused_grpo_loss",
                                "linear_token_logprobs", "fused_linear_grpo_loss"])
def test_public_op_options_equal_the_spec(op):
    public = keyword_options(getattr(ops, op))
    spec = spec_options(op)
    assert positional(getattr(ops, op)) == positional(getattr(reference, op))
    extra = set(public) - set(spec)
    assert extra <= PUBLIC_ONLY, f"ops.{op} has options the spec lacks: {sorted(extra - PUBLIC_ONLY)}"
    missing = set(spec) - set(public)
    assert not missing, f"ops.{op} lacks the spec's options {sorted(missing)}"
    for name, default in spec.items():
        assert public[name] == default or (public[name] is None and default is None), \
            f"ops.{op}({name}=...) defaults to {public[name]!r}, the spec to {default!r}"
    assert getattr(gk, op) is getattr(ops, op)


def test_loss_defaults_are_the_spec():
    spec = keyword_options(reference.grpo_loss)
    assert kernel_options.LOSS_DEFAULTS == spec
    assert spec["loss_type"] in loss_table.LOSS_TYPES
    assert spec["kl_estimator"] in loss_table.KL_ESTIMATORS
    assert spec["rollout_is_mode"] in loss_table.ROLLOUT_IS_MODES
    assert spec["importance_sampling_level"] in loss_table.IMPORTANCE_SAMPLING_LEVELS


def test_validation_checks_every_scalar_option():
    """check_loss_options takes every loss option that is not a tensor or a count of items."""
    checked = set(inspect.signature(validation.check_loss_options).parameters)
    tensors = {"ref_logprobs", "importance_weights", "sampling_logprobs", "num_items_in_batch"}
    assert checked == set(kernel_options.LOSS_DEFAULTS) - tensors


def test_kernel_scalars_are_formed_from_spec_options():
    """Every kernel scalar is formed from the spec's options (defaults included), in SCALAR_NAMES order."""
    assert loss_table.SCALAR_NAMES == tuple(s.name for s in loss_table.KERNEL_SCALARS)
    assert len(set(loss_table.SCALAR_NAMES)) == len(loss_table.SCALAR_NAMES)
    values = [s.value(kernel_options.LOSS_DEFAULTS) for s in loss_table.KERNEL_SCALARS]
    assert all(isinstance(v, float) for v in values)
    import torch

    cfg = kernel_options.kernel_loss_options(4, torch.zeros(2), {})
    assert cfg.scalars._fields == loss_table.SCALAR_NAMES
    assert tuple(cfg.scalars) == tuple(values)


def test_module_takes_the_spec_options():
    """GRPOLoss holds every option but the per-call ones (tensors, the batch's token count)."""
    from grpo_kernels.validation import PER_CALL_OPTIONS

    assert set(PER_CALL_OPTIONS) <= set(kernel_options.LOSS_DEFAULTS)
    held = {k: v for k, v in kernel_options.LOSS_DEFAULTS.items() if k not in PER_CALL_OPTIONS}
    module = gk.GRPOLoss(**held)
    assert isinstance(module, gk.GRPOLoss)
    with pytest.raises(TypeError):
        gk.GRPOLoss(not_an_option=1)


def test_trl_options_are_spec_options():
    pytest.importorskip("trl")
    from grpo_kernels.integrations import trl_loss

    class Args:
        delta = None
        use_bias_correction_kl = False
        sapo_temperature_pos, sapo_temperature_neg = 1.0, 1.05
        vespo_k_pos = vespo_lambda_pos = vespo_k_neg = vespo_lambda_neg = 1.0

    for row in loss_table.LOSS_TYPE_TABLE.values():
        if row.trl_name is None:
            continue
        trainer = type("Trainer", (), dict(args=Args, loss_type=row.trl_name, beta=0.0, epsilon_low=0.2,
                                           epsilon_high=0.2, importance_sampling_level="token",
                                           max_completion_length=8, off_policy_mask_threshold=None))
        assert set(trl_loss.loss_options(trainer)) <= set(kernel_options.LOSS_DEFAULTS)


"""The Triton launch-knob overrides (grpo_kernels/triton/tuning.py) that benchmarks/tune.py sweeps.

Under the interpreter on CPU: an override reaches the kernel launch (the
launched BLOCK_V / num_warps are recorded), results stay those of the
reference, and the overrides are restored after the block.
"""

import importlib
import os

import pytest
import torch

import grpo_kernels as gk

pytestmark = pytest.mark.skipif(
    "triton" not in gk.available_backends("token_logprobs") or os.environ.get("TRITON_INTERPRET", "0") != "1",
    reason="needs the Triton backend under the interpreter (CPU tensors)",
)


def _modules():
    names = ("tuning", "token_logprobs", "fused_grpo_loss", "linear_logprobs")
    return [importlib.import_module(f"grpo_kernels.triton.{name}") for name in names]


class _Spy:
    """Stands in for a @triton.jit kernel: records each launch's keyword arguments, then launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_parse_and_format_round_trip():
    tuning, *_ = _modules()
    text = "fused_grpo_loss.programs_per_sm=2, token_logprobs.fwd.max_block_v=4096,linear.num_stages=3"
    values = tuning.parse(text)
    assert values == {"fused_grpo_loss.programs_per_sm": 2, "token_logprobs.fwd.max_block_v": 4096,
                      "linear.num_stages": 3}
    assert tuning.parse(tuning.format_overrides(values)) == values
    assert tuning.parse("") == {}


@pytest.mark.parametrize("text, message", [
    ("fused_grpo_loss.programs_per_SM=2", "unknown Triton tuning knob"),
    ("linear.block_n", "expected name=value"),
    ("linear.block_n=0", "positive integer"),
    ("linear.num_stages=two", "positive integer"),
    ("token_logprobs.bwd.num_warps=6", "power of two"),
])
def test_bad_overrides_raise_naming_the_variable(text, message):
    tuning, *_ = _modules()
    with pytest.raises(ValueError, match=message) as error:
        tuning.parse(text)
    assert tuning.ENV in str(error.value)
    if "=" in text:  # the context manager checks the same way
        with pytest.raises(ValueError, match=message):
            with tuning.overrides(dict([text.split("=")])):
                pass
    assert tuning.active() == {}


def test_environment_variable_sets_overrides_at_import(monkeypatch):
    tuning, tl_mod, *_ = _modules()
    monkeypatch.setenv(tuning.ENV, "token_logprobs.fwd.num_warps=2")
    try:
        importlib.reload(tuning)
        assert tuning.active() == {"token_logprobs.fwd.num_warps": 2}
        assert tl_mod.launch_config(151_936, torch.bfloat16) == (8192, 2)  # the kernels read the reloaded table
    finally:
        monkeypatch.delenv(tuning.ENV)
        importlib.reload(tuning)
    assert tuning.active() == {} and tl_mod.launch_config(151_936, torch.bfloat16) == (8192, 16)


def test_every_knob_changes_a_launch_parameter():
    tuning, tl_mod, _, lin = _modules()
    seen = set()
    for kernel in ("token_logprobs.fwd", "token_logprobs.bwd", "fused_grpo_loss"):
        knobs = {f"{kernel}.max_block_v": 256, f"{kernel}.num_warps": 2}
        with tuning.overrides(knobs):
            assert tl_mod.launch_config(151_936, torch.bfloat16, kernel=kernel) == (256, 2)
            other = "token_logprobs.bwd" if kernel != "token_logprobs.bwd" else "token_logprobs.fwd"
            assert tl_mod.launch_config(151_936, torch.bfloat16, kernel=other) == (8192, 16)
        seen |= set(knobs)
    tile = {f"linear.{name}": 2 ** (i + 1) for i, name in enumerate(lin.TileConfig._fields)}
    with tuning.overrides(tile):
        assert lin.tile_config(torch.bfloat16, torch.device("cpu")) == lin.TileConfig(2, 4, 8, 16, 32)
    seen |= set(tile)
    # Knobs of the GPU grids: read where the grid is sized (CUDA only, so checked in the source).
    for name, module in (("fused_grpo_loss.programs_per_sm", "fused_grpo_loss"),
                         ("linear.programs_per_sm", "linear_logprobs"), ("linear.min_splits", "linear_logprobs")):
        source = open(importlib.import_module(f"grpo_kernels.triton.{module}").__file__).read()
        assert f'knob("{name}"' in source
        seen.add(name)
    assert seen == set(tuning.KNOBS)


def test_overrides_reach_the_launches_and_keep_results(monkeypatch):
    tuning, tl_mod, fused_mod, _ = _modules()
    fwd = _Spy(tl_mod._token_logprobs_fwd_kernel)
    bwd = _Spy(tl_mod._token_logprobs_bwd_kernel)
    fused = _Spy(fused_mod._fused_grpo_loss_kernel)
    monkeypatch.setattr(tl_mod, "_token_logprobs_fwd_kernel", fwd)
    monkeypatch.setattr(tl_mod, "_token_logprobs_bwd_kernel", bwd)
    monkeypatch.setattr(fused_mod, "_fused_grpo_loss_kernel", fused)
    B, T, V = 2, 3, 70
    logits = torch.randn(B, T, V, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (B, T))
    old, adv, mask = -torch.rand(B, T, dtype=torch.float64), torch.randn(B, dtype=torch.float64), torch.ones(B, T)
    knobs = {"token_logprobs.fwd.max_block_v": 16, "token_logprobs.fwd.num_warps": 2,
             "token_logprobs.bwd.max_block_v": 32, "token_logprobs.bwd.num_warps": 1,
             "fused_grpo_loss.max_block_v": 64, "fused_grpo_loss.num_warps": 4}
    with tuning.overrides(knobs):
        logp = gk.token_logprobs(logits, ids, backend="triton")
        (grad,) = torch.autograd.grad(logp.sum(), logits)
        loss = gk.fused_grpo_loss(logits, ids, old, adv, mask, backend="triton").loss
        (fused_grad,) = torch.autograd.grad(loss, logits)
    assert tuning.active() == {}
    assert [(k["BLOCK_V"], k["num_warps"]) for k in fwd.launches] == [(16, 2)]
    assert [(k["BLOCK_V"], k["num_warps"]) for k in bwd.launches] == [(32, 1)]
    assert [(k["BLOCK_V"], k["num_warps"]) for k in fused.launches] == [(64, 4)]
    ref_logp = gk.token_logprobs(logits, ids, backend="reference")
    (ref_grad,) = torch.autograd.grad(ref_logp.sum(), logits)
    ref_loss = gk.fused_grpo_loss(logits, ids, old, adv, mask, backend="reference").loss
    (ref_fused_grad,) = torch.autograd.grad(ref_loss, logits)
    for got, want in ((logp, ref_logp), (grad, ref_grad), (loss, ref_loss), (fused_grad, ref_fused_grad)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)

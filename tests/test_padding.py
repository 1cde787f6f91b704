"""The padding rules and the hardening of issue 17, per backend: ignore_index under mask 1 counts as masked
(fused, fused-linear, packed), garbage where nothing counts changes nothing, clear errors for bad values,
the C++ kernels' own checks (ids in range with value checks off, auxiliary tensor sizes, option codes),
layouts the kernels copy (a strided vocabulary dim), and the warning of a broken extension."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import reference
from grpo_kernels._extension import _C

OP = "fused_grpo_loss"
IGNORE = -100


def _inputs(B=2, T=4, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3] = False
    return logits, ids, old, adv, mask


def _loss_and_grad(fn, x):
    x = x.clone().requires_grad_()
    out = fn(x)
    (grad,) = torch.autograd.grad(out.loss, x)
    return out, grad


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_ignore_index_under_mask_one_counts_as_masked(backend, level):
    """An id equal to ignore_index where the mask is 1: the same as mask 0 there (fused and packed), with
    whatever logits that row holds."""
    logits, ids, old, adv, mask = _inputs()
    ids[0, 1] = IGNORE  # mask 1 there
    opts = dict(importance_sampling_level=level, loss_type="grpo", backend=backend)
    poisoned = logits.clone()
    poisoned[0, 1] = math.nan
    out, grad = _loss_and_grad(lambda x: gk.fused_grpo_loss(x, ids, old, adv, mask, **opts), poisoned)
    masked = mask.clone()
    masked[0, 1] = False
    ids_valid = ids.clone()
    ids_valid[0, 1] = 0
    expected, expected_grad = _loss_and_grad(
        lambda x: gk.fused_grpo_loss(x, ids_valid, old, adv, masked, backend="reference",
                                     importance_sampling_level=level, loss_type="grpo"), logits)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(grad, expected_grad)
    assert bool((grad[0, 1] == 0).all()) and out.per_token_loss[0, 1] == 0
    # packed: the same rule
    cu = torch.tensor([0, 4, 8])
    packed, packed_grad = _loss_and_grad(
        lambda x: gk.fused_grpo_loss(x.reshape(8, -1), ids.reshape(8), old.reshape(8), adv, mask.reshape(8),
                                     cu_seqlens=cu, **opts), poisoned)
    torch.testing.assert_close(packed.loss, expected.loss)
    torch.testing.assert_close(packed_grad, expected_grad)


def test_ignore_index_under_mask_one_fused_linear(backend):
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 3, 5, 9
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    old, adv, mask = -torch.rand(B, T, generator=g, dtype=torch.float64), torch.randn(B, dtype=torch.float64), \
        torch.ones(B, T)
    ids[1, 0] = IGNORE
    out = gk.fused_linear_grpo_loss(hidden, weight, ids, old, adv, mask, chunk_size=2, backend=backend)
    masked = mask.clone()
    masked[1, 0] = 0
    ids_valid = ids.clone()
    ids_valid[1, 0] = 3
    expected = gk.fused_linear_grpo_loss(hidden, weight, ids_valid, old, adv, masked, backend="reference")
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.per_token_loss[1, 0] == 0


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e30])
def test_garbage_where_nothing_counts(backend, value):
    """NaN/±inf/huge values at masked positions of every input, and in the advantage of a fully masked
    sequence: the loss, metrics and gradient of finite padding, a zero gradient there."""
    logits, ids, old, adv, mask = _inputs(B=3)
    mask[2] = False
    ref = old + 0.1
    iw = torch.rand(3, 4, dtype=torch.float64) + 0.5
    opts = dict(ref_logprobs=ref, beta=0.1, importance_weights=iw, loss_type="grpo", return_entropy=True,
                backend=backend)
    clean, clean_grad = _loss_and_grad(lambda x: gk.fused_grpo_loss(x, ids, old, adv, mask, **opts), logits)
    bad = ~mask[..., None].expand_as(logits)
    dirty_logits = logits.masked_fill(bad, value)
    fill = ~mask
    dirty = dict(opts, ref_logprobs=ref.masked_fill(fill, value), importance_weights=iw.masked_fill(fill, value))
    adv_dirty = adv.clone()
    adv_dirty[2] = value
    out, grad = _loss_and_grad(
        lambda x: gk.fused_grpo_loss(x, ids, old.masked_fill(fill, value), adv_dirty, mask, **dirty), dirty_logits)
    for a, b in zip(out, clean):
        assert torch.equal(a, b)
    assert torch.equal(grad, clean_grad) and bool((grad[bad] == 0).all())


def test_nonfinite_logit_that_counts_propagates(backend):
    logits, ids, old, adv, mask = _inputs()
    logits[0, 0, 3] = math.nan
    out = gk.fused_grpo_loss(logits, ids, old, adv, mask, backend=backend)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_advantages_that_count_are_refused(value):
    logits, ids, old, adv, mask = _inputs()
    bad = adv.clone()
    bad[0] = value
    with pytest.raises(ValueError, match="advantages must be finite where the mask is 1"):
        gk.fused_grpo_loss(logits, ids, old, bad, mask)
    with pytest.raises(ValueError, match="advantages must be finite"):
        gk.grpo_loss(old, None, bad, mask)
    per_token = adv[:, None].expand(2, 4).clone()
    per_token[1, 3] = value  # masked: fine
    gk.grpo_loss(old, None, per_token, mask)
    per_token[1, 2] = value
    with pytest.raises(ValueError, match="advantages must be finite"):
        gk.grpo_loss(old, None, per_token, mask)
    with pytest.raises(ValueError, match="advantages must be finite"):  # packed, per sequence
        gk.grpo_loss(old.reshape(8), None, bad, mask.reshape(8), cu_seqlens=torch.tensor([0, 4, 8]))


def test_num_items_in_batch_at_least_one():
    logits, ids, old, adv, mask = _inputs()
    for n in (0, 0.5, torch.tensor(0.0)):
        with pytest.raises(ValueError, match="num_items_in_batch must be >= 1"):
            gk.fused_grpo_loss(logits, ids, old, adv, mask, num_items_in_batch=n)


def test_strided_vocabulary_dim(backend):
    logits, ids, old, adv, mask = _inputs()
    strided = logits.transpose(1, 2).contiguous().transpose(1, 2)
    assert strided.stride(-1) != 1
    a, grad_a = _loss_and_grad(lambda x: gk.fused_grpo_loss(x, ids, old, adv, mask, backend=backend), strided)
    b, grad_b = _loss_and_grad(lambda x: gk.fused_grpo_loss(x, ids, old, adv, mask, backend="reference"), logits)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(grad_a, grad_b)
    logp = gk.token_logprobs(strided[0], ids[0].to(torch.int32), backend=backend)
    torch.testing.assert_close(logp, reference.token_logprobs(logits[0], ids[0]))


# --------------------------------------------------------------------------- #
# the C++ kernels' own checks
# --------------------------------------------------------------------------- #
needs_ext = pytest.mark.skipif(_C is None, reason="the compiled extension is not built")


@needs_ext
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cpu_kernels_check_ids_with_value_checks_off(monkeypatch, level):
    monkeypatch.setenv("GRPO_KERNELS_CHECK_VALUES", "0")
    logits, ids, old, adv, mask = _inputs()
    for bad in (11, -1, 10**12):
        ids_bad = ids.clone()
        ids_bad[1, 2] = bad
        with pytest.raises(RuntimeError, match=r"token_ids must be in \[0, V\) = \[0, 11\).*found"):
            gk.token_logprobs(logits, ids_bad, backend="cpu")
        with pytest.raises(RuntimeError, match=r"token_ids must be in \[0, V\)"):
            gk.fused_grpo_loss(logits.clone().requires_grad_(), ids_bad, old, adv, mask, backend="cpu",
                               importance_sampling_level=level)


@needs_ext
def test_cpu_kernels_check_ids_under_compile():
    logits, ids, old, adv, mask = _inputs()
    ids[0, 0] = 11

    def loss(x):
        return gk.fused_grpo_loss(x, ids, old, adv, mask, backend="cpu").loss

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"token_ids must be in \[0, V\)"):
        torch.compile(loss, backend="aot_eager", fullgraph=True)(logits)
    torch._dynamo.reset()


@needs_ext
def test_cpu_entry_points_check_auxiliary_tensors():
    B, T, V = 2, 3, 5
    logits = torch.randn(B * T, V)
    ids = torch.zeros(B * T, dtype=torch.long)
    logp, lse, _ = _C.token_logprobs_fwd(logits, ids, 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="token_ids must have one id per row"):
        _C.token_logprobs_fwd(logits, ids[:-1], 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="token_ids must be an integer tensor"):
        _C.token_logprobs_fwd(logits, ids.float(), 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="lse must have 6 values"):
        _C.token_logprobs_bwd(logits, ids, lse[:-1], logp, None, None, 1.0, IGNORE, False)
    with pytest.raises(RuntimeError, match="grad_logp must have 6 values"):
        _C.token_logprobs_bwd(logits, ids, lse, logp[:2], None, None, 1.0, IGNORE, False)
    cfg = _C.LossConfig([0.0] * _C.NUM_LOSS_SCALARS)
    lp = torch.randn(B, T)
    adv, m = torch.randn(B, T), torch.ones(B, T)
    _, partials = _C.grpo_loss_fwd(lp, None, None, adv, m, None, None, cfg)
    with pytest.raises(RuntimeError, match="partials must be"):
        _C.grpo_loss_bwd(lp, None, None, adv, m, None, None, partials[:, :1], torch.ones(B), cfg)
    with pytest.raises(RuntimeError, match="seq_grad must have 2 values"):
        _C.grpo_loss_bwd(lp, None, None, adv, m, None, None, partials, torch.ones(B + 1), cfg)
    with pytest.raises(RuntimeError, match=r"adv must be a \[2, 3\] view"):
        _C.grpo_loss_fwd(lp, None, None, adv[:, :2], m, None, None, cfg)
    with pytest.raises(RuntimeError, match="old_logp must be in the compute dtype"):
        _C.grpo_loss_fwd(lp, lp.double(), None, adv, m, None, None, cfg)
    with pytest.raises(RuntimeError, match=r"ref_logp must be a \[2, 3\] view"):
        _C.fused_grpo_loss_fwd(logits.view(B, T, V), ids.view(B, T), None, lp[:1], adv, m, None, None,
                               torch.ones(B), cfg, 1.0, IGNORE, False, True, False)
    with pytest.raises(RuntimeError, match="offsets must run from 0 to B"):
        _C.group_normalize(torch.randn(4, 1), None, torch.tensor([0, 2, 5]), None, 1e-4, 0, False)
    with pytest.raises(RuntimeError, match="order values must be in"):
        _C.group_normalize(torch.randn(4, 1), torch.tensor([0, 1, 2, 9]), torch.tensor([0, 4]), None, 1e-4, 0, False)
    for field, value in (("family", 6), ("kl_estimator", 4), ("rollout_is", 3)):
        with pytest.raises(ValueError, match="unknown"):  # the binding checks the codes (the entry points again)
            setattr(cfg, field, value)
    with pytest.raises(RuntimeError, match="unknown scale"):
        _C.group_normalize(torch.randn(4, 1), None, torch.tensor([0, 4]), None, 1e-4, 7, False)


def test_unknown_options_raise_in_the_python_layers():
    from grpo_kernels import aggregation, kernel_options

    logp = -torch.rand(2, 3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        reference.grpo_loss(logp, None, torch.randn(2), torch.ones(2, 3), loss_type="dapo2")
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        reference.kl_estimate(logp, logp, "k4")
    with pytest.raises(ValueError, match="rollout_is_mode must be one of"):
        reference.rollout_importance_ratio(logp, logp, torch.ones(2, 3), "token", None, 2.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregation.sequence_weights(torch.ones(2), "luspo2", 3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        aggregation.aggregate(torch.zeros(aggregation.NUM_PARTIALS, 2), "x", 3, has_ref=False, per_seq_metrics=False)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        kernel_options.kernel_loss_options(3, torch.randn(2), dict(loss_type="nope"))


def test_a_broken_extension_warns(tmp_path):
    """A grpo_kernels/_C*.so that fails to import: one warning naming the error, the package still works."""
    package = Path(gk.__file__).parent
    copy = tmp_path / "grpo_kernels"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (copy / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not a shared object")
    code = ("import warnings; warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    import grpo_kernels\n"
            "print(grpo_kernels.extension_available(), [str(x.message) for x in w])\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("False"), result.stdout
    assert "exists but failed to import" in result.stdout and "ImportError" in result.stdout, result.stdout


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_packed_garbage_where_nothing_counts(backend, level):
    """Packed sequences (cu_seqlens): NaN logits and log-probs at masked tokens change nothing."""
    logits, ids, old, adv, mask = _inputs()
    cu = torch.tensor([0, 4, 8])
    flat = dict(ids=ids.reshape(8), old=old.reshape(8), mask=mask.reshape(8))
    opts = dict(cu_seqlens=cu, loss_type="grpo", importance_sampling_level=level, backend=backend)
    clean, clean_grad = _loss_and_grad(
        lambda x: gk.fused_grpo_loss(x, flat["ids"], flat["old"], adv, flat["mask"], **opts), logits.reshape(8, -1))
    dirty_logits = logits.reshape(8, -1).clone()
    dirty_logits[~flat["mask"]] = math.nan
    dirty_old = flat["old"].masked_fill(~flat["mask"], math.nan)
    out, grad = _loss_and_grad(
        lambda x: gk.fused_grpo_loss(x, flat["ids"], dirty_old, adv, flat["mask"], **opts), dirty_logits)
    for a, b in zip(out, clean):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(grad, clean_grad) and bool((grad[~flat["mask"]] == 0).all())

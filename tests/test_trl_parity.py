"""Parity with TRL 1.16.0: the reference implementation against TRL's own code, run.

- ``grpo_loss``: TRL's real ``GRPOTrainer._compute_loss``, called unbound on a stub
  trainer whose ``_get_per_token_logps_and_entropies`` returns our chosen
  log-probs; loss, gradient w.r.t. the log-probs and the logged metrics
  (``kl``, ``clip_ratio/*_mean``, ``cispo_clip_ratio``) are compared, float64.
- ``fused_grpo_loss``: the same with log-probs and entropies computed by TRL's
  ``selective_log_softmax_and_entropy`` from logits (gradient w.r.t. the logits,
  ``entropy`` metric).
- ``token_logprobs``: TRL's ``selective_log_softmax`` / ``entropy_from_logits``
  and TRL's fused LM head (``ChunkedLogProbFunction``, its torch path, with an
  identity "LM head" so that its logits are ours).
- ``linear_token_logprobs``: TRL's fused LM head on a real head (weight, bias,
  ``logit_scale``, ``final_logit_softcapping``), float32, values and gradients.
- ``group_advantages``: TRL computes advantages inline in
  ``_generate_and_score_completions``; :func:`trl_source_advantages` cuts those
  statements from the installed TRL's source and executes them.

Name mapping (TRL → ours): ``epsilon`` → ``epsilon_low``; ``epsilon_high`` (TRL
sets it to ``epsilon`` when unset) → ``epsilon_high`` (``None`` = same rule);
``args.delta`` → ``delta``; vLLM ``importance_sampling_ratio`` (with
``vllm_importance_sampling_correction``) → ``importance_weights``;
``num_items_in_batch / num_processes * grad_accum / steps_per_generation`` →
``num_items_in_batch`` (dapo, cispo); for the other loss types TRL divides the
loss by the gradient-accumulation steps, which our op leaves to the caller.

TRL in float64: TRL makes a few tensors from Python scalars, which get torch's
default dtype (float32): the SAPO temperatures (``torch.where(A > 0, 1.0, 1.05)``)
and the Bessel factor ``count / (count - 1)`` of ``nanstd``. With float64 inputs
these float32 roundings (relative 2e-8 to 3e-7) are the only differences from
the reference, which uses the exact values; so the float64 comparisons run TRL
with ``torch.set_default_dtype(torch.float64)`` (then TRL is float64 throughout),
and ``test_sapo_temperatures_*`` / ``test_trl_nanstd_*`` pin down that under the
float32 default the difference is exactly those roundings.

Known, deliberate difference: with T == 1 TRL's metrics take a [B, 1] tensor
for "one value per sequence" and average over all B rows, masked or not; ours
stay masked means (see ``test_metrics_with_one_token_completions``).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import textwrap
import types
from collections import defaultdict

import pytest
import torch

trl = pytest.importorskip("trl")
if trl.__version__ != "1.16.0":
    pytest.skip(f"parity is pinned to trl 1.16.0, found {trl.__version__}", allow_module_level=True)

from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import (  # noqa: E402
    entropy_from_logits,
    nanstd,
    selective_log_softmax,
    selective_log_softmax_and_entropy,
)

import grpo_kernels as gk  # noqa: E402
from grpo_kernels.loss_table import LOSS_TYPE_TABLE, Family  # noqa: E402

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=2e-5, atol=2e-6)
NAN = float("nan")


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's default dtype (of tensors made from Python scalars) set to ``dtype`` for the block."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


# --------------------------------------------------------------------------- #
# the stub trainer
# --------------------------------------------------------------------------- #
class _Accelerator:
    """One process: every collective is the identity."""

    process_index = 0
    sync_gradients = True

    def __init__(self, num_processes=1):
        self.num_processes = num_processes

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor


def trl_loss(per_token_logps, entropies, inputs, *, loss_type, importance_sampling_level="token", beta=0.0,
             use_bias_correction_kl=False, delta=None, epsilon=0.2, epsilon_high=None, use_vllm=False,
             max_completion_length=None, off_policy_mask_threshold=None, top_entropy_quantile=1.0,
             num_processes=1, gradient_accumulation_steps=1, steps_per_generation=1, sapo_temperature_pos=1.0,
             sapo_temperature_neg=1.05, vespo=(2.0, 3.0, 3.0, 2.0), scalar_dtype=None):
    """Run TRL's ``GRPOTrainer._compute_loss`` on a stub trainer; returns (loss, train metrics).

    ``scalar_dtype``: torch's default dtype during the call (default: the log-probs' dtype).
    """
    completion_ids = inputs["completion_ids"]

    def get_logps(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == completion_ids.shape[1] and kwargs["compute_entropy"]
        return per_token_logps, entropies, None

    args = types.SimpleNamespace(
        delta=delta, use_bias_correction_kl=use_bias_correction_kl, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, steps_per_generation=steps_per_generation,
        **dict(zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"), vespo)),
    )
    fake = types.SimpleNamespace(
        args=args,
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(num_processes),
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,  # as GRPOTrainer.__init__
        use_vllm=use_vllm,
        vllm_importance_sampling_correction=True,
        max_completion_length=completion_ids.shape[1] if max_completion_length is None else max_completion_length,
        off_policy_mask_threshold=off_policy_mask_threshold,
        top_entropy_quantile=top_entropy_quantile,
        current_gradient_accumulation_steps=gradient_accumulation_steps,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _get_per_token_logps_and_entropies=get_logps,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    fake.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, fake)
    with default_dtype(per_token_logps.dtype if scalar_dtype is None else scalar_dtype):
        loss = GRPOTrainer._compute_loss(fake, types.SimpleNamespace(training=True), inputs)
    return loss, fake._metrics["train"]


def make_batch(seed, *, batch=8, length=6, adv_shape="B", vllm=None, dtype=torch.float64):
    """Log-probs with ratios inside and outside the clip range, masks with fully masked rows."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.empty(batch, length, dtype=dtype).uniform_(0.02, 1.0, generator=g).log()
    seq_shift = 0.3 * torch.randn(batch, 1, generator=g, dtype=dtype)
    old = logp + 0.25 * torch.randn(batch, length, generator=g, dtype=dtype) + seq_shift
    ref = logp + 0.4 * torch.randn(batch, length, generator=g, dtype=dtype)
    lengths = torch.tensor([length, 3, 0, 1, length - 1, length, 0, 2])[:batch]
    mask = (torch.arange(length) < lengths[:, None]).to(torch.int32)
    if length > 2:
        mask[4, 2] = 0  # a hole inside a completion (TRL's tool_mask)
    if adv_shape == "B":
        adv = torch.randn(batch, generator=g, dtype=dtype)
        adv[5] = 0.0
        # A sequence without tokens is padding for grpo_kernels (its advantage counts nowhere); TRL's
        # sequence-level cispo metric counts it as clipped when A > 0 (ratio e^0 = 1 above a cap < 1).
        adv[lengths == 0] = -adv[lengths == 0].abs()
    else:
        adv = torch.randn(batch, length, generator=g, dtype=dtype)
        adv[1, 0] = 0.0
    iw = None
    if vllm == "token":
        iw = torch.empty(batch, length, dtype=dtype).uniform_(0.5, 1.5, generator=g)
        iw[0, 1] = 0.0  # a token masked out by the vLLM "token_mask" mode
    elif vllm == "sequence":
        iw = torch.empty(batch, 1, dtype=dtype).uniform_(0.5, 1.5, generator=g)
    entropies = torch.empty(batch, length, dtype=dtype).uniform_(0.0, 3.0, generator=g)
    return dict(logp=logp, old=old, ref=ref, mask=mask, adv=adv, iw=iw, entropies=entropies)


def trl_inputs(b, *, with_old, num_items=None):
    batch, length = b["mask"].shape
    inputs = {
        "prompt_ids": torch.ones(batch, 2, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 2, dtype=torch.int32),
        "completion_ids": torch.ones(batch, length, dtype=torch.long),
        "completion_mask": b["mask"],
        "advantages": b["adv"],
        "ref_per_token_logps": b["ref"],
        "num_items_in_batch": b["mask"].sum().to(torch.float64) if num_items is None else torch.tensor(num_items),
    }
    if with_old:
        inputs["old_per_token_logps"] = b["old"]
    if b["iw"] is not None:
        inputs["importance_sampling_ratio"] = b["iw"]
    return inputs


# --------------------------------------------------------------------------- #
# grpo_loss against _compute_loss
# --------------------------------------------------------------------------- #
# TRL's loss types with a per-token ratio (vespo: test_vespo_*), and their clipped family (delta applies).
TRL_LOSS_TYPES = tuple(row.trl_name for row in LOSS_TYPE_TABLE.values() if row.trl_name and row.token_ratio)
CLIPPED = tuple(name for name in TRL_LOSS_TYPES if LOSS_TYPE_TABLE[name].family is Family.CLIPPED)
KL_OPTIONS = ((0.0, False), (0.04, False), (0.04, True))  # (beta, use_bias_correction_kl)


def _cases():
    for loss_type in TRL_LOSS_TYPES:
        # delta 1.15 < 1 + epsilon_high: the clip-ratio metrics must use the delta-clamped ratio, as TRL does
        deltas = (None, 1.15, 1.4) if loss_type in CLIPPED else (None,)
        eps_highs = (None, 1.1, 5.0) if loss_type == "cispo" else (None, 0.28)
        extras = {"dapo": ("mask", 40.0), "cispo": ("mask", 40.0), "dr_grpo": (None, 9)}.get(loss_type, (None,))
        for level, kl, delta, eps_high, with_old, vllm, adv_shape, extra in itertools.product(
            ("token", "sequence"), KL_OPTIONS, deltas, eps_highs, (False, True), (None, "token", "sequence"),
            ("B", "BT"), extras,
        ):
            yield loss_type, level, kl, delta, eps_high, with_old, vllm, adv_shape, extra


CASES = list(_cases())


def _case_id(case):
    loss_type, level, (beta, bias), delta, eps_high, with_old, vllm, adv_shape, extra = case
    return (f"{loss_type}-{level}-beta{beta}{'-biaskl' if bias else ''}-delta{delta}-eh{eps_high}"
            f"-{'old' if with_old else 'noold'}-vllm{vllm}-adv{adv_shape}-{extra}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_grpo_loss_matches_trl_compute_loss(case):
    loss_type, level, (beta, bias_kl), delta, eps_high, with_old, vllm, adv_shape, extra = case
    b = make_batch(CASES.index(case), adv_shape=adv_shape, vllm=vllm)
    num_items = extra if isinstance(extra, float) else None
    max_len = extra if isinstance(extra, int) else None

    trl_logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = trl_loss(
        trl_logp, b["entropies"], trl_inputs(b, with_old=with_old, num_items=num_items), loss_type=loss_type,
        importance_sampling_level=level, beta=beta, use_bias_correction_kl=bias_kl, delta=delta,
        epsilon_high=eps_high, use_vllm=vllm is not None, max_completion_length=max_len,
    )
    loss.backward()

    our_logp = b["logp"].clone().requires_grad_(True)
    out = gk.grpo_loss(
        our_logp, b["old"] if with_old else None, b["adv"], b["mask"], ref_logprobs=b["ref"], beta=beta,
        epsilon_low=0.2, epsilon_high=eps_high, delta=delta, loss_type=loss_type, importance_sampling_level=level,
        use_bias_correction_kl=bias_kl, importance_weights=b["iw"], max_completion_length=max_len,
        num_items_in_batch=num_items, backend="reference",
    )
    out.loss.backward()

    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)

    if beta != 0.0:
        assert metrics["kl"] == [pytest.approx(out.kl.item(), rel=1e-10, abs=1e-12)]
    else:
        assert "kl" not in metrics
    # TRL counts clipped tokens in float32 (``.float()``): fractions k/n with n <= 48 differ by > 4e-4, so a
    # relative tolerance of 1e-6 still tells every count apart.
    if loss_type in CLIPPED:
        assert metrics["clip_ratio/low_mean"] == [pytest.approx(out.clip_ratio_low.item(), rel=1e-6, abs=0)]
        assert metrics["clip_ratio/high_mean"] == [pytest.approx(out.clip_ratio_high.item(), rel=1e-6, abs=0)]
        assert metrics["clip_ratio/region_mean"] == [pytest.approx(out.clip_ratio_region.item(), rel=1e-6, abs=0)]
    elif loss_type == "cispo":
        assert metrics["cispo_clip_ratio"] == [pytest.approx(out.clip_ratio_high.item(), rel=1e-6, abs=0)]
        assert out.clip_ratio_region.item() == out.clip_ratio_high.item()
        assert out.clip_ratio_low.item() == 0.0
    else:  # sapo: TRL logs no clip ratio
        assert not any(k.startswith("clip_ratio") or k.startswith("cispo") for k in metrics)


def test_grid_exercises_clipping():
    """The batches above do clip: low, high and delta-clamped ratios all occur (else the grid proves little)."""
    b = make_batch(0)
    ratio = (b["logp"] - b["old"]).exp()[b["mask"].bool()]
    assert (ratio < 0.8).any() and (ratio > 1.28).any() and (ratio > 1.4).any()
    assert ((ratio > 0.8) & (ratio < 1.15)).any()
    seq = ((b["logp"] - b["old"]) * b["mask"]).sum(-1) / b["mask"].sum(-1).clamp(min=1)
    assert (seq.exp() < 0.8).any() and (seq.exp() > 1.2).any()


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_gradient_accumulation_and_processes_mapping(loss_type):
    """TRL with 2 processes, 4 accumulation steps, 2 steps per generation ↔ our options (documented mapping)."""
    b = make_batch(7, vllm="token")
    nproc, gas, spg, nib = 2, 4, 2, 123.0
    trl_logp = b["logp"].clone().requires_grad_(True)
    loss, _ = trl_loss(trl_logp, b["entropies"], trl_inputs(b, with_old=True, num_items=nib), loss_type=loss_type,
                       beta=0.04, use_vllm=True, num_processes=nproc, gradient_accumulation_steps=gas,
                       steps_per_generation=spg)
    loss.backward()
    our_logp = b["logp"].clone().requires_grad_(True)
    out = gk.grpo_loss(our_logp, b["old"], b["adv"], b["mask"], ref_logprobs=b["ref"], beta=0.04, loss_type=loss_type,
                       importance_weights=b["iw"], num_items_in_batch=nib / nproc * gas / spg, backend="reference")
    ours = out.loss if loss_type in ("dapo", "cispo") else out.loss / gas
    ours.backward()
    torch.testing.assert_close(ours, loss.detach(), **F64)
    torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_off_policy_and_entropy_masks_as_importance_weights(loss_type, level):
    """TRL's off-policy sequence mask and top-entropy mask are loss multipliers: our ``importance_weights``."""
    b = make_batch(11, vllm="token")
    threshold, quantile = 0.05, 0.6
    trl_logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = trl_loss(trl_logp, b["entropies"], trl_inputs(b, with_old=True), loss_type=loss_type,
                             importance_sampling_level=level, beta=0.04, use_vllm=True,
                             off_policy_mask_threshold=threshold, top_entropy_quantile=quantile)
    loss.backward()

    mask = b["mask"]
    adv = b["adv"].unsqueeze(1)
    seq_kl = ((b["old"] - b["logp"]) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    off_policy = ((adv >= 0) | (seq_kl <= threshold)).to(b["logp"].dtype)
    assert 0 < off_policy.sum() < len(off_policy)  # the mask drops some sequences, keeps others
    cut = torch.quantile(b["entropies"][mask.bool()].float(), 1 - quantile)
    high_entropy = ((b["entropies"] * mask >= cut) & mask.bool()).to(b["logp"].dtype)
    our_logp = b["logp"].clone().requires_grad_(True)
    out = gk.grpo_loss(our_logp, b["old"], b["adv"], mask, ref_logprobs=b["ref"], beta=0.04, loss_type=loss_type,
                       importance_sampling_level=level, importance_weights=off_policy * high_entropy * b["iw"],
                       backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)
    assert metrics["kl"] == [pytest.approx(out.kl.item(), rel=1e-10)]


def test_metrics_with_one_token_completions():
    """T == 1: loss and gradient agree; the metrics differ only where TRL averages masked rows in (deliberate).

    TRL's metric helper reads a ``[B, 1]`` tensor as "one value per sequence" (GSPO) and averages it over all
    B rows; at token level with T == 1 that includes masked rows. Ours is the masked mean.
    """
    b = make_batch(3, batch=8, length=1)
    b["old"] = b["logp"] + torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5, -0.5, 0.5, -0.5], dtype=torch.float64)[:, None]
    b["adv"] = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    kwargs = dict(loss_type="bnpo", beta=0.04)
    for full_mask in (True, False):
        if full_mask:
            b["mask"] = torch.ones_like(b["mask"])
        else:
            b["mask"] = torch.tensor([[1], [1], [0], [1], [0], [1], [1], [0]], dtype=torch.int32)
        trl_logp = b["logp"].clone().requires_grad_(True)
        loss, metrics = trl_loss(trl_logp, b["entropies"], trl_inputs(b, with_old=True), **kwargs)
        loss.backward()
        our_logp = b["logp"].clone().requires_grad_(True)
        out = gk.grpo_loss(our_logp, b["old"], b["adv"], b["mask"], ref_logprobs=b["ref"], backend="reference",
                           **kwargs)
        out.loss.backward()
        torch.testing.assert_close(out.loss, loss.detach(), **F64)
        torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)

        m = b["mask"].to(torch.float64)
        coef = (b["logp"] - b["old"]).exp()
        low = ((coef < 0.8) & (b["adv"][:, None] < 0)).to(torch.float64)
        kl = (b["ref"] - b["logp"]).exp() - (b["ref"] - b["logp"]) - 1
        # ours: masked means
        assert out.kl.item() == pytest.approx(((kl * m).sum() / m.sum()).item(), rel=1e-12)
        assert out.clip_ratio_low.item() == pytest.approx(((low * m).sum() / m.sum()).item(), rel=1e-12)
        assert 0 < out.clip_ratio_low.item() < 1
        # TRL: means over all B rows (equal to ours only when nothing is masked)
        assert metrics["kl"][0] == pytest.approx(kl.mean().item(), rel=1e-12)
        assert metrics["clip_ratio/low_mean"][0] == pytest.approx(low.mean().item(), rel=1e-6)
        if full_mask:
            assert metrics["kl"][0] == pytest.approx(out.kl.item(), rel=1e-12)
        else:
            assert metrics["kl"][0] != pytest.approx(out.kl.item(), rel=1e-6)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo_temperatures_under_float32_default(level):
    """TRL's SAPO temperatures come from ``torch.where(A > 0, 1.0, 1.05)``: float32 under torch's usual default.

    So with float64 log-probs TRL uses tau_neg = float32(1.05) = 1.0499999523...; ours given that value matches
    TRL to float64 precision, and ours with the exact 1.05 (the reference's choice) differs only by that rounding.
    """
    b = make_batch(13, vllm="token")
    trl_logp = b["logp"].clone().requires_grad_(True)
    loss, _ = trl_loss(trl_logp, b["entropies"], trl_inputs(b, with_old=True), loss_type="sapo",
                       importance_sampling_level=level, beta=0.04, use_vllm=True, scalar_dtype=torch.float32)
    loss.backward()
    tau_neg32 = torch.tensor(1.05, dtype=torch.float32).item()
    assert tau_neg32 != 1.05
    kwargs = dict(ref_logprobs=b["ref"], beta=0.04, loss_type="sapo", importance_sampling_level=level,
                  importance_weights=b["iw"], backend="reference")
    our_logp = b["logp"].clone().requires_grad_(True)
    out = gk.grpo_loss(our_logp, b["old"], b["adv"], b["mask"], sapo_temperature_neg=tau_neg32, **kwargs)
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)

    exact = gk.grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], **kwargs).loss
    assert not torch.isclose(exact, loss.detach(), **F64)
    torch.testing.assert_close(exact, loss.detach(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- #
# fused_grpo_loss against _compute_loss fed by TRL's log-prob/entropy code
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_fused_grpo_loss_matches_trl(loss_type, level, temperature):
    b = make_batch(21, vllm="token")
    batch, length = b["mask"].shape
    g = torch.Generator().manual_seed(5)
    logits = 2 * torch.randn(batch, length, 40, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 40, (batch, length), generator=g)
    eps_high = 3.0 if loss_type == "cispo" else 0.28

    trl_logits = logits.clone().requires_grad_(True)
    logp, ent = selective_log_softmax_and_entropy(trl_logits, ids, temperature=temperature)
    inputs = trl_inputs(b, with_old=True)
    inputs["completion_ids"] = ids
    loss, metrics = trl_loss(logp, ent, inputs, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                             epsilon_high=eps_high, use_vllm=True)
    loss.backward()

    our_logits = logits.clone().requires_grad_(True)
    out = gk.fused_grpo_loss(our_logits, ids, b["old"], b["adv"], b["mask"], temperature=temperature,
                             return_entropy=True, ref_logprobs=b["ref"], beta=0.04, epsilon_high=eps_high,
                             loss_type=loss_type, importance_sampling_level=level, importance_weights=b["iw"],
                             backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_logits.grad, trl_logits.grad, **F64)
    assert metrics["entropy"] == [pytest.approx(out.entropy.item(), rel=1e-10)]
    assert metrics["kl"] == [pytest.approx(out.kl.item(), rel=1e-10)]


# --------------------------------------------------------------------------- #
# token_logprobs
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 300), (1, 1, 7)], ids=str)
def test_token_logprobs_matches_trl(shape, temperature, dtype):
    g = torch.Generator().manual_seed(17)
    logits = (4 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    logits[..., 0, 1] += 30.0  # one very peaked row
    ids = torch.randint(0, shape[-1], shape[:-1], generator=g)
    tol = F64 if dtype == torch.float64 else F32

    trl_logits = logits.clone().requires_grad_(True)
    trl_logp = selective_log_softmax(trl_logits, ids, temperature=temperature)
    trl_ent = entropy_from_logits(trl_logits / temperature)
    our_logits = logits.clone().requires_grad_(True)
    logp, ent = gk.token_logprobs(our_logits, ids, temperature=temperature, return_entropy=True, backend="reference")
    assert logp.dtype == ent.dtype == dtype
    torch.testing.assert_close(logp, trl_logp, **tol)
    torch.testing.assert_close(ent, trl_ent, **tol)

    w1 = torch.randn(ids.shape, generator=g, dtype=torch.float64).to(dtype)
    w2 = torch.randn(ids.shape, generator=g, dtype=torch.float64).to(dtype)
    ((trl_logp * w1).sum() + (trl_ent * w2).sum()).backward()
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    torch.testing.assert_close(our_logits.grad, trl_logits.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ignore_index_matches_trl_row_mask(dtype):
    """Our ``ignore_index`` positions ↔ TRL's ``row_mask == 0`` rows: log-prob 0 and entropy 0."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 6, 33, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, 33, (4, 6), generator=g)
    row_mask = torch.rand(4, 6, generator=g) > 0.3
    trl_logp, trl_ent = selective_log_softmax_and_entropy(logits, ids, temperature=0.8, row_mask=row_mask)
    logp, ent = gk.token_logprobs(logits, ids.masked_fill(~row_mask, -100), temperature=0.8, return_entropy=True,
                                  backend="reference")
    tol = F64 if dtype == torch.float64 else F32
    torch.testing.assert_close(logp, trl_logp, **tol)
    torch.testing.assert_close(ent, trl_ent, **tol)


def test_entropy_with_masked_vocabulary():
    """-inf logits: TRL's ``entropy_from_logits`` gives NaN (0·-inf); ours is the entropy over the finite support."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 20, generator=g, dtype=torch.float64)
    banned = torch.zeros(20, dtype=torch.bool)
    banned[[3, 7, 19]] = True
    ids = torch.randint(0, 20, (5,), generator=g)
    ids[ids == 3] = 4
    ids[ids == 7] = 8
    ids[ids == 19] = 18
    _, ent = gk.token_logprobs(logits.masked_fill(banned, -torch.inf), ids, return_entropy=True, backend="reference")
    torch.testing.assert_close(ent, entropy_from_logits(logits[:, ~banned]), **F64)
    assert torch.isnan(entropy_from_logits(logits.masked_fill(banned, -torch.inf))).all()


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_token_logprobs_matches_trl_fused_lm_head(temperature):
    """TRL 1.16's trainer gets log-probs from its fused LM head; with weight = I its logits are the hidden states."""
    g = torch.Generator().manual_seed(9)
    n, vocab = 37, 50
    logits = 3 * torch.randn(n, vocab, generator=g)
    ids = torch.randint(0, vocab, (n,), generator=g)
    hidden = logits.clone().requires_grad_(True)
    trl_logp, trl_ent, *_ = ChunkedLogProbFunction.apply(hidden, torch.eye(vocab), None, ids, temperature, 16, None,
                                                          1.0, ("entropy",))
    our_logits = logits.clone().requires_grad_(True)
    logp, ent = gk.token_logprobs(our_logits, ids, temperature=temperature, return_entropy=True, backend="reference")
    torch.testing.assert_close(logp, trl_logp, **F32)
    torch.testing.assert_close(ent, trl_ent, **F32)
    w1, w2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ((trl_logp * w1).sum() + (trl_ent * w2).sum()).backward()
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    torch.testing.assert_close(our_logits.grad, hidden.grad, **F32)


@pytest.mark.parametrize("head_backend", gk.available_backends("linear_token_logprobs"))
@pytest.mark.parametrize("temperature,logit_scale,softcap", [(1.0, 1.0, None), (0.7, 1.5, 10.0)])
def test_linear_token_logprobs_matches_trl_fused_lm_head(head_backend, temperature, logit_scale, softcap):
    """TRL 1.16's fused LM head (``ChunkedLogProbFunction``, torch path) on a real [V, H] head with bias,
    float32: log-probs, entropies and the gradients of hidden, weight and bias."""
    g = torch.Generator().manual_seed(11)
    n, size, vocab = 23, 16, 70
    inputs = [torch.randn(n, size, generator=g), torch.randn(vocab, size, generator=g) / 3,
              torch.randn(vocab, generator=g)]
    ids = torch.randint(0, vocab, (n,), generator=g)
    w1, w2 = torch.randn(n, generator=g), torch.randn(n, generator=g)
    trl_leaves = [t.clone().requires_grad_() for t in inputs]
    trl_logp, trl_ent, *_ = ChunkedLogProbFunction.apply(*trl_leaves, ids, temperature, 32, softcap, logit_scale,
                                                          ("entropy",))
    ((trl_logp * w1).sum() + (trl_ent * w2).sum()).backward()
    leaves = [t.clone().requires_grad_() for t in inputs]
    logp, ent = gk.linear_token_logprobs(leaves[0], leaves[1], ids, bias=leaves[2], temperature=temperature,
                                         logit_scale=logit_scale, softcap=softcap, return_entropy=True,
                                         chunk_size=8, backend=head_backend)
    ((logp * w1).sum() + (ent * w2).sum()).backward()
    torch.testing.assert_close(logp, trl_logp, **F32)
    torch.testing.assert_close(ent, trl_ent, **F32)
    for ours, theirs in zip(leaves, trl_leaves):
        torch.testing.assert_close(ours.grad, theirs.grad, **F32)


# --------------------------------------------------------------------------- #
# group advantages
# --------------------------------------------------------------------------- #
def trl_source_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards,
                          multi_objective_aggregation):
    """TRL's advantage statements, cut from the installed ``_generate_and_score_completions`` and executed.

    ``rewards_per_func`` is [B, K] with NaN for "reward function returned None".
    """
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = src.rindex("\n", 0, src.index("unscorable_mask = torch.isnan(rewards_per_func)")) + 1
    end = src.index("\n", src.index("advantages = torch.nan_to_num(advantages, nan=0.0)"))
    stub = types.SimpleNamespace(multi_objective_aggregation=multi_objective_aggregation, scale_rewards=scale_rewards,
                                 reward_weights=reward_weights, reward_funcs=[None] * rewards_per_func.shape[1])
    scope = dict(self=stub, rewards_per_func=rewards_per_func.clone(), num_generations=num_generations, device="cpu")
    exec(textwrap.dedent(src[start:end]), {"torch": torch, "nanstd": nanstd}, scope)
    return scope["advantages"]


def make_rewards(seed, groups, group_size, k, dtype=torch.float64):
    """Rewards with NaNs, unscorable rows, a constant group, a group with one scored row, binary columns."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(groups * group_size, k, generator=g, dtype=torch.float64)
    if k > 1:
        r[:, 1] = (r[:, 1] > 0).to(r.dtype)  # a 0/1 correctness reward
    nan = torch.rand(r.shape, generator=g) < 0.15
    r[nan] = NAN
    r[1] = NAN  # unscorable row
    if groups > 1:
        r[group_size:2 * group_size] = 0.5  # all-equal group: std 0
    if groups > 2 and group_size > 1:
        r[2 * group_size + 1:3 * group_size] = NAN  # only one scored row in this group
    return r.to(dtype)


GROUPINGS = [(4, 4), (3, 8), (5, 2), (4, 1)]  # (groups, group_size); G = 1 only in TRL's eval path


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("k,weights", [(1, None), (2, None), (3, (1.0, 0.5, -2.0))], ids=["K1", "K2", "K3w"])
@pytest.mark.parametrize("groups,group_size", GROUPINGS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_sum_then_normalize_matches_trl(scale, groups, group_size, k, weights, dtype):
    r = make_rewards(groups * 100 + group_size * 10 + k, groups, group_size, k, dtype)
    w = torch.ones(k, dtype=dtype) if weights is None else torch.tensor(weights, dtype=dtype)
    with default_dtype(dtype):
        expected = trl_source_advantages(r, w, group_size, scale, "sum_then_normalize")
    ours = gk.group_advantages(r, group_size=group_size, scale=scale, reward_weights=None if weights is None else w,
                               backend="reference")
    torch.testing.assert_close(ours, expected, **(F64 if dtype == torch.float64 else F32))
    if k == 1:  # 1-D rewards are the same problem
        ours_1d = gk.group_advantages(r[:, 0], group_size=group_size, scale=scale, backend="reference")
        torch.testing.assert_close(ours_1d, expected, **(F64 if dtype == torch.float64 else F32))
    assert expected.abs().sum() > 0 or group_size == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("k,weights", [(1, None), (2, (1.0, 2.0)), (3, (1.0, 0.5, -2.0))], ids=["K1", "K2w", "K3w"])
@pytest.mark.parametrize("groups,group_size", GROUPINGS)
def test_normalize_then_sum_matches_trl(groups, group_size, k, weights, dtype):
    """TRL's normalize_then_sum always normalizes each reward by its group std: our ``scale="group"``."""
    r = make_rewards(groups * 100 + group_size * 10 + k + 1, groups, group_size, k, dtype)
    w = torch.ones(k, dtype=dtype) if weights is None else torch.tensor(weights, dtype=dtype)
    with default_dtype(dtype):
        expected = trl_source_advantages(r, w, group_size, "group", "normalize_then_sum")
        for scale in ("batch", "none"):  # TRL ignores scale_rewards here
            torch.testing.assert_close(trl_source_advantages(r, w, group_size, scale, "normalize_then_sum"),
                                       expected, rtol=0, atol=0)
    ours = gk.group_advantages(r, group_size=group_size, scale="group", reward_weights=w,
                               multi_objective="normalize_then_sum", backend="reference")
    torch.testing.assert_close(ours, expected, **(F64 if dtype == torch.float64 else F32))
    assert expected.abs().sum() > 0 or group_size == 1


def test_trl_nanstd_is_our_std():
    """Our per-group std (``return_stats``) is TRL's ``nanstd``: NaN-ignoring, unbiased, NaN below 2 values.

    Under torch's float32 default TRL's Bessel factor ``count / (count - 1)`` (an integer division) is a float32
    number even for float64 rewards; that rounding is the whole difference from our exact std.
    """
    r = make_rewards(1, 6, 8, 1)[:, 0].view(6, 8)
    r[0, 4:] = NAN  # 4 values: factor 4/3, not a float32 number
    r[3, :7] = NAN  # 1 value: NaN
    _, mean, std = gk.group_advantages(r.flatten(), group_size=8, return_stats=True, backend="reference")
    torch.testing.assert_close(mean, torch.nanmean(r, dim=1), equal_nan=True, **F64)
    with default_dtype(torch.float64):
        torch.testing.assert_close(std, nanstd(r, dim=1), equal_nan=True, **F64)

    trl_std = nanstd(r, dim=1)  # float32 default
    n = (~torch.isnan(r)).sum(1).to(torch.float64)
    factor = n / (n - 1)
    factor32 = factor.to(torch.float32).to(torch.float64)
    assert (factor32 != factor).any()
    torch.testing.assert_close(trl_std, std * torch.sqrt(factor32 / factor), equal_nan=True, **F64)
    assert not torch.allclose(trl_std[:3], std[:3], **F64)


# --------------------------------------------------------------------------- #
# VESPO, the off-policy mask and the vLLM importance-sampling ratio, computed in the loss
# --------------------------------------------------------------------------- #
VESPO_PARAMS = [(2.0, 3.0, 3.0, 2.0), (1.0, 0.5, 4.0, 0.0)]


@pytest.mark.parametrize("vespo", VESPO_PARAMS, ids=["defaults", "custom"])
@pytest.mark.parametrize("vllm", [None, "token"])
@pytest.mark.parametrize("adv_shape", ["B", "BT"])
@pytest.mark.parametrize("with_old,beta,bias_kl", [(True, 0.0, False), (False, 0.04, False), (True, 0.04, True)])
def test_vespo_matches_trl(vespo, vllm, adv_shape, with_old, beta, bias_kl):
    """loss_type="vespo" ↔ TRL's (``get_gamma_weights``), the vLLM ratio folded into the weight."""
    b = make_batch(51 + VESPO_PARAMS.index(vespo), adv_shape=adv_shape, vllm=vllm)
    if b["iw"] is not None:  # TRL's ratio is exactly 1 at masked tokens ((old - sampling) · mask = 0)
        b["iw"] = torch.where(b["mask"].bool(), b["iw"], torch.ones_like(b["iw"]))
        b["iw"][0, 1] = 0.0  # a token masked out by "token_mask": log 0 → log 1e-8
    b["old"][0, 0] = b["logp"][0, 0] - 25.0  # a log-ratio past VESPO's ±20 clamp
    trl_logp = b["logp"].clone().requires_grad_(True)
    loss, _ = trl_loss(trl_logp, b["entropies"], trl_inputs(b, with_old=with_old), loss_type="vespo", beta=beta,
                       use_bias_correction_kl=bias_kl, use_vllm=vllm is not None, vespo=vespo)
    loss.backward()
    our_logp = b["logp"].clone().requires_grad_(True)
    out = gk.grpo_loss(our_logp, b["old"] if with_old else None, b["adv"], b["mask"], ref_logprobs=b["ref"], beta=beta,
                       use_bias_correction_kl=bias_kl, loss_type="vespo", importance_weights=b["iw"],
                       **dict(zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"), vespo)),
                       backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)
    assert our_logp.grad.abs().sum() > 0


@pytest.mark.parametrize("sampling", [True, False], ids=["sampling_logps", "old_logps"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "vespo"])
def test_off_policy_mask_matches_trl(loss_type, level, sampling):
    """off_policy_mask_threshold (+ sampling_logprobs, NaN where vLLM could not score) ↔ TRL's own mask."""
    if loss_type == "vespo" and level == "sequence":
        pytest.skip("vespo is token level (TRL only warns)")
    b = make_batch(11, vllm="token")
    g = torch.Generator().manual_seed(6)
    sampling_logps = b["old"] + 0.2 * torch.randn(b["old"].shape, generator=g, dtype=torch.float64)
    sampling_logps[0, 2] = NAN
    if loss_type == "vespo":  # TRL's ratio is exactly 1 at masked tokens; vespo folds it into its weight
        b["iw"] = torch.where(b["mask"].bool(), b["iw"], torch.ones_like(b["iw"]))
    inputs = trl_inputs(b, with_old=True)
    if sampling:
        inputs["sampling_per_token_logps"] = sampling_logps
    trl_logp = b["logp"].clone().requires_grad_(True)
    loss, _ = trl_loss(trl_logp, b["entropies"], inputs, loss_type=loss_type, importance_sampling_level=level,
                       beta=0.04, use_vllm=True, off_policy_mask_threshold=0.05)
    loss.backward()
    our_logp = b["logp"].clone().requires_grad_(True)
    out = gk.grpo_loss(our_logp, b["old"], b["adv"], b["mask"], ref_logprobs=b["ref"], beta=0.04, loss_type=loss_type,
                       importance_sampling_level=level, importance_weights=b["iw"], off_policy_mask_threshold=0.05,
                       sampling_logprobs=sampling_logps if sampling else None, backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)
    unmasked = gk.grpo_loss(b["logp"], b["old"], b["adv"], b["mask"], ref_logprobs=b["ref"], beta=0.04,
                            loss_type=loss_type, importance_sampling_level=level, importance_weights=b["iw"])
    assert not torch.isclose(out.loss, unmasked.loss)  # the mask drops something


def trl_source_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL's vLLM importance-sampling ratio: its statements cut from the installed
    ``_generate_and_score_completions`` and executed."""
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = src.rindex("\n", 0, src.index("per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps)"))
    end = src.index("\n", src.index("invalid_mis_mask, value=0.0"))
    end = src.index("\n", end + 1)  # the closing parenthesis
    body = textwrap.dedent(src[start + 1:end])
    stub = types.SimpleNamespace(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=clip_min,
                                 vllm_importance_sampling_clip_max=clip_max)
    scope = dict(self=stub, old_per_token_logps=old, sampling_per_token_logps=sampling, mask=mask)
    exec(body, {"torch": torch, "math": __import__("math")}, scope)
    return scope["vllm_importance_sampling_ratio"]


ROLLOUT_CASES = [(mode, low, high) for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
                 for low, high in ((None, 3.0), (0.5, 2.0), (0.8, None))]


@pytest.mark.parametrize("mode,low,high", ROLLOUT_CASES)
def test_rollout_is_matches_trl(mode, low, high):
    """rollout_is_mode / rollout_is_min / rollout_is_max ↔ TRL's vllm_importance_sampling_* (the ratio TRL
    computes at generation, then multiplies into _compute_loss's per-token loss)."""
    b = make_batch(71)
    g = torch.Generator().manual_seed(8)
    sampling = b["old"] + 0.5 * torch.randn(b["old"].shape, generator=g, dtype=torch.float64)
    sampling[0, 1] = NAN  # unscored by vLLM: ratio 1
    sampling[5, 0] = b["old"][5, 0] + 40.0  # a huge ratio
    ratio = trl_source_is_ratio(b["old"], sampling, b["mask"], mode, low, high)
    ours = gk.reference.rollout_importance_ratio(b["old"], sampling, b["mask"].to(torch.float64), mode, low, high)
    torch.testing.assert_close(ours, ratio, **F64)
    assert ((ratio > 0) & (ratio != 1)).any()
    for loss_type in ("dapo", "grpo", "vespo"):
        if loss_type == "vespo" and mode.startswith("sequence"):
            continue
        b["iw"] = ratio
        trl_logp = b["logp"].clone().requires_grad_(True)
        loss, _ = trl_loss(trl_logp, b["entropies"], trl_inputs(b, with_old=True), loss_type=loss_type, beta=0.04,
                           use_vllm=True)
        loss.backward()
        our_logp = b["logp"].clone().requires_grad_(True)
        out = gk.grpo_loss(our_logp, b["old"], b["adv"], b["mask"], ref_logprobs=b["ref"], beta=0.04,
                           loss_type=loss_type, sampling_logprobs=sampling, rollout_is_mode=mode, rollout_is_min=low,
                           rollout_is_max=high, backend="reference")
        out.loss.backward()
        torch.testing.assert_close(out.loss, loss.detach(), **F64)
        torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)


def test_sequence_cispo_metric_with_empty_sequences_differs_from_trl():
    """Known difference (docs/semantics.md): TRL's sequence-level cispo clip ratio counts a sequence without
    tokens as clipped when its advantage is positive (ratio e^0 = 1 above a cap below 1); for grpo_kernels such a
    sequence is padding and counts nowhere. Loss and gradient agree; without empty sequences the metric does too
    (test_grpo_loss_matches_trl_compute_loss)."""
    b = make_batch(3)
    empty = b["mask"].sum(1) == 0
    assert empty.sum() == 2
    b["adv"][empty] = 1.0
    trl_logp = b["logp"].clone().requires_grad_(True)
    loss, metrics = trl_loss(trl_logp, b["entropies"], trl_inputs(b, with_old=True), loss_type="cispo",
                             importance_sampling_level="sequence", epsilon_high=0.8)
    loss.backward()
    our_logp = b["logp"].clone().requires_grad_(True)
    out = gk.grpo_loss(our_logp, b["old"], b["adv"], b["mask"], ref_logprobs=b["ref"], loss_type="cispo",
                       importance_sampling_level="sequence", epsilon_high=0.8, importance_weights=b["iw"],
                       backend="reference")
    out.loss.backward()
    torch.testing.assert_close(out.loss, loss.detach(), **F64)
    torch.testing.assert_close(our_logp.grad, trl_logp.grad, **F64)
    batch = b["mask"].shape[0]
    # TRL: the two empty sequences are counted as clipped, out of all sequences
    assert metrics["cispo_clip_ratio"] == [pytest.approx(out.clip_ratio_high.item() + empty.sum().item() / batch)]

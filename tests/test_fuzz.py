"""Differential fuzzing of every CPU-tensor backend against the float64 reference (hypothesis).

Random shapes (V from 1 to a few thousand, T and B from 1), masks (all-masked rows and batches included), ids
with ignore_index, layouts (a strided vocabulary dim, broadcast advantages, int32 ids, mixed float dtypes),
every option combination validation accepts, and garbage (NaN, ±inf, huge) at masked positions:

- ``test_backends_match_the_reference``: every backend gives the reference's loss, metrics and gradients
  within the dtype's tolerance, or every backend raises the reference's error type; a non-finite value at
  an unmasked position gives a non-finite loss on every backend alike.
- ``test_poisoned_padding_changes_nothing``: replacing finite padding by NaN/±inf/huge values changes no
  output and no gradient, bitwise, on every backend, and the gradient there is exactly 0.

The Triton interpreter is slow: it only sees the tiny draws (``_TRITON_MAX``). ``COUNTS`` records the cases
and comparisons (printed with ``-s``).
"""

from __future__ import annotations

import math
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grpo_kernels as gk
from grpo_kernels import loss_table, reference

IGNORE = -100
_TRITON_MAX = dict(rows=4, vocab=24)  # draws the Triton interpreter runs
COUNTS: Counter = Counter()

POISON = (math.nan, math.inf, -math.inf, 1e30, -1e30)


def _backends(op: str) -> list[str]:
    names = [b for b in gk.available_backends(op) if b != "cuda"]
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        names = [b for b in names if b != "triton"]
    return names


def _runs(backend: str, rows: int, vocab: int) -> bool:
    return backend != "triton" or (rows <= _TRITON_MAX["rows"] and vocab <= _TRITON_MAX["vocab"])


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- #
# case generation
# --------------------------------------------------------------------------- #
@st.composite
def loss_options(draw, T: int) -> dict:
    loss_type = draw(st.sampled_from(loss_table.LOSS_TYPES))
    row = loss_table.LOSS_TYPE_TABLE[loss_type]
    o: dict = dict(loss_type=loss_type)
    if row.token_ratio and draw(st.booleans()):
        o["importance_sampling_level"] = "sequence"
    if draw(st.booleans()):
        o["beta"] = draw(st.sampled_from([0.0, 0.04, 0.5]))
        o["kl_estimator"] = draw(st.sampled_from(list(loss_table.KL_ESTIMATORS)))
        o["ref"] = True
        if row.family is not loss_table.Family.GMPO and draw(st.booleans()):
            o["use_bias_correction_kl"] = True
    o["epsilon_low"] = draw(st.sampled_from([0.0, 0.2, 0.5]))
    o["epsilon_high"] = draw(st.sampled_from([None, 0.28, 5.0]))
    if row.family is loss_table.Family.CLIPPED:
        if draw(st.booleans()):
            o["delta"] = draw(st.sampled_from([1.1, 2.0]))
        if draw(st.booleans()):
            o["clip_ratio_c"] = 3.0
    if row.aggregation is loss_table.Aggregation.FIXED_LENGTH and draw(st.booleans()):
        o["max_completion_length"] = draw(st.integers(1, T + 3))
    if draw(st.booleans()):
        o["num_items_in_batch"] = draw(st.sampled_from([1, 7, 100.5]))
    mode = draw(st.sampled_from([None] + list(loss_table.ROLLOUT_IS_MODES)))
    if mode is not None and not (row.family in loss_table.FOLDS_IMPORTANCE_WEIGHTS
                                 and loss_table.ROLLOUT_IS_MODES[mode].level == loss_table.RolloutLevel.SEQUENCE):
        o["rollout_is_mode"] = mode
        o["rollout_is_min"] = draw(st.sampled_from([None, 0.5]))
        o["rollout_is_max"] = draw(st.sampled_from([None, 2.0]) if mode.endswith("mask") or o["rollout_is_min"]
                                   else st.just(2.0))
        o["sampling"] = True
    if draw(st.booleans()):
        o["off_policy_mask_threshold"] = draw(st.sampled_from([0.0, 0.05]))
        o["sampling"] = o.get("sampling") or draw(st.booleans())
    if draw(st.booleans()):
        o["log_ratio_clamp"] = draw(st.sampled_from([0.1, 20.0]))
    o["iw"] = draw(st.sampled_from([None, "B", "BT"] if loss_type != "vespo" else [None, "BT"]))
    return o


@st.composite
def cases(draw, op: str) -> dict:
    tiny = draw(st.booleans())  # every other case small enough for the Triton interpreter
    B = draw(st.integers(1, 2 if tiny else 4))
    T = draw(st.integers(1, 2 if tiny else 6))
    V = draw(st.integers(1, 24)) if tiny else draw(st.sampled_from([1, 2, 7, 33, 100, 517, 3001]))
    c = dict(op=op, B=B, T=T, V=V, seed=draw(st.integers(0, 2**31 - 1)),
             dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
             mask=draw(st.sampled_from(["random", "random", "row_masked", "all_masked", "all"])),
             ignore=draw(st.booleans()), poison=draw(st.sampled_from(POISON)),
             temperature=draw(st.sampled_from([1.0, 0.1, 0.7, 10.0])),
             strided_vocab=draw(st.booleans()), int32_ids=draw(st.booleans()), mixed=draw(st.booleans()),
             expanded_adv=draw(st.booleans()), adv=draw(st.sampled_from(["B", "B1", "BT"])),
             unmasked_nonfinite=draw(st.sampled_from([None] * 6 + ["nan", "inf"])),
             entropy=draw(st.booleans()))
    if op != "token_logprobs":
        c["options"] = draw(loss_options(T))
    return c


def _mask(c: dict, g) -> torch.Tensor:
    B, T = c["B"], c["T"]
    kind = c["mask"]
    if kind == "all":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "all_masked":
        return torch.zeros(B, T, dtype=torch.bool)
    m = torch.rand(B, T, generator=g) > 0.35
    if kind == "row_masked":
        m[0] = False
    return m


def make_inputs(c: dict, *, poisoned: bool) -> dict:
    """The case's tensors; masked positions hold finite padding, or ``c["poison"]`` when ``poisoned``."""
    g = _rng(c["seed"])
    B, T, V, dtype = c["B"], c["T"], c["V"], c["dtype"]
    mask = _mask(c, g)
    ids = torch.randint(0, V, (B, T), generator=g)
    if c["ignore"]:
        ids = torch.where(torch.rand(B, T, generator=g) < 0.3, IGNORE, ids)
    keep = mask & (ids != IGNORE) if c["op"] != "grpo_loss" else mask
    if c["op"] == "token_logprobs":
        keep = ids != IGNORE

    def per_token(values: torch.Tensor, masked_value) -> torch.Tensor:
        if not poisoned:
            return values
        return torch.where(keep.reshape(keep.shape + (1,) * (values.ndim - 2)), values,
                           torch.tensor(masked_value, dtype=values.dtype))

    x: dict = dict(mask=mask, ids=ids.to(torch.int32) if c["int32_ids"] else ids, keep=keep)
    x["logits"] = per_token((3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype), c["poison"])
    x["logprobs"] = per_token((-3 * torch.rand(B, T, generator=g, dtype=torch.float64)).to(dtype), c["poison"])
    base = x["logprobs"] if not poisoned else torch.where(keep, x["logprobs"], -1.0)
    other = torch.float64 if c["mixed"] and dtype != torch.float64 else dtype
    for name in ("old", "ref", "sampling"):
        t = (base.double() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(other)
        x[name] = per_token(t, c["poison"])
    adv_shape = {"B": (B,), "B1": (B, 1), "BT": (B, T)}[c["adv"]]
    adv = torch.randn(adv_shape, generator=g, dtype=torch.float64).to(dtype)
    if c["adv"] == "BT":
        adv = per_token(adv, c["poison"])
    elif poisoned:  # a sequence without a kept token: its advantage is padding too
        rows = keep.any(-1).reshape(adv_shape)
        adv = torch.where(rows, adv, torch.tensor(c["poison"], dtype=dtype))
    if c["expanded_adv"] and c["adv"] != "BT":
        adv = adv.reshape(B, 1).expand(B, T)  # a broadcast view (stride 0 over T)
    x["adv"] = adv
    iw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    x["iw_BT"] = per_token(iw.to(dtype), c["poison"])
    x["iw_B"] = iw[:, 0].to(dtype)
    x["hidden"] = per_token(torch.randn(B, T, 6, generator=g, dtype=torch.float64).to(dtype), 0.0)
    x["weight"] = (torch.randn(V, 6, generator=g, dtype=torch.float64) / 2).to(dtype)
    if c["unmasked_nonfinite"] and bool(keep.any()):
        value = math.nan if c["unmasked_nonfinite"] == "nan" else math.inf
        i, t = [int(v) for v in keep.nonzero()[0]]
        name = {"token_logprobs": "logits", "fused_grpo_loss": "logits", "grpo_loss": "logprobs",
                "fused_linear_grpo_loss": "hidden"}[c["op"]]
        x[name] = x[name].clone()
        if x[name].ndim == 3:  # one entry of the row (logits, hidden)
            x[name][i, t, int(torch.randint(0, x[name].shape[-1], (), generator=g))] = value
        else:
            x[name][i, t] = value
    return x


def _loss_kwargs(c: dict, x: dict) -> dict:
    o = dict(c["options"])
    kw = {k: v for k, v in o.items() if k not in ("ref", "sampling", "iw")}
    if o.get("ref"):
        kw["ref_logprobs"] = x["ref"]
    if o.get("sampling"):
        kw["sampling_logprobs"] = x["sampling"]
    if o["iw"] == "B":
        kw["importance_weights"] = x["iw_B"]
    elif o["iw"] == "BT":
        kw["importance_weights"] = x["iw_BT"]
    return kw


# --------------------------------------------------------------------------- #
# running one op
# --------------------------------------------------------------------------- #
def run(c: dict, x: dict, backend: str, *, float64: bool = False):
    """``(outputs, gradients)`` of the case on ``backend`` (float64 inputs for the reference ``float64``)."""

    def prep(t: torch.Tensor) -> torch.Tensor:
        return t.double() if float64 and t.is_floating_point() else t

    op = c["op"]
    if op == "grpo_loss":
        leaf = prep(x["logprobs"]).clone().requires_grad_()
        kw = {k: prep(v) if isinstance(v, torch.Tensor) else v for k, v in _loss_kwargs(c, x).items()}
        out = gk.grpo_loss(leaf, prep(x["old"]), prep(x["adv"]), x["mask"], backend=backend, **kw)
        outputs = list(out)[:6]
        wrt = [leaf]
        total = out.loss
    elif op in ("token_logprobs", "fused_grpo_loss"):
        logits = prep(x["logits"])
        if c["strided_vocab"]:  # the same values, the vocabulary dim not contiguous
            logits = logits.transpose(-1, -2).contiguous().transpose(-1, -2)
        leaf = logits.clone().requires_grad_() if not c["strided_vocab"] else logits.requires_grad_()
        if op == "token_logprobs":
            out = gk.token_logprobs(leaf, x["ids"], temperature=c["temperature"], return_entropy=c["entropy"],
                                    backend=backend)
            outputs = list(out) if c["entropy"] else [out]
            g = torch.linspace(-1, 1, outputs[0].numel(), dtype=outputs[0].dtype).reshape(outputs[0].shape)
            total = (outputs[0] * g).sum() + (0.3 * outputs[1].sum() if c["entropy"] else 0)
        else:
            kw = {k: prep(v) if isinstance(v, torch.Tensor) else v for k, v in _loss_kwargs(c, x).items()}
            out = gk.fused_grpo_loss(leaf, x["ids"], prep(x["old"]), prep(x["adv"]), x["mask"],
                                     temperature=c["temperature"], return_entropy=c["entropy"], backend=backend,
                                     **kw)
            outputs = list(out)
            total = out.loss + (0.01 * out.entropy if c["entropy"] else 0)
        wrt = [leaf]
    elif op == "fused_linear_grpo_loss":
        hidden = prep(x["hidden"]).clone().requires_grad_()
        weight = prep(x["weight"]).clone().requires_grad_()
        kw = {k: prep(v) if isinstance(v, torch.Tensor) else v for k, v in _loss_kwargs(c, x).items()}
        out = gk.fused_linear_grpo_loss(hidden, weight, x["ids"], prep(x["old"]), prep(x["adv"]), x["mask"],
                                        temperature=c["temperature"], return_entropy=c["entropy"], chunk_size=3,
                                        backend=backend, **kw)
        outputs = list(out)
        total = out.loss + (0.01 * out.entropy if c["entropy"] else 0)
        wrt = [hidden, weight]
    else:
        raise ValueError(f"unknown op {op!r}")
    grads = torch.autograd.grad(total, wrt, allow_unused=True) if total.requires_grad else [None] * len(wrt)
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in outputs], list(grads)


def _tolerance(c: dict, grad_dtype: torch.dtype) -> tuple[dict, dict]:
    """(tolerance of the float outputs, of the gradients) against the float64 reference."""
    if c["dtype"] == torch.float64:
        value = dict(atol=1e-9, rtol=1e-9)
    else:
        value = dict(atol=2e-5, rtol=2e-4)
    if grad_dtype == torch.bfloat16:
        return value, dict(atol=1e-6, rtol=2**-7)
    if grad_dtype == torch.float64:
        return value, dict(atol=1e-9, rtol=1e-9)
    return value, dict(atol=2e-5, rtol=2e-4)


def _outcome(c: dict, x: dict, backend: str, **kw):
    try:
        return run(c, x, backend, **kw), None
    except (ValueError, TypeError) as error:
        return None, error


# --------------------------------------------------------------------------- #
# the properties
# --------------------------------------------------------------------------- #
OPS = ("token_logprobs", "grpo_loss", "fused_grpo_loss", "fused_linear_grpo_loss")


def _check_against_reference(c: dict, backend: str) -> None:
    x = make_inputs(c, poisoned=True)
    expected, expected_error = _outcome(c, x, "reference", float64=True)
    got, error = _outcome(c, x, backend)
    if expected_error is not None or error is not None:
        COUNTS["same error"] += 1
        assert type(error) is type(expected_error), (backend, error, expected_error)
        return
    (exp_out, exp_grads), (out, grads) = expected, got
    unmasked_bad = c["unmasked_nonfinite"] and bool(x["keep"].any())
    if unmasked_bad:  # a non-finite value where it counts: the loss is non-finite everywhere alike
        COUNTS["non-finite propagated"] += 1
        assert bool(torch.isfinite(out[0]).all()) == bool(torch.isfinite(exp_out[0]).all()), (backend, out[0],
                                                                                               exp_out[0])
        return
    COUNTS["values compared"] += 1
    for k, (a, b) in enumerate(zip(out, exp_out)):
        assert (a is None) == (b is None), (backend, k)
        if a is None:
            continue
        value_tol, _ = _tolerance(c, a.dtype)
        torch.testing.assert_close(a.double().reshape(b.shape), b.double(), **value_tol,
                                   msg=lambda m: f"{backend} output {k}: {m}")
    for k, (a, b) in enumerate(zip(grads, exp_grads)):
        if a is None and b is None:
            continue
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a, dtype=torch.float64) if b is None else b
        _, grad_tol = _tolerance(c, a.dtype)
        if a.dtype == torch.bfloat16:  # a loss and an entropy gradient, each rounded to bfloat16, then summed
            grad_tol["atol"] = max(grad_tol["atol"], 2**-8 * float(b.abs().max()))
        torch.testing.assert_close(a.double(), b.to(a.dtype).double(), **grad_tol,
                                   msg=lambda m: f"{backend} gradient {k}: {m}")


# Examples per op and property (GRPO_FUZZ_SCALE multiplies them): the fused-linear op is the slowest under the
# Triton interpreter. About a minute in all on 2 cores.
EXAMPLES = {"token_logprobs": 40, "grpo_loss": 40, "fused_grpo_loss": 30, "fused_linear_grpo_loss": 12}


def _fuzz(op: str):
    scale = float(os.environ.get("GRPO_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(EXAMPLES[op] * scale)), deadline=None, derandomize=True,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("op", OPS)
def test_backends_match_the_reference(op):
    @_fuzz(op)
    @given(data=st.data())
    def check(data):
        c = data.draw(cases(op))
        COUNTS[f"cases {op}"] += 1
        rows = c["B"] * c["T"]
        for backend in _backends(op):
            if backend == "reference" or not _runs(backend, rows, c["V"]):
                continue
            COUNTS[f"comparisons {backend}"] += 1
            _check_against_reference(c, backend)

    check()


@pytest.mark.parametrize("op", OPS)
def test_poisoned_padding_changes_nothing(op):
    @_fuzz(op)
    @given(data=st.data())
    def check(data):
        c = data.draw(cases(op))
        c["unmasked_nonfinite"] = None
        COUNTS[f"poison cases {op}"] += 1
        rows = c["B"] * c["T"]
        clean, poisoned = make_inputs(c, poisoned=False), make_inputs(c, poisoned=True)
        for backend in _backends(op):
            if not _runs(backend, rows, c["V"]):
                continue
            a, error_a = _outcome(c, clean, backend)
            b, error_b = _outcome(c, poisoned, backend)
            assert type(error_a) is type(error_b), (backend, error_a, error_b)
            if a is None:
                continue
            COUNTS[f"poison {backend}"] += 1
            for k, (u, v) in enumerate(zip(a[0] + a[1], b[0] + b[1])):
                assert (u is None) == (v is None), (backend, k)
                if u is not None:
                    torch.testing.assert_close(v, u, atol=0, rtol=0, equal_nan=True,
                                               msg=lambda m: f"{backend} output/gradient {k}: {m}")
            grad = b[1][0]
            if op != "fused_linear_grpo_loss" and grad is not None:  # exactly 0 where nothing counts
                assert bool((grad[~poisoned["keep"]] == 0).all()), (backend, "gradient at masked positions")

    check()


def teardown_module(module):
    print("\nfuzz counts:", dict(sorted(COUNTS.items())))

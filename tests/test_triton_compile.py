"""The Triton loss kernels' interface: named option codes, the numeric options by name, and an sm_90 compile.

The interpreter (every other Triton test here) is lenient about types; the
compiler is not. So the ``grpo_loss`` forward and backward kernels and the
single-pass ``fused_grpo_loss`` kernel are compiled to sm_90 cubins (no GPU
needed) with their float64 scalars typed from ``loss_table.SCALAR_NAMES``, one
variant per loss family (and per rollout gate), and an unknown family, KL
estimator, rollout level or gate code must fail the compile.
"""

import importlib
import inspect

import pytest
import torch
import triton.language as tl
from triton_compile import run_compile_script

import grpo_kernels as gk
from grpo_kernels.kernel_options import LossScalars, kernel_loss_options
from grpo_kernels.loss_table import SCALAR_NAMES, Family, KlEstimator, RolloutGate, RolloutLevel

if "triton" not in gk.available_backends("grpo_loss"):
    pytest.skip("the triton backend is not available", allow_module_level=True)

# (importlib: grpo_kernels.triton's attributes of these names are the ops)
loss_module = importlib.import_module("grpo_kernels.triton.grpo_loss")
fused_module = importlib.import_module("grpo_kernels.triton.fused_grpo_loss")

KERNELS = {
    "grpo_loss forward": loss_module._grpo_loss_fwd_kernel,
    "grpo_loss backward": loss_module._grpo_loss_bwd_kernel,
    "fused_grpo_loss": fused_module._fused_grpo_loss_kernel,
}


def test_every_enum_member_has_a_named_code():
    """Each member of the loss table's enums has its constexpr in the kernels' module, with the member's value."""
    for enum, prefix in ((Family, ""), (KlEstimator, "KL_"), (RolloutLevel, "ROLLOUT_"), (RolloutGate, "GATE_")):
        for member in enum:
            code = getattr(loss_module, prefix + member.name)
            assert isinstance(code, tl.constexpr) and code.value == int(member), (enum.__name__, member.name)


@pytest.mark.parametrize("name", KERNELS)
def test_kernels_take_the_scalars_by_name(name):
    """The float64 parameters of each kernel are exactly loss_table.SCALAR_NAMES, the fields of LossScalars."""
    assert LossScalars._fields == SCALAR_NAMES
    params = inspect.signature(KERNELS[name].fn).parameters.values()
    assert tuple(p.name for p in params if p.annotation in (tl.float64, "tl.float64")) == SCALAR_NAMES


def test_unknown_code_is_refused_under_the_interpreter():
    """A code outside the enums fails the kernel's static assertion (under TRITON_INTERPRET as in the compile)."""
    logp, old, adv = torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(1)
    mask = torch.ones(1, 3, dtype=torch.bool)
    cfg = kernel_loss_options(3, adv, {})
    for field in ("family", "kl_estimator", "rollout_is", "rollout_is_gate"):
        bad = cfg._replace(**{field: 9})
        with pytest.raises(Exception, match="unknown"):
            loss_module._GRPOLossFunction.apply(logp, old, None, adv, mask, None, None, bad)
    loss_module._GRPOLossFunction.apply(logp, old, None, adv, mask, None, None, cfg)  # the valid codes run


def test_kernels_compile_for_hopper():
    """Both grpo_loss kernels and the fused kernel compile to sm_90 cubins, one variant per family (every code path
    on between them), float64 scalars typed fp64; unknown codes fail the compile."""
    script = r'''
import importlib, inspect
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from grpo_kernels.loss_table import SCALAR_NAMES, Family, KlEstimator, RolloutGate, RolloutLevel
loss_module = importlib.import_module("grpo_kernels.triton.grpo_loss")
fused_module = importlib.import_module("grpo_kernels.triton.fused_grpo_loss")

TARGET = GPUTarget("cuda", 90, 32)
FP32_ARGS = ("inv_t_hi", "inv_t_lo")  # 1/T as a float32 pair
I64_ARGS = ("stride_outer", "dx_stride_outer", "ignore_index")


def build(kernel, constexprs, pointers, default_pointer, warps):
    """Compile ``kernel``: pointers by name (else ``default_pointer``), SCALAR_NAMES fp64, other ints i32."""
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in SCALAR_NAMES:
            sig[name] = "fp64"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, default_pointer)
        else:
            sig[name] = "fp32" if name in FP32_ARGS else "i64" if name in I64_ARGS else "i32"
    return compile(ASTSource(kernel, sig, constexprs=constexprs), target=TARGET, options=dict(num_warps=warps))


def loss_flags(family, *, seq_level, kl, rollout, delta=False, clip_c=False, bias=False, iw=False, is_mask=False,
               opm=False, log_clamp=False, gate=RolloutGate.RATIO):
    return dict(FAMILY=int(family), SHARED=seq_level or family == Family.GMPO, KL_EST=int(kl), ADD_KL=True,
                BIAS_KL=bias, HAS_IW=iw, HAS_DELTA=delta, HAS_C=clip_c, ROLLOUT=int(rollout), IS_MASK=is_mask,
                GATE=int(gate), HAS_OPM=opm, LOG_CLAMP=log_clamp, HAS_SAMP=rollout != RolloutLevel.NONE)


def grpo_loss_kernels(xdt, dtype, flags, seq_level):
    cdt = "fp64" if dtype == tl.float64 else "fp32"
    pointers = dict(logp_ptr=xdt, old_logp_ptr=xdt, ref_logp_ptr=xdt, samp_ptr=xdt, grad_logp_ptr=xdt,
                    adv_ptr="fp32", iw_ptr="fp32", mask_ptr="u8")
    seq_pass = (seq_level or flags["FAMILY"] in (Family.VESPO, Family.GMPO)
                or flags["ROLLOUT"] == RolloutLevel.SEQUENCE or flags["HAS_OPM"])
    common = dict(flags, DTYPE=dtype, BLOCK_T=1024)
    build(loss_module._grpo_loss_fwd_kernel, dict(common, SEQ_LEVEL=seq_level, SEQ_PASS=seq_pass, HAS_REF=True,
                                                  PER_SEQ_METRICS=seq_level), pointers, cdt, 4)
    build(loss_module._grpo_loss_bwd_kernel, common, pointers, cdt, 4)


# (input dtype, compute dtype, family, options): one per family, every option on in at least one
VARIANTS = [
    ("bf16", tl.float32, loss_flags(Family.CLIPPED, seq_level=False, kl=KlEstimator.K3, rollout=RolloutLevel.TOKEN,
                                    delta=True, clip_c=True, bias=True, iw=True, log_clamp=True), False),
    ("fp64", tl.float64, loss_flags(Family.CLIPPED, seq_level=True, kl=KlEstimator.K1, rollout=RolloutLevel.SEQUENCE,
                                    delta=True, iw=True, opm=True, log_clamp=True), True),
    ("fp32", tl.float32, loss_flags(Family.SAPO, seq_level=True, kl=KlEstimator.LOW_VAR_KL,
                                    rollout=RolloutLevel.SEQUENCE, iw=True, is_mask=True, opm=True,
                                    gate=RolloutGate.GEOMETRIC_MEAN), True),
    ("fp64", tl.float64, loss_flags(Family.CISPO, seq_level=False, kl=KlEstimator.K2, rollout=RolloutLevel.NONE,
                                    bias=True, log_clamp=True), False),
    ("fp32", tl.float32, loss_flags(Family.VESPO, seq_level=False, kl=KlEstimator.K3, rollout=RolloutLevel.TOKEN,
                                    bias=True, iw=True, is_mask=True, opm=True, log_clamp=True,
                                    gate=RolloutGate.BINARY_KL), False),
    ("fp64", tl.float64, loss_flags(Family.GMPO, seq_level=False, kl=KlEstimator.LOW_VAR_KL,
                                    rollout=RolloutLevel.TOKEN, iw=True, opm=True, log_clamp=True), False),
    ("bf16", tl.float32, loss_flags(Family.GPG, seq_level=False, kl=KlEstimator.K3, rollout=RolloutLevel.SEQUENCE,
                                    bias=True, is_mask=True, opm=True, gate=RolloutGate.TV), False),
]
assert {v[2]["FAMILY"] for v in VARIANTS} == {int(f) for f in Family}
assert {v[2]["GATE"] for v in VARIANTS} == {int(g) for g in RolloutGate}
for xdt, dtype, flags, seq_level in VARIANTS:
    grpo_loss_kernels(xdt, dtype, flags, seq_level)

# the fused kernel: token-level ratios only (no sequence pass)
# (per_row_t: a per-row temperature tensor, t_ptr in the compute dtype)
for xdt, acc, block, warps, family, rollout, per_row_t in (
        ("bf16", tl.float32, 8192, 16, Family.CLIPPED, RolloutLevel.TOKEN, True),
        ("fp64", tl.float64, 2048, 8, Family.SAPO, RolloutLevel.NONE, True),
        ("bf16", tl.float32, 8192, 16, Family.GPG, RolloutLevel.TOKEN, False)):
    flags = loss_flags(family, seq_level=False, kl=KlEstimator.LOW_VAR_KL, rollout=rollout, delta=True, clip_c=True,
                       bias=True, iw=True, is_mask=family == Family.GPG, log_clamp=True,
                       gate=RolloutGate.TV if family == Family.GPG else RolloutGate.RATIO)
    constexprs = dict(flags, HAS_OLD=True, RETURN_ENTROPY=True, WRITE_GRAD=True, BLOCK_V=block, ACC=acc,
                      PER_ROW_T=per_row_t)
    pointers = dict(x_ptr=xdt, dx_ptr=xdt, y_ptr="i64", keep_ptr="u8", adv_ptr="fp32")
    build(fused_module._fused_grpo_loss_kernel, constexprs, pointers, "fp64" if acc == tl.float64 else "fp32", warps)

# an unknown code fails the compile, with the name of what is unknown
good = loss_flags(Family.CLIPPED, seq_level=False, kl=KlEstimator.K3, rollout=RolloutLevel.NONE)
for field, message in (("FAMILY", "unknown loss family code"), ("KL_EST", "unknown KL estimator code"),
                       ("ROLLOUT", "unknown rollout level code"), ("GATE", "unknown rollout gate code")):
    try:
        grpo_loss_kernels("fp32", tl.float32, dict(good, **{field: 9}), False)
    except Exception as error:
        chain = []  # the static assertion's message is in the chain of causes
        while error is not None:
            chain.append(str(error))
            error = error.__cause__ or error.__context__
        assert any(message in text for text in chain), (field, chain[-1][-500:])
    else:
        raise AssertionError(f"{field}=9 compiled")
print("compiled")
'''
    run_compile_script(script)

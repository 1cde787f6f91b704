"""The CUDA kernels of grpo_kernels._C (csrc/cuda) against its CPU kernels (csrc/cpu), entry point by entry
point, and the extension's glue (grpo_kernels.native) on CUDA tensors against the reference. Needs a GPU and an
extension built with CUDA; registry-independent (the "cuda" backend need not be registered).

Edge cases of the row kernels: V = 1, V not a multiple of the 16-byte pack, rows that start off a 16-byte
boundary, strided and transposed leading dims, ignored rows, -inf logits, in-place gradients, more rows than a
65535-block grid.
"""

import pytest
import torch

import grpo_kernels.native as native
import grpo_kernels.reference as ref
from grpo_kernels._extension import _C
from grpo_kernels.kernel_options import kernel_loss_options
from grpo_kernels.loss_table import Family, KlEstimator, RolloutGate, RolloutLevel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_C is None or not _C.with_cuda(), reason="needs grpo_kernels._C built with CUDA"),
]

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10)}
LOW = dict(atol=2e-5, rtol=2e-5)


def close(a, b, dtype=torch.float32, **kw):
    """CUDA output a against CPU output b; gradients in a 16-bit dtype within one rounding of that dtype."""
    tol = dict(TOL.get(dtype, LOW))
    if a.dtype in (torch.bfloat16, torch.float16):
        tol = dict(atol=1e-6, rtol=torch.finfo(a.dtype).eps)
    tol.update(kw)
    torch.testing.assert_close(a.cpu(), b, **tol)


# Views [.., V] of a base [R, 2, V + 3]: rows at 16-byte boundaries, rows one element off them (row stride
# 2 (V + 3)), and leading dims that do not merge (transposed).
LAYOUTS = {
    "contiguous": lambda b, V: b[:, 0, :V].contiguous(),
    "unaligned rows": lambda b, V: b[:, 0, 1:V + 1],
    "transposed leading dims": lambda b, V: b[:, :, 1:V + 1].transpose(0, 1),
}


def base_logits(R, V, dtype):
    base = (3 * torch.randn(R, 2, V + 3, dtype=torch.float64)).to(dtype)
    if V > 3:
        base[..., 1] = float("-inf")  # -inf logits: p = 0, no NaN
    return base


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("V", [1, 7, 9, 64, 1000, 4099])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logprobs_rows(dtype, V, layout):
    view = LAYOUTS[layout]
    base = base_logits(5, V, dtype)
    x, xc = view(base, V), view(base.cuda(), V)
    ids = torch.randint(0, V, x.shape[:-1])
    ids.view(-1)[1] = -100
    yc = ids.cuda()
    for entropy in (False, True):
        cpu = _C.token_logprobs_fwd(x, ids, 0.7, -100, entropy)
        gpu = _C.token_logprobs_fwd(xc, yc, 0.7, -100, entropy)
        for a, b in zip(gpu, cpu):
            close(a, b, dtype)
    logp, lse, ent = _C.token_logprobs_fwd(x, ids, 0.7, -100, True)
    g, g_ent = torch.randn_like(logp), torch.randn_like(ent)
    cpu = _C.token_logprobs_bwd(x, ids, lse, g, ent, g_ent, 0.7, -100, False)
    gpu = _C.token_logprobs_bwd(xc, yc, lse.cuda(), g.cuda(), ent.cuda(), g_ent.cuda(), 0.7, -100, False)
    close(gpu, cpu, dtype)
    in_place = view(base.clone().cuda(), V)
    out = _C.token_logprobs_bwd(in_place, yc, lse.cuda(), g.cuda(), None, None, 0.7, -100, True)
    assert out.data_ptr() == in_place.data_ptr()
    close(out, _C.token_logprobs_bwd(x, ids, lse, g, None, None, 0.7, -100, False), dtype)


def test_token_logprobs_many_rows():
    """More rows than 65535 blocks, int32 ids."""
    x = torch.randn(70000, 33, device="cuda")
    ids = torch.randint(0, 33, (70000,), device="cuda", dtype=torch.int32)
    logp, lse, _ = _C.token_logprobs_fwd(x, ids, 1.0, -100, False)
    expected = torch.log_softmax(x.double(), -1).gather(-1, ids.long()[:, None])[:, 0]
    torch.testing.assert_close(logp.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("scale", [0, 1, 2])
@pytest.mark.parametrize("rloo", [False, True])
def test_group_normalize(dtype, scale, rloo):
    r = torch.randn(50, 3, dtype=dtype)
    r[3, 0] = r[7, 1] = float("nan")
    order = torch.randperm(50)
    offsets = torch.tensor([0, 1, 2, 10, 10, 47, 50])
    batch_std = r.std(0) if scale == 1 else None
    for o in (None, order):
        cpu = _C.group_normalize(r, o, offsets, batch_std, 1e-4, scale, rloo)
        gpu = _C.group_normalize(r.cuda(), None if o is None else o.cuda(), offsets.cuda(),
                                 None if batch_std is None else batch_std.cuda(), 1e-4, scale, rloo)
        for a, b in zip(gpu, cpu):
            torch.testing.assert_close(a.cpu(), b, equal_nan=True, **TOL.get(dtype, LOW))


# The numeric options of the loss's defaults (loss_table.KERNEL_SCALARS), some moved off them.
SCALARS = kernel_loss_options(1, torch.zeros(1), {}).scalars._replace(
    lo=0.8, hi=1.28, eps_high=0.28, eps_low=0.2, delta=1.5, clip_c=3.0, beta=0.04, is_min=0.5, is_max=2.0,
    off_policy_threshold=0.05, log_clamp=1.0)


def loss_config(family, seq_level, kl, bias_kl, delta, clip_c, rollout=RolloutLevel.NONE, off_policy=False,
                log_clamp=False, gate=RolloutGate.RATIO, per_seq_metrics=False, has_iw=True):
    """A LossConfig as kernel_options.kernel_loss_options fills it (rollout masked with off_policy)."""
    cfg = _C.LossConfig(SCALARS)
    cfg.family, cfg.seq_level, cfg.kl_estimator = family, seq_level, kl
    cfg.seq_pass = (seq_level or family in (Family.VESPO, Family.GMPO) or rollout == RolloutLevel.SEQUENCE
                    or off_policy)
    cfg.shared_ratio = seq_level or family == Family.GMPO
    cfg.add_kl, cfg.bias_kl = True, bias_kl
    cfg.has_delta, cfg.has_clip_c = delta, clip_c
    cfg.has_iw, cfg.rollout_is, cfg.rollout_is_mask, cfg.rollout_is_gate = has_iw, rollout, off_policy, gate
    cfg.has_off_policy_mask, cfg.has_log_clamp = off_policy, log_clamp
    cfg.per_seq_metrics = per_seq_metrics
    return cfg


CONFIGS = [(f, s, kl, b, d, c) for f in (Family.CLIPPED, Family.CISPO, Family.SAPO) for s in (False, True)
           for kl in (KlEstimator.K3, KlEstimator.LOW_VAR_KL) for b, d, c in ((False, False, False), (True, True, True))]
# the loss variants: vespo, gmpo, gpg, rollout importance sampling, off-policy mask, log-ratio clamp
CONFIGS += [(Family.VESPO, False, KlEstimator.K3, True, False, False, RolloutLevel.TOKEN, True, True),
            (Family.GMPO, False, KlEstimator.LOW_VAR_KL, False, False, False, RolloutLevel.TOKEN, False, True),
            (Family.GPG, False, KlEstimator.K3, False, False, False, RolloutLevel.SEQUENCE, True, False),
            (Family.CLIPPED, True, KlEstimator.K3, True, True, True, RolloutLevel.SEQUENCE, True, True),
            (Family.SAPO, False, KlEstimator.LOW_VAR_KL, True, False, False, RolloutLevel.TOKEN, True, False)]
# the rollout gates (masks: off_policy on)
CONFIGS += [(Family.CLIPPED, False, KlEstimator.K3, False, False, False, RolloutLevel.TOKEN, True, True,
             RolloutGate.TV),
            (Family.SAPO, True, KlEstimator.LOW_VAR_KL, True, False, False, RolloutLevel.SEQUENCE, True, False,
             RolloutGate.GEOMETRIC_MEAN),
            (Family.GPG, False, KlEstimator.K3, False, False, False, RolloutLevel.SEQUENCE, True, True,
             RolloutGate.BINARY_KL)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("T", [1, 37, 700])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_grpo_loss(dtype, T, config):
    B = 5
    cfg = loss_config(*config, per_seq_metrics=config[1] and T != 1)
    logp = -4 * torch.rand(B, T, dtype=dtype)
    old = (logp + 0.3 * torch.randn(B, T, dtype=dtype)).clamp(max=0)
    old[0, 0] = logp[0, 0]  # ratio exactly 1: ties at the clip bounds
    refl = -4 * torch.rand(B, T, dtype=dtype)
    adv = torch.randn(B, dtype=dtype)[:, None].expand(B, T)  # a broadcast view
    mask = (torch.rand(B, T) > 0.3).to(dtype)
    iw = torch.rand(B, T, dtype=dtype)
    sampling = (old + 0.3 * torch.randn(B, T, dtype=dtype)).clamp(max=0)
    sampling[1, 0] = float("nan")
    args = (logp, old, refl, adv, mask, iw, sampling)
    cuda_args = tuple(a.cuda() for a in args)
    cpu = _C.grpo_loss_fwd(*args, cfg)
    gpu = _C.grpo_loss_fwd(*cuda_args, cfg)
    for a, b in zip(gpu, cpu):
        close(a, b, dtype)
    seq_grad = torch.randn(B, dtype=dtype)
    close(_C.grpo_loss_bwd(*cuda_args, gpu[1], seq_grad.cuda(), cfg), _C.grpo_loss_bwd(*args, cpu[1], seq_grad, cfg),
          dtype)
    on_policy = (logp, None, None, adv, mask, None, None)
    on_policy_cfg = loss_config(*config[:6], per_seq_metrics=config[1] and T != 1, has_iw=False)
    close(_C.grpo_loss_fwd(*(None if a is None else a.cuda() for a in on_policy), on_policy_cfg)[0],
          _C.grpo_loss_fwd(*on_policy, on_policy_cfg)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V", [1, 9, 1003])
@pytest.mark.parametrize("entropy", [False, True])
def test_fused_grpo_loss(dtype, V, entropy):
    B, T = 3, 4
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    base = (3 * torch.randn(B, T, V + 1, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, V, (B, T))
    ids[1, 2] = -100
    keep = ((torch.rand(B, T) > 0.3) & (ids != -100)).to(acc)
    old = -4 * torch.rand(B, T, dtype=acc)
    refl = -4 * torch.rand(B, T, dtype=acc)
    adv = torch.randn(B, dtype=acc)[:, None].expand(B, T)
    seq_weight = torch.rand(B, dtype=acc)
    cfg = loss_config(Family.CLIPPED, False, KlEstimator.K3, False, False, True, rollout=RolloutLevel.TOKEN,
                      log_clamp=True, has_iw=False)
    sampling = -4 * torch.rand(B, T, dtype=acc)
    args = (ids, old, refl, adv, keep, None, sampling, seq_weight, cfg, 0.8, -100, entropy, True)
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    for view in (lambda b: b[..., :V], lambda b: b[..., 1:]):  # rows 16-byte aligned or not (V + 1 apart)
        expected = _C.fused_grpo_loss_fwd(view(base).contiguous(), *args, False)
        for inplace in (False, True):
            xc = view(base.clone().cuda())
            gpu = _C.fused_grpo_loss_fwd(xc, *cuda_args, inplace)
            for a, b in zip(gpu, expected):
                close(a, b, dtype)
            assert (gpu[5].data_ptr() == xc.data_ptr()) == inplace


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_native_glue_on_cuda(dtype, level):
    """grpo_kernels.native end to end on CUDA tensors (autograd included) against the reference."""
    B, T, V = 3, 6, 301
    logits = (3 * torch.randn(B, T, V, dtype=torch.float64)).to(dtype)
    ids = torch.randint(0, V, (B, T))
    ids[0, 1] = -100
    old = -4 * torch.rand(B, T, dtype=torch.float64)
    adv = torch.randn(B, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.2
    opts = dict(ref_logprobs=-4 * torch.rand(B, T, dtype=torch.float64), beta=0.04, importance_sampling_level=level,
                temperature=0.9, return_entropy=True)
    x = logits.double().requires_grad_()
    expected = ref.fused_grpo_loss(x, ids, old, adv, mask, **opts)
    expected.loss.backward()
    xc = logits.cuda().requires_grad_()
    cuda_opts = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in opts.items()}
    out = native.fused_grpo_loss(xc, ids.cuda(), old.cuda(), adv.cuda(), mask.cuda(), **cuda_opts)
    out.loss.backward()
    tol = TOL.get(dtype, dict(atol=1e-5, rtol=1e-5))
    torch.testing.assert_close(out.loss.double().cpu(), expected.loss, **tol)
    torch.testing.assert_close(out.entropy.double().cpu(), expected.entropy, **tol)
    if dtype == torch.bfloat16:  # the float64 gradient rounded to bfloat16, within one rounding
        torch.testing.assert_close(xc.grad.double().cpu(), x.grad.to(dtype).double(), atol=1e-12, rtol=2**-7)
    else:
        torch.testing.assert_close(xc.grad.double().cpu(), x.grad, **tol)
    logp = native.token_logprobs(xc.detach(), ids.cuda(), temperature=0.9)
    torch.testing.assert_close(logp.double().cpu(), ref.token_logprobs(logits.double(), ids, temperature=0.9),
                               **tol)


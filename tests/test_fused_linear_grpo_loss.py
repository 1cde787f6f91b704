"""fused_linear_grpo_loss: equals the reference composition (loss, metrics, gradients of hidden/weight/bias) for
every loss option, and never forms the [B·T, V] logits."""

import importlib

import pytest
import torch
from loss_cases import TOKEN_RATIO_LOSS_TYPES, applicable
from test_linear_token_logprobs import TOLERANCES, LargestTensor, WeightCasts, nan_filled, triton_on_cpu

import grpo_kernels as gk

OP = "fused_linear_grpo_loss"

LOSS_TYPES = TOKEN_RATIO_LOSS_TYPES  # the OPTIONS grid includes the sequence level; the others: VARIANTS


def make_inputs(B=3, T=4, H=8, V=29, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / 2).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, V, (B, T), generator=g)
    if B > 1 and T > 2:
        ids[1, 2] = -100
    with torch.no_grad():
        logp = gk.linear_token_logprobs(hidden.double(), weight.double(), ids, bias=bias.double(),
                                        backend="reference")
    tensors = dict(
        old=logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        ref=logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64),
        adv=torch.randn(B, generator=g, dtype=torch.float64),
        iw=0.5 + torch.rand(B, T, generator=g, dtype=torch.float64),
    )
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[-1, :] = False  # a fully masked sequence
    mask[0, 0] = True
    return hidden, weight, bias, ids, mask, tensors


def run(hidden, weight, bias, ids, mask, tensors, *, backend, upcast=False, entropy_coef=0.0, **options):
    """The result and the gradients ``(d hidden, d weight, d bias)`` of ``loss + entropy_coef·entropy``."""
    leaves = [None if t is None else t.detach().clone() for t in (hidden, weight, bias)]
    if upcast:
        leaves = [None if t is None else t.double() for t in leaves]
    for t in leaves:
        if t is not None:
            t.requires_grad_()
    out = gk.fused_linear_grpo_loss(leaves[0], leaves[1], ids, tensors["old"], tensors["adv"], mask, bias=leaves[2],
                                    backend=backend, **options)
    objective = out.loss if not entropy_coef else out.loss + entropy_coef * out.entropy
    objective.backward()
    return out, [None if t is None else t.grad for t in leaves]


def assert_matches_spec(backend, inputs, **options):
    ours, our_grads = run(*inputs, backend=backend, **options)
    spec, spec_grads = run(*inputs, backend="reference", upcast=True, **options)
    tol = TOLERANCES[inputs[0].dtype]
    for name, a, b in zip(ours._fields + ("d hidden", "d weight", "d bias"), (*ours, *our_grads),
                          (*spec, *spec_grads)):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a.double(), b.to(a.dtype).double(), **tol, msg=lambda m: f"{name}: {m}")


OPTIONS = [
    dict(),
    dict(beta=0.04, kl_estimator="k1"),
    dict(beta=0.04, importance_sampling_level="sequence", use_bias_correction_kl=True),
    dict(epsilon_high=0.28, delta=1.5, clip_ratio_c=3.0),
    dict(kl_estimator="low_var_kl", beta=0.1, num_items_in_batch=7, importance_weights="iw"),
    dict(importance_sampling_level="sequence", kl_estimator="k2", beta=0.1, max_completion_length=6),
]
# delta / clip_ratio_c apply to the clipped loss types only
CASES = [(lt, o) for lt in LOSS_TYPES for o in OPTIONS if applicable(lt, o)]


def with_tensors(options: dict, tensors: dict) -> dict:
    options = dict(options)
    if options.get("beta"):
        options["ref_logprobs"] = tensors["ref"]
    if "importance_weights" in options:
        options["importance_weights"] = tensors[options["importance_weights"]]
    return options


@pytest.mark.parametrize("loss_type,opts", CASES, ids=[f"{lt}-{'-'.join(sorted(o)) or 'default'}" for lt, o in CASES])
def test_loss_options(backend, loss_type, opts):
    inputs = make_inputs()
    options = with_tensors(dict(opts, loss_type=loss_type), inputs[-1])
    assert_matches_spec(backend, inputs, temperature=0.7, chunk_size=5, return_entropy=True, **options)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
def test_temperature(backend, level, temperature):
    inputs = make_inputs()
    assert_matches_spec(backend, inputs, temperature=temperature, importance_sampling_level=level, chunk_size=5)


@pytest.mark.parametrize("logit_scale,softcap", [(2.5, None), (1.0, 3.0), (0.5, 30.0)])
def test_scale_and_softcap(backend, logit_scale, softcap):
    inputs = make_inputs()
    assert_matches_spec(backend, inputs, logit_scale=logit_scale, softcap=softcap, chunk_size=5,
                        loss_type="grpo", beta=0.04, ref_logprobs=inputs[-1]["ref"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_scale_and_token_weights_reach_each_gradient_once(backend, dtype, level):
    """A logit scale that is not a power of two, with a bias and no softcap (the chunked driver puts it on ``h``,
    ``b`` and the per-token weights, never on the tile), and per-token weights ``dL/dlogp`` that differ token by
    token (a KL term, masked and ignored tokens, an entropy bonus): either applied twice or not at all changes
    ``d hidden``, ``d weight`` and ``d bias``. The hidden states of tokens that do not count are NaN."""
    hidden, weight, bias, ids, mask, tensors = make_inputs(B=3, T=5, H=12, V=31, dtype=dtype)
    hidden[~mask | (ids == -100)] = float("nan")
    assert_matches_spec(backend, (hidden, weight, bias, ids, mask, tensors), importance_sampling_level=level,
                        logit_scale=0.7, temperature=0.6, chunk_size=4, loss_type="dapo", beta=0.04,
                        ref_logprobs=tensors["ref"], return_entropy=True, entropy_coef=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_dtypes(backend, dtype, level):
    inputs = make_inputs(dtype=dtype)
    assert_matches_spec(backend, inputs, importance_sampling_level=level, softcap=5.0, chunk_size=5,
                        return_entropy=True, entropy_coef=0.1)


@pytest.mark.parametrize("chunk_size", [1, 5, 100, None])
def test_chunk_sizes(backend, chunk_size):
    """Chunks of one token, chunks not dividing B·T = 12, one chunk larger than B·T, the default."""
    inputs = make_inputs()
    assert_matches_spec(backend, inputs, chunk_size=chunk_size, return_entropy=True)


@pytest.mark.parametrize("B,T,H,V", [(1, 1, 5, 17), (3, 7, 20, 45)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sizes(backend, B, T, H, V, level):
    """One token; several token tiles of the kernels; H and V not multiples of their blocks."""
    inputs = make_inputs(B=B, T=T, H=H, V=V)
    assert_matches_spec(backend, inputs, importance_sampling_level=level, temperature=2.0, logit_scale=1.5,
                        softcap=4.0, chunk_size=8, return_entropy=True, entropy_coef=0.2, loss_type="grpo")


def test_without_bias_per_token_advantages_on_policy(backend):
    hidden, weight, _, ids, mask, tensors = make_inputs()
    tensors = dict(tensors, old=None, adv=torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)))
    assert_matches_spec(backend, (hidden, weight, None, ids, mask, tensors), loss_type="bnpo", chunk_size=5)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_entropy_gradient(backend, level):
    """An entropy bonus: loss + c·entropy, and the entropy metric alone."""
    inputs = make_inputs()
    assert_matches_spec(backend, inputs, importance_sampling_level=level, chunk_size=5, return_entropy=True,
                        entropy_coef=-0.3)
    hidden, weight, bias, ids, mask, tensors = inputs
    grads = []
    for b in (backend, "reference"):
        w = weight.clone().requires_grad_()
        out = gk.fused_linear_grpo_loss(hidden, w, ids, tensors["old"], tensors["adv"], mask, bias=bias,
                                        return_entropy=True, chunk_size=5, importance_sampling_level=level, backend=b)
        out.entropy.backward()
        grads.append(w.grad)
    torch.testing.assert_close(*grads, **TOLERANCES[torch.float32])


def test_incoming_gradient_scales(backend):
    hidden, weight, bias, ids, mask, tensors = make_inputs()
    grads = []
    for scale in (1.0, -2.5):
        h = hidden.clone().requires_grad_()
        out = gk.fused_linear_grpo_loss(h, weight, ids, tensors["old"], tensors["adv"], mask, bias=bias,
                                        chunk_size=5, backend=backend)
        (scale * out.loss).backward()
        grads.append(h.grad / scale)
    torch.testing.assert_close(*grads)


def test_masked_and_ignored_tokens_get_no_gradient(backend):
    hidden, weight, bias, ids, mask, tensors = make_inputs()
    h = hidden.clone().requires_grad_()
    gk.fused_linear_grpo_loss(h, weight, ids, None, tensors["adv"], mask, bias=bias, chunk_size=5,  # none clipped
                              backend=backend).loss.backward()
    counted = mask & (ids != -100)
    assert (h.grad[~counted] == 0).all() and (h.grad[counted].abs().sum(-1) > 0).all()


def test_second_backward_needs_a_new_forward():
    hidden, weight, bias, ids, mask, tensors = make_inputs()
    h = hidden.clone().requires_grad_()
    out = gk.fused_linear_grpo_loss(h, weight, ids, tensors["old"], tensors["adv"], mask, chunk_size=5,
                                    backend="cpu" if "cpu" in gk.available_backends(OP) else "triton")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_never_forms_the_logits(backend, level):
    """Every tensor created is at most max(chunk·V, V·H, B·T·H) float32 values: never B·T·V."""
    B, T, H, V, chunk = 4, 16, 16, 300, 8
    hidden, weight, bias, ids, mask, tensors = make_inputs(B=B, T=T, H=H, V=V)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with LargestTensor() as mode:
        out = gk.fused_linear_grpo_loss(leaves[0], leaves[1], ids, tensors["old"], tensors["adv"], mask,
                                        bias=leaves[2], return_entropy=True, chunk_size=chunk,
                                        importance_sampling_level=level, backend=backend)
        (out.loss + 0.1 * out.entropy).backward()
    assert all(t.grad is not None for t in leaves)
    if backend == "reference":  # the unfused composition: the control that the mode sees the logits
        assert mode.largest >= 4 * B * T * V
    else:
        assert mode.largest <= 4 * max(chunk * V, V * H, B * T * H) < 4 * B * T * V


# the loss variants: token-level ones (one sweep, the per-token weights from the reference) and ones with a
# sequence pass (two sweeps)
VARIANTS = [
    ("gpg", dict(rollout_is_mode="token_truncate", rollout_is_max=1.2, sampling=True)),
    ("dapo", dict(rollout_is_mode="token_mask", rollout_is_min=0.8, rollout_is_max=1.25, log_ratio_clamp=0.25,
                  sampling=True)),
    ("vespo", dict(rollout_is_mode="token_truncate", sampling=True)),
    ("gmpo", dict(beta=0.04)),
    ("grpo", dict(off_policy_mask_threshold=0.01, sampling=True)),
]


@pytest.mark.parametrize("loss_type,opts", VARIANTS, ids=[f"{lt}-{'-'.join(sorted(o))}" for lt, o in VARIANTS])
def test_loss_variants(backend, loss_type, opts):
    inputs = make_inputs()
    tensors = inputs[-1]
    options = with_tensors(dict(opts, loss_type=loss_type), tensors)
    if options.pop("sampling", False):
        g = torch.Generator().manual_seed(3)
        options["sampling_logprobs"] = tensors["old"] + 0.3 * torch.randn(tensors["old"].shape, generator=g,
                                                                          dtype=torch.float64)
    assert_matches_spec(backend, inputs, temperature=0.7, chunk_size=5, **options)


class CountedKernel:
    """A Triton kernel whose launches are counted (with the constexpr keywords of each launch)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            self.launches.append(kwargs)
            return launch(*args, **kwargs)

        return counted


# (level, entropy bonus, launches of the recomputing gradient kernel) for 12 tokens in chunks of 5
RECOMPUTE = [("token", 0.0, 0), ("token", 0.2, 3), ("sequence", 0.0, 3)]


@pytest.mark.parametrize("level,entropy_coef,recomputed", RECOMPUTE, ids=[f"{lv}-{c}" for lv, c, _ in RECOMPUTE])
def test_triton_token_level_forward_does_not_recompute_the_logits(monkeypatch, level, entropy_coef, recomputed):
    """At token level the forward's stats kernel also writes each chunk's logits tile, which the row gradient
    kernel turns into d logits in place: the tl.dot gradient kernel, which forms the tiles again, never runs
    (6·N·V·H matmul FLOPs). It runs once per chunk where the weights are not known in the forward: the
    sequence level's second sweep and an entropy bonus's backward (the control that the count sees it)."""
    triton_on_cpu()
    linear_logprobs = importlib.import_module("grpo_kernels.triton.linear_logprobs")
    token_logprobs = importlib.import_module("grpo_kernels.triton.token_logprobs")  # the package exports a function
    kernels = {}
    for module, name in ((linear_logprobs, "_linear_stats_kernel"), (linear_logprobs, "_linear_grad_kernel"),
                         (token_logprobs, "_token_logprobs_bwd_kernel")):
        kernels[name] = CountedKernel(getattr(module, name))
        monkeypatch.setattr(module, name, kernels[name])
    inputs = make_inputs()  # 12 tokens: 3 chunks of at most 5
    assert_matches_spec("triton", inputs, importance_sampling_level=level, temperature=0.7, logit_scale=1.5,
                        softcap=4.0, chunk_size=5, return_entropy=True, entropy_coef=entropy_coef)
    token_level = level == "token"
    assert len(kernels["_linear_grad_kernel"].launches) == recomputed
    # token level: a stats launch per chunk, writing its tile; sequence level: one for every token, no tile
    writes_tile = [k["WRITE_TILE"] for k in kernels["_linear_stats_kernel"].launches]
    assert writes_tile == ([True] * 3 if token_level else [False])
    assert [k["SOFTCAP"] for k in kernels["_token_logprobs_bwd_kernel"].launches] == [True] * 3 * token_level


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_minus_infinity_bias(backend, level, softcap):
    """Vocabulary entries switched off by a -inf bias (a whole vocabulary tile of them; no sampled id among them):
    p = 0 there, no NaN in the loss or the gradients; with a softcap they become -c."""
    hidden, weight, bias, ids, mask, tensors = make_inputs(V=40)
    bias[3] = bias[16:32] = float("-inf")
    ids[(ids == 3) | ((ids >= 16) & (ids < 32))] = 5
    assert_matches_spec(backend, (hidden, weight, bias, ids, mask, tensors), importance_sampling_level=level,
                        softcap=softcap, chunk_size=5, return_entropy=True, entropy_coef=0.1)


def test_garbage_hidden_states_where_nothing_counts(backend):
    """NaN / inf hidden states of masked tokens and ignored ids change no output and no gradient (d hidden is 0
    there): the logits of padding never form a term, and its hidden states never reach d weight (0 · NaN)."""
    g = torch.Generator().manual_seed(0)
    B, T, H, V = 2, 5, 8, 37
    hidden = torch.randn(B, T, H, generator=g)
    weight, bias = 0.3 * torch.randn(V, H, generator=g), torch.randn(V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, 1] = -100
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    old, adv = -1 - torch.rand(B, T, generator=g), torch.randn(B, generator=g)
    poisoned = hidden.clone()
    poisoned[0, 1], poisoned[1, 3], poisoned[1, 4] = float("nan"), float("inf"), float("-inf")

    def run(h):
        h, w, b = (t.clone().requires_grad_() for t in (h, weight, bias))
        out = gk.fused_linear_grpo_loss(h, w, ids, old, adv, mask, bias=b, beta=0.04, ref_logprobs=old + 0.1,
                                        return_entropy=True, backend=backend)
        (out.loss - 0.01 * out.entropy).backward()
        return [t for t in out if t is not None] + [h.grad, w.grad, b.grad]

    for clean, dirty in zip(run(hidden), run(poisoned)):
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    d_hidden = run(poisoned)[-3]
    assert (d_hidden[0, 1] == 0).all() and (d_hidden[1, 3:] == 0).all()


@pytest.mark.parametrize("level,entropy_coef", [("token", 0.0), ("token", 0.1), ("sequence", 0.1)])
def test_cpu_casts_a_bf16_weight_once_per_sweep(level, entropy_coef):
    """The cpu backend's exact bf16 path: float32 GEMMs from a float32 copy of the weight made once per sweep
    (token level: one sweep, a sequence pass two, an entropy bonus's backward one more), not once per chunk."""
    inputs = make_inputs(B=3, T=5, H=12, V=31, dtype=torch.bfloat16)
    with WeightCasts(inputs[1].shape) as mode:
        run(*inputs, backend="cpu", importance_sampling_level=level, chunk_size=4, return_entropy=True,
            entropy_coef=entropy_coef)
    assert mode.count == 1 + (level == "sequence") + (entropy_coef != 0)
    assert_matches_spec("cpu", inputs, importance_sampling_level=level, chunk_size=4, return_entropy=True,
                        entropy_coef=entropy_coef)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_uninitialized_memory_is_never_read(backend, monkeypatch, level, dtype):
    """Gradient accumulators start uninitialized (the first chunk of a sweep writes them with beta = 0; an entropy
    bonus's sweep adds; bf16's float32 ones are leased from the workspace) and the tile buffer is reused: NaN in
    every new buffer changes nothing."""
    if backend == "triton":
        pytest.skip("the driver's accumulators are the cpu backend's too; the interpreter is slow")
    inputs = make_inputs(B=3, T=5, H=6, V=19, dtype=dtype)
    options = dict(importance_sampling_level=level, chunk_size=4, return_entropy=True, entropy_coef=0.1,
                   backend=backend)
    clean_out, clean_grads = run(*inputs, **options)
    nan_filled(monkeypatch)
    out, grads = run(*inputs, **options)
    for a, b in zip([t for t in out if t is not None] + grads, [t for t in clean_out if t is not None] + clean_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

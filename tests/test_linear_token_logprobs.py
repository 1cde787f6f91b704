"""linear_token_logprobs: equals the reference composition (values, gradients of hidden/weight/bias) and never
forms the [N, V] logits."""

import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from triton_compile import run_compile_script

import grpo_kernels as gk
from grpo_kernels import linear, reference

OP = "linear_token_logprobs"

# float32 tiles against the float64 spec: H products accumulated in float32.
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=3e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-5, rtol=1e-4),
    torch.float16: dict(atol=3e-5, rtol=1e-4),
}


def make_inputs(shape=(2, 5), H=8, V=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / 2).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype)
    ids = torch.randint(0, V, shape, generator=g)
    ids.view(-1)[min(1, ids.numel() - 1)] = -100 if ids.numel() > 1 else ids.view(-1)[0]
    return hidden, weight, bias, ids


def run(hidden, weight, bias, ids, *, backend, grads=True, upcast=False, **options):
    """``(logp, entropy, d hidden, d weight, d bias)`` of ``Σ a·logp + c·H`` with fixed random a, c."""
    leaves = [None if t is None else t.detach().clone() for t in (hidden, weight, bias)]
    if upcast:
        leaves = [None if t is None else t.double() for t in leaves]
    for t in leaves:
        if t is not None:
            t.requires_grad_(grads)
    logp, entropy = gk.linear_token_logprobs(leaves[0], leaves[1], ids, bias=leaves[2], return_entropy=True,
                                             backend=backend, **options)
    if grads:
        g = torch.Generator().manual_seed(1)
        a, c = torch.randn(ids.shape, generator=g), torch.randn(ids.shape, generator=g)
        ((logp * a.to(logp)).sum() + (entropy * c.to(logp)).sum()).backward()
    return [logp, entropy] + [None if t is None else t.grad for t in leaves]


def assert_matches_spec(backend, hidden, weight, bias, ids, **options):
    ours = run(hidden, weight, bias, ids, backend=backend, **options)
    spec = run(hidden, weight, bias, ids, backend="reference", upcast=True, **options)
    tol = TOLERANCES[hidden.dtype]
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), ours, spec):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32) or name[0] == "d"
        torch.testing.assert_close(a.double(), b.to(a.dtype).double(), **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_matches_reference(backend, dtype, chunk_size):
    hidden, weight, bias, ids = make_inputs(dtype=dtype)
    assert_matches_spec(backend, hidden, weight, bias, ids, temperature=0.7, logit_scale=1.3, softcap=4.0,
                        chunk_size=chunk_size)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("logit_scale,softcap", [(1.0, None), (2.5, None), (1.0, 3.0), (0.5, 30.0)])
def test_temperature_scale_softcap(backend, temperature, logit_scale, softcap):
    hidden, weight, bias, ids = make_inputs()
    assert_matches_spec(backend, hidden, weight, bias, ids, temperature=temperature, logit_scale=logit_scale,
                        softcap=softcap, chunk_size=4)


def test_no_bias_flat_tokens_default_chunk(backend):
    hidden, weight, _, ids = make_inputs(shape=(7,), V=50)
    assert_matches_spec(backend, hidden, weight, None, ids)


def test_weight_in_vocabulary_blocks(backend):
    """bfloat16 weight: cast in blocks of chunk·V/H rows (off the CPU; the cpu backend casts it once per sweep),
    V not a multiple of the block."""
    hidden, weight, bias, ids = make_inputs(shape=(3, 4), H=24, V=41, dtype=torch.bfloat16)
    assert_matches_spec(backend, hidden, weight, bias, ids, chunk_size=5)


@pytest.mark.parametrize("N,H,V", [(1, 5, 17), (1, 40, 3), (37, 40, 50), (70, 16, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sizes(backend, N, H, V, dtype):
    """One token, V < one vocabulary tile, several token tiles; H and V not multiples of the kernels' blocks."""
    hidden, weight, bias, ids = make_inputs(shape=(N,), H=H, V=V, dtype=dtype)
    assert_matches_spec(backend, hidden, weight, bias, ids, temperature=1.7, softcap=2.0, chunk_size=16)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_minus_infinity_bias(backend, softcap):
    """Vocabulary entries switched off by a -inf bias (a whole vocabulary tile of them, and the sampled id of a
    token): p = 0 there, -inf log-probs, no NaN elsewhere; with a softcap they become -c."""
    hidden, weight, bias, ids = make_inputs(shape=(6,), H=8, V=40)
    bias[3] = bias[16:32] = float("-inf")
    ids[0], ids[2] = 3, 20
    ours = run(hidden, weight, bias, ids, backend=backend, softcap=softcap, chunk_size=4)
    spec = run(hidden, weight, bias, ids, backend="reference", upcast=True, softcap=softcap, chunk_size=4)
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), ours, spec):
        torch.testing.assert_close(a.double(), b.double(), **TOLERANCES[torch.float32], equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
    assert not ours[1].isnan().any()


def test_ignored_tokens_and_partial_gradients(backend):
    hidden, weight, bias, ids = make_inputs()
    ids[0] = -100
    h = hidden.clone().requires_grad_()
    logp, entropy = gk.linear_token_logprobs(h, weight, ids, bias=bias, return_entropy=True, chunk_size=3,
                                             backend=backend)
    assert (logp[0] == 0).all() and (entropy[0] == 0).all()
    (logp.sum() + entropy.sum()).backward()
    assert (h.grad[0] == 0).all() and h.grad[1].abs().sum() > 0
    assert weight.grad is None and bias.grad is None


def test_ignored_tokens_with_huge_logits(backend):
    """Logits / T far beyond float32's e^88 (a cold temperature): an ignored token still gets a zero gradient, not
    0·inf = NaN, and the others match the spec."""
    hidden, weight, bias, ids = make_inputs(shape=(6,), H=8, V=37)
    ours = run(hidden, 20 * weight, bias, ids, backend=backend, temperature=0.1, chunk_size=4)
    spec = run(hidden, 20 * weight, bias, ids, backend="reference", upcast=True, temperature=0.1, chunk_size=4)
    assert ids[1] == -100 and (ours[2][1] == 0).all()
    for name, a, b in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), ours, spec):
        assert a.isfinite().all(), name
        torch.testing.assert_close(a.double(), b.double(), atol=1e-3, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_logp_only_and_no_grad(backend):
    hidden, weight, bias, ids = make_inputs()
    spec = reference.linear_token_logprobs(hidden, weight, ids, bias=bias)
    with torch.no_grad():
        logp = gk.linear_token_logprobs(hidden, weight, ids, bias=bias, chunk_size=4, backend=backend)
    torch.testing.assert_close(logp, spec, **TOLERANCES[torch.float32])
    w = weight.clone().requires_grad_()
    gk.linear_token_logprobs(hidden, w, ids, bias=bias, chunk_size=4, backend=backend).sum().backward()
    w_spec = weight.clone().requires_grad_()
    reference.linear_token_logprobs(hidden, w_spec, ids, bias=bias).sum().backward()
    torch.testing.assert_close(w.grad, w_spec.grad, **TOLERANCES[torch.float32])


def triton_on_cpu():
    """Skip unless the triton backend runs the tests' CPU tensors (under the interpreter)."""
    if "triton" not in gk.available_backends(OP) or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the triton backend on CPU tensors (TRITON_INTERPRET=1)")


class LargestTensor(TorchDispatchMode):
    """Records the largest size in bytes of any tensor an op returns (forward and backward).

    Bytes, not elements: the Triton interpreter views buffers as bytes."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_never_forms_the_logits(backend):
    """Every tensor created is at most max(chunk·V, V·H, N·H) float32 values: never N·V."""
    N, H, V, chunk = 64, 16, 300, 8
    hidden, weight, bias, ids = make_inputs(shape=(N,), H=H, V=V)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with LargestTensor() as mode:
        logp, entropy = gk.linear_token_logprobs(leaves[0], leaves[1], ids, bias=leaves[2], return_entropy=True,
                                                 chunk_size=chunk, backend=backend)
        (logp.sum() + entropy.sum()).backward()
    assert all(t.grad is not None for t in leaves)
    if backend == "reference":  # the unfused composition: the control that the mode sees the logits
        assert mode.largest >= 4 * N * V
    else:
        assert mode.largest <= 4 * max(chunk * V, V * H, N * H) < 4 * N * V


def test_triton_forward_allocates_no_tile():
    """The triton backend's statistics need no logits tile, not even of 8 tokens: the forward's largest tensors
    are the inputs (which the interpreter views) and the ``[3, splits, N]`` partials."""
    triton_on_cpu()
    from grpo_kernels.triton import linear_logprobs

    N, H, V = 64, 4, 300
    hidden, weight, bias, ids = make_inputs(shape=(N,), H=H, V=V)
    with LargestTensor() as mode:
        gk.linear_token_logprobs(hidden, weight, ids, bias=bias, return_entropy=True, chunk_size=8, backend="triton")
    assert mode.largest <= 4 * max(V * H, 3 * linear_logprobs._INTERPRETER_SPLITS * N) < 4 * 8 * V


@pytest.mark.parametrize("config,group_n,splits", [((16, 16, 16), 1, 1), ((16, 32, 16), 2, 3), ((32, 16, 32), 3, 7)])
def test_triton_tilings(monkeypatch, config, group_n, splits):
    """Other tile sizes, token-tile groups (a partial last group) and vocabulary splits (empty ones dropped)."""
    triton_on_cpu()
    from grpo_kernels.triton import linear_logprobs

    monkeypatch.setattr(linear_logprobs, "CONFIG_OVERRIDE", linear_logprobs.TileConfig(*config, 1, 1))
    monkeypatch.setattr(linear_logprobs, "GROUP_N", group_n)
    monkeypatch.setattr(linear_logprobs, "_INTERPRETER_SPLITS", splits)
    hidden, weight, bias, ids = make_inputs(shape=(83,), H=35, V=70)
    assert_matches_spec("triton", hidden, weight, bias, ids, temperature=0.4, logit_scale=0.8, softcap=6.0,
                        chunk_size=40)


def test_triton_linear_kernels_compile_for_hopper():
    """Both kernels compile to sm_90 cubins for bf16, float32 (tf32x3) and float64 inputs, every code path on
    (the stats kernel writing the logits tile of the fused loss's forward too);
    bf16 and float32 use the Hopper tensor cores (wgmma)."""
    if "triton" not in gk.available_backends(OP):
        pytest.skip("triton is not installed")
    script = r'''
import inspect
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from grpo_kernels.triton import linear_logprobs as m
for kernel, paths in ((m._linear_stats_kernel, dict(RETURN_ENTROPY=True, WRITE_TILE=True)),
                      (m._linear_grad_kernel, dict(HAS_G_LOGP=True, HAS_G_ENT=True))):
    for dtype, xdt in ((torch.bfloat16, "bf16"), (torch.float32, "fp32"), (torch.float64, "fp64")):
        cfg = m._GPU_CONFIGS[dtype]
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        cdt = "fp64" if dtype == torch.float64 else "fp32"
        constexprs = dict(HAS_BIAS=True, SOFTCAP=True, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                          GROUP_N=m.GROUP_N, ACC=acc, PRECISION=m._PRECISION.get(dtype, "ieee"), UPCAST=False,
                          PER_ROW_T=dtype != torch.float32, **paths)  # (a per-row temperature: t_ptr)
        sig = {}
        for name in inspect.signature(kernel.fn).parameters:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*" + (xdt if name in ("h_ptr", "w_ptr", "b_ptr") else "i64" if name == "y_ptr" else cdt)
            elif name.endswith("_arg"):
                sig[name] = "fp64"
            elif name.startswith("inv_t"):
                sig[name] = "fp32"
            else:
                sig[name] = "i64" if name.startswith("s_") else "i32"
        compiled = compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
        assert dtype == torch.float64 or "wgmma" in compiled.asm["ptx"], (kernel, dtype)
print("compiled")
'''
    run_compile_script(script)


def test_garbage_hidden_states_of_ignored_tokens(backend):
    """NaN / inf hidden states of ignored tokens change no log-prob, entropy or gradient (d hidden 0 there)."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 7, 8, 37
    hidden = torch.randn(N, H, generator=g)
    weight = 0.3 * torch.randn(V, H, generator=g)
    ids = torch.randint(0, V, (N,), generator=g)
    ids[[1, 4]] = -100
    poisoned = hidden.clone()
    poisoned[1], poisoned[4] = float("nan"), float("inf")

    def run(h):
        h, w = h.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, ent = gk.linear_token_logprobs(h, w, ids, return_entropy=True, backend=backend)
        (logp.sum() + ent.sum()).backward()
        return logp, ent, h.grad, w.grad

    for clean, dirty in zip(run(hidden), run(poisoned)):
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    assert (run(poisoned)[2][[1, 4]] == 0).all()


# --------------------------------------------------------------------------- #
# The default chunk size (grpo_kernels.linear.default_chunk_size) and the CPU sweep's buffers
# --------------------------------------------------------------------------- #
def _cpu_chunk(monkeypatch, V, H, threads, cache, dtype=torch.float32):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(linear, "last_level_cache_bytes", lambda: cache)
    return linear.default_chunk_size(V, H, dtype, torch.device("cpu"))


@pytest.mark.parametrize("V,H", [(32000, 512), (32000, 1024), (151936, 4096), (262144, 2048), (1000, 64)])
@pytest.mark.parametrize("threads", [1, 2, 16, 128])
@pytest.mark.parametrize("cache", [None, 32 << 20])
def test_default_chunk_size_on_cpu_is_bounded(monkeypatch, V, H, threads, cache):
    """At least one row; the tile never larger than CPU_TILE_BYTES or the float32 weight, whichever is larger
    (O(chunk·V + V·H) memory, whatever N); never more rows than the threads' share asks for."""
    chunk = _cpu_chunk(monkeypatch, V, H, threads, cache)
    assert 1 <= chunk <= threads * linear.CPU_ROWS_PER_THREAD
    assert chunk * V * 4 <= max(linear.CPU_TILE_BYTES, V * H * 4)


def test_default_chunk_size_on_cpu_follows_threads_and_cache(monkeypatch):
    V, H = 32000, 4096  # a weight of 524 MB: never in the cache; the bound (H rows) is far away
    assert [_cpu_chunk(monkeypatch, V, H, t, 32 << 20) for t in (1, 2, 4)] == [
        t * linear.CPU_ROWS_PER_THREAD for t in (1, 2, 4)]
    assert _cpu_chunk(monkeypatch, V, H, 64, 32 << 20) == H  # bounded by the weight's size
    assert _cpu_chunk(monkeypatch, V, H, 2, None) == 2 * linear.CPU_ROWS_PER_THREAD  # cache unknown: streams
    # 32000 x 512 at 8 threads: bounded by the tile's bytes; in float64 by the weight's size (H rows)
    tile_rows = linear.CPU_TILE_BYTES // (32000 * 4)
    assert 512 < tile_rows < 8 * linear.CPU_ROWS_PER_THREAD
    assert _cpu_chunk(monkeypatch, 32000, 512, 8, 32 << 20) == tile_rows
    assert _cpu_chunk(monkeypatch, 32000, 512, 8, 32 << 20, torch.bfloat16) == tile_rows  # the tile is float32
    assert _cpu_chunk(monkeypatch, 32000, 512, 8, 32 << 20, torch.float64) == max(512, tile_rows // 2)
    # a weight and accumulator that fit in half the cache: a GEMM panel per thread is enough
    assert _cpu_chunk(monkeypatch, 1000, 64, 4, 32 << 20) == 4 * linear.CPU_CACHED_ROWS_PER_THREAD
    assert _cpu_chunk(monkeypatch, 1000, 64, 4, 256 << 10) == min(4 * linear.CPU_ROWS_PER_THREAD,
                                                                   linear.CPU_TILE_BYTES // (1000 * 4))


def test_default_chunk_size_off_cpu_is_the_64_mib_tile(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    for V in (1000, 32000, 151936):
        assert linear.default_chunk_size(V, 4096, torch.bfloat16, torch.device("cuda")) == \
            linear.DEFAULT_TILE_ELEMENTS // V


def test_last_level_cache_bytes():
    size = linear.last_level_cache_bytes()
    assert size is None or size > 0
    if any(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")):
        assert size is not None and size >= 64 << 10


class TileRows(TorchDispatchMode):
    """The most rows of any float tensor ``[n, V]`` an op returns."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[1] == self.vocab and t.is_floating_point():
                self.rows = max(self.rows, t.shape[0])
        return out


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_default_chunk_size_is_used_and_an_explicit_one_wins(backend, monkeypatch, chunk_size):
    if backend != "cpu":
        pytest.skip("the reference is unchunked; the driver's choice is the same for every backend")
    monkeypatch.setattr(linear, "default_chunk_size", lambda V, H, dtype, device: 3)
    hidden, weight, bias, ids = make_inputs(shape=(4, 5), H=2, V=23)  # H < 3 rows: weight.t() is [H, V]
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with TileRows(23) as mode:
        logp = gk.linear_token_logprobs(leaves[0], leaves[1], ids, bias=leaves[2], chunk_size=chunk_size,
                                        backend=backend)
        logp.sum().backward()
    assert mode.rows == (3 if chunk_size is None else chunk_size)


class WeightCasts(TorchDispatchMode):
    """Counts the casts of a ``[V, H]`` tensor to float32 (``.to`` or a ``copy_`` into a float32 buffer)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            self.count += tuple(out.shape) == self.shape and out.dtype == torch.float32
        elif func is torch.ops.aten.copy_.default:
            self.count += (tuple(out.shape) == self.shape and out.dtype == torch.float32
                           and args[1].dtype != torch.float32)
        return out


def test_cpu_casts_a_bf16_weight_once_per_sweep():
    """The cpu backend's exact bf16 path: float32 GEMMs from a float32 copy of the weight made once per sweep
    (the forward's and the backward's), not once per chunk; values and gradients as the spec's."""
    hidden, weight, bias, ids = make_inputs(shape=(3, 7), H=12, V=31, dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with WeightCasts(weight.shape) as mode:
        logp = gk.linear_token_logprobs(leaves[0], leaves[1], ids, bias=leaves[2], chunk_size=4, backend="cpu")
        logp.sum().backward()
    assert mode.count == 2
    assert_matches_spec("cpu", hidden, weight, bias, ids, chunk_size=4)


def nan_filled(monkeypatch):
    """``torch.empty`` and ``Tensor.new_empty`` return NaN-filled floats (uninitialized memory made visible), and
    bytes of 0xFF (NaN in every float dtype: the raw buffers of grpo_kernels.workspace, none kept from before)."""
    empty, new_empty = torch.empty, torch.Tensor.new_empty
    gk.release_cpu_workspace()

    def fill(t):
        if t.dtype == torch.uint8:
            return t.fill_(255)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(new_empty(self, *a, **k)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_uninitialized_memory_is_never_read(backend, monkeypatch, dtype):
    """The accumulators start uninitialized (written with beta = 0 by the first chunk; bf16's float32 ones are
    leased from the workspace) and the tile buffer is reused: NaN in every new buffer changes nothing."""
    if backend == "triton":
        pytest.skip("the driver's accumulators are the cpu backend's too; the interpreter is slow")
    inputs = make_inputs(shape=(3, 5), H=6, V=19, dtype=dtype)
    clean = run(*inputs, backend=backend, chunk_size=4)
    nan_filled(monkeypatch)
    for a, b in zip(run(*inputs, backend=backend, chunk_size=4), clean):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

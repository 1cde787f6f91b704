"""The CPU fused-linear ops' kept buffers (grpo_kernels/workspace.py): reused between calls, bounded, released
on demand, and never a change in any number."""

import threading

import pytest
import torch

import grpo_kernels as gk
from grpo_kernels import workspace

pytestmark = pytest.mark.skipif("cpu" not in gk.available_backends("fused_linear_grpo_loss"),
                                reason="the cpu backend is not built")


@pytest.fixture(autouse=True)
def fresh_workspace():
    previous = gk.keep_cpu_workspace(True)
    gk.release_cpu_workspace()
    yield
    gk.keep_cpu_workspace(previous)


def _inputs(N, V, H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, N // 2, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    ids = torch.randint(0, V, (2, N // 2), generator=g)
    old = -torch.rand(2, N // 2, generator=g)
    return hidden, weight, ids, old, torch.randn(2, generator=g), torch.rand(2, N // 2, generator=g) > 0.2


def _loss_and_grads(hidden, weight, ids, old, adv, mask, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = gk.fused_linear_grpo_loss(h, w, ids, old, adv, mask, backend="cpu", beta=0.0, **kw)
    out.loss.backward()
    return out.loss.detach(), h.grad, w.grad


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_tile_buffer_is_kept_reused_and_released(dtype):
    N, V, H, chunk = 12, 257, 16, 5
    inputs = _inputs(N, V, H, dtype)
    first = _loss_and_grads(*inputs, chunk_size=chunk)
    # a bf16 call also keeps the float32 copy of its weight and its float32 accumulators of d weight and d hidden
    kept = chunk * V * 4 + (0 if dtype == torch.float32 else 2 * V * H * 4 + N * H * 4)
    assert workspace.kept_bytes() == kept
    _assert_same(_loss_and_grads(*inputs, chunk_size=chunk), first)  # the kept buffers reused: the same bits
    assert workspace.kept_bytes() == kept
    assert gk.release_cpu_workspace() == kept
    assert workspace.kept_bytes() == 0
    _assert_same(_loss_and_grads(*inputs, chunk_size=chunk), first)


def test_a_smaller_call_reuses_a_larger_buffer_without_reading_its_old_contents():
    big = _inputs(40, 1001, 8, seed=1)
    small = _inputs(6, 700, 8, seed=2)  # a tile of 4 × 700 in the buffer of 4 × 1001
    gk.keep_cpu_workspace(False)
    expected = _loss_and_grads(*small, chunk_size=4)
    gk.keep_cpu_workspace(True)
    _loss_and_grads(*big, chunk_size=4)
    kept = workspace.kept_bytes()
    _assert_same(_loss_and_grads(*small, chunk_size=4), expected)
    assert workspace.kept_bytes() == kept  # the small tile took the big buffer and gave it back


def test_a_buffer_more_than_twice_as_large_as_asked_is_left_for_its_own_size():
    with workspace.cpu_buffer(1000, torch.float32):
        pass
    with workspace.cpu_buffer(400, torch.float32):  # 1600 bytes: the 4000-byte buffer is not taken
        assert workspace.kept_bytes() == 4000
    assert workspace.kept_bytes() == 5600
    with workspace.cpu_buffer(450, torch.float32):  # 1800 bytes: the 4000-byte one is not, the 1600 one too small
        assert workspace.kept_bytes() == 5600
    with workspace.cpu_buffer(900, torch.float32):  # 3600 bytes: the 4000-byte one
        assert workspace.kept_bytes() == 5600 + 1800 - 4000


def test_nothing_is_kept_when_keeping_is_off_or_past_the_limit(monkeypatch):
    inputs = _inputs(8, 300, 8)
    assert gk.keep_cpu_workspace(False) is True
    _loss_and_grads(*inputs, chunk_size=4)
    assert workspace.kept_bytes() == 0
    gk.keep_cpu_workspace(True)
    monkeypatch.setattr(workspace, "KEEP_LIMIT_BYTES", 4 * 300 * 4 - 1)  # one byte short of the tile
    _loss_and_grads(*inputs, chunk_size=4)
    assert workspace.kept_bytes() == 0
    with pytest.raises(TypeError, match="keep must be a bool"):
        gk.keep_cpu_workspace("yes")


def test_linear_token_logprobs_and_concurrent_calls_each_get_their_own_buffer():
    """Two threads in their sweeps at once: one takes the kept buffer, the other a new one; results unchanged."""
    inputs = [_inputs(16, 513, 8, seed=s) for s in range(4)]
    gk.keep_cpu_workspace(False)
    expected = [_loss_and_grads(*x, chunk_size=4) for x in inputs]
    logp_expected = gk.linear_token_logprobs(inputs[0][0], inputs[0][1], inputs[0][2], chunk_size=3, backend="cpu")
    gk.keep_cpu_workspace(True)
    results = [None] * len(inputs)

    def work(i):
        for _ in range(3):
            results[i] = _loss_and_grads(*inputs[i], chunk_size=4)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        _assert_same(got, want)
    assert torch.equal(gk.linear_token_logprobs(inputs[0][0], inputs[0][1], inputs[0][2], chunk_size=3,
                                                backend="cpu"), logp_expected)
    assert 0 < workspace.kept_bytes() <= workspace.KEEP_LIMIT_BYTES


def test_the_runners_peak_memory_counts_the_kept_tile():
    """benchmarks/memory.py frees the kept buffers first: a call's peak includes the tile it pages in."""
    from benchmarks import memory

    if memory.method(torch.device("cpu")) == "not measured":
        pytest.skip("peak memory is not measured on this platform")
    N, V, H = 64, 20000, 8
    inputs = _inputs(N, V, H)
    _loss_and_grads(*inputs, chunk_size=N)  # the tile is kept now
    assert workspace.kept_bytes() == N * V * 4
    peak = memory.peak_bytes_above(lambda: _loss_and_grads(*inputs, chunk_size=N), torch.device("cpu"))
    assert peak >= N * V * 4


def test_a_lease_is_kept_once_released_and_only_then():
    lease = workspace.CpuLease(100, torch.float32)
    assert lease.tensor.shape == (100,) and workspace.kept_bytes() == 0
    lease.release()
    assert lease.tensor is None and workspace.kept_bytes() == 400
    lease.release()  # a second release gives nothing back twice
    assert workspace.kept_bytes() == 400
    again = workspace.CpuLease(50, torch.float64)  # the kept bytes, another dtype
    assert workspace.kept_bytes() == 0 and again.tensor.dtype == torch.float64
    del again  # never released: freed, not kept
    assert workspace.kept_bytes() == 0


@pytest.mark.parametrize("op", ["fused_linear_grpo_loss", "linear_token_logprobs"])
def test_bf16_accumulators_are_leased_until_the_backward_has_cast_them(op):
    """The float32 accumulators of a bf16 call's gradients are kept once its backward has cast them (the fused
    op's forward forms them: leased until then); a forward whose graph is dropped gives nothing back."""
    N, V, H, chunk = 12, 257, 16, 5
    hidden, weight, ids, old, adv, mask = _inputs(N, V, H, torch.bfloat16)
    tile_and_weight, accumulators = chunk * V * 4 + V * H * 4, V * H * 4 + N * H * 4

    def forward():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if op == "fused_linear_grpo_loss":
            out = gk.fused_linear_grpo_loss(h, w, ids, old, adv, mask, backend="cpu", beta=0.0, chunk_size=chunk)
            return out.loss, h, w
        return gk.linear_token_logprobs(h, w, ids, backend="cpu", chunk_size=chunk).sum(), h, w

    gk.keep_cpu_workspace(False)
    loss, h, w = forward()
    loss.backward()
    expected = (loss.detach(), h.grad, w.grad)
    gk.keep_cpu_workspace(True)
    for call in range(2):  # new buffers, then the kept ones
        loss, h, w = forward()
        # the fused op's forward holds its accumulators; linear_token_logprobs' backward leases them
        accumulators_kept = op == "linear_token_logprobs" and call > 0
        assert workspace.kept_bytes() == tile_and_weight + (accumulators if accumulators_kept else 0)
        loss.backward()
        assert workspace.kept_bytes() == tile_and_weight + accumulators
        assert h.grad.dtype == w.grad.dtype == torch.bfloat16
        _assert_same((loss.detach(), h.grad, w.grad), expected)
    loss, h, w = forward()
    del loss  # the graph dropped before its backward: a lease still held is freed, not kept
    assert workspace.kept_bytes() == tile_and_weight + (0 if op == "fused_linear_grpo_loss" else accumulators)

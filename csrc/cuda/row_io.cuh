// Sweeps of one block over one row of V values, with 16-byte vector loads and
// stores: a scalar head up to the row's first 16-byte boundary (rows of any
// stride start anywhere), 16-byte packs, a scalar tail. Thread i takes packs
// i, i + blockDim.x, ... (two in flight per iteration), so a warp reads 512
// contiguous bytes per instruction.
#pragma once

#include <cstdint>

namespace grpo_kernels::cuda {

// K consecutive values of a row; 16 bytes for K = kPack.
template <typename scalar_t, int K>
struct alignas(sizeof(scalar_t) * K) Pack {
  static constexpr int kSize = K;
  scalar_t v[K];
};

template <typename scalar_t>
constexpr int kPack = 16 / sizeof(scalar_t);

template <typename scalar_t>
using Pack16 = Pack<scalar_t, kPack<scalar_t>>;

// Values of p before its first 16-byte boundary (at most V).
template <typename scalar_t>
__device__ __forceinline__ int64_t head_length(const scalar_t* p, int64_t V) {
  const int64_t to_boundary = ((16 - reinterpret_cast<uintptr_t>(p) % 16) % 16) / sizeof(scalar_t);
  return to_boundary < V ? to_boundary : V;
}

// Calls f(pack) for every value of x [V] exactly once (pack: a Pack<scalar_t, K>, K = 1 or kPack).
template <typename scalar_t, typename F>
__device__ __forceinline__ void row_for_each(const scalar_t* x, int64_t V, F&& f) {
  constexpr int N = kPack<scalar_t>;
  const int64_t head = head_length(x, V);
  const int64_t n_packs = (V - head) / N;
  const int64_t step = blockDim.x;
  for (int64_t v = threadIdx.x; v < head; v += step) f(Pack<scalar_t, 1>{{x[v]}});
  const Pack16<scalar_t>* packs = reinterpret_cast<const Pack16<scalar_t>*>(x + head);
  int64_t i = threadIdx.x;
  for (; i + step < n_packs; i += 2 * step) {
    const Pack16<scalar_t> a = packs[i];
    const Pack16<scalar_t> b = packs[i + step];
    f(a);
    f(b);
  }
  if (i < n_packs) f(packs[i]);
  for (int64_t v = head + n_packs * N + threadIdx.x; v < V; v += step) f(Pack<scalar_t, 1>{{x[v]}});
}

// dx[v] = f(v, x[v]) (f returns the compute type, rounded to scalar_t here) for every v of the row;
// each value of x is read before the same thread writes dx at that position, so dx may be x. Packs go
// from the row's end backwards with kReverse. 16-byte stores when dx has x's alignment, else scalar.
template <bool kReverse, typename scalar_t, typename F>
__device__ __forceinline__ void row_transform(const scalar_t* x, scalar_t* dx, int64_t V, F&& f) {
  constexpr int N = kPack<scalar_t>;
  const int64_t head = head_length(x, V);
  const int64_t n_packs = (V - head) / N;
  const int64_t step = blockDim.x;
  const bool vector_store = reinterpret_cast<uintptr_t>(x) % 16 == reinterpret_cast<uintptr_t>(dx) % 16;
  const Pack16<scalar_t>* in = reinterpret_cast<const Pack16<scalar_t>*>(x + head);
  Pack16<scalar_t>* out = reinterpret_cast<Pack16<scalar_t>*>(dx + head);
  auto one_pack = [&](int64_t i, const Pack16<scalar_t>& a) {
    const int64_t v0 = head + i * N;
    Pack16<scalar_t> o;
#pragma unroll
    for (int k = 0; k < N; ++k) o.v[k] = static_cast<scalar_t>(f(v0 + k, a.v[k]));
    if (vector_store) {
      out[i] = o;
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) dx[v0 + k] = o.v[k];
    }
  };
  auto pack_index = [&](int64_t j) { return kReverse ? n_packs - 1 - j : j; };

  for (int64_t v = threadIdx.x; v < head; v += step) dx[v] = static_cast<scalar_t>(f(v, x[v]));
  int64_t j = threadIdx.x;
  for (; j + step < n_packs; j += 2 * step) {
    const int64_t i0 = pack_index(j), i1 = pack_index(j + step);
    const Pack16<scalar_t> a = in[i0];
    const Pack16<scalar_t> b = in[i1];
    one_pack(i0, a);
    one_pack(i1, b);
  }
  if (j < n_packs) one_pack(pack_index(j), in[pack_index(j)]);
  for (int64_t v = head + n_packs * N + threadIdx.x; v < V; v += step) dx[v] = static_cast<scalar_t>(f(v, x[v]));
}

// dx[v] = 0 for the whole row (16-byte stores from dx's first 16-byte boundary).
template <typename scalar_t>
__device__ __forceinline__ void row_zero(scalar_t* dx, int64_t V) {
  constexpr int N = kPack<scalar_t>;
  const int64_t head = head_length(dx, V);
  const int64_t n_packs = (V - head) / N;
  Pack16<scalar_t> zeros;
#pragma unroll
  for (int k = 0; k < N; ++k) zeros.v[k] = static_cast<scalar_t>(0);
  Pack16<scalar_t>* out = reinterpret_cast<Pack16<scalar_t>*>(dx + head);
  for (int64_t v = threadIdx.x; v < head; v += blockDim.x) dx[v] = zeros.v[0];
  for (int64_t i = threadIdx.x; i < n_packs; i += blockDim.x) out[i] = zeros;
  for (int64_t v = head + n_packs * N + threadIdx.x; v < V; v += blockDim.x) dx[v] = zeros.v[0];
}

}  // namespace grpo_kernels::cuda

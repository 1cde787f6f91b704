// dx[v] = e[v] · k for a row of values e in the compute dtype, stored in the
// logits dtype: the last pass of the fused gradient (dx = -w p / T off the
// label, with p = e · exp(chunk max - lse)).
//
// streaming = true is for a gradient buffer that is not read again soon (a new
// tensor): with AVX-512, whole 64-byte lines are written with non-temporal
// stores, which skip reading each line into the cache before it is
// overwritten (a third of the fused kernel's memory traffic); the caller
// issues stream_fence() after its last row. The values do not depend on
// streaming. bfloat16 with AVX512-BF16: every value is rounded by the vector
// conversion (to nearest even as from_acc, but subnormal results flush to 0
// and a NaN keeps its sign), one instruction where from_acc's rounding takes
// eight.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "softmax_row.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

template <typename scalar_t, typename acc_t>
inline void scaled_store_plain(const acc_t* e, acc_t k, scalar_t* dx, int64_t n) {
#pragma omp simd
  for (int64_t v = 0; v < n; ++v) dx[v] = from_acc<scalar_t>(e[v] * k);
}

// Elements up to dx's first 64-byte boundary (at most n).
template <typename scalar_t>
inline int64_t unaligned_head(const scalar_t* dx, int64_t n) {
  return std::min<int64_t>(n, (-reinterpret_cast<intptr_t>(dx) & 63) / sizeof(scalar_t));
}

template <typename scalar_t, typename acc_t>
inline void scaled_store(const acc_t* e, acc_t k, scalar_t* dx, int64_t n, bool streaming) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    if (streaming) {
      const int64_t head = unaligned_head(dx, n);
      scaled_store_plain(e, k, dx, head);
      const __m512 kv = _mm512_set1_ps(k);
      int64_t v = head;
      for (; v + 16 <= n; v += 16) _mm512_stream_ps(dx + v, _mm512_mul_ps(_mm512_loadu_ps(e + v), kv));
      scaled_store_plain(e + v, k, dx + v, n - v);
      return;
    }
  }
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m512 kv = _mm512_set1_ps(k);
    auto bf16 = [&](int64_t v, __mmask16 lanes) {
      return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, e + v), kv)));
    };
    auto store_part = [&](int64_t v, int64_t count) {  // count <= 16 values, plain stores
      const __mmask16 lanes = static_cast<__mmask16>((1u << count) - 1);
      _mm256_mask_storeu_epi16(dx + v, lanes, bf16(v, lanes));
    };
    int64_t v = 0;
    if (streaming) {
      const int64_t head = unaligned_head(dx, n);
      for (; v < head; v += 16) store_part(v, std::min<int64_t>(16, head - v));
      v = head;
      for (; v + 32 <= n; v += 32) {
        const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(bf16(v, 0xFFFF)), bf16(v + 16, 0xFFFF), 1);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dx + v), line);
      }
    }
    for (; v + 16 <= n; v += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dx + v), bf16(v, 0xFFFF));
    if (v < n) store_part(v, n - v);
    return;
  }
#endif
#endif
  (void)streaming;
  scaled_store_plain(e, k, dx, n);
}

// Orders this thread's non-temporal stores before its later stores (the end of its share of rows).
inline void stream_fence() {
#ifdef __AVX512F__
  _mm_sfence();
#endif
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY

// Addressing the rows of a [..., V] logits tensor whose vocab dim has stride 1
// and whose leading dims have any strides (no copy): row r (row-major over the
// leading dims) starts at element offset(r). Leading dims of size 1 are dropped
// and dims that are contiguous with each other merged, so a contiguous tensor
// has one dim (offset = r · V).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace grpo_kernels::cuda {

struct LogitRows {
  static constexpr int kMaxDims = 6;
  int dims;  // collapsed leading dims, outermost first
  int64_t size[kMaxDims];
  int64_t stride[kMaxDims];

  // Element offset of row r; fully unrolled so that the arrays stay in registers / the parameter bank.
  __host__ __device__ int64_t offset(int64_t r) const {
    int64_t off = 0;
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      if (d < dims) {
        off += (r % size[d]) * stride[d];
        r /= size[d];
      }
    }
    return off;
  }
};

// The LogitRows of t, and its number of rows in *rows.
inline LogitRows logit_rows(const at::Tensor& t, int64_t* rows) {
  TORCH_CHECK(t.dim() >= 1, "logits must have a vocab dim");
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, "the vocab dim of logits must have stride 1");
  LogitRows r{};
  *rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    const int64_t n = t.size(d), st = t.stride(d);
    *rows *= n;
    if (n == 1) continue;
    if (r.dims > 0 && r.stride[r.dims - 1] == n * st) {  // the outer dim steps over this one exactly: merge
      r.size[r.dims - 1] *= n;
      r.stride[r.dims - 1] = st;
      continue;
    }
    TORCH_CHECK(r.dims < LogitRows::kMaxDims, "logits: at most ", LogitRows::kMaxDims,
                " non-mergeable leading dims are supported");
    r.size[r.dims] = n;
    r.stride[r.dims] = st;
    ++r.dims;
  }
  return r;
}

}  // namespace grpo_kernels::cuda

// Addressing the rows of a [..., V] logits tensor whose vocab dim has stride 1
// and whose leading dims have any strides (no copy), and the per-row buffers
// the kernels keep in each thread.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/ATen.h>

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

// Element offset of row r (row-major over the leading dims) of a tensor.
class LogitRows {
 public:
  explicit LogitRows(const at::Tensor& logits) : vocab_(logits.size(-1)) {
    TORCH_CHECK(logits.dim() >= 1, "logits must have a vocab dim");
    TORCH_CHECK(vocab_ <= 1 || logits.stride(-1) == 1, "the vocab dim of logits must have stride 1");
    for (int64_t d = 0; d + 1 < logits.dim(); ++d) {
      sizes_.push_back(logits.size(d));
      strides_.push_back(logits.stride(d));
    }
    rows_ = 1;
    for (int64_t n : sizes_) rows_ *= n;
  }

  int64_t rows() const { return rows_; }
  int64_t vocab() const { return vocab_; }

  int64_t offset(int64_t r) const {
    int64_t off = 0;
    for (int64_t d = static_cast<int64_t>(sizes_.size()) - 1; d >= 0; --d) {
      off += (r % sizes_[d]) * strides_[d];
      r /= sizes_[d];
    }
    return off;
  }

 private:
  int64_t vocab_;
  int64_t rows_;
  std::vector<int64_t> sizes_;
  std::vector<int64_t> strides_;
};

// The token ids of the rows of `logits` as a contiguous int64 [R] tensor (checked: an integer tensor of R
// values on the logits' device).
inline at::Tensor flat_ids(const at::Tensor& token_ids, const at::Tensor& logits, int64_t rows, const char* name) {
  TORCH_CHECK(!at::isFloatingType(token_ids.scalar_type()) && !at::isComplexType(token_ids.scalar_type()) &&
                  token_ids.scalar_type() != at::kBool,
              name, ": token_ids must be an integer tensor, got ", token_ids.scalar_type());
  TORCH_CHECK(token_ids.device() == logits.device(), name, ": token_ids must be on ", logits.device(), ", got ",
              token_ids.device());
  TORCH_CHECK(token_ids.numel() == rows, name, ": token_ids must have one id per row of logits (", rows,
              "), got ", token_ids.numel());
  return token_ids.reshape({-1}).to(at::kLong).contiguous();
}

// A row's id y is ignore_index or in [0, vocab): checked inside the kernels before any row is read or written
// (value checks of the Python layer may be off, or skipped under torch.compile).
inline void check_token_id(int64_t y, int64_t vocab, int64_t ignore_index, int64_t row) {
  TORCH_CHECK(y >= 0 && y < vocab, "token_ids must be in [0, V) = [0, ", vocab, ") or equal ignore_index=",
              ignore_index, ", found ", y, " (row ", row, ")");
}

// A buffer of at least n values of T owned by the calling thread, reused across calls.
template <typename T>
T* thread_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY

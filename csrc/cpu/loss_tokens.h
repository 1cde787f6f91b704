// Strided read access to the [B, T] inputs of the loss (logp, old_logp,
// ref_logp, adv, mask, importance weights, sampling log-probs), shared by the
// grpo_loss and fused_grpo_loss kernels. Each may be a broadcast view (stride
// 0); all are in the compute dtype acc_t. Absent inputs read as: old_logp =
// logp, ref_logp = 0 (has_ref false), iw = 1, sampling_logp = old_logp. A masked token (mask 0) reads
// neutral inputs (loss_terms.h loss::select_unmasked), whatever it holds.
#pragma once

#include <algorithm>

#include <ATen/ATen.h>

#include "../common/loss_terms.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

template <typename acc_t>
class StridedMatrix {
 public:
  StridedMatrix() = default;
  explicit StridedMatrix(const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 2, "loss inputs must be [B, T] views");
    data_ = t.const_data_ptr<acc_t>();
    stride_b_ = t.stride(0);
    stride_t_ = t.stride(1);
  }
  acc_t operator()(int64_t i, int64_t t) const { return data_[i * stride_b_ + t * stride_t_]; }
  bool present() const { return data_ != nullptr; }

 private:
  const acc_t* data_ = nullptr;
  int64_t stride_b_ = 0, stride_t_ = 0;
};

// Checks of an entry point's [B, T] loss inputs (as csrc/cuda/loss_inputs.cuh strided_bt): each present one a
// [B, T] view of the compute dtype of `main` (logp, or the fused kernel's compute dtype) on its device; with
// bool_mask (grpo_loss) the mask may be bool too.
inline void check_loss_input(const c10::optional<at::Tensor>& t, int64_t B, int64_t T, at::ScalarType dtype,
                             const at::Tensor& main, const char* name, const char* what, bool may_be_bool = false) {
  if (!t) return;
  TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == T, name, ": ", what, " must be a [", B, ", ", T,
              "] view, got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype || (may_be_bool && t->scalar_type() == at::kBool), name, ": ", what,
              " must be in the compute dtype ", dtype, may_be_bool ? " or bool" : "", ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == main.device(), name, ": ", what, " must be on ", main.device(), ", got ", t->device());
}

inline void check_loss_inputs(const char* name, const at::Tensor& main, int64_t B, int64_t T, at::ScalarType dtype,
                              const c10::optional<at::Tensor>& logp, const c10::optional<at::Tensor>& old_logp,
                              const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv,
                              const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
                              const c10::optional<at::Tensor>& sampling_logp, bool bool_mask = false) {
  check_loss_input(logp, B, T, dtype, main, name, "logp");
  check_loss_input(old_logp, B, T, dtype, main, name, "old_logp");
  check_loss_input(ref_logp, B, T, dtype, main, name, "ref_logp");
  check_loss_input(adv, B, T, dtype, main, name, "adv");
  check_loss_input(mask, B, T, dtype, main, name, "mask", bool_mask);
  check_loss_input(iw, B, T, dtype, main, name, "iw");
  check_loss_input(sampling_logp, B, T, dtype, main, name, "sampling_logp");
}

inline void check_logp(const at::Tensor& logp, const char* name) {
  TORCH_CHECK(logp.is_cpu(), name, ": logp must be a CPU tensor, got ", logp.device());
  TORCH_CHECK(logp.dim() == 2, name, ": logp must be [B, T], got ", logp.sizes());
  TORCH_CHECK(logp.scalar_type() == at::kFloat || logp.scalar_type() == at::kDouble, name,
              ": logp must be in a compute dtype (float32 or float64), got ", logp.scalar_type());
}

// t (n values, any shape and strides) as a contiguous [n] tensor of dtype, checked: n values on main's device.
inline at::Tensor per_row_values(const at::Tensor& t, at::ScalarType dtype, int64_t n, const at::Tensor& main,
                                 const char* name, const char* what) {
  TORCH_CHECK(t.device() == main.device(), name, ": ", what, " must be on ", main.device(), ", got ", t.device());
  TORCH_CHECK(t.numel() == n, name, ": ", what, " must have ", n, " values, got ", t.numel());
  return t.reshape({-1}).to(dtype).contiguous();
}

template <typename acc_t>
struct LossTokens {
  int64_t B, T;
  bool has_ref, has_old;

  LossTokens(const at::Tensor& logp_, const c10::optional<at::Tensor>& old_, const c10::optional<at::Tensor>& ref_,
             const at::Tensor& adv_, const at::Tensor& mask_, const c10::optional<at::Tensor>& iw_,
             const c10::optional<at::Tensor>& sampling_)
      : B(logp_.size(0)), T(logp_.size(1)), has_ref(ref_.has_value()), has_old(old_.has_value()), logp_m(logp_),
        old_m(old_ ? *old_ : logp_), ref_m(ref_ ? StridedMatrix<acc_t>(*ref_) : StridedMatrix<acc_t>()), adv_m(adv_),
        mask_m(mask_), iw_m(iw_ ? StridedMatrix<acc_t>(*iw_) : StridedMatrix<acc_t>()),
        sampling_m(sampling_ ? StridedMatrix<acc_t>(*sampling_) : StridedMatrix<acc_t>()) {}

  acc_t logp(int64_t i, int64_t t) const { return logp_m(i, t); }
  acc_t old_logp(int64_t i, int64_t t) const { return old_m(i, t); }
  acc_t ref_logp(int64_t i, int64_t t) const { return has_ref ? ref_m(i, t) : acc_t(0); }
  acc_t adv(int64_t i, int64_t t) const { return adv_m(i, t); }
  acc_t mask(int64_t i, int64_t t) const { return mask_m(i, t); }
  acc_t iw(int64_t i, int64_t t) const { return iw_m.present() ? iw_m(i, t) : acc_t(1); }

  // The inputs at (i, t), logp given (the fused kernel computes it); neutral ones at a masked token.
  loss::TokenInputs<acc_t> token(int64_t i, int64_t t, acc_t logp_it) const {
    const acc_t old = has_old ? old_m(i, t) : logp_it;
    const acc_t sampling = sampling_m.present() ? sampling_m(i, t) : old;
    return loss::select_unmasked(
        loss::TokenInputs<acc_t>{logp_it, old, adv(i, t), mask(i, t), ref_logp(i, t), iw(i, t), sampling});
  }
  loss::TokenInputs<acc_t> token(int64_t i, int64_t t) const { return token(i, t, logp(i, t)); }

  // The statistics of sequence i (a pass over its tokens; cfg.seq_pass).
  loss::SeqStats<acc_t> sequence(const LossConfig& cfg, const LossScalars<acc_t>& s, int64_t i) const {
    acc_t sums[loss::kSequenceSums] = {};
    for (int64_t t = 0; t < T; ++t) loss::add_sequence_terms(cfg, s, token(i, t), sums);
    return loss::sequence_stats(cfg, s, sums);
  }

 private:
  StridedMatrix<acc_t> logp_m, old_m, ref_m, adv_m, mask_m, iw_m, sampling_m;
};

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY

// Device read access to the [B, T] inputs of the loss (logp, old_logp,
// ref_logp, adv, mask, importance weights, sampling log-probs), shared by the
// grpo_loss and fused_grpo_loss kernels. Each may be a broadcast view (stride
// 0); all are in the compute dtype acc_t. Absent inputs read as: old_logp =
// logp, ref_logp = 0, iw = 1, sampling_logp = old_logp. token(i, t, logp) gathers
// them for the per-token loss math of csrc/common/loss_terms.h (host-device functions).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../common/loss_terms.h"
#include "launch.cuh"

namespace grpo_kernels::cuda {

template <typename acc_t>
struct StridedBT {
  const acc_t* data;  // nullptr: absent
  int64_t stride_b, stride_t;

  __device__ __forceinline__ acc_t operator()(int64_t i, int64_t t) const { return data[i * stride_b + t * stride_t]; }
};

template <typename acc_t>
struct LossInputs {
  StridedBT<acc_t> logp, old_logp, ref_logp, adv, mask, iw, sampling_logp;
  bool has_ref;

  // The inputs at (i, t) with log-prob logp_it (the fused kernel computes it); neutral ones at a masked token
  // (loss::select_unmasked: selection, so NaN or ±inf there reach nothing).
  __device__ __forceinline__ loss::TokenInputs<acc_t> token(int64_t i, int64_t t, acc_t logp_it) const {
    const acc_t old = old_logp.data != nullptr ? old_logp(i, t) : logp_it;
    return loss::select_unmasked(loss::TokenInputs<acc_t>{logp_it,
                                                          old,
                                                          adv(i, t),
                                                          mask(i, t),
                                                          has_ref ? ref_logp(i, t) : acc_t(0),
                                                          iw.data != nullptr ? iw(i, t) : acc_t(1),
                                                          sampling_logp.data != nullptr ? sampling_logp(i, t) : old});
  }
  __device__ __forceinline__ loss::TokenInputs<acc_t> token(int64_t i, int64_t t) const {
    return token(i, t, logp(i, t));
  }
};

// A [B, T] view of t (checked: shape, compute dtype, device), or an absent one.
template <typename acc_t>
StridedBT<acc_t> strided_bt(const c10::optional<at::Tensor>& t, int64_t B, int64_t T, const at::Tensor& main,
                            const char* what) {
  if (!t) return {nullptr, 0, 0};
  TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == T, what, " must be a [", B, ", ", T,
              "] view, got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == c10::CppTypeToScalarType<acc_t>::value, what, " must be in the compute dtype ",
              c10::CppTypeToScalarType<acc_t>::value, ", got ", t->scalar_type());
  check_on_device(*t, main, what);
  return {t->const_data_ptr<acc_t>(), t->stride(0), t->stride(1)};
}

// logp is absent for the fused kernel (it computes logp itself).
template <typename acc_t>
LossInputs<acc_t> loss_inputs(const at::Tensor& main, int64_t B, int64_t T, const c10::optional<at::Tensor>& logp,
                              const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
                              const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
                              const c10::optional<at::Tensor>& sampling_logp) {
  return {strided_bt<acc_t>(logp, B, T, main, "logp"),
          strided_bt<acc_t>(old_logp, B, T, main, "old_logp"),
          strided_bt<acc_t>(ref_logp, B, T, main, "ref_logp"),
          strided_bt<acc_t>(adv, B, T, main, "adv"),
          strided_bt<acc_t>(mask, B, T, main, "mask"),
          strided_bt<acc_t>(iw, B, T, main, "iw"),
          strided_bt<acc_t>(sampling_logp, B, T, main, "sampling_logp"),
          ref_logp.has_value()};
}

}  // namespace grpo_kernels::cuda

// Device read access to the [B, T] inputs of the loss (logp, old_logp,
// ref_logp, adv, mask, importance weights), shared by the grpo_loss and
// fused_grpo_loss kernels. Each may be a broadcast view (stride 0); all are in
// the compute dtype acc_t. Absent inputs read as: old_logp = logp, ref_logp = 0,
// iw = 1. token_terms_at evaluates the per-token loss math of
// csrc/cpu/loss_terms.h (host-device functions) on the inputs at (i, t).
#pragma once

#include <cstdint>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "../cpu/loss_terms.h"
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
  StridedBT<acc_t> logp, old_logp, ref_logp, adv, mask, iw;
  bool has_ref;

  __device__ __forceinline__ acc_t old_or(int64_t i, int64_t t, acc_t logp_it) const {
    return old_logp.data != nullptr ? old_logp(i, t) : logp_it;
  }
  __device__ __forceinline__ acc_t ref_or_zero(int64_t i, int64_t t) const {
    return has_ref ? ref_logp(i, t) : acc_t(0);
  }
  __device__ __forceinline__ acc_t iw_or_one(int64_t i, int64_t t) const {
    return iw.data != nullptr ? iw(i, t) : acc_t(1);
  }
};

// The terms of token (i, t) for ratio coef_1 and log-prob logp.
template <typename acc_t>
__device__ __forceinline__ cpu::TokenTerms<acc_t> token_terms_at(const LossInputs<acc_t>& in, const LossConfig& cfg,
                                                                 const cpu::LossScalars<acc_t>& s, int64_t i,
                                                                 int64_t t, acc_t coef_1, acc_t logp) {
  return cpu::token_terms(cfg, s, coef_1, in.adv(i, t), logp, in.has_ref, in.ref_or_zero(i, t), in.iw_or_one(i, t));
}

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
                              const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw) {
  return {strided_bt<acc_t>(logp, B, T, main, "logp"),
          strided_bt<acc_t>(old_logp, B, T, main, "old_logp"),
          strided_bt<acc_t>(ref_logp, B, T, main, "ref_logp"),
          strided_bt<acc_t>(adv, B, T, main, "adv"),
          strided_bt<acc_t>(mask, B, T, main, "mask"),
          strided_bt<acc_t>(iw, B, T, main, "iw"),
          ref_logp.has_value()};
}

}  // namespace grpo_kernels::cuda

// grpo_loss on CPU tensors around the kernels' grpo_loss_fwd_grad, the host work of a call done in C++ (one
// pybind call instead of a few dozen small torch ops): the value checks of the inputs in one pass, the inputs
// in the kernels' compute dtype, the scalar loss and metrics from the per-sequence partials with the weights
// dL/dS_i (grpo_kernels/aggregation.py's arithmetic), and the backward's scaling of the gradient sums.
// Included by module.cpp only: compiled once, in the baseline copy's namespace as module.cpp is (scalar and
// memory-bound code; the kernels it calls are the chosen copy's, through the entry-point table). The autograd
// node of the loss is a C++ one (GRPOLossNode): no Python runs in the backward, and a call costs a few
// microseconds less than a Python autograd Function (at [8, 256] the framework's overhead is most of a call).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <typeinfo>

#include "../common/entry_points.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {

// An aggregation of the loss as arithmetic (grpo_kernels.aggregation.KernelRule):
// loss = reduce_i(S_i / max(n_i, 1) if count_per_sequence else S_i) / batch, reduce the mean over sequences
// or the sum; batch = max(N, 1) (N masked tokens) with batch_tokens, else B · batch_length, else
// max(batch_number, 1) (each rounded to the compute dtype), else none.
struct LossAggregation {
  bool count_per_sequence = false;
  bool mean_over_sequences = false;
  bool batch_tokens = false;
  c10::optional<double> batch_length;
  c10::optional<double> batch_number;
};

// ---------------------------------------------------------------------------------------------------------
// Value checks (grpo_kernels/validation.py raises the errors, before any kernel).

template <typename scalar_t>
bool all_binary(const at::Tensor& mask) {
  const scalar_t* p = mask.const_data_ptr<scalar_t>();
  const int64_t B = mask.size(0), T = mask.size(1), sb = mask.stride(0), st = mask.stride(1);
  for (int64_t i = 0; i < B; ++i) {
    bool ok = true;
    const scalar_t* row = p + i * sb;
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t v = row[t * st];
      ok &= (v == scalar_t(0)) | (v == scalar_t(1));
    }
    if (!ok) return false;
  }
  return true;
}

// Whether row i of the [B, T] mask has a token that counts (a value other than 0).
inline bool row_counts(const at::Tensor& mask, int64_t i) { return mask.select(0, i).ne(0).any().item<bool>(); }

// The first advantage (row-major) that is not finite where it counts: at a token whose mask is not 0 for
// [B, T] advantages, in a sequence with such a token for per-sequence ones ([B] / [B, 1]).
template <typename scalar_t>
c10::optional<double> first_bad_advantage(const at::Tensor& adv, const at::Tensor& mask) {
  const int64_t B = mask.size(0), T = mask.size(1);
  const scalar_t* p = adv.const_data_ptr<scalar_t>();
  const bool per_sequence = adv.dim() == 1 || (adv.size(1) == 1 && T != 1);
  const int64_t sb = adv.stride(0), st = per_sequence ? 0 : adv.stride(1);
  const int64_t len = per_sequence ? 1 : T;
  for (int64_t i = 0; i < B; ++i) {
    const scalar_t* row = p + i * sb;
    float probe = 0.0f;  // NaN when the row holds a NaN or an infinity (x · 0 is NaN for those only)
    if (st == 1 && std::is_same_v<scalar_t, float>) {
#pragma omp simd reduction(+ : probe)
      for (int64_t t = 0; t < len; ++t) probe += static_cast<float>(row[t]) * 0.0f;
    } else {
      for (int64_t t = 0; t < len; ++t) probe += std::isfinite(static_cast<double>(row[t * st])) ? 0.0f : NAN;
    }
    if (!std::isnan(probe)) continue;
    at::Tensor counted;  // the row's tokens that count, read only for a row with a non-finite advantage
    for (int64_t t = 0; t < len; ++t) {
      const double v = static_cast<double>(row[t * st]);
      if (std::isfinite(v)) continue;
      if (per_sequence) {
        if (row_counts(mask, i)) return v;
        break;
      }
      if (!counted.defined()) counted = mask.select(0, i).ne(0).contiguous();
      if (counted.const_data_ptr<bool>()[t]) return v;
    }
  }
  return c10::nullopt;
}

// The value checks of grpo_loss's mask [B, T] (any dtype) and advantages ([B], [B, 1] or [B, T], floating),
// shapes already checked: ("", 0) when the mask holds only 0 and 1 (a bool mask is not read) and the advantages
// are finite wherever they count; else the argument that fails first ("mask", then "advantages") and, for
// advantages, the first non-finite value that counts (row-major).
inline std::tuple<std::string, double> grpo_loss_value_problem(const at::Tensor& mask, const at::Tensor& adv) {
  TORCH_CHECK(mask.is_cpu() && adv.is_cpu(), "grpo_loss_value_problem: CPU tensors only");
  TORCH_CHECK(mask.dim() == 2 && (adv.dim() == 1 || adv.dim() == 2) && adv.size(0) == mask.size(0),
              "grpo_loss_value_problem: mask must be [B, T] and advantages [B], [B, 1] or [B, T]");
  if (mask.scalar_type() != at::kBool) {
    bool binary = true;
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, mask.scalar_type(), "grpo_loss_value_problem",
                               [&] { binary = all_binary<scalar_t>(mask); });
    if (!binary) return {"mask", 0.0};
  }
  c10::optional<double> bad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, adv.scalar_type(), "grpo_loss_value_problem",
                                  [&] { bad = first_bad_advantage<scalar_t>(adv, mask); });
  if (bad) return {"advantages", *bad};
  return {"", 0.0};
}

// Whether the inputs of a grpo_loss call pass every check of grpo_kernels/validation.py on its tensors: plain
// dense CPU tensors (no tensor subclass, fake or meta tensor), logp [B, T] non-empty, old_logp / ref_logp /
// sampling_logp [B, T], adv and iw [B], [B, 1] or [B, T] (iw [B, T] with iw_per_token), all float16 /
// bfloat16 / float32 / float64; the mask [B, T] bool, floating or integer, and the values of
// grpo_loss_value_problem. A sufficient condition only: a call it refuses goes through validation.py, which
// names the problem or finds none.
inline bool plain_cpu_tensor(const at::Tensor& t) {
  // a TensorImpl itself (not a functorch, functionalization or nested wrapper) without a Python subclass's key
  return t.defined() && typeid(*t.unsafeGetTensorImpl()) == typeid(c10::TensorImpl) && t.is_cpu() &&
         t.layout() == at::kStrided && t.has_storage() && !t.is_neg() && !t.key_set().has(c10::DispatchKey::Python);
}

inline bool float_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble;
}

inline bool float_input(const at::Tensor& t) { return plain_cpu_tensor(t) && float_dtype(t.scalar_type()); }

inline bool per_token_input(const c10::optional<at::Tensor>& t, int64_t B, int64_t T) {
  return !t || (float_input(*t) && t->dim() == 2 && t->size(0) == B && t->size(1) == T);
}

inline bool per_sequence_or_token_input(const at::Tensor& t, int64_t B, int64_t T) {
  return float_input(t) && (t.dim() == 1 || t.dim() == 2) && t.size(0) == B &&
         (t.dim() == 1 || t.size(1) == 1 || t.size(1) == T);
}

inline bool grpo_loss_inputs_pass(const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
                                  const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv,
                                  const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
                                  const c10::optional<at::Tensor>& sampling_logp, bool iw_per_token) {
  if (!float_input(logp) || logp.dim() != 2 || logp.size(0) == 0 || logp.size(1) == 0) return false;
  const int64_t B = logp.size(0), T = logp.size(1);
  if (!per_token_input(old_logp, B, T) || !per_token_input(ref_logp, B, T) || !per_token_input(sampling_logp, B, T))
    return false;
  if (!per_sequence_or_token_input(adv, B, T)) return false;
  if (iw && !(iw_per_token ? per_token_input(iw, B, T) : per_sequence_or_token_input(*iw, B, T))) return false;
  const at::ScalarType mask_dtype = mask.scalar_type();
  const bool mask_dtype_ok = mask_dtype == at::kBool || float_dtype(mask_dtype) || mask_dtype == at::kByte ||
                             mask_dtype == at::kChar || mask_dtype == at::kShort || mask_dtype == at::kInt ||
                             mask_dtype == at::kLong;
  if (!plain_cpu_tensor(mask) || !mask_dtype_ok || mask.dim() != 2 || mask.size(0) != B || mask.size(1) != T)
    return false;
  return std::get<0>(grpo_loss_value_problem(mask, adv)).empty();
}

// ---------------------------------------------------------------------------------------------------------
// The forward and backward.

// A new CPU tensor without the dispatcher (the host code's small outputs: a call's overhead matters at small
// batches).
inline at::Tensor new_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_cpu(sizes, dtype, /*pin_memory=*/false, c10::nullopt);
}

// t in `dtype`: a contiguous bfloat16 tensor to float32 here (exact: the bits shifted; torch's copy costs a few
// microseconds of dispatch per tensor, most of a small call's conversions), else by torch.
inline at::Tensor to_compute_dtype(const at::Tensor& t, at::ScalarType dtype) {
  if (dtype != at::kFloat || t.scalar_type() != at::kBFloat16 || !t.is_contiguous()) return t.to(dtype);
  at::Tensor out = new_cpu(t.sizes(), at::kFloat);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(t.const_data_ptr());
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr());
  at::parallel_for(0, t.numel(), 32768, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<uint32_t>(src[i]) << 16;
  });
  return out;
}

// A [B, T] input of the loss as the kernels take it: the compute dtype, a [B] / [B, 1] one as a broadcast view.
inline at::Tensor as_bt(const at::Tensor& t, at::ScalarType dtype, int64_t B, int64_t T) {
  at::Tensor x = t.scalar_type() == dtype ? t : to_compute_dtype(t, dtype);
  if (x.dim() == 2 && x.size(1) == T) return x;
  return x.as_strided({B, T}, {x.stride(0), 0});  // [B] or [B, 1]: each row's value over T (one view op)
}

inline c10::optional<at::Tensor> as_bt(const c10::optional<at::Tensor>& t, at::ScalarType dtype, int64_t B,
                                       int64_t T) {
  if (!t) return c10::nullopt;
  return as_bt(*t, dtype, B, T);
}

// The loss and metrics from the partials [kNumPartials, B] (compute dtype), and dL/dS_i [B].
template <typename acc_t>
std::tuple<acc_t, acc_t, acc_t, acc_t, acc_t> aggregate(const acc_t* p, int64_t B, const LossAggregation& agg,
                                                        bool has_ref, bool per_seq_metrics, acc_t* seq_weight) {
  double sums[6] = {};  // Σ S_i, Σ n_i, Σ KL, Σ low, Σ high, Σ region, in float64 whatever the compute dtype
  for (int64_t k = 0; k < 6; ++k) {
    for (int64_t i = 0; i < B; ++i) sums[k] += static_cast<double>(p[k * B + i]);
  }
  const acc_t* count = p + B;
  const acc_t token_denom = std::max(static_cast<acc_t>(sums[1]), acc_t(1));
  acc_t x;
  if (agg.count_per_sequence) {
    double s = 0;
    for (int64_t i = 0; i < B; ++i) s += static_cast<double>(p[i] / std::max(count[i], acc_t(1)));
    x = static_cast<acc_t>(agg.mean_over_sequences ? s / static_cast<double>(B) : s);
  } else {
    x = static_cast<acc_t>(agg.mean_over_sequences ? sums[0] / static_cast<double>(B) : sums[0]);
  }
  bool has_batch = true;
  acc_t batch = 1;
  if (agg.batch_tokens) {
    batch = token_denom;
  } else if (agg.batch_length) {
    batch = static_cast<acc_t>(static_cast<double>(B) * *agg.batch_length);
  } else if (agg.batch_number) {
    batch = std::max(static_cast<acc_t>(*agg.batch_number), acc_t(1));
  } else {
    has_batch = false;
  }
  const acc_t loss = has_batch ? x / batch : x;
  if (agg.count_per_sequence) {
    for (int64_t i = 0; i < B; ++i) {
      acc_t w = acc_t(1) / std::max(count[i], acc_t(1));
      if (agg.mean_over_sequences) w = w / static_cast<acc_t>(B);
      seq_weight[i] = has_batch ? w / batch : w;
    }
  } else {
    const double scale = agg.mean_over_sequences ? 1.0 / static_cast<double>(B) : 1.0;
    const acc_t w = has_batch ? static_cast<acc_t>(scale) / batch : static_cast<acc_t>(scale);
    std::fill(seq_weight, seq_weight + B, w);
  }
  const acc_t metric_denom = per_seq_metrics ? static_cast<acc_t>(B) : token_denom;
  const acc_t kl = has_ref ? static_cast<acc_t>(sums[2]) / token_denom : acc_t(0);
  return {loss, kl, static_cast<acc_t>(sums[3]) / metric_denom, static_cast<acc_t>(sums[4]) / metric_denom,
          static_cast<acc_t>(sums[5]) / metric_denom};
}

using FwdGrad = decltype(&cpu::grpo_loss_fwd_grad);

// grpo_loss forward on CPU tensors: (loss, per_token_loss, kl, clip_ratio_low, clip_ratio_high,
// clip_ratio_region, grad_sums, seq_weight), the scalars 0-d, all in the compute dtype (float64 for float64
// logp, else float32); grad_sums [B, T] (empty without compute_grad) and seq_weight [B] = dL/dS_i give
// d loss / d logp = g · seq_weight_i · grad_sums (grpo_loss_backward). kl is 0 without ref_logp.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
grpo_loss_forward(FwdGrad kernel, const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
                  const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& mask,
                  const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp,
                  const LossConfig& cfg, const LossAggregation& agg, bool compute_grad) {
  TORCH_CHECK(logp.is_cpu() && logp.dim() == 2, "grpo_loss_forward: logp must be a [B, T] CPU tensor");
  const at::NoGradGuard no_grad;  // constants of the kernels (the caller's autograd Function holds the graph)
  const int64_t B = logp.size(0), T = logp.size(1);
  const at::ScalarType dtype = logp.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor mask_k = mask.scalar_type() == at::kBool ? mask : as_bt(mask, dtype, B, T);
  auto [per_token_loss, partials, grad_sums] =
      kernel(as_bt(logp, dtype, B, T), as_bt(old_logp, dtype, B, T), as_bt(ref_logp, dtype, B, T),
             as_bt(adv, dtype, B, T), mask_k, as_bt(iw, dtype, B, T), as_bt(sampling_logp, dtype, B, T), cfg,
             compute_grad);
  at::Tensor seq_weight = new_cpu({B}, dtype);
  at::Tensor scalars[5];
  AT_DISPATCH_FLOATING_TYPES(dtype, "grpo_loss_forward", [&] {
    const auto values = aggregate<scalar_t>(partials.const_data_ptr<scalar_t>(), B, agg, ref_logp.has_value(),
                                            cfg.per_seq_metrics, seq_weight.data_ptr<scalar_t>());
    const scalar_t v[5] = {std::get<0>(values), std::get<1>(values), std::get<2>(values), std::get<3>(values),
                           std::get<4>(values)};
    for (int k = 0; k < 5; ++k) {
      scalars[k] = new_cpu({}, dtype);
      *scalars[k].data_ptr<scalar_t>() = v[k];
    }
  });
  return {scalars[0], per_token_loss, scalars[1], scalars[2], scalars[3], scalars[4], grad_sums, seq_weight};
}

// x rounded to bfloat16 as c10::BFloat16 rounds it (to nearest even, NaN to 0x7FC0), without a branch (a loop
// of c10::BFloat16 conversions stays scalar).
inline uint16_t bfloat16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
}

template <typename acc_t, typename out_t>
void scale_rows(const acc_t* x, const acc_t* w, acc_t g, int64_t B, int64_t T, out_t* y) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(T, 1));  // small batches: this thread
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t s = g * w[i];
      const acc_t* xi = x + i * T;
      out_t* yi = y + i * T;
      if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<out_t, c10::BFloat16>) {
        uint16_t* bits = reinterpret_cast<uint16_t*>(yi);
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) bits[t] = bfloat16_bits(s * xi[t]);
      } else {
#pragma omp simd
        for (int64_t t = 0; t < T; ++t) yi[t] = static_cast<out_t>(s * xi[t]);
      }
    }
  });
}

// d loss / d logp = (g · seq_weight_i) · grad_sums [B, T], in `dtype` (logp's), for the incoming gradient g
// of the loss (0-d; rounded to the compute dtype first, as the other backends do).
inline at::Tensor grpo_loss_backward(const at::Tensor& grad_sums, const at::Tensor& seq_weight,
                                     const at::Tensor& grad_loss, at::ScalarType dtype) {
  TORCH_CHECK(grad_sums.is_cpu() && grad_sums.dim() == 2 && grad_sums.is_contiguous() && seq_weight.is_contiguous() &&
                  seq_weight.numel() == grad_sums.size(0) && seq_weight.scalar_type() == grad_sums.scalar_type(),
              "grpo_loss_backward: grad_sums must be a contiguous [B, T] CPU tensor and seq_weight [B] of its dtype");
  TORCH_CHECK(grad_loss.is_cpu() && grad_loss.numel() == 1, "grpo_loss_backward: grad_loss must be a one-element "
              "CPU tensor");
  const int64_t B = grad_sums.size(0), T = grad_sums.size(1);
  at::Tensor out = new_cpu({B, T}, dtype);
  AT_DISPATCH_FLOATING_TYPES(grad_sums.scalar_type(), "grpo_loss_backward", [&] {
    using acc_t = scalar_t;
    acc_t g;  // the incoming gradient rounded to the compute dtype (as .to(acc_t).item() rounds it)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_loss.scalar_type(), "grpo_loss_backward",
                                    [&] { g = static_cast<acc_t>(*grad_loss.const_data_ptr<scalar_t>()); });
    const acc_t* w = seq_weight.const_data_ptr<acc_t>();
    const acc_t* x = grad_sums.const_data_ptr<acc_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "grpo_loss_backward",
                                    [&] { scale_rows<acc_t, scalar_t>(x, w, g, B, T, out.data_ptr<scalar_t>()); });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------
// The autograd node.

// `grad`, computed without a graph, made to raise when it is differentiated (a backward with
// create_graph=True, then a second one): the node is differentiable once, as Python's
// torch.autograd.function.once_differentiable makes the other backends' nodes.
inline at::Tensor once_differentiable(const at::Tensor& grad) {
  auto error = std::make_shared<torch::autograd::DelayedError>(
      "grpo_loss (cpu backend): trying to differentiate twice a function that is differentiable once", 1);
  return error->apply({grad.detach().requires_grad_(true)})[0];
}

// The loss as a C++ autograd Function: forward = grpo_loss_forward (with the gradient sums when logp requires
// grad), backward = grpo_loss_backward (d loss / d logp only; the other inputs are constants). The outputs
// without gradient (per_token_loss, kl and the clip metrics) go to `metrics`.
struct GRPOLossNode : public torch::autograd::Function<GRPOLossNode> {
  static constexpr size_t kNumArgs = 11;  // forward's arguments after ctx: one gradient slot each

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& logp,
                            const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
                            const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
                            const c10::optional<at::Tensor>& sampling_logp, FwdGrad kernel, const LossConfig& cfg,
                            const LossAggregation& agg, std::vector<at::Tensor>* metrics) {
    auto [loss, per_token_loss, kl, low, high, region, grad_sums, seq_weight] = grpo_loss_forward(
        kernel, logp, old_logp, ref_logp, adv, mask, iw, sampling_logp, cfg, agg, logp.requires_grad());
    *metrics = {per_token_loss, kl, low, high, region};
    ctx->saved_data["grad_sums"] = grad_sums;
    ctx->saved_data["seq_weight"] = seq_weight;
    ctx->saved_data["logp_dtype"] = logp.scalar_type();
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads(kNumArgs);
    if (ctx->needs_input_grad(0)) {
      const at::Tensor grad = grpo_loss_backward(ctx->saved_data["grad_sums"].toTensor(),
                                                 ctx->saved_data["seq_weight"].toTensor(), grad_outputs[0],
                                                 ctx->saved_data["logp_dtype"].toScalarType());
      grads[0] = at::GradMode::is_enabled() ? once_differentiable(grad) : grad;
    }
    return grads;
  }
};

// grpo_loss on CPU tensors: (loss, per_token_loss, kl, clip_ratio_low, clip_ratio_high, clip_ratio_region) in
// the compute dtype; the loss has a GRPOLossNode when grad mode is on and an input requires grad (the other
// outputs never have a gradient). kl is 0 without ref_logp.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_loss_autograd(
    FwdGrad kernel, const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
    const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& mask,
    const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp, const LossConfig& cfg,
    const LossAggregation& agg) {
  bool track = false;
  if (at::GradMode::is_enabled()) {
    for (const c10::optional<at::Tensor>& t : {c10::optional<at::Tensor>(logp), old_logp, ref_logp,
                                               c10::optional<at::Tensor>(adv), c10::optional<at::Tensor>(mask),
                                               iw, sampling_logp}) {
      track |= t.has_value() && t->requires_grad();
    }
  }
  if (!track) {
    auto [loss, per_token_loss, kl, low, high, region, grad_sums, seq_weight] =
        grpo_loss_forward(kernel, logp, old_logp, ref_logp, adv, mask, iw, sampling_logp, cfg, agg, false);
    return {loss, per_token_loss, kl, low, high, region};
  }
  std::vector<at::Tensor> metrics;
  at::Tensor loss = GRPOLossNode::apply(logp, old_logp, ref_logp, adv, mask, iw, sampling_logp, kernel, cfg, agg,
                                        &metrics);
  return {loss, metrics[0], metrics[1], metrics[2], metrics[3], metrics[4]};
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY

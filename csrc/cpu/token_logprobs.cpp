// token_logprobs on CPU: forward (log-sum-exp, gathered logit, entropy) and
// backward (d logits), parallel over rows, vectorized over the vocabulary.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include "../common/entry_points.h"
#include "../common/row_temperature.h"
#include "gradient_buffer.h"
#include "logit_rows.h"
#include "loss_tokens.h"
#include "softmax_row.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

namespace {

constexpr int64_t kRowsPerTask = 1;  // a row is V values: enough work per task

// Forward. Row r reads its id y and its V logits once from memory (kChunk at a
// time, each chunk twice, chunk_sums: the first read from L2 where the previous
// chunk prefetched it; x_y again from cache); writes logp, lse (and H) [R].
// Memory traffic: one read of the logits + 8-12 bytes per row (16-24 in
// float64). Ignored rows read nothing but y (and are prefetched all the same).
template <typename scalar_t, bool kEntropy>
void forward_kernel(const at::Tensor& logits, const int64_t* ids, double temperature,
                    const at::opmath_type<scalar_t>* row_t, int64_t ignore_index, at::Tensor& logp, at::Tensor& lse,
                    at::Tensor& entropy) {
  using acc_t = at::opmath_type<scalar_t>;
  const LogitRows rows(logits);
  const int64_t vocab = rows.vocab();
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  const acc_t inv_t_all = inverse_temperature<acc_t>(temperature);
  acc_t* logp_out = logp.data_ptr<acc_t>();
  acc_t* lse_out = lse.data_ptr<acc_t>();
  acc_t* ent_out = kEntropy ? entropy.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, rows.rows(), kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = ids[r];
      acc_t row_logp = 0, row_lse = 0, row_ent = 0;
      if (y != ignore_index) {
        check_token_id(y, vocab, ignore_index, r);
        const scalar_t* x_row = x + rows.offset(r);
        const scalar_t* next_row = r + 1 < end ? x + rows.offset(r + 1) : x_row;  // prefetched after this row
        const acc_t inv_t = row_inverse_temperature(row_t, r, inv_t_all);
        LseState<acc_t> state;
        for (int64_t v0 = 0; v0 < vocab; v0 += kChunk<scalar_t>) {
          const int64_t v1 = std::min(vocab, v0 + kChunk<scalar_t>);
          acc_t cm, cs, ca;
          chunk_sums<kEntropy>(x_row + v0, v1 - v0, inv_t, v1 < vocab ? x_row + v1 : next_row, cm, cs, ca);
          state.merge(cm, cs, ca);
        }
        row_lse = state.lse();
        row_logp = static_cast<acc_t>(x_row[y]) * inv_t - row_lse;
        if (kEntropy) row_ent = state.entropy();
      }
      logp_out[r] = row_logp;
      lse_out[r] = row_lse;
      if (kEntropy) ent_out[r] = row_ent;
    }
  });
}

// Backward. Row r reads y, lse, g_logp (and H, g_H): a few bytes, and its V
// logits once; writes its V gradient values once (into the logits buffer when
// in place: each value is read before it is overwritten). Memory traffic: one
// read + one write of the logits. Ignored rows only write zeros.
template <typename scalar_t, bool kEntropyGrad>
void backward_kernel(const at::Tensor& logits, at::Tensor& grad, const int64_t* ids, const at::Tensor& lse,
                     const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& entropy,
                     const c10::optional<at::Tensor>& grad_entropy, double temperature,
                     const at::opmath_type<scalar_t>* row_t, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const LogitRows rows(logits), grad_rows(grad);
  const int64_t vocab = rows.vocab();
  const scalar_t* x = logits.const_data_ptr<scalar_t>();
  scalar_t* dx = grad.data_ptr<scalar_t>();
  const acc_t inv_t_all = inverse_temperature<acc_t>(temperature);
  const acc_t* lse_in = lse.const_data_ptr<acc_t>();
  const acc_t* g_logp = grad_logp ? grad_logp->const_data_ptr<acc_t>() : nullptr;
  const acc_t* ent = kEntropyGrad ? entropy->const_data_ptr<acc_t>() : nullptr;
  const acc_t* g_ent = kEntropyGrad ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, rows.rows(), kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* dx_row = dx + grad_rows.offset(r);
      const int64_t y = ids[r];
      if (y == ignore_index) {
        std::fill(dx_row, dx_row + vocab, scalar_t(0));
        continue;
      }
      // An id outside [0, V) has no one-hot term (a target in another vocabulary shard): softmax_grad_row
      // never indexes the row with it.
      const acc_t w = g_logp ? g_logp[r] : acc_t(0);
      const acc_t inv_t = row_inverse_temperature(row_t, r, inv_t_all);
      softmax_grad_row<kEntropyGrad>(x + rows.offset(r), dx_row, vocab, y, inv_t, lse_in[r], w,
                                     kEntropyGrad ? g_ent[r] : acc_t(0), kEntropyGrad ? ent[r] : acc_t(0));
    }
  });
}

// A contiguous [R] tensor of the compute dtype (the saved statistics and incoming gradients), checked: R values
// on the logits' device.
at::Tensor per_row(const at::Tensor& t, at::ScalarType dtype, int64_t rows, const at::Tensor& logits,
                   const char* what) {
  return per_row_values(t, dtype, rows, logits, "token_logprobs_bwd", what);
}

// The per-row temperatures [R] in the compute dtype, or none (a float temperature).
c10::optional<at::Tensor> row_temperatures(const c10::optional<at::Tensor>& row_temperature, at::ScalarType dtype,
                                           int64_t rows, const at::Tensor& logits, const char* name) {
  if (!row_temperature) return c10::nullopt;
  return per_row_values(*row_temperature, dtype, rows, logits, name, "row_temperature");
}

template <typename acc_t>
const acc_t* data_or_null(const c10::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<acc_t>() : nullptr;
}

void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK(logits.is_cpu(), name, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), name, ": logits must be floating point, got ",
              logits.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& token_ids, double temperature,
                                                                  int64_t ignore_index, bool return_entropy,
                                                                  const c10::optional<at::Tensor>& row_temperature) {
  check_logits(logits, "token_logprobs_fwd");
  const at::Tensor ids = flat_ids(token_ids, logits, LogitRows(logits).rows(), "token_logprobs_fwd");
  const auto acc = at::toOpMathType(logits.scalar_type());
  const c10::optional<at::Tensor> row_t =
      row_temperatures(row_temperature, acc, ids.numel(), logits, "token_logprobs_fwd");
  const auto options = logits.options().dtype(acc);
  at::Tensor logp = at::empty({ids.numel()}, options);
  at::Tensor lse = at::empty({ids.numel()}, options);
  at::Tensor entropy = at::empty({return_entropy ? ids.numel() : 0}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_fwd", [&] {
    if (return_entropy) {
      forward_kernel<scalar_t, true>(logits, ids.const_data_ptr<int64_t>(), temperature,
                                     data_or_null<at::opmath_type<scalar_t>>(row_t), ignore_index, logp, lse, entropy);
    } else {
      forward_kernel<scalar_t, false>(logits, ids.const_data_ptr<int64_t>(), temperature,
                                      data_or_null<at::opmath_type<scalar_t>>(row_t), ignore_index, logp, lse, entropy);
    }
  });
  return {logp, lse, entropy};
}

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& lse,
                              const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& entropy,
                              const c10::optional<at::Tensor>& grad_entropy, double temperature,
                              int64_t ignore_index, bool inplace,
                              const c10::optional<at::Tensor>& row_temperature) {
  check_logits(logits, "token_logprobs_bwd");
  const int64_t rows = LogitRows(logits).rows();
  const at::Tensor ids = flat_ids(token_ids, logits, rows, "token_logprobs_bwd");
  const auto acc = at::toOpMathType(logits.scalar_type());
  const c10::optional<at::Tensor> row_t = row_temperatures(row_temperature, acc, rows, logits, "token_logprobs_bwd");
  TORCH_CHECK(!grad_entropy || entropy, "token_logprobs_bwd: grad_entropy needs entropy");
  TORCH_CHECK(!inplace || at::has_internal_overlap(logits) != at::MemOverlap::Yes,
              "token_logprobs_bwd: in place needs logits whose rows do not overlap");
  const at::Tensor lse_r = per_row(lse, acc, rows, logits, "lse");
  const c10::optional<at::Tensor> g_logp =
      grad_logp ? c10::optional<at::Tensor>(per_row(*grad_logp, acc, rows, logits, "grad_logp")) : c10::nullopt;
  const bool entropy_grad = grad_entropy.has_value();
  const c10::optional<at::Tensor> ent =
      entropy_grad ? c10::optional<at::Tensor>(per_row(*entropy, acc, rows, logits, "entropy")) : c10::nullopt;
  const c10::optional<at::Tensor> g_ent =
      entropy_grad ? c10::optional<at::Tensor>(per_row(*grad_entropy, acc, rows, logits, "grad_entropy"))
                   : c10::nullopt;
  at::Tensor grad = inplace ? logits : empty_gradient_like(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_bwd", [&] {
    if (entropy_grad) {
      backward_kernel<scalar_t, true>(logits, grad, ids.const_data_ptr<int64_t>(), lse_r, g_logp, ent, g_ent,
                                      temperature, data_or_null<at::opmath_type<scalar_t>>(row_t), ignore_index);
    } else {
      backward_kernel<scalar_t, false>(logits, grad, ids.const_data_ptr<int64_t>(), lse_r, g_logp, ent, g_ent,
                                       temperature, data_or_null<at::opmath_type<scalar_t>>(row_t), ignore_index);
    }
  });
  return grad;
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY

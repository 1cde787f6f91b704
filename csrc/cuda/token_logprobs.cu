// token_logprobs on CUDA: forward (log-sum-exp, gathered logit, entropy) and
// backward (d logits), one block per row (grid-stride over rows), 16-byte
// vector loads and stores over the vocabulary.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/MemoryOverlap.h>

#include "../common/entry_points.h"
#include "../common/row_temperature.h"
#include "launch.cuh"
#include "logit_rows.cuh"
#include "row_softmax.cuh"

namespace grpo_kernels::cuda {

namespace {

// Forward. Block `row` reads its id y and its V logits once (plus x_y, from
// L1/L2); writes logp, lse (and H) [R]. Memory traffic: one read of the logits
// + 8-12 bytes per row (16-24 for float64). Ignored rows read nothing but y.
template <typename scalar_t, bool kEntropy>
__global__ void __launch_bounds__(kMaxRowThreads, kRowBlocksPerSm<scalar_t>)
    token_logprobs_fwd_kernel(const scalar_t* __restrict__ x, LogitRows rows, int64_t n_rows, int64_t vocab,
                              const int64_t* __restrict__ ids, at::opmath_type<scalar_t> inv_t_all,
                              const at::opmath_type<scalar_t>* __restrict__ row_t, int64_t ignore_index,
                              at::opmath_type<scalar_t>* __restrict__ logp_out,
                              at::opmath_type<scalar_t>* __restrict__ lse_out,
                              at::opmath_type<scalar_t>* __restrict__ ent_out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ RowState<acc_t> smem[kWarpSize];
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int64_t y = ids[r];
    acc_t logp = 0, lse = 0, ent = 0;
    if (y != ignore_index) {
      CUDA_KERNEL_ASSERT(y >= 0 && y < vocab && "token id out of range");
      const scalar_t* x_row = x + rows.offset(r);
      const acc_t inv_t = row_inverse_temperature(row_t, r, inv_t_all);
      const RowStats<acc_t> st = row_stats<kEntropy>(x_row, vocab, inv_t, smem);
      lse = st.lse;
      ent = st.entropy;
      if (threadIdx.x == 0) logp = static_cast<acc_t>(x_row[y]) * inv_t - lse;
    }
    if (threadIdx.x == 0) {
      logp_out[r] = logp;
      lse_out[r] = lse;
      if (kEntropy) ent_out[r] = ent;
    }
  }
}

// Backward. Block `row` reads y, lse, g_logp (H and g_H with kEntropyGrad): a
// few bytes, and its V logits once; writes its V gradient values once (dx may
// be x: each value is read before it is overwritten, by the same thread).
// Memory traffic: one read + one write of the logits. Ignored rows only write zeros.
template <typename scalar_t, bool kEntropyGrad>
__global__ void __launch_bounds__(kMaxRowThreads, kRowBlocksPerSm<scalar_t>)
    token_logprobs_bwd_kernel(const scalar_t* x, LogitRows rows, scalar_t* dx, LogitRows dx_rows, int64_t n_rows,
                              int64_t vocab, const int64_t* __restrict__ ids,
                              const at::opmath_type<scalar_t>* __restrict__ lse,
                              const at::opmath_type<scalar_t>* __restrict__ g_logp,
                              const at::opmath_type<scalar_t>* __restrict__ ent,
                              const at::opmath_type<scalar_t>* __restrict__ g_ent, at::opmath_type<scalar_t> inv_t_all,
                              const at::opmath_type<scalar_t>* __restrict__ row_t, int64_t ignore_index) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    scalar_t* dx_row = dx + dx_rows.offset(r);
    const int64_t y = ids[r];
    if (y == ignore_index) {
      row_zero(dx_row, vocab);
      continue;
    }
    const acc_t row_lse = lse[r];
    const acc_t inv_t = row_inverse_temperature(row_t, r, inv_t_all);
    const acc_t w = g_logp != nullptr ? g_logp[r] : acc_t(0);
    const acc_t row_g_ent = kEntropyGrad ? g_ent[r] : acc_t(0);
    const acc_t row_ent = kEntropyGrad ? ent[r] : acc_t(0);
    row_transform<false>(x + rows.offset(r), dx_row, vocab, [&](int64_t v, scalar_t xv) {
      return softmax_grad<kEntropyGrad>(static_cast<acc_t>(xv) * inv_t, v == y, row_lse, w, row_g_ent, row_ent,
                                        inv_t);
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits,
                                                                  const at::Tensor& token_ids, double temperature,
                                                                  int64_t ignore_index, bool return_entropy,
                                                                  const c10::optional<at::Tensor>& row_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  int64_t n_rows = 0;
  const LogitRows rows = logit_rows(logits, &n_rows);
  const int64_t vocab = logits.size(-1);
  const at::Tensor ids = per_row(token_ids, at::kLong, n_rows, logits, "token_ids");
  const auto options = logits.options().dtype(at::toOpMathType(logits.scalar_type()));
  at::Tensor logp = at::empty({n_rows}, options);
  at::Tensor lse = at::empty({n_rows}, options);
  at::Tensor entropy = at::empty({return_entropy ? n_rows : 0}, options);
  const at::Tensor row_t =
      row_temperature ? per_row(*row_temperature, options.dtype().toScalarType(), n_rows, logits, "row_temperature")
                      : at::Tensor();
  if (n_rows == 0) return {logp, lse, entropy};
  const int threads = row_threads(vocab, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = return_entropy ? token_logprobs_fwd_kernel<scalar_t, true> : token_logprobs_fwd_kernel<scalar_t, false>;
    kernel<<<grid_size(n_rows), threads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), rows, n_rows, vocab, ids.const_data_ptr<int64_t>(),
        inverse_temperature<acc_t>(temperature), row_temperature ? row_t.const_data_ptr<acc_t>() : nullptr,
        ignore_index, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
        return_entropy ? entropy.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, lse, entropy};
}

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& token_ids, const at::Tensor& lse,
                              const c10::optional<at::Tensor>& grad_logp, const c10::optional<at::Tensor>& entropy,
                              const c10::optional<at::Tensor>& grad_entropy, double temperature,
                              int64_t ignore_index, bool inplace,
                              const c10::optional<at::Tensor>& row_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  TORCH_CHECK(!grad_entropy || entropy, "token_logprobs_bwd: grad_entropy needs entropy");
  TORCH_CHECK(!inplace || at::has_internal_overlap(logits) != at::MemOverlap::Yes,
              "token_logprobs_bwd: in place needs logits whose rows do not overlap");
  int64_t n_rows = 0;
  const LogitRows rows = logit_rows(logits, &n_rows);
  const int64_t vocab = logits.size(-1);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const at::Tensor ids = per_row(token_ids, at::kLong, n_rows, logits, "token_ids");
  const at::Tensor lse_r = per_row(lse, acc, n_rows, logits, "lse");
  const bool entropy_grad = grad_entropy.has_value();
  const at::Tensor g_logp = grad_logp ? per_row(*grad_logp, acc, n_rows, logits, "grad_logp") : at::Tensor();
  const at::Tensor ent = entropy_grad ? per_row(*entropy, acc, n_rows, logits, "entropy") : at::Tensor();
  const at::Tensor g_ent = entropy_grad ? per_row(*grad_entropy, acc, n_rows, logits, "grad_entropy") : at::Tensor();
  const at::Tensor row_t =
      row_temperature ? per_row(*row_temperature, acc, n_rows, logits, "row_temperature") : at::Tensor();
  at::Tensor grad = inplace ? logits : at::empty(logits.sizes(), logits.options());
  if (n_rows == 0) return grad;
  int64_t grad_rows_count = 0;
  const LogitRows grad_rows = logit_rows(grad, &grad_rows_count);
  const int threads = row_threads(vocab, logits.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel =
        entropy_grad ? token_logprobs_bwd_kernel<scalar_t, true> : token_logprobs_bwd_kernel<scalar_t, false>;
    kernel<<<grid_size(n_rows), threads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), rows, grad.data_ptr<scalar_t>(), grad_rows, n_rows, vocab,
        ids.const_data_ptr<int64_t>(), lse_r.const_data_ptr<acc_t>(),
        grad_logp ? g_logp.const_data_ptr<acc_t>() : nullptr, entropy_grad ? ent.const_data_ptr<acc_t>() : nullptr,
        entropy_grad ? g_ent.const_data_ptr<acc_t>() : nullptr, inverse_temperature<acc_t>(temperature),
        row_temperature ? row_t.const_data_ptr<acc_t>() : nullptr, ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace grpo_kernels::cuda

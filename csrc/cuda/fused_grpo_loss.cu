// fused_grpo_loss on CUDA (no sequence pass: token-level ratios): logits → logp →
// loss, with d loss / d logits formed in the same kernel, one block per row.
//
// The loss weights of sequence i, dL/dS_i (seq_weight), depend on the mask
// only, so a token's weight w = dL/dlogp = dL/dS_i · m · dℓ/dlogp is known as
// soon as its logp is: a block sweeps its row once for the log-sum-exp (and
// entropy), forms logp and w, then sweeps the row again, from its end
// backwards, writing w (onehot_y - p) / T. The grid is persistent and sized so
// that the rows in flight fit in L2: the second sweep reads from L2, not DRAM.
// The per-token loss and the per-sequence partials then come from the [B, T]
// log-probs through the grpo_loss forward kernel (a few bytes per token).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>

#include "../common/entry_points.h"
#include "../common/row_temperature.h"
#include "launch.cuh"
#include "logit_rows.cuh"
#include "loss_inputs.cuh"
#include "row_softmax.cuh"

namespace grpo_kernels::cuda {

namespace {

// Row r = token (i, t) = (r / T, r % T) reads its id, its V logits, and a few
// [B, T] values (keep, adv, old_logp, ref_logp, iw, sampling_logp) and seq_weight[i]; writes
// logp, lse (H) and, with kGrad, its V gradient values (into the logits when in
// place: x_y is read before the block's barrier, and each value of the row is
// read by the thread that overwrites it). A row with w = 0 (masked, ignored,
// fully clipped) gets zeros without a second read. Memory traffic: one read of
// the logits (+ one write with kGrad; the second read hits L2).
template <typename scalar_t, bool kEntropy, bool kGrad>
__global__ void __launch_bounds__(kMaxRowThreads, kRowBlocksPerSm<scalar_t>)
    fused_grpo_loss_kernel(const scalar_t* x, LogitRows rows, scalar_t* dx, LogitRows dx_rows, int64_t n_rows,
                           int64_t T, int64_t vocab, const int64_t* __restrict__ ids,
                           at::opmath_type<scalar_t> inv_t_all, const at::opmath_type<scalar_t>* __restrict__ row_t,
                           int64_t ignore_index, LossInputs<at::opmath_type<scalar_t>> in,
                           const at::opmath_type<scalar_t>* __restrict__ seq_weight, LossConfig cfg,
                           LossScalars<at::opmath_type<scalar_t>> s,
                           at::opmath_type<scalar_t>* __restrict__ logp_out,
                           at::opmath_type<scalar_t>* __restrict__ lse_out,
                           at::opmath_type<scalar_t>* __restrict__ ent_out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ RowState<acc_t> smem[kWarpSize];
  __shared__ acc_t w_shared;
  for (int64_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
    const int64_t y = ids[r];
    scalar_t* dx_row = kGrad ? dx + dx_rows.offset(r) : nullptr;
    // An ignored row is never read (the caller passes masked rows as ignored: native/fused_grpo_loss.py).
    if (y == ignore_index) {
      if (threadIdx.x == 0) {
        logp_out[r] = lse_out[r] = acc_t(0);
        if (kEntropy) ent_out[r] = acc_t(0);
      }
      if (kGrad) row_zero(dx_row, vocab);
      continue;
    }
    CUDA_KERNEL_ASSERT(y >= 0 && y < vocab && "token id out of range");
    const scalar_t* x_row = x + rows.offset(r);
    const acc_t inv_t = row_inverse_temperature(row_t, r, inv_t_all);  // read only where the row counts
    const RowStats<acc_t> st = row_stats<kEntropy>(x_row, vocab, inv_t, smem);
    if (threadIdx.x == 0) {
      const acc_t logp = static_cast<acc_t>(x_row[y]) * inv_t - st.lse;
      logp_out[r] = logp;
      lse_out[r] = st.lse;
      if (kEntropy) ent_out[r] = st.entropy;
      if (kGrad) {  // w = dL/dS_i · m · (∂ℓ/∂logp + ∂ℓ/∂c1 · d c1/d logp), as grpo_loss_bwd at token level
        const int64_t i = r / T, t = r % T;
        const acc_t m = in.mask(i, t);
        acc_t w = 0;
        if (m != acc_t(0)) {
          const loss::TokenTerms<acc_t> terms =
              loss::token_terms<acc_t, /*kRolloutGates=*/false>(cfg, s, loss::SeqStats<acc_t>{},
                                                                 in.token(i, t, logp), in.has_ref);
          w = seq_weight[i] * (m * loss::dloss_dlogp(cfg, terms, acc_t(0)));
        }
        w_shared = w;
      }
    }
    if (!kGrad) continue;
    __syncthreads();  // w_shared is written; the next write of it is behind the next row's block reduction
    const acc_t w = w_shared;
    if (w == acc_t(0)) {
      row_zero(dx_row, vocab);
      continue;
    }
    const acc_t lse = st.lse;
    row_transform<true>(x_row, dx_row, vocab, [&](int64_t v, scalar_t xv) {
      return softmax_grad<false>(static_cast<acc_t>(xv) * inv_t, v == y, lse, w, acc_t(0), acc_t(0), inv_t);
    });
  }
}

// Blocks of the persistent grid with the gradient: as many rows in flight as
// fit in half of L2 (the gradient's writes pass through it too), at least one
// block per SM, at most what an SM holds (2048 threads).
int64_t fused_grid(const at::Tensor& logits, int64_t n_rows, int threads, bool grad) {
  if (!grad) return n_rows;
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, logits);
  const int64_t l2_bytes = device_attribute(cudaDevAttrL2CacheSize, logits);
  const int64_t row_bytes = std::max<int64_t>(1, logits.size(-1) * logits.element_size());
  const int64_t per_sm = std::clamp<int64_t>(l2_bytes / 2 / row_bytes / sms, 1, 2048 / threads);
  return std::min(n_rows, sms * per_sm);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_grpo_loss_fwd(
    const at::Tensor& logits, const at::Tensor& token_ids, const c10::optional<at::Tensor>& old_logp,
    const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& keep,
    const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp, const at::Tensor& seq_weight,
    const LossConfig& cfg, double temperature, int64_t ignore_index, bool return_entropy, bool compute_grad,
    bool inplace, const c10::optional<at::Tensor>& row_temperature) {
  const c10::cuda::CUDAGuard guard(logits.device());
  check_config(cfg, "fused_grpo_loss_fwd");
  TORCH_CHECK(!cfg.seq_pass, "fused_grpo_loss_fwd: a loss with a sequence pass is composed by the caller");
  TORCH_CHECK(cfg.rollout_is_gate == RolloutGate::kRatio,
              "fused_grpo_loss_fwd: a rollout gate other than the ratio is composed by the caller");
  TORCH_CHECK(logits.dim() == 3, "fused_grpo_loss_fwd: logits must be [B, T, V]");
  TORCH_CHECK(!(compute_grad && inplace) || at::has_internal_overlap(logits) != at::MemOverlap::Yes,
              "fused_grpo_loss_fwd: in place needs logits whose rows do not overlap");
  const int64_t B = logits.size(0), T = logits.size(1), vocab = logits.size(2);
  int64_t n_rows = 0;
  const LogitRows rows = logit_rows(logits, &n_rows);
  const auto acc = at::toOpMathType(logits.scalar_type());
  const auto options = logits.options().dtype(acc);
  const at::Tensor ids = per_row(token_ids, at::kLong, n_rows, logits, "token_ids");
  check_on_device(seq_weight, logits, "seq_weight");
  const at::Tensor weights = seq_weight.to(acc).expand({B}).contiguous();
  const at::Tensor row_t =
      row_temperature ? per_row(*row_temperature, acc, n_rows, logits, "row_temperature") : at::Tensor();
  at::Tensor logp = at::empty({B, T}, options);
  at::Tensor lse = at::empty({B, T}, options);
  at::Tensor entropy = at::empty({return_entropy ? B : 0, return_entropy ? T : 0}, options);
  at::Tensor grad = !compute_grad ? at::empty({0}, logits.options())
                    : inplace     ? logits
                                  : at::empty(logits.sizes(), logits.options());
  if (n_rows > 0) {
    int64_t grad_rows_count = 0;
    const LogitRows grad_rows = compute_grad ? logit_rows(grad, &grad_rows_count) : rows;
    const int threads = row_threads(vocab, logits.element_size());
    const unsigned int grid = grid_size(fused_grid(logits, n_rows, threads, compute_grad));
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "fused_grpo_loss_fwd", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const LossInputs<acc_t> in =
          loss_inputs<acc_t>(logits, B, T, c10::nullopt, old_logp, ref_logp, adv, keep, iw, sampling_logp);
      auto launch = [&](auto kernel) {
        kernel<<<grid, threads, 0, stream>>>(
            logits.const_data_ptr<scalar_t>(), rows, compute_grad ? grad.data_ptr<scalar_t>() : nullptr, grad_rows,
            n_rows, T, vocab, ids.const_data_ptr<int64_t>(), inverse_temperature<acc_t>(temperature),
            row_temperature ? row_t.const_data_ptr<acc_t>() : nullptr, ignore_index, in,
            weights.const_data_ptr<acc_t>(), cfg, rounded_scalars<acc_t>(cfg.scalars), logp.data_ptr<acc_t>(),
            lse.data_ptr<acc_t>(), return_entropy ? entropy.data_ptr<acc_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (return_entropy) {
        compute_grad ? launch(fused_grpo_loss_kernel<scalar_t, true, true>)
                     : launch(fused_grpo_loss_kernel<scalar_t, true, false>);
      } else {
        compute_grad ? launch(fused_grpo_loss_kernel<scalar_t, false, true>)
                     : launch(fused_grpo_loss_kernel<scalar_t, false, false>);
      }
    });
  }
  auto [per_token_loss, partials] = grpo_loss_fwd(logp, old_logp, ref_logp, adv, keep, iw, sampling_logp, cfg);
  return {logp, lse, entropy, per_token_loss, partials, grad};
}

}  // namespace grpo_kernels::cuda

// grpo_loss on CUDA: per-token loss and per-sequence partials (forward),
// d loss / d logp (backward); one block per sequence (grid-stride over
// sequences), threads over its tokens, per-sequence sums by a block reduction
// (deterministic: the tree is fixed by T). The per-token math is
// csrc/common/loss_terms.h, shared with the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/ops/ones.h>

#include <cmath>

#include "../common/entry_points.h"
#include "block_reduce.cuh"
#include "launch.cuh"
#include "loss_inputs.cuh"

namespace grpo_kernels::cuda {

namespace {

constexpr int kMaxThreads = 256;
// Blocks per SM the backward is compiled for: its float64 math needs more than the 80 registers ptxas
// otherwise settles on (it spilled), 2 blocks of 256 threads allow 128.
template <typename acc_t>
constexpr int kBackwardBlocksPerSm = sizeof(acc_t) == 8 ? 2 : 4;

// The statistics of sequence i (cfg.seq_pass): the block sums its tokens' terms of the sequence pass.
template <typename acc_t>
__device__ __forceinline__ loss::SeqStats<acc_t> sequence_stats(const LossInputs<acc_t>& in, int64_t i, int64_t T,
                                                                const LossConfig& cfg, const LossScalars<acc_t>& s,
                                                                Sums<loss::kSequenceSums, acc_t>* smem) {
  Sums<loss::kSequenceSums, acc_t> sums = Sums<loss::kSequenceSums, acc_t>::identity();
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) loss::add_sequence_terms(cfg, s, in.token(i, t), sums.v);
  sums = block_reduce(sums, smem);
  return loss::sequence_stats(cfg, s, sums.v);
}

// Forward. Sequence i reads logp, old_logp, adv, mask (ref_logp, iw,
// sampling_logp) over T (twice with a sequence pass: its statistics first);
// writes per_token_loss [i, :] and partials [:, i].
// Memory traffic ≈ B·T·(3..7 loads + 1 store), ×~2 loads with a sequence pass.
template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    grpo_loss_fwd_kernel(LossInputs<acc_t> in, int64_t B, int64_t T, LossConfig cfg, LossScalars<acc_t> s,
                         acc_t* __restrict__ per_token_loss, acc_t* __restrict__ partials) {
  __shared__ Sums<loss::kSequenceSums, acc_t> smem_seq[kWarpSize];
  __shared__ Sums<6, acc_t> smem_sums[kWarpSize];
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    const loss::SeqStats<acc_t> seq =
        cfg.seq_pass ? sequence_stats(in, i, T, cfg, s, smem_seq) : loss::SeqStats<acc_t>{};
    Sums<6, acc_t> sums = Sums<6, acc_t>::identity();  // Σ m·ℓ, Σ m, Σ m·KL, Σ m·low, Σ m·high, Σ m·region
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const acc_t m = in.mask(i, t);
      const loss::TokenTerms<acc_t> r = loss::token_terms(cfg, s, seq, in.token(i, t), in.has_ref);
      per_token_loss[i * T + t] = m != acc_t(0) ? r.loss : acc_t(0);  // 0 at masked tokens, by selection
      sums.v[0] += r.loss * m;
      sums.v[1] += m;
      sums.v[2] += r.kl * m;
      sums.v[3] += acc_t(r.is_low) * m;
      sums.v[4] += acc_t(r.is_high) * m;
      sums.v[5] += acc_t(r.is_low || r.is_high) * m;
    }
    sums = block_reduce(sums, smem_sums);
    if (threadIdx.x == 0) {
      if (cfg.per_seq_metrics && T > 0) {  // one ratio and one advantage per sequence: a 0/1 flag per sequence
        const acc_t seq_coef_1 = std::exp(seq.log_ratio);
        const acc_t adv = sums.v[1] != acc_t(0) ? in.adv(i, 0) : acc_t(0);  // a fully masked sequence: neutral
        const loss::TokenTerms<acc_t> r = loss::policy_terms(cfg, s, seq_coef_1, adv, seq_coef_1, acc_t(0), seq);
        sums.v[3] = acc_t(r.is_low);
        sums.v[4] = acc_t(r.is_high);
        sums.v[5] = acc_t(r.is_low || r.is_high);
      }
#pragma unroll
      for (int k = 0; k < 6; ++k) partials[k * B + i] = sums.v[k];
      partials[6 * B + i] = seq.log_ratio;
      partials[7 * B + i] = seq.adv;
      partials[8 * B + i] = seq.is_weight;
      partials[9 * B + i] = seq.kl;
    }
  }
}

// Backward. d loss / d logp_{i,t} = seq_grad_i · m · dℓ_t/dlogp_t (loss_terms.h dloss_dlogp). Token level:
// dℓ/dlogp = ∂ℓ/∂logp + ∂ℓ/∂c1 · d c1/d logp. Shared ratio (GSPO, GMPO): a first loop sums
// G_i = Σ_t m ∂ℓ_t/∂c1, then dℓ/dlogp_s = ∂ℓ_s/∂logp_s + G_i c1 / denominator · ratio_grad_s. Sequence i
// reads its inputs over T (twice with a shared ratio), its partials and seq_grad_i; writes d logp [i, :].
// Memory traffic ≈ B·T·(3..7 loads + 1 store).
template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads, kBackwardBlocksPerSm<acc_t>)
    grpo_loss_bwd_kernel(LossInputs<acc_t> in, int64_t B, int64_t T, LossConfig cfg, LossScalars<acc_t> s,
                         const acc_t* __restrict__ partials, const acc_t* __restrict__ seq_grad,
                         acc_t* __restrict__ grad_logp) {
  __shared__ Sums<1, acc_t> smem[kWarpSize];
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    const loss::SeqStats<acc_t> seq = loss::stored_stats(partials, B, i);
    acc_t seq_term = 0;
    // Pass 0 (shared ratio only) sums G_i, pass 1 writes the gradient: one copy of the token math.
#pragma unroll 1
    for (int pass = cfg.shared_ratio ? 0 : 1; pass < 2; ++pass) {
      Sums<1, acc_t> g = Sums<1, acc_t>::identity();
      for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
        const loss::TokenTerms<acc_t> r = loss::token_terms(cfg, s, seq, in.token(i, t), in.has_ref);
        if (pass == 0) {
          g.v[0] += r.dloss_dcoef * in.mask(i, t);
        } else {
          const acc_t m = in.mask(i, t);
          grad_logp[i * T + t] = m != acc_t(0) ? seq_grad[i] * (m * loss::dloss_dlogp(cfg, r, seq_term)) : acc_t(0);
        }
      }
      if (pass == 0) {
        g = block_reduce(g, smem);
        seq_term = loss::shared_ratio_term(cfg, g.v[0], seq.log_ratio, partials[B + i]);
      }
    }
  }
}

void check_logp(const at::Tensor& logp) {
  TORCH_CHECK(logp.dim() == 2, "grpo_loss: logp must be [B, T]");
  TORCH_CHECK(logp.scalar_type() == at::kFloat || logp.scalar_type() == at::kDouble,
              "grpo_loss: logp must be in a compute dtype (float32 or float64), got ", logp.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> grpo_loss_fwd(const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
                                                 const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv,
                                                 const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
                                                 const c10::optional<at::Tensor>& sampling_logp,
                                                 const LossConfig& cfg) {
  const c10::cuda::CUDAGuard guard(logp.device());
  check_logp(logp);
  check_config(cfg, "grpo_loss_fwd");
  const int64_t B = logp.size(0), T = logp.size(1);
  at::Tensor per_token_loss = at::empty({B, T}, logp.options());
  at::Tensor partials = at::empty({kNumPartials, B}, logp.options());
  if (B == 0) return {per_token_loss, partials};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "grpo_loss_fwd", [&] {
    const LossInputs<scalar_t> in =
        loss_inputs<scalar_t>(logp, B, T, logp, old_logp, ref_logp, adv, mask, iw, sampling_logp);
    grpo_loss_fwd_kernel<scalar_t><<<grid_size(B), pow2_threads(T, kMaxThreads), 0, stream>>>(
        in, B, T, cfg, rounded_scalars<scalar_t>(cfg.scalars), per_token_loss.data_ptr<scalar_t>(),
        partials.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {per_token_loss, partials};
}

at::Tensor grpo_loss_bwd(const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
                         const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& mask,
                         const c10::optional<at::Tensor>& iw, const c10::optional<at::Tensor>& sampling_logp,
                         const at::Tensor& partials, const at::Tensor& seq_grad, const LossConfig& cfg) {
  const c10::cuda::CUDAGuard guard(logp.device());
  check_logp(logp);
  check_config(cfg, "grpo_loss_bwd");
  const int64_t B = logp.size(0), T = logp.size(1);
  TORCH_CHECK(partials.dim() == 2 && partials.size(0) == kNumPartials && partials.size(1) == B,
              "grpo_loss_bwd: partials must be [", kNumPartials, ", ", B, "]");
  const at::Tensor partials_c = per_row(partials, logp.scalar_type(), kNumPartials * B, logp, "partials");
  const at::Tensor seq_grad_c = per_row(seq_grad, logp.scalar_type(), B, logp, "seq_grad");
  at::Tensor grad_logp = at::empty({B, T}, logp.options());
  if (B == 0) return grad_logp;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "grpo_loss_bwd", [&] {
    const LossInputs<scalar_t> in =
        loss_inputs<scalar_t>(logp, B, T, logp, old_logp, ref_logp, adv, mask, iw, sampling_logp);
    grpo_loss_bwd_kernel<scalar_t><<<grid_size(B), pow2_threads(T, kMaxThreads), 0, stream>>>(
        in, B, T, cfg, rounded_scalars<scalar_t>(cfg.scalars), partials_c.const_data_ptr<scalar_t>(),
        seq_grad_c.const_data_ptr<scalar_t>(), grad_logp.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logp;
}

// The forward, then the backward for seq_grad = 1 (the CPU kernels form both in one pass).
std::tuple<at::Tensor, at::Tensor, at::Tensor> grpo_loss_fwd_grad(
    const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp, const c10::optional<at::Tensor>& ref_logp,
    const at::Tensor& adv, const at::Tensor& mask, const c10::optional<at::Tensor>& iw,
    const c10::optional<at::Tensor>& sampling_logp, const LossConfig& cfg, bool compute_grad) {
  auto [per_token_loss, partials] = grpo_loss_fwd(logp, old_logp, ref_logp, adv, mask, iw, sampling_logp, cfg);
  const at::Tensor grad_sums =
      compute_grad ? grpo_loss_bwd(logp, old_logp, ref_logp, adv, mask, iw, sampling_logp, partials,
                                   at::ones({logp.size(0)}, logp.options()), cfg)
                   : at::empty({0, logp.size(1)}, logp.options());
  return {per_token_loss, partials, grad_sums};
}

}  // namespace grpo_kernels::cuda

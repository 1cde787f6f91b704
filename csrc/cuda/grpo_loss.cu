// grpo_loss on CUDA: per-token loss and per-sequence partials (forward),
// d loss / d logp (backward); one block per sequence (grid-stride over
// sequences), threads over its tokens, per-sequence sums by a block reduction
// (deterministic: the tree is fixed by T). The per-token math is
// csrc/cpu/loss_terms.h, shared with the CPU kernels.
#include <ATen/Dispatch.h>

#include <cmath>

#include "../grpo_kernels.h"
#include "block_reduce.cuh"
#include "launch.cuh"
#include "loss_inputs.cuh"

namespace grpo_kernels::cuda {

namespace {

constexpr int kMaxThreads = 256;

template <typename acc_t>
__device__ __forceinline__ acc_t at_least_one(acc_t n) {
  return n > acc_t(1) ? n : acc_t(1);
}

// Forward. Sequence i reads logp, old_logp, adv, mask (ref_logp, iw) over T
// (logp, old_logp and mask twice at sequence level: the mean log-ratio
// first); writes per_token_loss [i, :] and partials [:, i].
// Memory traffic ≈ B·T·(3..6 loads + 1 store), + 3 loads at sequence level.
template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    grpo_loss_fwd_kernel(LossInputs<acc_t> in, int64_t B, int64_t T, LossConfig cfg, cpu::LossScalars<acc_t> s,
                         acc_t* __restrict__ per_token_loss, acc_t* __restrict__ partials) {
  __shared__ Sums<2, acc_t> smem_ratio[kWarpSize];
  __shared__ Sums<6, acc_t> smem_sums[kWarpSize];
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    acc_t seq_log_ratio = 0;
    if (cfg.seq_level) {  // GSPO: w_i = Σ_t m (logp - old_logp) / max(1, Σ_t m)
      Sums<2, acc_t> ratio = Sums<2, acc_t>::identity();
      for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
        const acc_t m = in.mask(i, t), logp = in.logp(i, t);
        ratio.v[0] += (logp - in.old_or(i, t, logp)) * m;
        ratio.v[1] += m;
      }
      ratio = block_reduce(ratio, smem_ratio);
      seq_log_ratio = ratio.v[0] / at_least_one(ratio.v[1]);
    }
    const acc_t seq_coef_1 = std::exp(seq_log_ratio);

    Sums<6, acc_t> sums = Sums<6, acc_t>::identity();  // Σ m·ℓ, Σ m, Σ m·KL, Σ m·low, Σ m·high, Σ m·region
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const acc_t m = in.mask(i, t), logp = in.logp(i, t);
      const acc_t coef_1 = cfg.seq_level ? seq_coef_1 : std::exp(logp - in.old_or(i, t, logp));
      const cpu::TokenTerms<acc_t> r = token_terms_at(in, cfg, s, i, t, coef_1, logp);
      per_token_loss[i * T + t] = r.loss;
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
        const cpu::TokenTerms<acc_t> r = cpu::policy_terms(cfg, s, seq_coef_1, in.adv(i, 0), seq_coef_1);
        sums.v[3] = acc_t(r.is_low);
        sums.v[4] = acc_t(r.is_high);
        sums.v[5] = acc_t(r.is_low || r.is_high);
      }
#pragma unroll
      for (int k = 0; k < 6; ++k) partials[k * B + i] = sums.v[k];
      partials[6 * B + i] = seq_log_ratio;
    }
  }
}

// Backward. d loss / d logp_{i,t} = seq_grad_i · m · dℓ_t/dlogp_t. Token level:
// dℓ/dlogp = ∂ℓ/∂logp + ∂ℓ/∂c1 · c1. Sequence level (shared c1, d c1 / d logp_s
// = c1 m_s / max(1, n_i)): a first loop sums G_i = Σ_t m ∂ℓ_t/∂c1, then
// dℓ/dlogp_s = ∂ℓ_s/∂logp_s + G_i c1 / max(1, n_i). Sequence i reads its
// inputs over T (twice at sequence level) and 2 partials (sequence level) and
// seq_grad_i; writes d logp [i, :]. Memory traffic ≈ B·T·(3..6 loads + 1 store).
template <typename acc_t>
__global__ void __launch_bounds__(kMaxThreads)
    grpo_loss_bwd_kernel(LossInputs<acc_t> in, int64_t B, int64_t T, LossConfig cfg, cpu::LossScalars<acc_t> s,
                         const acc_t* __restrict__ partials, const acc_t* __restrict__ seq_grad,
                         acc_t* __restrict__ grad_logp) {
  __shared__ Sums<1, acc_t> smem[kWarpSize];
  for (int64_t i = blockIdx.x; i < B; i += gridDim.x) {
    const acc_t seq_coef_1 = cfg.seq_level ? std::exp(partials[6 * B + i]) : acc_t(1);
    acc_t seq_term = 0;
    if (cfg.seq_level) {
      Sums<1, acc_t> g = Sums<1, acc_t>::identity();
      for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
        g.v[0] += token_terms_at(in, cfg, s, i, t, seq_coef_1, in.logp(i, t)).dloss_dcoef * in.mask(i, t);
      }
      g = block_reduce(g, smem);
      seq_term = g.v[0] * seq_coef_1 / at_least_one(partials[B + i]);
    }
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      const acc_t logp = in.logp(i, t);
      const acc_t coef_1 = cfg.seq_level ? seq_coef_1 : std::exp(logp - in.old_or(i, t, logp));
      const cpu::TokenTerms<acc_t> r = token_terms_at(in, cfg, s, i, t, coef_1, logp);
      const acc_t dloss = cfg.seq_level ? r.dloss_dlogp + seq_term : r.dloss_dlogp + r.dloss_dcoef * coef_1;
      grad_logp[i * T + t] = seq_grad[i] * (in.mask(i, t) * dloss);
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
                                                 const LossConfig& cfg) {
  const c10::cuda::CUDAGuard guard(logp.device());
  check_logp(logp);
  const int64_t B = logp.size(0), T = logp.size(1);
  at::Tensor per_token_loss = at::empty({B, T}, logp.options());
  at::Tensor partials = at::empty({kNumPartials, B}, logp.options());
  if (B == 0) return {per_token_loss, partials};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "grpo_loss_fwd", [&] {
    const LossInputs<scalar_t> in = loss_inputs<scalar_t>(logp, B, T, logp, old_logp, ref_logp, adv, mask, iw);
    grpo_loss_fwd_kernel<scalar_t><<<grid_size(B), pow2_threads(T, kMaxThreads), 0, stream>>>(
        in, B, T, cfg, cpu::LossScalars<scalar_t>(cfg), per_token_loss.data_ptr<scalar_t>(),
        partials.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {per_token_loss, partials};
}

at::Tensor grpo_loss_bwd(const at::Tensor& logp, const c10::optional<at::Tensor>& old_logp,
                         const c10::optional<at::Tensor>& ref_logp, const at::Tensor& adv, const at::Tensor& mask,
                         const c10::optional<at::Tensor>& iw, const at::Tensor& partials, const at::Tensor& seq_grad,
                         const LossConfig& cfg) {
  const c10::cuda::CUDAGuard guard(logp.device());
  check_logp(logp);
  const int64_t B = logp.size(0), T = logp.size(1);
  TORCH_CHECK(partials.dim() == 2 && partials.size(0) == kNumPartials && partials.size(1) == B,
              "grpo_loss_bwd: partials must be [", kNumPartials, ", ", B, "]");
  const at::Tensor partials_c = per_row(partials, logp.scalar_type(), kNumPartials * B, logp, "partials");
  const at::Tensor seq_grad_c = per_row(seq_grad, logp.scalar_type(), B, logp, "seq_grad");
  at::Tensor grad_logp = at::empty({B, T}, logp.options());
  if (B == 0) return grad_logp;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(logp.scalar_type(), "grpo_loss_bwd", [&] {
    const LossInputs<scalar_t> in = loss_inputs<scalar_t>(logp, B, T, logp, old_logp, ref_logp, adv, mask, iw);
    grpo_loss_bwd_kernel<scalar_t><<<grid_size(B), pow2_threads(T, kMaxThreads), 0, stream>>>(
        in, B, T, cfg, cpu::LossScalars<scalar_t>(cfg), partials_c.const_data_ptr<scalar_t>(),
        seq_grad_c.const_data_ptr<scalar_t>(), grad_logp.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_logp;
}

}  // namespace grpo_kernels::cuda

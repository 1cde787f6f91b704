// group_advantages on CPU: per-group NaN-ignoring statistics and advantages of
// rewards [B, K], one task per (group, reward column).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>

#include "../common/entry_points.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

namespace {

constexpr int64_t kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2;

// Group g, column k: reads the group's rewards three times (count and sum,
// squared deviations, advantages); writes mean, std [g, k] and the group's
// advantages. Memory traffic: 3 reads + 1 write of rewards, 2 writes per group.
template <typename acc_t>
void normalize_kernel(const at::Tensor& rewards, const int64_t* order, const int64_t* offsets, int64_t groups,
                      const acc_t* batch_std, acc_t eps, int64_t scale, bool rloo, acc_t* adv, acc_t* mean_out,
                      acc_t* std_out) {
  const int64_t K = rewards.size(1), sb = rewards.stride(0), sk = rewards.stride(1);
  const acc_t* r = rewards.const_data_ptr<acc_t>();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  at::parallel_for(0, groups * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / K, k = task % K;
      auto row = [&](int64_t j) { return order ? order[j] : j; };
      acc_t count = 0, total = 0;
      for (int64_t j = offsets[g]; j < offsets[g + 1]; ++j) {
        const acc_t x = r[row(j) * sb + k * sk];
        if (!std::isnan(x)) {
          count += 1;
          total += x;
        }
      }
      const acc_t mean = total / count;  // NaN for a group without a value (0 / 0)
      acc_t ss = 0;
      for (int64_t j = offsets[g]; j < offsets[g + 1]; ++j) {
        const acc_t x = r[row(j) * sb + k * sk];
        if (!std::isnan(x)) ss += (x - mean) * (x - mean);
      }
      const acc_t std = count > 1 ? std::sqrt(ss / (count - 1)) : nan;
      mean_out[g * K + k] = mean;
      std_out[g * K + k] = std;
      // scale is kScaleGroup, kScaleBatch or kScaleNone (checked by group_normalize)
      const acc_t den = scale == kScaleGroup ? std + eps : (scale == kScaleBatch ? batch_std[k] + eps : acc_t(1));
      for (int64_t j = offsets[g]; j < offsets[g + 1]; ++j) {
        const int64_t b = row(j);
        acc_t a = r[b * sb + k * sk] - mean;
        if (rloo) a = count > 1 ? a * count / (count - 1) : nan;  // r - mean of the other n - 1
        adv[b * K + k] = scale == kScaleGroup || scale == kScaleBatch ? a / den : a;
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_normalize(const at::Tensor& rewards,
                                                               const c10::optional<at::Tensor>& order,
                                                               const at::Tensor& offsets,
                                                               const c10::optional<at::Tensor>& batch_std,
                                                               double eps, int64_t scale, bool rloo) {
  const char* name = "group_normalize";
  TORCH_CHECK(rewards.is_cpu(), name, ": rewards must be a CPU tensor, got ", rewards.device());
  TORCH_CHECK(rewards.dim() == 2, name, ": rewards must be [B, K], got ", rewards.sizes());
  TORCH_CHECK(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble, name,
              ": rewards must be float32 or float64, got ", rewards.scalar_type());
  TORCH_CHECK(scale == kScaleGroup || scale == kScaleBatch || scale == kScaleNone, name, ": unknown scale ", scale);
  TORCH_CHECK(scale != kScaleBatch || batch_std, name, ": scale=batch needs batch_std");
  TORCH_CHECK(offsets.numel() >= 1 && offsets.device() == rewards.device(), name,
              ": offsets must be G + 1 values on ", rewards.device());
  const int64_t B = rewards.size(0), K = rewards.size(1), groups = offsets.numel() - 1;
  const at::Tensor offsets_c = offsets.reshape({-1}).to(at::kLong).contiguous();
  const int64_t* off = offsets_c.const_data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[groups] == B, name, ": offsets must run from 0 to B = ", B);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(off[g] <= off[g + 1], name, ": offsets must be non-decreasing");
  }
  at::Tensor order_c;
  if (order) {
    TORCH_CHECK(order->numel() == B && order->device() == rewards.device(), name, ": order must be ", B,
                " row indices on ", rewards.device());
    order_c = order->reshape({-1}).to(at::kLong).contiguous();
    const int64_t* o = order_c.const_data_ptr<int64_t>();
    for (int64_t j = 0; j < B; ++j) TORCH_CHECK(o[j] >= 0 && o[j] < B, name, ": order values must be in [0, ", B, ")");
  }
  if (batch_std) {
    TORCH_CHECK(batch_std->numel() == K && batch_std->device() == rewards.device(), name, ": batch_std must be ", K,
                " values on ", rewards.device());
  }
  at::Tensor adv = at::empty({B, K}, rewards.options());
  at::Tensor mean = at::empty({groups, K}, rewards.options());
  at::Tensor std = at::empty({groups, K}, rewards.options());
  AT_DISPATCH_FLOATING_TYPES(rewards.scalar_type(), "group_normalize", [&] {
    const at::Tensor batch_std_c =
        batch_std ? batch_std->reshape({-1}).to(rewards.scalar_type()).contiguous() : at::Tensor();
    normalize_kernel<scalar_t>(rewards, order ? order_c.const_data_ptr<int64_t>() : nullptr,
                               offsets_c.const_data_ptr<int64_t>(), groups,
                               batch_std ? batch_std_c.const_data_ptr<scalar_t>() : nullptr,
                               static_cast<scalar_t>(eps), scale, rloo, adv.data_ptr<scalar_t>(),
                               mean.data_ptr<scalar_t>(), std.data_ptr<scalar_t>());
  });
  return {adv, mean, std};
}

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY

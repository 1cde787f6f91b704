// Python bindings of grpo_kernels._C (pybind11 through torch/extension.h):
// build facts, LossConfig, and the entry points of csrc/common/entry_points.h, each
// dispatched on the device of its first tensor argument: for CPU tensors to the copy of
// the CPU kernels (one per instruction set, setup.py) chosen for this CPU when the module
// is loaded, for CUDA tensors to grpo_kernels::cuda when built with CUDA.
#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common/entry_points.h"
#include "grpo_loss_host.h"

#ifndef GRPO_KERNELS_VERSION
#error "setup.py defines GRPO_KERNELS_VERSION from grpo_kernels/_version.py"
#endif

namespace grpo_kernels {

std::string version() { return GRPO_KERNELS_VERSION; }

#ifndef GRPO_KERNELS_CPU_ARCH
#define GRPO_KERNELS_CPU_ARCH ""
#endif

// The -march of each copy of the CPU kernels, joined by "+" ("" for the compiler's default).
std::string cpu_arch() { return GRPO_KERNELS_CPU_ARCH; }

namespace {

// The widest vector instruction set of code compiled with this file's flags (a one-copy build).
constexpr const char* compiled_isa() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return "avx512+bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#elif defined(__AVX2__)
  return "avx2-no-fma";
#elif defined(__AVX__)
  return "avx";
#elif defined(__SSE4_2__)
  return "sse4.2";
#elif defined(__x86_64__)
  return "sse2";
#else
  return "generic";
#endif
}

bool always() { return true; }

// One copy of the CPU kernels (setup.py's X86_CPU_COPIES): the instruction set it is named by, its entry
// points (called only once supported() held) and whether the running CPU executes its instructions.
struct CpuCopy {
  const char* isa;
  const cpu::Kernels& (*kernels)();
  bool (*supported)();
};

}  // namespace

#ifdef GRPO_CPU_DISPATCH  // the default x86-64 build: x86-64-v3 (module.cpp's own target) and x86-64-v4
namespace cpu::avx2 {
const Kernels& kernels();
}
namespace cpu::avx512 {
const Kernels& kernels();
}

namespace {

// What -march=x86-64-v4 adds to x86-64-v3, and x86-64-v3's vector features (libgcc also checks that the
// OS saves the AVX-512 registers).
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

// Most capable first; the last is the baseline, which the import guard (grpo_kernels/_extension.py)
// checked against this CPU.
const CpuCopy kCpuCopies[] = {{"avx512", &cpu::avx512::kernels, &cpu_has_avx512},
                              {"avx2", &cpu::avx2::kernels, &always}};

}  // namespace
#else  // one copy, compiled like this file (GRPO_KERNELS_CPU_ARCH, or a target other than x86-64)
namespace cpu::single {
const Kernels& kernels();
}

namespace {
const CpuCopy kCpuCopies[] = {{compiled_isa(), &cpu::single::kernels, &always}};
}  // namespace
#endif

namespace {

// The copy this process runs: GRPO_KERNELS_CPU_ISA when set (one of the copies' isa names; tests run
// the baseline on a CPU that has more), else the most capable one the CPU supports.
const CpuCopy& choose_cpu_copy() {
  const char* forced = std::getenv("GRPO_KERNELS_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    std::string names;
    for (const CpuCopy& copy : kCpuCopies) {
      if (std::strcmp(copy.isa, forced) == 0) {
        if (!copy.supported()) {
          throw std::invalid_argument(std::string("GRPO_KERNELS_CPU_ISA=") + forced +
                                      ": this CPU lacks that instruction set");
        }
        return copy;
      }
      names += std::string(names.empty() ? "" : ", ") + copy.isa;
    }
    throw std::invalid_argument(std::string("GRPO_KERNELS_CPU_ISA=") + forced +
                                " names no copy of the CPU kernels in this build (it has: " + names + ")");
  }
  for (const CpuCopy& copy : kCpuCopies) {
    if (copy.supported()) return copy;
  }
  throw std::logic_error("the baseline copy of the CPU kernels is always supported");
}

const CpuCopy* g_cpu_copy = nullptr;  // set when the module is loaded

const cpu::Kernels& cpu_kernels() { return g_cpu_copy->kernels(); }

}  // namespace

// The instruction set of the copy of the CPU kernels that this process runs.
std::string cpu_isa() { return g_cpu_copy->isa; }

#ifdef GRPO_WITH_CUDA
int cuda_runtime_version();  // csrc/cuda/build_info.cu
#endif

bool with_cuda() {
#ifdef GRPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// CUDA runtime version the CUDA kernels were compiled against (0 without CUDA).
int cuda_version() {
#ifdef GRPO_WITH_CUDA
  return cuda_runtime_version();
#else
  return 0;
#endif
}

namespace {

// The implementation of an entry point for tensors on the device of `t`.
template <typename Fn>
Fn on_device(const at::Tensor& t, const char* name, Fn cpu_fn, Fn cuda_fn) {
  if (t.is_cuda() && cuda_fn != nullptr) return cuda_fn;
  TORCH_CHECK(t.is_cpu(), name, ": this build of grpo_kernels._C has no kernels for ", t.device(), " tensors");
  return cpu_fn;
}

#ifdef GRPO_WITH_CUDA
#define GRPO_DISPATCH(t, name) on_device(t, #name, cpu_kernels().name, &cuda::name)
#else
#define GRPO_DISPATCH(t, name) on_device(t, #name, cpu_kernels().name, decltype(cpu::Kernels::name){nullptr})
#endif

template <typename... Args>
auto token_logprobs_fwd(const at::Tensor& logits, Args... args) {
  return GRPO_DISPATCH(logits, token_logprobs_fwd)(logits, args...);
}
template <typename... Args>
auto token_logprobs_bwd(const at::Tensor& logits, Args... args) {
  return GRPO_DISPATCH(logits, token_logprobs_bwd)(logits, args...);
}
template <typename... Args>
auto group_normalize(const at::Tensor& rewards, Args... args) {
  return GRPO_DISPATCH(rewards, group_normalize)(rewards, args...);
}
template <typename... Args>
auto grpo_loss_fwd(const at::Tensor& logp, Args... args) {
  return GRPO_DISPATCH(logp, grpo_loss_fwd)(logp, args...);
}
template <typename... Args>
auto grpo_loss_bwd(const at::Tensor& logp, Args... args) {
  return GRPO_DISPATCH(logp, grpo_loss_bwd)(logp, args...);
}
template <typename... Args>
auto grpo_loss_fwd_grad(const at::Tensor& logp, Args... args) {
  return GRPO_DISPATCH(logp, grpo_loss_fwd_grad)(logp, args...);
}
template <typename... Args>
auto fused_grpo_loss_fwd(const at::Tensor& logits, Args... args) {
  return GRPO_DISPATCH(logits, fused_grpo_loss_fwd)(logits, args...);
}

}  // namespace

}  // namespace grpo_kernels

namespace py = pybind11;
using Tensor = at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace grpo_kernels;
  m.doc() = "grpo_kernels compiled extension (entry points: csrc/common/entry_points.h)";
  g_cpu_copy = &choose_cpu_copy();
  m.def("version", &version, "version of the grpo_kernels sources this extension was built from");
  m.def("cpu_arch", &cpu_arch, "the -march of each copy of the CPU kernels, joined by '+' (empty: the "
        "compiler's default target)");
  m.def("cpu_isa", &cpu_isa, "the instruction set of the copy of the CPU kernels this process runs");
  m.def(
      "gradient_buffer_pages", [] { return std::string(cpu_kernels().gradient_buffer_pages()); },
      "the pages of the CPU kernels' logits-sized gradient buffers (csrc/cpu/gradient_buffer.h)");
  m.def("with_cuda", &with_cuda, "whether the extension was built with its CUDA kernels");
  m.def("cuda_version", &cuda_version, "CUDART_VERSION of the CUDA kernels (0 without CUDA)");

  // The numeric options are one sequence in loss_table.KERNEL_SCALARS order (no field of their own here: a
  // new option is a row of that table, and loss_table.h is generated from it); the codes are checked ints.
  py::class_<LossConfig>(m, "LossConfig", "options of the GRPO loss kernels (csrc/common/loss_config.h)")
      .def(py::init([](const std::vector<double>& scalars) {
             LossConfig cfg;
             cfg.scalars = loss_scalars_from(scalars);
             return cfg;
           }),
           py::arg("scalars"), "scalars: the kNumLossScalars numeric options in loss_table.KERNEL_SCALARS order")
      .def_property(
          "scalars", [](const LossConfig& cfg) { return loss_scalars_values(cfg.scalars); },
          [](LossConfig& cfg, const std::vector<double>& values) { cfg.scalars = loss_scalars_from(values); },
          "the numeric options in loss_table.KERNEL_SCALARS order")
      .def_property(
          "family", [](const LossConfig& cfg) { return static_cast<int64_t>(cfg.family); },
          [](LossConfig& cfg, int64_t code) { cfg.family = family_from_code(code); }, "loss_table.Family code")
      .def_property(
          "kl_estimator", [](const LossConfig& cfg) { return static_cast<int64_t>(cfg.kl_estimator); },
          [](LossConfig& cfg, int64_t code) { cfg.kl_estimator = kl_estimator_from_code(code); },
          "loss_table.KlEstimator code")
      .def_property(
          "rollout_is", [](const LossConfig& cfg) { return static_cast<int64_t>(cfg.rollout_is); },
          [](LossConfig& cfg, int64_t code) { cfg.rollout_is = rollout_level_from_code(code); },
          "loss_table.RolloutLevel code")
      .def_property(
          "rollout_is_gate", [](const LossConfig& cfg) { return static_cast<int64_t>(cfg.rollout_is_gate); },
          [](LossConfig& cfg, int64_t code) { cfg.rollout_is_gate = rollout_gate_from_code(code); },
          "loss_table.RolloutGate code")
      .def_readwrite("seq_level", &LossConfig::seq_level)
      .def_readwrite("seq_pass", &LossConfig::seq_pass)
      .def_readwrite("shared_ratio", &LossConfig::shared_ratio)
      .def_readwrite("add_kl", &LossConfig::add_kl)
      .def_readwrite("bias_kl", &LossConfig::bias_kl)
      .def_readwrite("has_delta", &LossConfig::has_delta)
      .def_readwrite("has_clip_c", &LossConfig::has_clip_c)
      .def_readwrite("per_seq_metrics", &LossConfig::per_seq_metrics)
      .def_readwrite("has_iw", &LossConfig::has_iw)
      .def_readwrite("rollout_is_mask", &LossConfig::rollout_is_mask)
      .def_readwrite("has_off_policy_mask", &LossConfig::has_off_policy_mask)
      .def_readwrite("has_log_clamp", &LossConfig::has_log_clamp);
  m.attr("NUM_LOSS_SCALARS") = kNumLossScalars;

  // row_temperature: one temperature per row [R] (csrc/common/row_temperature.h), None for the float's
  m.def("token_logprobs_fwd", &token_logprobs_fwd<const Tensor&, double, int64_t, bool, const OptTensor&>,
        py::arg("logits"), py::arg("token_ids"), py::arg("temperature"), py::arg("ignore_index"),
        py::arg("return_entropy"), py::arg("row_temperature") = py::none(), "(logp, lse, entropy) per row",
        py::call_guard<py::gil_scoped_release>());
  m.def("token_logprobs_bwd",
        &token_logprobs_bwd<const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                            double, int64_t, bool, const OptTensor&>,
        py::arg("logits"), py::arg("token_ids"), py::arg("lse"), py::arg("grad_logp"), py::arg("entropy"),
        py::arg("grad_entropy"), py::arg("temperature"), py::arg("ignore_index"), py::arg("inplace"),
        py::arg("row_temperature") = py::none(),
        "d logits in the logits dtype (into logits when inplace)", py::call_guard<py::gil_scoped_release>());
  m.def("group_normalize",
        &group_normalize<const OptTensor&, const Tensor&, const OptTensor&, double, int64_t, bool>,
        py::arg("rewards"), py::arg("order"), py::arg("offsets"), py::arg("batch_std"), py::arg("eps"),
        py::arg("scale"), py::arg("rloo"), "(adv [B, K], mean [G, K], std [G, K])",
        py::call_guard<py::gil_scoped_release>());
  m.def("grpo_loss_fwd",
        &grpo_loss_fwd<const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
                       const OptTensor&, const LossConfig&>,
        py::arg("logp"), py::arg("old_logp"), py::arg("ref_logp"), py::arg("adv"), py::arg("mask"), py::arg("iw"),
        py::arg("sampling_logp"), py::arg("cfg"), "(per_token_loss [B, T], partials [kNumPartials, B])",
        py::call_guard<py::gil_scoped_release>());
  m.def("grpo_loss_bwd",
        &grpo_loss_bwd<const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
                       const OptTensor&, const Tensor&, const Tensor&, const LossConfig&>,
        py::arg("logp"), py::arg("old_logp"), py::arg("ref_logp"), py::arg("adv"), py::arg("mask"), py::arg("iw"),
        py::arg("sampling_logp"), py::arg("partials"), py::arg("seq_grad"), py::arg("cfg"), "d loss / d logp [B, T]",
        py::call_guard<py::gil_scoped_release>());
  m.def("grpo_loss_fwd_grad",
        &grpo_loss_fwd_grad<const OptTensor&, const OptTensor&, const Tensor&, const Tensor&, const OptTensor&,
                            const OptTensor&, const LossConfig&, bool>,
        py::arg("logp"), py::arg("old_logp"), py::arg("ref_logp"), py::arg("adv"), py::arg("mask"), py::arg("iw"),
        py::arg("sampling_logp"), py::arg("cfg"), py::arg("compute_grad"),
        "(per_token_loss [B, T], partials [kNumPartials, B], grad_sums [B, T] = d S_i / d logp or empty)",
        py::call_guard<py::gil_scoped_release>());

  // grpo_loss on CPU tensors: the host work of a call in C++ (csrc/cpu/grpo_loss_host.h)
  py::class_<cpu::LossAggregation>(m, "LossAggregation",
                                        "an aggregation of the loss as arithmetic (aggregation.KernelRule)")
      .def(py::init([](bool count_per_sequence, bool mean_over_sequences, bool batch_tokens,
                       c10::optional<double> batch_length, c10::optional<double> batch_number) {
             return cpu::LossAggregation{count_per_sequence, mean_over_sequences, batch_tokens, batch_length,
                                              batch_number};
           }),
           py::arg("count_per_sequence"), py::arg("mean_over_sequences"), py::arg("batch_tokens"),
           py::arg("batch_length"), py::arg("batch_number"));
  m.def("grpo_loss_value_problem", &cpu::grpo_loss_value_problem, py::arg("mask"), py::arg("advantages"),
        "('', 0) or the first argument of grpo_loss whose values fail its checks ('mask', 'advantages') and the "
        "advantage found", py::call_guard<py::gil_scoped_release>());
  m.def("grpo_loss_forward",
        [](const Tensor& logp, const OptTensor& old_logp, const OptTensor& ref_logp, const Tensor& adv,
           const Tensor& mask, const OptTensor& iw, const OptTensor& sampling_logp, const LossConfig& cfg,
           const cpu::LossAggregation& aggregation, bool compute_grad) {
          return cpu::grpo_loss_forward(cpu_kernels().grpo_loss_fwd_grad, logp, old_logp, ref_logp, adv, mask,
                                             iw, sampling_logp, cfg, aggregation, compute_grad);
        },
        py::arg("logp"), py::arg("old_logp"), py::arg("ref_logp"), py::arg("adv"), py::arg("mask"), py::arg("iw"),
        py::arg("sampling_logp"), py::arg("cfg"), py::arg("aggregation"), py::arg("compute_grad"),
        "(loss, per_token_loss, kl, clip_ratio_low, clip_ratio_high, clip_ratio_region, grad_sums, seq_weight)",
        py::call_guard<py::gil_scoped_release>());
  m.def("grpo_loss",
        [](const Tensor& logp, const OptTensor& old_logp, const OptTensor& ref_logp, const Tensor& adv,
           const Tensor& mask, const OptTensor& iw, const OptTensor& sampling_logp, const LossConfig& cfg,
           const cpu::LossAggregation& aggregation) {
          return cpu::grpo_loss_autograd(cpu_kernels().grpo_loss_fwd_grad, logp, old_logp, ref_logp, adv, mask, iw,
                                         sampling_logp, cfg, aggregation);
        },
        py::arg("logp"), py::arg("old_logp"), py::arg("ref_logp"), py::arg("adv"), py::arg("mask"), py::arg("iw"),
        py::arg("sampling_logp"), py::arg("cfg"), py::arg("aggregation"),
        "(loss, per_token_loss, kl, clip_ratio_low, clip_ratio_high, clip_ratio_region); the loss with a C++ "
        "autograd node when grad mode is on and an input requires grad",
        py::call_guard<py::gil_scoped_release>());
  // The same call for inputs not yet checked, whose options passed validation.py: None when a tensor input
  // does not pass cpu::grpo_loss_inputs_pass (or is not a tensor / None where one may be), before any kernel.
  m.def("grpo_loss_checked",
        [](py::handle logp, py::handle old_logp, py::handle ref_logp, py::handle adv, py::handle mask, py::handle iw,
           py::handle sampling_logp, const LossConfig& cfg, const cpu::LossAggregation& aggregation,
           bool iw_per_token) -> py::object {
          Tensor inputs[7];
          const py::handle given[7] = {logp, old_logp, ref_logp, adv, mask, iw, sampling_logp};
          constexpr bool kOptional[7] = {false, true, true, false, false, true, true};
          for (int k = 0; k < 7; ++k) {
            if (kOptional[k] && given[k].is_none()) continue;
            if (!THPVariable_Check(given[k].ptr())) return py::none();
            inputs[k] = THPVariable_Unpack(given[k].ptr());
          }
          auto optional = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
          const OptTensor old_t = optional(inputs[1]), ref_t = optional(inputs[2]), iw_t = optional(inputs[5]),
                          sampling_t = optional(inputs[6]);
          std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> out;
          bool passed;
          {
            py::gil_scoped_release no_gil;
            passed = cpu::grpo_loss_inputs_pass(inputs[0], old_t, ref_t, inputs[3], inputs[4], iw_t, sampling_t,
                                                iw_per_token);
            if (passed) {
              out = cpu::grpo_loss_autograd(cpu_kernels().grpo_loss_fwd_grad, inputs[0], old_t, ref_t, inputs[3],
                                            inputs[4], iw_t, sampling_t, cfg, aggregation);
            }
          }
          return passed ? py::cast(std::move(out)) : py::none();
        },
        py::arg("logp"), py::arg("old_logp"), py::arg("ref_logp"), py::arg("adv"), py::arg("mask"), py::arg("iw"),
        py::arg("sampling_logp"), py::arg("cfg"), py::arg("aggregation"), py::arg("iw_per_token"),
        "grpo_loss's outputs, or None when an input does not pass the checks of cpu::grpo_loss_inputs_pass");
  m.def("grpo_loss_backward", &cpu::grpo_loss_backward, py::arg("grad_sums"), py::arg("seq_weight"),
        py::arg("grad_loss"), py::arg("dtype"), "d loss / d logp [B, T] in dtype",
        py::call_guard<py::gil_scoped_release>());
  m.def("fused_grpo_loss_fwd",
        &fused_grpo_loss_fwd<const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                             const OptTensor&, const OptTensor&, const Tensor&, const LossConfig&, double, int64_t,
                             bool, bool, bool, const OptTensor&>,
        py::arg("logits"), py::arg("token_ids"), py::arg("old_logp"), py::arg("ref_logp"), py::arg("adv"),
        py::arg("keep"), py::arg("iw"), py::arg("sampling_logp"), py::arg("seq_weight"), py::arg("cfg"),
        py::arg("temperature"), py::arg("ignore_index"), py::arg("return_entropy"), py::arg("compute_grad"),
        py::arg("inplace"), py::arg("row_temperature") = py::none(),
        "(logp, lse, entropy, per_token_loss, partials, grad_logits)", py::call_guard<py::gil_scoped_release>());
}

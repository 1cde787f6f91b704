// The per-token GRPO loss of csrc/common/loss_terms.h in a form gcc vectorizes (float32, CPU): a sequence's
// tokens in blocks of kTokenBlock, each input read in place where its row is contiguous float32 (else copied
// into a block buffer), neutral values selected at masked tokens, then every term computed branch-free in
// `omp simd` loops, the loss family and the estimator's presence hoisted out of the loops as template
// parameters and every other option a select on a loop-invariant flag. Same formulas, operand order and tie rules as loss_terms.h (loss::token_terms,
// loss::dloss_dlogp); the exponential is exp_any below (within 2 ulp of std::exp). Selects are written on
// the bits (select_bits): gcc 12 leaves an AVX2 loop scalar for some float selects (softmax_row.h).
// Sums over a sequence run in kSumLanes fixed lanes, so results depend neither on the thread count nor on
// the vector width.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include <ATen/ATen.h>

#include "../common/loss_terms.h"
#include "softmax_row.h"

namespace grpo_kernels::cpu::GRPO_CPU_COPY {  // one copy per instruction set (setup.py)

constexpr int64_t kTokenBlock = 512;

GRPO_ALWAYS_INLINE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

GRPO_ALWAYS_INLINE float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// c ? a : b, on the bits.
GRPO_ALWAYS_INLINE float select_bits(bool c, float a, float b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return bits_float((float_bits(a) & m) | (float_bits(b) & ~m));
}

GRPO_ALWAYS_INLINE float flag(bool c) { return select_bits(c, 1.0f, 0.0f); }

// e^x for any float x, within 2 ulp: e^r 2^n as exp_nonpositive (exp_parts, exp_poly.h), 2^n applied as two
// exact power-of-two factors so that results overflow to +inf above ~88.72 and underflow through the
// subnormals to 0 below ~-103. The argument is clamped below at -104 (e^x rounds to 0 there) and n above at 129
// (e^x overflows from n = 128 on; past it r = x - n ln 2 only grows, and so does the result); NaN stays NaN
// (r is NaN, whatever n). The clamps are a select on the bits and an integer min (of t > 0, or NaN), where
// gcc 12 turns a float clamp into about ten mask operations per vector.
GRPO_ALWAYS_INLINE float exp_any(float x) {
  constexpr int32_t kMaxShiftedN = static_cast<int32_t>(kRoundShifterBits) + 129;  // t's bits for n = 129
  const float x_low = select_bits(x < -104.0f, -104.0f, x);
  const int32_t t_bits = static_cast<int32_t>(float_bits(exp_shifted_n(x_low)));
  const ExpParts e = exp_parts(x_low, bits_float(static_cast<uint32_t>(std::min(t_bits, kMaxShiftedN))));
  const int32_t ni = static_cast<int32_t>(e.t_bits - kRoundShifterBits);  // n
  const int32_t n1 = ni >> 1, n2 = ni - n1;                                // each in [-75, 65]
  const float s1 = bits_float(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_float(static_cast<uint32_t>(n2 + 127) << 23);
  return e.poly * s1 * s2;
}

GRPO_ALWAYS_INLINE float clampf(float x, float low, float high) { return std::min(std::max(x, low), high); }

// torch.min(a, b)'s gradient share of a (loss::min_share).
GRPO_ALWAYS_INLINE float min_share_f(float a, float b) { return select_bits(a < b, 1.0f, select_bits(a == b, 0.5f, 0.0f)); }

// The options of LossConfig the token loop reads, as flags and numbers invariant over a sequence.
struct TokenOptions {
  bool has_log_clamp, has_delta, has_clip_c, bias_kl, add_kl;
  KlEstimator kl_estimator;
  LossScalars<float> s;
  // per sequence: the shared ratio's e^w (GSPO, GMPO), GMPO's mean advantage, VESPO's φ for A ≥ 0 and A < 0
  float shared_coef = 1.0f, seq_adv = 0.0f, phi_nonneg = 0.0f, phi_neg = 0.0f;
};

// The options that token_out takes as constants, the others each a select on its flag: kGeneral none; kPlain no
// log-ratio clamp, delta, dual clip or bias-corrected KL, and the k3 estimator (plain()); kBare also no importance
// weights, and the KL, when given, added to the loss (bare()).
enum class Fixed { kGeneral, kPlain, kBare };

// One token's inputs (neutral at a masked token) and terms.
struct TokenIn {
  float logp, old, adv, mask, ref, iw;
};

struct TokenOut {
  float loss, kl, low, high, dcoef, dlogp, ratio_grad;
};

// loss::token_terms for one token of a sequence without rollout ratios, off-policy mask, or token importance
// weights folded into a sequence weight (supported_fast); iw multiplies the policy term (1 when absent; not
// read with Fixed::kBare).
template <Family F, bool kShared, bool kRef, Fixed kFixed>
GRPO_ALWAYS_INLINE TokenOut token_out(const TokenOptions& o, const TokenIn& in) {
  const float logp = in.logp, old = in.old, adv = in.adv, ref = in.ref, iw = in.iw;
  const LossScalars<float>& s = o.s;
  constexpr bool kPlain = kFixed != Fixed::kGeneral, kBare = kFixed == Fixed::kBare;
  const bool has_log_clamp = !kPlain && o.has_log_clamp, has_delta = !kPlain && o.has_delta;
  const bool has_clip_c = !kPlain && o.has_clip_c, bias_kl = !kPlain && o.bias_kl, add_kl = kBare || o.add_kl;
  const KlEstimator kl_estimator = kPlain ? KlEstimator::kK3 : o.kl_estimator;
  float r = logp - old;
  const float dr = select_bits((!has_log_clamp) | ((r >= -s.log_clamp) & (r <= s.log_clamp)), 1.0f, 0.0f);
  r = select_bits(has_log_clamp, clampf(r, -s.log_clamp, s.log_clamp), r);
  const float coef_1 = kShared ? o.shared_coef : exp_any(r);
  float loss = 0.0f, kl_out = 0.0f, low = 0.0f, high = 0.0f, dcoef = 0.0f, dlogp = 0.0f;  // scalars: a struct
  // initialized as a whole is one memory write gcc does not vectorize
  float dg = 1.0f;
  if constexpr (F == Family::kCispo) {
    const float capped = std::min(coef_1, s.eps_high);
    loss = -capped * adv * logp;
    dlogp = -capped * adv;
    high = flag((coef_1 > s.eps_high) & (adv > 0.0f));
  } else if constexpr (F == Family::kSapo) {
    const float tau = select_bits(adv > 0.0f, s.tau_pos, s.tau_neg);
    const float sig = 1.0f / (1.0f + exp_any(-(tau * (coef_1 - 1.0f))));
    loss = -sig * 4.0f / tau * adv;
    dcoef = -(sig * (1.0f - sig)) * 4.0f * adv;
    low = flag((coef_1 < s.lo) & (adv < 0.0f));
    high = flag((coef_1 > s.hi) & (adv > 0.0f));
  } else if constexpr (F == Family::kVespo) {
    const float phi = select_bits(adv >= 0.0f, o.phi_nonneg, o.phi_neg);
    loss = -phi * adv * logp;
    dlogp = -phi * adv;
  } else if constexpr (F == Family::kGmpo) {  // ψ = 1: no token importance weights here
    loss = -o.seq_adv * coef_1 * 1.0f;
    dcoef = -o.seq_adv * 1.0f;
    const bool clipped = (r < -s.eps_low) | (r > s.eps_high);
    low = flag(clipped & (adv < 0.0f));
    high = flag(clipped & (adv > 0.0f));
    // loss::gmpo_log_ratio's derivative
    const float sign = select_bits(adv > 0.0f, 1.0f, select_bits(adv < 0.0f, -1.0f, 0.0f));
    const float dclipped = flag((r >= -s.eps_low) & (r <= s.eps_high));
    const float a = sign * r, b = sign * clampf(r, -s.eps_low, s.eps_high);
    const float share = min_share_f(a, b);
    dg = sign * (share * sign + (1.0f - share) * sign * dclipped);
  } else if constexpr (F == Family::kGpg) {
    loss = -logp * adv;
    dlogp = -adv;
  } else {
    static_assert(F == Family::kClipped, "token_out: a family without its case");
    const float coef_2 = std::min(std::max(coef_1, s.lo), s.hi);
    const float dcoef_2 = flag((coef_1 >= s.lo) & (coef_1 <= s.hi));
    const float coef_1d = select_bits(has_delta, std::min(coef_1, s.delta), coef_1);
    const float dcoef_1d = select_bits(!has_delta | (coef_1 <= s.delta), 1.0f, 0.0f);
    const float x1 = coef_1d * adv, x2 = coef_2 * adv;
    const float g1 = min_share_f(x1, x2);
    loss = -std::min(x1, x2);
    dcoef = -(adv * (g1 * dcoef_1d + (1.0f - g1) * dcoef_2));
    const bool dual = has_clip_c & (adv < 0.0f);
    const float cap = -adv * s.clip_c;
    dcoef = select_bits(dual, dcoef * min_share_f(loss, cap), dcoef);
    loss = select_bits(dual, std::min(loss, cap), loss);
    low = flag((coef_1d < s.lo) & (adv < 0.0f));
    high = flag((coef_1d > s.hi) & (adv > 0.0f));
  }
  const float ratio_grad = kShared ? dr * dg : coef_1 * dr;
  if constexpr (!folds_importance_weights(F) && !kBare) {
    loss *= iw;
    dcoef *= iw;
    dlogp *= iw;
  }
  if constexpr (kRef) {  // loss::kl_terms, the estimator by selection
    const float d = ref - logp;
    const bool low_var = kl_estimator == KlEstimator::kLowVarKl;
    const float dc = select_bits(low_var, clampf(d, -20.0f, 20.0f), d);
    const float e = exp_any(dc);
    const float v = e - dc - 1.0f;  // k3 (dc = d there)
    const bool inside = (d >= -20.0f) & (d <= 20.0f) & (v >= -10.0f) & (v <= 10.0f);
    const float kl_low_var = clampf(v, -10.0f, 10.0f);
    const float dkl_low_var = select_bits(inside, 1.0f - e, 0.0f);
    const bool k1 = kl_estimator == KlEstimator::kK1, k2 = kl_estimator == KlEstimator::kK2;
    float kl = select_bits(k1, -d, select_bits(k2, 0.5f * d * d, select_bits(low_var, kl_low_var, v)));
    float dkl = select_bits(k1, 1.0f, select_bits(k2, -d, select_bits(low_var, dkl_low_var, 1.0f - e)));
    dcoef = select_bits(bias_kl & add_kl, dcoef + s.beta * kl, dcoef);
    kl = select_bits(bias_kl, kl * coef_1, kl);
    dkl = select_bits(bias_kl, dkl * coef_1, dkl);
    kl_out = kl;
    loss = select_bits(add_kl, loss + s.beta * kl, loss);
    dlogp = select_bits(add_kl, dlogp + s.beta * dkl, dlogp);
  }
  return TokenOut{loss, kl_out, low, high, dcoef, dlogp, ratio_grad};
}

// Whether token_out<..., Fixed::kPlain> computes cfg's terms.
inline bool plain(const LossConfig& cfg) {
  return !cfg.has_log_clamp && !cfg.has_delta && !cfg.has_clip_c && !cfg.bias_kl &&
         cfg.kl_estimator == KlEstimator::kK3;
}

// Whether token_out<..., Fixed::kBare> computes cfg's terms, with ref log-probs and importance weights given or not.
inline bool bare(const LossConfig& cfg, bool has_ref, bool has_iw) {
  return plain(cfg) && !has_iw && (!has_ref || cfg.add_kl);
}

// Whether token_out covers cfg (else the kernels take loss_terms.h token by token).
inline bool supported_fast(const LossConfig& cfg) {
  return cfg.rollout_is == RolloutLevel::kNone && !cfg.has_off_policy_mask &&
         !(folds_importance_weights(cfg.family) && cfg.has_iw);
}

// Sums in kSumLanes fixed lanes (the order of softmax_row.h): add(x, n) adds x[0..n), n a multiple of
// kSumLanes except for the last call; total() adds the lanes in a fixed tree.
struct LaneSum {
  float lane[kSumLanes] = {};
  void add(const float* x, int64_t n) {
    int64_t t = 0;
    for (; t + kSumLanes <= n; t += kSumLanes) {
#pragma omp simd
      for (int64_t l = 0; l < kSumLanes; ++l) lane[l] += x[t + l];
    }
    for (int64_t l = 0; t + l < n; ++l) lane[l] += x[t + l];
  }
  float total() const {
    float v[kSumLanes];
    for (int64_t l = 0; l < kSumLanes; ++l) v[l] = lane[l];
#pragma GCC unroll 8  // each level's loop of constant length: one vector add
    for (int64_t w = kSumLanes / 2; w >= 1; w /= 2) {
      for (int64_t l = 0; l < w; ++l) v[l] += v[l + w];
    }
    return v[0];
  }
};

// What a block buffer holds from a read of one value (RowReader::view): its bits in [0, count).
struct BufferFill {
  uint32_t bits = 0;
  int64_t count = 0;  // 0: nothing known
};

// A mask value as the kernels read it: a bool mask's byte compared with 0 (gcc 12 leaves a loop over bool values
// scalar, not one over bytes), a float as is.
GRPO_ALWAYS_INLINE float mask_value(uint8_t m) { return static_cast<float>(m != 0); }
GRPO_ALWAYS_INLINE float mask_value(float m) { return m; }

// A [B, T] input of the loss read row by row: float32 (any strides, a broadcast row has stride 0), or the
// mask as bool. Absent: reads `absent`.
class RowReader {
 public:
  RowReader() = default;
  RowReader(const c10::optional<at::Tensor>& t, float absent) : absent_(absent) {
    if (!t) return;
    if (t->scalar_type() == at::kBool) {
      bools_ = t->const_data_ptr<bool>();
    } else {
      floats_ = t->const_data_ptr<float>();
    }
    stride_b_ = t->stride(0);
    stride_t_ = t->stride(1);
  }

  // x[0..n) = row i, tokens [t0, t0 + n).
  void read(int64_t i, int64_t t0, int64_t n, float* x) const {
    const int64_t off = i * stride_b_ + t0 * stride_t_;
    if (floats_ != nullptr) {
      const float* p = floats_ + off;
      if (stride_t_ == 1) {
        std::memcpy(x, p, n * sizeof(float));
      } else if (stride_t_ == 0) {
        std::fill(x, x + n, p[0]);
      } else {
        for (int64_t t = 0; t < n; ++t) x[t] = p[t * stride_t_];
      }
    } else if (bools_ != nullptr) {
      const uint8_t* p = reinterpret_cast<const uint8_t*>(bools_ + off);
      if (stride_t_ == 1) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) x[t] = mask_value(p[t]);
      } else {
        for (int64_t t = 0; t < n; ++t) x[t] = mask_value(p[t * stride_t_]);
      }
    } else {
      std::fill(x, x + n, absent_);
    }
  }

  // The tokens [begin, end) of row i (of len) outside which the row holds only 0 (the mask's padding), begin
  // rounded down to a multiple of kSumLanes; [0, len) unless the row is contiguous.
  std::pair<int64_t, int64_t> nonzero_span(int64_t i, int64_t len) const {
    int64_t begin = 0, end = len;
    if (stride_t_ != 1) return {begin, end};
    if (bools_ != nullptr) {  // 8 bytes at a time (a row's padding may be long), then byte by byte
      const uint8_t* p = reinterpret_cast<const uint8_t*>(bools_ + i * stride_b_);
      while (end >= 8 && load_u64(p + end - 8) == 0) end -= 8;
      while (end > 0 && p[end - 1] == 0) --end;
      while (begin + 8 <= end && load_u64(p + begin) == 0) begin += 8;
      while (begin < end && p[begin] == 0) ++begin;
    } else if (floats_ != nullptr) {
      const float* p = floats_ + i * stride_b_;
      while (end > 0 && p[end - 1] == 0.0f) --end;
      while (begin < end && p[begin] == 0.0f) ++begin;
    }
    return {begin / kSumLanes * kSumLanes, end};
  }

  // A contiguous bool row's bytes from token t0 of row i (read in place, each compared with 0); else null.
  const uint8_t* bytes(int64_t i, int64_t t0) const {
    if (bools_ == nullptr || stride_t_ != 1) return nullptr;
    return reinterpret_cast<const uint8_t*>(bools_ + i * stride_b_ + t0);
  }

  // Row i, tokens [t0, t0 + n): in place when contiguous float32, else read into buf. One value for the whole
  // row (a broadcast row, or absent) is not written again where buf already holds it (fill: what buf holds).
  const float* view(int64_t i, int64_t t0, int64_t n, float* buf, BufferFill& fill) const {
    if (floats_ != nullptr && stride_t_ == 1) return floats_ + i * stride_b_ + t0;
    if (bools_ == nullptr && (floats_ == nullptr || stride_t_ == 0)) {
      const uint32_t bits = float_bits(floats_ != nullptr ? floats_[i * stride_b_] : absent_);
      if (fill.count < n || fill.bits != bits) {
        std::fill(buf, buf + n, bits_float(bits));
        fill = BufferFill{bits, n};
      }
      return buf;
    }
    fill.count = 0;
    read(i, t0, n, buf);
    return buf;
  }

 private:
  static uint64_t load_u64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }

  const float* floats_ = nullptr;
  const bool* bools_ = nullptr;
  int64_t stride_b_ = 0, stride_t_ = 0;
  float absent_ = 0.0f;
};

// A block of one sequence's inputs: the mask as float 0/1, the others where they are (a contiguous row is
// read in place) or in the buffers; token() selects neutral values at masked tokens (loss::select_unmasked).
struct TokenBlock {
  float mask[kTokenBlock];
  const float *logp, *old, *adv, *ref, *iw;
  float logp_buf[kTokenBlock], old_buf[kTokenBlock], adv_buf[kTokenBlock], ref_buf[kTokenBlock],
      iw_buf[kTokenBlock];
  BufferFill logp_fill, old_fill, adv_fill, ref_fill, iw_fill;

  // Makes the tokens [c, c + kSumLanes) readable when only n < kSumLanes of them are (a row's last tokens, c +
  // kSumLanes <= kTokenBlock): the inputs in the buffers, the tokens past n masked.
  void pad(int64_t c, int64_t n) {
    std::fill(mask + c + n, mask + c + kSumLanes, 0.0f);
    pad_input(logp, logp_buf, logp_fill, c, n);
    pad_input(old, old_buf, old_fill, c, n);
    pad_input(adv, adv_buf, adv_fill, c, n);
    pad_input(ref, ref_buf, ref_fill, c, n);
    pad_input(iw, iw_buf, iw_fill, c, n);
  }

 private:
  static void pad_input(const float*& x, float* buf, BufferFill& fill, int64_t c, int64_t n) {
    if (x != buf) std::copy(x + c, x + c + n, buf + c);
    std::fill(buf + c + n, buf + c + kSumLanes, 0.0f);
    x = buf;
    fill.count = 0;
  }
};

GRPO_ALWAYS_INLINE TokenIn token(const TokenBlock& b, int64_t t) {
  const float m = b.mask[t];
  const bool k = m != 0.0f;
  return TokenIn{select_bits(k, b.logp[t], 0.0f), select_bits(k, b.old[t], 0.0f), select_bits(k, b.adv[t], 0.0f),
                 m,
                 select_bits(k, b.ref[t], 0.0f),
                 select_bits(k, b.iw[t], 1.0f)};
}

struct LossRows {
  RowReader logp, old, ref, adv, mask, iw;
  bool has_old, has_ref;

  LossRows(const at::Tensor& logp_, const c10::optional<at::Tensor>& old_, const c10::optional<at::Tensor>& ref_,
           const at::Tensor& adv_, const at::Tensor& mask_, const c10::optional<at::Tensor>& iw_)
      : logp(logp_, 0.0f), old(old_, 0.0f), ref(ref_, 0.0f), adv(adv_, 0.0f), mask(mask_, 0.0f), iw(iw_, 1.0f),
        has_old(old_.has_value()), has_ref(ref_.has_value()) {}

  // The tokens of row i that the kernels visit (RowReader::nonzero_span of the mask): outside them every token
  // is masked, so it adds 0 to every sum and gets 0 in every output; inside, each token keeps its sum lane.
  std::pair<int64_t, int64_t> span(int64_t i, int64_t len) const { return mask.nonzero_span(i, len); }

  void read(int64_t i, int64_t t0, int64_t n, TokenBlock& b) const {
    mask.read(i, t0, n, b.mask);
    b.logp = logp.view(i, t0, n, b.logp_buf, b.logp_fill);
    b.old = has_old ? old.view(i, t0, n, b.old_buf, b.old_fill) : b.logp;  // absent: logp (ratio 1)
    b.adv = adv.view(i, t0, n, b.adv_buf, b.adv_fill);
    b.ref = ref.view(i, t0, n, b.ref_buf, b.ref_fill);
    b.iw = iw.view(i, t0, n, b.iw_buf, b.iw_fill);
  }
};

}  // namespace grpo_kernels::cpu::GRPO_CPU_COPY

// AdamW's per-element update (docs/semantics.md), written once for the C++ CPU path and the
// CUDA path, beside SGD's (sgd_math.h, which also holds the storage types and the unscale).
#pragma once
#include "sgd_math.h"
#include "state_math.h"

namespace fused_opt {

// One AdamW group's hyperparameters, as laid out in the host's group table
// (update_rules.AdamWHyper.row): 1 - beta is rounded once from the double, as torch rounds
// its scalar arguments; the *_lo columns are what the FP32 columns lost of the user's doubles,
// so that hi + lo gives the bias corrections and the decay torch computes in double.
struct AdamWHyper {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, eps, maximize;
  float beta1_lo, beta2_lo, lr_lo, weight_decay_lo;
};

// base^n by squaring, in double: the bias corrections 1 - beta^t, as torch computes them on
// the host in double. Once per chunk, so its cost does not matter; exact to a few double ulps.
FUSED_HD double power(double base, int64_t n) {
  double result = 1.0;
  while (n > 0) {
    if (n & 1) result *= base;
    base *= base;
    n >>= 1;
  }
  return result;
}

// Correctly rounded sqrt, of a float (the norm, the denominator) and of a double (the bias
// correction), on the host and the device.
FUSED_HD float lane_sqrt(float x) {
#ifdef __CUDA_ARCH__
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);
#endif
}
FUSED_HD double lane_sqrt(double x) {
#ifdef __CUDA_ARCH__
  return __dsqrt_rn(x);
#else
  return __builtin_sqrt(x);
#endif
}

// Per-chunk constants for a param at its t-th applied step (t = its step + 1): computed in
// double and rounded once, as torch.optim.AdamW's step_size and bias_correction2_sqrt; the
// element's operations are torch.optim.AdamW's (single-tensor) in their order.
// The maximize sign is folded into the clip coefficient (negation is exact).
// `bound` is 2 C_t, C_t of update_rules.moment_bound (used with int8 state only): |m| <= C_t * sqrt(v)
// holds for FP32 state after t steps whatever the grads, and clamping to twice it bounds every step.
struct AdamWCoefs {
  float coef, beta1, one_minus_beta1, lerp_rest, beta2, one_minus_beta2, eps, decay, neg_step_size, bias2_sqrt, bound;
  uint32_t salt;  // t (or 0 at beta1 <= 1/2): the int8 codes' dither (state_math.h dithered_salt)
};

FUSED_HD double moment_bound(double beta1, double beta2, int64_t t) {
  if (beta2 == 0.0) return __builtin_inf();
  const double r = beta1 * beta1 / beta2;
  const double total = r == 1.0 ? double(t) : (1.0 - power(r, t)) / (1.0 - r);
  return (1.0 - beta1) * lane_sqrt(total / (1.0 - beta2)) * (1.0 + 0x1p-20);
}

// The clamp allows kMomentMargin times C_t: rounding noise (a code up to 1/8 off, v's half
// precision) never reaches it, only codes that disagree (update_rules.MOMENT_MARGIN).
constexpr double kMomentMargin = 2.0;

FUSED_HD AdamWCoefs adamw_coefs(const AdamWHyper& h, float clip_coef, float step) {
  const int64_t t = int64_t(step) + 1;
  const double beta1 = double(h.beta1) + double(h.beta1_lo), beta2 = double(h.beta2) + double(h.beta2_lo);
  const double bias1 = 1.0 - power(beta1, t);
  const double bias2 = 1.0 - power(beta2, t);
  const double lr = double(h.lr) + double(h.lr_lo);
  const double wd = double(h.weight_decay) + double(h.weight_decay_lo);
  return AdamWCoefs{h.maximize != 0.0f ? -clip_coef : clip_coef, h.beta1, h.one_minus_beta1,
                    1.0f - h.one_minus_beta1, h.beta2, h.one_minus_beta2, h.eps, float(1.0 - lr * wd),
                    -float(lr / bias1),
                    float(lane_sqrt(bias2)), float(kMomentMargin * moment_bound(beta1, beta2, t)),
                    dithered_salt(h.beta1, uint32_t(t))};
}

// amsgrad's running max, and sqrt on 8 lanes for the host's 8-wide loop.
FUSED_HD float lane_max(float a, float b) { return a > b ? a : b; }
#if defined(__AVX2__) && !defined(__CUDACC__)
inline __m256 lane_sqrt(__m256 x) { return _mm256_sqrt_ps(x); }
inline __m256 lane_max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }  // a > b ? a : b, lane-wise
#endif

// One element of an applied step: u = c*g/S (negated if maximize), the moments, decoupled
// weight decay and the bias-corrected step; returns the new w and updates m, v (and, with
// amsgrad, vmax, whose running max replaces v in the denominator). The operation order is
// torch.optim.AdamW's (and the oracle's), so results differ only by FMA contraction.
// ((1 - beta2) * u) * u is torch's addcmul_ order: u * u would overflow FP32 from |u| = 1.8e19.
// Bounded (int8 state): m clamped to +-bound * sqrt(v), selects (a NaN passes, as the oracle's).
template <bool AmsGrad, bool Bounded = false, class V>
FUSED_HD V adamw_element(V u, V w, V& m, V& v, V& vmax, const AdamWCoefs& k) {
  u = u * k.coef;
  // torch's exp_avg.lerp_(grad, 1 - beta1): the formula of its lerp kernel for a weight below
  // or above one half (the branch is uniform over a launch's group).
  m = k.one_minus_beta1 < 0.5f ? m + k.one_minus_beta1 * (u - m) : u - (u - m) * k.lerp_rest;
  v = k.beta2 * v + (k.one_minus_beta2 * u) * u;
  if constexpr (Bounded) {
    const V limit = k.bound * lane_sqrt(v);
    m = m > limit ? limit : m;
    m = m < -limit ? -limit : m;
  }
  V second = v;
  if (AmsGrad) {
    vmax = lane_max(vmax, v);
    second = vmax;
  }
  const V denom = lane_sqrt(second) / k.bias2_sqrt + k.eps;
  // torch's param.mul_(1 - lr * wd).addcdiv_(exp_avg, denom, value=-step_size)
  return w * k.decay + (k.neg_step_size * m) / denom;
}

}  // namespace fused_opt

// AdamW's per-element update (docs/semantics.md), written once for the C++ CPU path and the
// CUDA path, beside SGD's (sgd_math.h, which also holds the storage types and the unscale).
#pragma once
#include "sgd_math.h"

namespace fused_opt {

// One AdamW group's hyperparameters, as laid out in the host's group table
// (update_rules.AdamWHyper.row): 1 - beta is rounded once from the double, as torch rounds
// its scalar arguments.
struct AdamWHyper {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, weight_decay, eps, maximize;
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
// double and rounded once, as torch.optim.AdamW's step_size and bias_correction2_sqrt.
// The maximize sign is folded into the clip coefficient (negation is exact).
struct AdamWCoefs {
  float coef, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt;
};

FUSED_HD AdamWCoefs adamw_coefs(const AdamWHyper& h, float clip_coef, float step) {
  const int64_t t = int64_t(step) + 1;
  const double bias1 = 1.0 - power(double(h.beta1), t);
  const double bias2 = 1.0 - power(double(h.beta2), t);
  const double lr = h.lr;
  return AdamWCoefs{h.maximize != 0.0f ? -clip_coef : clip_coef, h.beta1, h.one_minus_beta1, h.beta2,
                    h.one_minus_beta2, h.eps, float(1.0 - lr * double(h.weight_decay)), float(lr / bias1),
                    float(lane_sqrt(bias2))};
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
template <bool AmsGrad, class V>
FUSED_HD V adamw_element(V u, V w, V& m, V& v, V& vmax, const AdamWCoefs& k) {
  u = u * k.coef;
  m = k.beta1 * m + k.one_minus_beta1 * u;
  v = k.beta2 * v + k.one_minus_beta2 * (u * u);
  V second = v;
  if (AmsGrad) {
    vmax = lane_max(vmax, v);
    second = vmax;
  }
  const V denom = lane_sqrt(second) / k.bias2_sqrt + k.eps;
  return w * k.decay - k.step_size * (m / denom);
}

}  // namespace fused_opt

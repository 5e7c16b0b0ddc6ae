// The model EMA of a param (fused_opt/ema.py), updated in the update pass right after the
// param's master w is written: e = e + a * (w - e), in FP32, stored rounded to nearest even in
// the EMA's dtype (FP32 or BF16). a = 1 - d_t is computed once per step, by finalize.
#pragma once
#include <cmath>

#include "sgd_math.h"

namespace fused_opt {

// a for the t-th applied step: (1 - d) + d * exp(-t / tau) with the warm-up (d_t = d * (1 -
// exp(-t / tau)), as Ultralytics' ModelEMA), else 1 - d. 1 - d arrives rounded from float64
// on the host (d = 0.9999 keeps a = 1e-4 to FP32 precision); the rest is float64, rounded once.
FUSED_HD float ema_weight(float one_minus_decay, float decay, float inv_tau, int32_t t) {
  double a = one_minus_decay;
  if (inv_tau > 0.0f) a += double(decay) * exp(-double(t) * double(inv_tau));
  return float(a);
}

template <class E>
FUSED_HD typename E::storage ema_element(typename E::storage e, float w, float a) {
  const float x = E::load(e);
  return E::store(x + a * (w - x));
}

}  // namespace fused_opt

// dtype codes shared with Python (native_backend.py: DTYPE_CODES) and the one place that
// turns them into storage types.
#pragma once
#include <stdexcept>
#include "state_math.h"

namespace fused_opt {

enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// The update rule (update_rules.py: SGD_CODE, ADAMW_CODE).
enum RuleCode : int { kSGD = 0, kAdamW = 1 };
// Param dtype codes only: BF16 params whose masters are int16 remainders (BF16Remainder) or
// int8 ones (BF16Remainder8).
constexpr int kBFloat16Remainder = 3;
constexpr int kBFloat16Remainder8 = 4;

// Calls fn(G{}) with the storage type for `code`.
template <class Fn>
void dispatch_dtype(int code, Fn&& fn) {
  switch (code) {
    case kFloat32: fn(F32{}); break;
    case kFloat16: fn(F16{}); break;
    case kBFloat16: fn(BF16{}); break;
    default: throw std::invalid_argument("fused_opt native: unknown dtype code");
  }
}

// Every launch takes the same arguments on CPU and CUDA; addresses are raw device pointers.
struct PartialsArgs {
  int64_t chunks, num_chunks, table, scale, partials, flags, chunk_size;
  int grad_dtype; bool norm_inf;
};
struct UpdateArgs {
  int64_t chunks, num_chunks, table, groups, scalars, applied_steps, chunk_size;
  int grad_dtype, param_dtype, rule, ema_dtype;  // ema_dtype: kFloat32 or kBFloat16 (rows without an EMA: any)
  int state;  // how the state buffers are stored (StateCode)
};
// Calls fn(G{}, P{}) for the update's (grad, param) storage types: a grad in its param's dtype
// (torch's .grad), or an FP32 grad for any param (fp32_grad_accumulation's sums).
template <class Fn>
void dispatch_update_dtypes(const UpdateArgs& a, Fn&& fn) {
  if (a.rule != kSGD && a.rule != kAdamW) throw std::invalid_argument("fused_opt native: unknown update rule");
  if (a.state != kStateF32 && a.state != kStateBF16 && a.state != kStateInt8) {
    throw std::invalid_argument("fused_opt native: unknown state precision");
  }
  if (a.param_dtype == kBFloat16Remainder || a.param_dtype == kBFloat16Remainder8) {
    const bool eight = a.param_dtype == kBFloat16Remainder8;
    if (a.grad_dtype == kBFloat16) {
      if (eight) fn(BF16{}, BF16Remainder8{}); else fn(BF16{}, BF16Remainder{});
    } else if (a.grad_dtype == kFloat32) {
      if (eight) fn(F32{}, BF16Remainder8{}); else fn(F32{}, BF16Remainder{});
    } else {
      throw std::invalid_argument("fused_opt native: a BF16 param's grad must be BF16 or FP32");
    }
  } else if (a.grad_dtype == a.param_dtype) {
    dispatch_dtype(a.grad_dtype, [&](auto g) { fn(g, g); });
  } else if (a.grad_dtype == kFloat32) {
    dispatch_dtype(a.param_dtype, [&](auto p) { fn(F32{}, p); });
  } else {
    throw std::invalid_argument("fused_opt native: a grad must have its param's dtype or be FP32");
  }
}
struct ReduceArgs {
  int64_t partials, flags, num_chunks;
};

}  // namespace fused_opt

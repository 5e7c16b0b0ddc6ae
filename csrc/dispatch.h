// dtype codes shared with Python (native_backend.py: DTYPE_CODES) and the one place that
// turns them into storage types.
#pragma once
#include <stdexcept>
#include "sgd_math.h"

namespace fused_opt {

enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

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
  int grad_dtype, param_dtype;
};
inline void check_same_dtype(const UpdateArgs& a) {
  if (a.grad_dtype != a.param_dtype) throw std::invalid_argument("fused_opt native: grad and param dtypes differ");
}
struct ReduceArgs {
  int64_t partials, flags, num_chunks;
};

}  // namespace fused_opt

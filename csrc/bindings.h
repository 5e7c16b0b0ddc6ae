// The Python surface of a native module (CPU or CUDA): three launches that take addresses
// from the host's tables (multi_tensor.py) and never read device memory on the host.
#pragma once
#include <pybind11/pybind11.h>
#include "chunks.h"
#include "dispatch.h"

namespace fused_opt {

template <class Partials, class Finalize, class Update>
void bind_step(pybind11::module_& m, Partials partials, Finalize finalize, Update update) {
  namespace py = pybind11;
  m.def("partials", [partials](int64_t chunks, int64_t num_chunks, int64_t table, int64_t scale, int64_t out,
                               int64_t flags, int grad_dtype, bool norm_inf, int64_t chunk_size, int64_t stream) {
    partials(PartialsArgs{chunks, num_chunks, table, scale, out, flags, chunk_size, grad_dtype, norm_inf}, stream);
  });
  m.def("finalize", [finalize](int64_t partials, int64_t flags, int64_t num_chunks, int64_t scale, int64_t tracker,
                               int64_t hysteresis_tracker, int64_t applied, int64_t skips, int64_t scalars,
                               int64_t grad_norm, int64_t found_inf, float max_norm, float growth, float backoff,
                               float min_scale, float max_scale, int32_t interval, int32_t hysteresis,
                               bool has_clip, bool norm_inf, bool dynamic, int64_t stream) {
    FinalizeArgs a{reinterpret_cast<float*>(scale), reinterpret_cast<int32_t*>(tracker),
                   reinterpret_cast<int32_t*>(hysteresis_tracker), reinterpret_cast<int32_t*>(applied),
                   reinterpret_cast<int32_t*>(skips), reinterpret_cast<StepScalars*>(scalars),
                   reinterpret_cast<float*>(grad_norm), reinterpret_cast<bool*>(found_inf),
                   max_norm, growth, backoff, min_scale, max_scale, interval, hysteresis,
                   has_clip, norm_inf, dynamic};
    finalize(ReduceArgs{partials, flags, num_chunks}, a, stream);
  });
  m.def("update", [update](int64_t chunks, int64_t num_chunks, int64_t table, int64_t groups, int64_t scalars,
                           int64_t applied, int grad_dtype, int param_dtype, int64_t chunk_size, int64_t stream) {
    update(UpdateArgs{chunks, num_chunks, table, groups, scalars, applied, chunk_size, grad_dtype, param_dtype},
           stream);
  });
}

}  // namespace fused_opt

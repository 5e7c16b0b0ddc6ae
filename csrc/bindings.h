// The Python surface of a native module (CPU or CUDA): three launches that take addresses
// from the host's tables (multi_tensor.py) and never read device memory on the host, and
// `step`, all of them in one call.
#pragma once
#include <pybind11/pybind11.h>
#include "chunks.h"
#include "dispatch.h"
#include "muon_math.h"

namespace fused_opt {

// What `step` launches, packed by native_backend.py once per plan (int64 words): a norm pass
// over one run of grads, and an update over one (grad, param) dtype pair.
struct NormRecord {
  int64_t chunks, num_chunks, table, partials, flags, grad_dtype;
};
struct UpdateRecord {
  int64_t chunks, num_chunks, table, grad_dtype, param_dtype, rule, ema_dtype, state;
};

// The finalize's arguments from the Python call's addresses and settings.
inline FinalizeArgs finalize_args(int64_t scale, int64_t tracker, int64_t hysteresis_tracker, int64_t applied,
                                  int64_t skips, int64_t scalars, int64_t grad_norm, int64_t found_inf, float max_norm,
                                  float growth, float backoff, float min_scale, float max_scale, int32_t interval,
                                  int32_t hysteresis, bool has_clip, bool norm_inf, bool dynamic,
                                  bool consecutive) {
  return FinalizeArgs{reinterpret_cast<float*>(scale), reinterpret_cast<int32_t*>(tracker),
                      reinterpret_cast<int32_t*>(hysteresis_tracker), reinterpret_cast<int32_t*>(applied),
                      reinterpret_cast<int32_t*>(skips), reinterpret_cast<StepScalars*>(scalars),
                      reinterpret_cast<float*>(grad_norm), reinterpret_cast<bool*>(found_inf),
                      max_norm, growth, backoff, min_scale, max_scale, interval, hysteresis,
                      has_clip, norm_inf, dynamic, consecutive};
}

// setup.py compiles in a digest of the sources and options; the package loads a module only
// when it matches the build's manifest (fused_opt/_build.json), so no stale module runs.
#ifndef FUSED_OPT_BUILD_DIGEST
#define FUSED_OPT_BUILD_DIGEST ""
#endif

template <class Partials, class Finalize, class Update, class Fold, class Unfold>
void bind_step(pybind11::module_& m, Partials partials, Finalize finalize, Update update, Fold fold, Unfold unfold) {
  namespace py = pybind11;
  m.attr("BUILD_DIGEST") = FUSED_OPT_BUILD_DIGEST;
  m.def("partials", [partials](int64_t chunks, int64_t num_chunks, int64_t table, int64_t scale, int64_t out,
                               int64_t flags, int grad_dtype, bool norm_inf, int64_t chunk_size, int64_t stream) {
    partials(PartialsArgs{chunks, num_chunks, table, scale, out, flags, chunk_size, grad_dtype, norm_inf}, stream);
  });
  m.def("finalize", [finalize](int64_t partials, int64_t flags, int64_t num_chunks, int64_t scale, int64_t tracker,
                               int64_t hysteresis_tracker, int64_t applied, int64_t skips, int64_t scalars,
                               int64_t grad_norm, int64_t found_inf, float max_norm, float growth, float backoff,
                               float min_scale, float max_scale, int32_t interval, int32_t hysteresis,
                               bool has_clip, bool norm_inf, bool dynamic, bool consecutive, int64_t stream) {
    const FinalizeArgs a = finalize_args(scale, tracker, hysteresis_tracker, applied, skips, scalars, grad_norm,
                                         found_inf, max_norm, growth, backoff, min_scale, max_scale, interval,
                                         hysteresis, has_clip, norm_inf, dynamic, consecutive);
    finalize(ReduceArgs{partials, flags, num_chunks}, a, stream);
  });
  m.def("update", [update](int64_t chunks, int64_t num_chunks, int64_t table, int64_t groups, int64_t scalars,
                           int64_t applied, int grad_dtype, int param_dtype, int rule, int ema_dtype, int state,
                           int64_t chunk_size, int64_t stream) {
    const UpdateArgs a{chunks, num_chunks, table, groups, scalars, applied, chunk_size, grad_dtype, param_dtype,
                       rule, ema_dtype, state};
    dispatch_update_dtypes(a, [](auto, auto) {});  // unknown codes raise before any write
    update(a, stream);
  });
  // A whole step: one crossing from Python instead of three (the crossings, not the launches,
  // were most of a small step's host time once a step's bytes had pushed them out of the
  // caches), and no point between the launches where an exception or an interrupt could leave
  // half a step. Every dtype code is checked before the first launch, so a bad record writes
  // nothing. `across` (None, or a Python callable) runs between the norm pass and the finalize:
  // sharded params' reduction across ranks. With `stats` (the address of a float[2] in device
  // memory) the partials are folded here into {statistic, inf flag}, `across()` makes that
  // pair global in place, and it comes back as slot 0; without, `across()` folds the partials
  // itself and returns how many slots the finalize reads. Either way it writes only scratch,
  // so if it raises nothing has changed.
  m.def("step", [partials, finalize, update, fold, unfold](
                    int64_t norms, int64_t num_norms, int64_t updates, int64_t num_updates, int64_t groups,
                    int64_t scalars, int64_t partial_slots, int64_t flag_slots, int64_t num_partials,
                    int64_t scale, int64_t tracker, int64_t hysteresis_tracker, int64_t applied, int64_t skips,
                    int64_t grad_norm, int64_t found_inf, float max_norm, float growth, float backoff,
                    float min_scale, float max_scale, int32_t interval, int32_t hysteresis, bool has_clip,
                    bool norm_inf, bool dynamic, bool consecutive, int64_t chunk_size, int64_t stream,
                    py::object across, int64_t stats) {
    const auto* n = reinterpret_cast<const NormRecord*>(norms);
    const auto* u = reinterpret_cast<const UpdateRecord*>(updates);
    auto update_args = [&](const UpdateRecord& r) {
      return UpdateArgs{r.chunks, r.num_chunks, r.table, groups, scalars, applied, chunk_size, int(r.grad_dtype),
                        int(r.param_dtype), int(r.rule), int(r.ema_dtype), int(r.state)};
    };
    for (int64_t i = 0; i < num_norms; ++i) dispatch_dtype(int(n[i].grad_dtype), [](auto) {});
    for (int64_t i = 0; i < num_updates; ++i) dispatch_update_dtypes(update_args(u[i]), [](auto, auto) {});
    for (int64_t i = 0; i < num_norms; ++i) {
      partials(PartialsArgs{n[i].chunks, n[i].num_chunks, n[i].table, scale, n[i].partials, n[i].flags, chunk_size,
                            int(n[i].grad_dtype), norm_inf}, stream);
    }
    if (!across.is_none() && stats != 0) {
      fold(ReduceArgs{partial_slots, flag_slots, num_partials}, stats, norm_inf, stream);
      across();
      num_partials = 1;
      unfold(ReduceArgs{partial_slots, flag_slots, num_partials}, stats, stream);
    } else if (!across.is_none()) {
      num_partials = across().cast<int64_t>();
    }
    const FinalizeArgs a = finalize_args(scale, tracker, hysteresis_tracker, applied, skips, scalars, grad_norm,
                                         found_inf, max_norm, growth, backoff, min_scale, max_scale, interval,
                                         hysteresis, has_clip, norm_inf, dynamic, consecutive);
    finalize(ReduceArgs{partial_slots, flag_slots, num_partials}, a, stream);
    for (int64_t i = 0; i < num_updates; ++i) update(update_args(u[i]), stream);
  });
}

// Muon's elementwise stages on one stack (muon_math.h), launched by
// fused_opt/backends/stack_kernels.py between the torch ops of the rest of its step. Addresses
// as above; `found_inf` a bool in device memory; `params` an array of the members' param
// addresses, in device memory too; param_dtype kFloat16 or kBFloat16 (FP32 masters), or
// BF16 params with remainders (dispatch_stack_param).
template <class Momentum, class MomentumGrads, class Apply, class MuSGDApply, class Decode, class Encode>
void bind_muon(pybind11::module_& m, Momentum momentum, MomentumGrads momentum_grads, Apply apply,
               MuSGDApply musgd_apply, Decode decode, Encode encode) {
  m.def("muon_momentum", [momentum](int64_t u, int64_t buf, int64_t update, int64_t n, int64_t found_inf,
                                    float one_minus_mu, float mu, bool nesterov, int64_t stream) {
    momentum(reinterpret_cast<const float*>(u), reinterpret_cast<float*>(buf), reinterpret_cast<uint16_t*>(update),
             n, reinterpret_cast<const bool*>(found_inf), MuonMomentumArgs{one_minus_mu, mu, nesterov}, stream);
  });
  // From the members' raw grads instead of FP32 rows: `grads` an array of their addresses (in
  // device memory), `per` elements each, of dtype code grad_dtype; inv_scale and clip FP32
  // scalars in device memory (clip 0: not clipped).
  m.def("muon_momentum_grads", [momentum_grads](int64_t grads, int grad_dtype, int64_t inv_scale, int64_t clip,
                                                int64_t buf, int64_t update, int64_t per, int64_t n,
                                                int64_t found_inf, float one_minus_mu, float mu, bool nesterov,
                                                int64_t stream) {
    dispatch_dtype(grad_dtype, [](auto) {});  // an unknown code raises before any write
    momentum_grads(reinterpret_cast<const void* const*>(grads), grad_dtype, reinterpret_cast<const float*>(inv_scale),
                   reinterpret_cast<const float*>(clip), reinterpret_cast<float*>(buf),
                   reinterpret_cast<uint16_t*>(update), per, n, reinterpret_cast<const bool*>(found_inf),
                   MuonMomentumArgs{one_minus_mu, mu, nesterov}, stream);
  });
  m.def("muon_apply", [apply](int64_t master, int64_t update, int64_t params, int64_t per, int64_t n,
                              int64_t found_inf, float decay, float alpha, int param_dtype, int64_t stream) {
    dispatch_stack_param(param_dtype, [](auto) {});  // an unknown code raises before any write
    apply(reinterpret_cast<void*>(master), reinterpret_cast<const uint16_t*>(update),
          reinterpret_cast<uint16_t* const*>(params), per, n, reinterpret_cast<const bool*>(found_inf), decay, alpha,
          param_dtype, stream);
  });
  // `update` 0 outside use_muon groups.
  m.def("musgd_apply", [musgd_apply](int64_t master, int64_t update, int64_t u, int64_t buf, int64_t params,
                                     int64_t per, int64_t n, int64_t found_inf, float muon_alpha, float scale,
                                     float weight_decay, float mu, bool nesterov, float sgd_alpha, int param_dtype,
                                     int64_t stream) {
    dispatch_stack_param(param_dtype, [](auto) {});
    musgd_apply(reinterpret_cast<void*>(master), reinterpret_cast<const uint16_t*>(update),
                reinterpret_cast<const float*>(u), reinterpret_cast<float*>(buf),
                reinterpret_cast<uint16_t* const*>(params), per, n, reinterpret_cast<const bool*>(found_inf),
                MuSGDArgs{muon_alpha, weight_decay, mu, sgd_alpha, scale}, nesterov, param_dtype, stream);
  });
  // int8 state of a stack of `rows` members of `per` elements (muon_math.h decode_stack_block):
  // signed codes (int8) or unsigned (FP16 bits); `salts` int32, one per member or one in all.
  m.def("state_decode", [decode](int64_t codes, int64_t scales, int64_t out, int64_t rows, int64_t per,
                                 bool is_signed, int64_t stream) {
    decode(reinterpret_cast<const void*>(codes), reinterpret_cast<const float*>(scales),
           reinterpret_cast<float*>(out), rows, per, is_signed, stream);
  });
  m.def("state_encode", [encode](int64_t x, int64_t codes, int64_t scales, int64_t rows, int64_t per, bool is_signed,
                                 int64_t salts, bool salt_per_row, int64_t found_inf, int64_t stream) {
    encode(reinterpret_cast<const float*>(x), reinterpret_cast<void*>(codes), reinterpret_cast<float*>(scales), rows,
           per, is_signed, reinterpret_cast<const int32_t*>(salts), salt_per_row,
           reinterpret_cast<const bool*>(found_inf), stream);
  });
}

}  // namespace fused_opt

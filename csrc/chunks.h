// The chunk table and the work of one chunk, shared by the CPU and CUDA paths: the CPU runs
// each chunk with stride 1, a CUDA block runs it with one thread per lane (stride = threads),
// so the CPU tests exercise exactly the indexing the GPU relies on.
#pragma once
#include <type_traits>

#include "adamw_math.h"
#include "ema_math.h"
#include "state_math.h"

namespace fused_opt {

// One row of the host's tensor table (multi_tensor.py, int64 columns): raw addresses. The
// update rule's state buffers are buf, buf2, buf3 (SGD: the momentum buffer; AdamW: exp_avg,
// exp_avg_sq, max_exp_avg_sq) and its per-param count is `count` (SGD: the buffer's
// first-step flag; AdamW: the param's step); `ema` the param's model EMA; scale, scale2,
// scale3 the block scales of buf, buf2, buf3 with int8 state; 0 where absent.
struct TensorEntry {
  int64_t grad, master, buf, param, numel, group, count, buf2, buf3, ema, scale, scale2, scale3;
};

// A chunk: (tensor row, first element). Elements [start, min(start + chunk, numel)).
struct Chunk {
  int64_t row, start;
};

FUSED_HD int64_t chunk_end(const TensorEntry& t, const Chunk& c, int64_t chunk_size) {
  return c.start + chunk_size < t.numel ? c.start + chunk_size : t.numel;
}

// Pass 1 over elements begin, begin+stride, ... < end of one chunk (64-bit indices).
template <class G, class Acc>
FUSED_HD void partial_range(const TensorEntry& t, float inv_scale, bool norm_inf, int64_t begin,
                            int64_t end, int64_t stride, Acc& acc, int& bad) {
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  for (int64_t i = begin; i < end; i += stride) accumulate_norm(unscale<G>(g[i], inv_scale), norm_inf, acc, bad);
}

// Whether this step is the momentum buffer's first applied one; records it (every chunk of
// the tensor writes the same value, so the chunks never race on the flag).
FUSED_HD bool claim_first_step(const TensorEntry& t, int32_t applied_steps, bool writer) {
  if (t.buf == 0) return false;
  auto* flag = reinterpret_cast<int32_t*>(t.count);
  const int32_t first_step = *flag;
  if (writer && first_step == 0) *flag = applied_steps;
  return first_step == 0 || first_step == applied_steps;
}

// Pass 2 with BF16Remainder params: the master is rebuilt from p and its remainder (the
// table's master column), updated, and split again: read g, p, r, b; write p, r, b.
template <class G, bool HasBuf, bool Nesterov>
FUSED_HD void update_range_remainder(const TensorEntry& t, const StepCoefs& coefs, float inv_scale,
                                     int64_t begin, int64_t end, int64_t stride) {
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  auto* r = reinterpret_cast<int16_t*>(t.master);
  auto* b = reinterpret_cast<float*>(t.buf);
  auto* p = reinterpret_cast<uint16_t*>(t.param);
  const StepCoefs k = coefs;
  for (int64_t i = begin; i < end; i += stride) {
    float bi = HasBuf ? b[i] : 0.0f;
    const float wi = sgd_element<HasBuf, Nesterov>(unscale<G>(g[i], inv_scale),
                                                   BF16Remainder::rebuild(p[i], r[i]), bi, k);
    const uint16_t pi = BF16Remainder::store(wi);
    if (HasBuf) b[i] = bi;
    p[i] = pi;
    r[i] = BF16Remainder::remainder(wi, pi);
  }
}

// Pass 2 over elements of one chunk: read g, w, b and p (to keep edits made outside the
// optimizer, see retake_if_edited); write w, b and the rounded param.
template <class G, class P, bool HasBuf, bool HasParam, bool Nesterov>
FUSED_HD void update_range(const TensorEntry& t, const StepCoefs& coefs, float inv_scale, int64_t begin,
                           int64_t end, int64_t stride) {
  if constexpr (P::kRemainder) {
    update_range_remainder<G, HasBuf, Nesterov>(t, coefs, inv_scale, begin, end, stride);
    return;
  }
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  auto* w = reinterpret_cast<float*>(t.master);
  auto* b = reinterpret_cast<float*>(t.buf);
  auto* p = reinterpret_cast<typename P::storage*>(t.param);
  const StepCoefs k = coefs;  // a local: stores through w/b/p can't alias it, so loads hoist
  for (int64_t i = begin; i < end; i += stride) {
    float bi = HasBuf ? b[i] : 0.0f;
    const float w_old = HasParam ? retake_if_edited<P>(p[i], w[i]) : w[i];
    const float wi = sgd_element<HasBuf, Nesterov>(unscale<G>(g[i], inv_scale), w_old, bi, k);
    w[i] = wi;
    if (HasBuf) b[i] = bi;
    if (HasParam) p[i] = P::store(wi);
  }
}

// Calls fn(HasBuf, HasParam, Nesterov) with std::bool_constant arguments for tensor t:
// per-tensor choices become compile-time ones, so the element loop carries no branch.
template <class Fn>
FUSED_HD void dispatch_tensor(const TensorEntry& t, bool nesterov, Fn&& fn) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (t.buf != 0) {
    if (nesterov) {
      if (t.param != 0) fn(Yes{}, Yes{}, Yes{}); else fn(Yes{}, No{}, Yes{});
    } else {
      if (t.param != 0) fn(Yes{}, Yes{}, No{}); else fn(Yes{}, No{}, No{});
    }
  } else {
    if (t.param != 0) fn(No{}, Yes{}, No{}); else fn(No{}, No{}, No{});
  }
}

// AdamW's pass 2 over elements of one chunk: read g, w (or p and its remainder), m, v (vmax)
// and p; write w (or p and r), m, v (vmax) and the rounded param. The param's step is read
// here and advanced after the pass (advance_count): chunks of one tensor run in any order.
template <class G, class P, bool HasParam, bool AmsGrad>
FUSED_HD void adamw_range(const TensorEntry& t, const AdamWCoefs& coefs, float inv_scale, int64_t begin,
                          int64_t end, int64_t stride) {
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  auto* m = reinterpret_cast<float*>(t.buf);
  auto* v = reinterpret_cast<float*>(t.buf2);
  auto* vmax = reinterpret_cast<float*>(t.buf3);
  auto* p = reinterpret_cast<typename P::storage*>(t.param);
  const AdamWCoefs k = coefs;  // a local: stores through the arrays can't alias it
  for (int64_t i = begin; i < end; i += stride) {
    float mi = m[i], vi = v[i], vmaxi = AmsGrad ? vmax[i] : 0.0f;
    if constexpr (P::kRemainder) {
      auto* r = reinterpret_cast<int16_t*>(t.master);
      const float wi = adamw_element<AmsGrad>(unscale<G>(g[i], inv_scale), BF16Remainder::rebuild(p[i], r[i]),
                                              mi, vi, vmaxi, k);
      const uint16_t pi = BF16Remainder::store(wi);
      p[i] = pi;
      r[i] = BF16Remainder::remainder(wi, pi);
    } else {
      auto* w = reinterpret_cast<float*>(t.master);
      const float w_old = HasParam ? retake_if_edited<P>(p[i], w[i]) : w[i];
      const float wi = adamw_element<AmsGrad>(unscale<G>(g[i], inv_scale), w_old, mi, vi, vmaxi, k);
      w[i] = wi;
      if (HasParam) p[i] = P::store(wi);
    }
    m[i] = mi;
    v[i] = vi;
    if (AmsGrad) vmax[i] = vmaxi;
  }
}

// AdamW's per-tensor choices as compile-time ones (as dispatch_tensor for SGD).
template <class Fn>
FUSED_HD void dispatch_adamw_tensor(const TensorEntry& t, Fn&& fn) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (t.param != 0) {
    if (t.buf3 != 0) fn(Yes{}, Yes{}); else fn(Yes{}, No{});
  } else {
    if (t.buf3 != 0) fn(No{}, Yes{}); else fn(No{}, No{});
  }
}

// -- The compressed path: state in BF16 or int8, or 24-bit masters (state_math.h) ----------
// One int8 block (kStateBlock elements) at a time: its state is decoded to FP32, each element
// is stepped by the rule's element function, and the state is encoded again with the block's
// new scale. The fast loops above stay as they are for FP32 state and masters.

// A launch takes it when its state is not FP32 or its masters are BF16Remainder8.

// A tensor's master column and param as typed pointers, read from the table once: element
// stores through int8 pointers may alias anything, so pointers re-read from the table inside
// a loop would be reloaded after every store, and the loop would not vectorize.
template <class P>
struct MasterOf {
  using MasterStorage = std::conditional_t<P::kRemainder8, int8_t, std::conditional_t<P::kRemainder, int16_t, float>>;
  MasterStorage* master;
  typename P::storage* param;
  explicit FUSED_HD MasterOf(const TensorEntry& t)
      : master(reinterpret_cast<MasterStorage*>(t.master)), param(reinterpret_cast<typename P::storage*>(t.param)) {}
  FUSED_HD MasterOf(void* master_column, void* param_storage)
      : master(static_cast<MasterStorage*>(master_column)), param(static_cast<typename P::storage*>(param_storage)) {}

  // Element i's FP32 master: loaded (and re-taken from an edited param), or rebuilt from the
  // BF16 param and its remainder.
  template <class HasParam>
  FUSED_HD float load(int64_t i, HasParam has_param) const {
    if constexpr (P::kRemainder8) {
      return BF16Remainder8::rebuild(param[i], master[i]);
    } else if constexpr (P::kRemainder) {
      return BF16Remainder::rebuild(param[i], master[i]);
    } else {  // an FP32 param is its own master
      return has_param ? retake_if_edited<P>(param[i], master[i]) : master[i];
    }
  }

  // The new master w of element i, stored as the master format keeps it, and the param rounded.
  template <class HasParam>
  FUSED_HD void store(int64_t i, float w, HasParam has_param) const {
    if constexpr (P::kRemainder8) {
      uint16_t p;
      int8_t r8;
      BF16Remainder8::split(w, p, r8);
      param[i] = p;
      master[i] = r8;
    } else if constexpr (P::kRemainder) {
      const uint16_t p = BF16::store(w);
      param[i] = p;
      master[i] = BF16Remainder::remainder(w, p);
    } else {
      master[i] = w;
      if (has_param) param[i] = P::store(w);
    }
  }
};

// Calls fn(std::integral_constant<int, state>{}): the state precision as a compile-time choice.
template <class Fn>
FUSED_HD void dispatch_state(int state, Fn&& fn) {
  if (state == kStateInt8) {
    fn(std::integral_constant<int, kStateInt8>{});
  } else if (state == kStateBF16) {
    fn(std::integral_constant<int, kStateBF16>{});
  } else {
    fn(std::integral_constant<int, kStateF32>{});
  }
}

// Calls fn(a, b, c) with std::bool_constant arguments for three run-time flags (c may be
// constant false: then two instantiations, not four).
template <class C, class Fn>
FUSED_HD void dispatch_flags(bool a, bool b, C c, Fn&& fn) {
  using Yes = std::true_type;
  using No = std::false_type;
  auto with_c = [&](auto x, auto y) {
    if constexpr (std::is_same_v<C, bool>) {
      if (c) fn(x, y, Yes{}); else fn(x, y, No{});
    } else {
      fn(x, y, No{});
    }
  };
  if (a) {
    if (b) with_c(Yes{}, Yes{}); else with_c(Yes{}, No{});
  } else {
    if (b) with_c(No{}, Yes{}); else with_c(No{}, No{});
  }
}

// The blocks of [begin, end) (begin on a block boundary) that lane `lane` of `lanes` owns:
// fn(first element, count). The CPU runs one lane, a CUDA block one per thread.
template <class Fn>
FUSED_HD void for_state_blocks(int64_t begin, int64_t end, int64_t lane, int64_t lanes, Fn&& fn) {
  for (int64_t at = begin + lane * kStateBlock; at < end; at += lanes * kStateBlock) {
    fn(at, int(end - at < kStateBlock ? end - at : kStateBlock));
  }
}

// The per-tensor flags are plain bools, uniform over a tensor: on the host the compiler unswitches
// the element loop on them, on the device they are uniform over a CUDA block. One instantiation
// per state precision keeps the builds short (every flag combination as its own template took
// minutes more per module).
template <class G, class P, int State, class HasBuf, class HasParam, class Nesterov>
FUSED_HD void sgd_compressed(const TensorEntry& t, const StepCoefs& coefs, float inv_scale, int64_t begin,
                             int64_t end, int64_t lane, int64_t lanes, HasBuf has_buf, HasParam has_param,
                             Nesterov nesterov, uint32_t salt) {
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  auto* scales = reinterpret_cast<float*>(t.scale);
  void* buf = reinterpret_cast<void*>(t.buf);
  const MasterOf<P> w_of(t);
  const StepCoefs k = coefs;  // a local: stores through the arrays can't alias it
  for_state_blocks(begin, end, lane, lanes, [&](int64_t at, int n) {
    // Locals, not the closure's references: int8 stores may alias anything reached through a
    // pointer, and a loop that must reload its coefficients after each store does not vectorize.
    const StepCoefs kk = k;
    const MasterOf<P> wo = w_of;
    const auto* gg = g;
    const float inv = inv_scale;
    // Not zeroed: a rep stos per block was a sixth of the int8 loop's time on an x86-64 CPU,
    // and without a buffer nothing reads it.
    float b[kStateBlock];
    prefetch_block<typename G::storage>(gg, at);
    prefetch_block<typename MasterOf<P>::MasterStorage>(wo.master, at);
    if (has_param) prefetch_block<typename P::storage>(wo.param, at);
    if (has_buf) prefetch_codes<State, SignedCodes>(buf, at);
    if (has_buf) decode_block<State, SignedCodes>(buf, scales, at, n, b);
#ifdef __CUDA_ARCH__
    // On the device the flags stay run-time values (uniform over the block): one loop, a short build.
    for (int e = 0; e < n; ++e) {
      const float u = unscale<G>(gg[at + e], inv), w = wo.load(at + e, has_param);
      wo.store(at + e, !has_buf ? sgd_element<false, false>(u, w, b[e], kk)
                                : (nesterov ? sgd_element<true, true>(u, w, b[e], kk)
                                            : sgd_element<true, false>(u, w, b[e], kk)), has_param);
    }
#else
    // The element loop with the flags as constants (each its own straight-line loop); the
    // decode and encode loops around it are shared.
    dispatch_flags(has_buf, has_param, nesterov, [&](auto buf_on, auto param_on, auto nesterov_on) {
      for (int e = 0; e < n; ++e) {
        const float u = unscale<G>(gg[at + e], inv), w = wo.load(at + e, param_on);
        wo.store(at + e, sgd_element<decltype(buf_on)::value, decltype(nesterov_on)::value>(u, w, b[e], kk), param_on);
      }
    });
#endif
    if (has_buf) encode_block<State, SignedCodes>(buf, scales, at, n, b, salt);
  });
}

template <class G, class P, int State, class HasParam, class AmsGrad>
FUSED_HD void adamw_compressed(const TensorEntry& t, const AdamWCoefs& coefs, float inv_scale, int64_t begin,
                               int64_t end, int64_t lane, int64_t lanes, HasParam has_param, AmsGrad amsgrad) {
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  void *m_codes = reinterpret_cast<void*>(t.buf), *v_codes = reinterpret_cast<void*>(t.buf2),
       *vmax_codes = reinterpret_cast<void*>(t.buf3);
  auto *m_scales = reinterpret_cast<float*>(t.scale), *v_scales = reinterpret_cast<float*>(t.scale2),
       *vmax_scales = reinterpret_cast<float*>(t.scale3);
  const MasterOf<P> w_of(t);
  const AdamWCoefs k = coefs;
  // int8 codes may decode m and v inconsistently (m from its block, v from another's): the
  // step is bounded as FP32 state bounds it (adamw_math.h AdamWCoefs::bound).
  constexpr bool kBounded = State == kStateInt8;
  for_state_blocks(begin, end, lane, lanes, [&](int64_t at, int n) {
    float m[kStateBlock], v[kStateBlock], vmax[kStateBlock];  // vmax is read with amsgrad only
    decode_block<State, SignedCodes>(m_codes, m_scales, at, n, m);
    decode_block<State, UnsignedCodes>(v_codes, v_scales, at, n, v);
    if (amsgrad) decode_block<State, UnsignedCodes>(vmax_codes, vmax_scales, at, n, vmax);
    const AdamWCoefs kk = k;  // locals, as in sgd_compressed
    const MasterOf<P> wo = w_of;
    const auto* gg = g;
    const float inv = inv_scale;
    prefetch_block<typename G::storage>(gg, at);
    prefetch_block<typename MasterOf<P>::MasterStorage>(wo.master, at);
    if (has_param) prefetch_block<typename P::storage>(wo.param, at);
    prefetch_codes<State, SignedCodes>(m_codes, at);
    prefetch_codes<State, UnsignedCodes>(v_codes, at);
    if (amsgrad) prefetch_codes<State, UnsignedCodes>(vmax_codes, at);
#ifdef __CUDA_ARCH__
    for (int e = 0; e < n; ++e) {
      const float u = unscale<G>(gg[at + e], inv), w = wo.load(at + e, has_param);
      wo.store(at + e, amsgrad ? adamw_element<true, kBounded>(u, w, m[e], v[e], vmax[e], kk)
                               : adamw_element<false, kBounded>(u, w, m[e], v[e], vmax[e], kk), has_param);
    }
#else
    dispatch_flags(has_param, amsgrad, false, [&](auto param_on, auto amsgrad_on, auto) {
      for (int e = 0; e < n; ++e) {
        const float u = unscale<G>(gg[at + e], inv), w = wo.load(at + e, param_on);
        wo.store(at + e, adamw_element<decltype(amsgrad_on)::value, kBounded>(u, w, m[e], v[e], vmax[e], kk),
                 param_on);
      }
    });
#endif
    encode_block<State, SignedCodes>(m_codes, m_scales, at, n, m, kk.salt);
    encode_block<State, UnsignedCodes>(v_codes, v_scales, at, n, v, kk.salt);
    if (amsgrad) encode_block<State, UnsignedCodes>(vmax_codes, vmax_scales, at, n, vmax, kk.salt);
  });
}

// The compressed update of one chunk's range for every per-tensor choice (as dispatch_tensor).
// `applied`: the step's applied-step count, the int8 dither's salt at a momentum above 1/2
// (state_math.h dithered_salt).
template <class G, class P>
FUSED_HD void sgd_compressed_range(const TensorEntry& t, const StepCoefs& k, float inv_scale, int state,
                                   int64_t begin, int64_t end, int64_t lane, int64_t lanes, int32_t applied) {
  dispatch_state(state, [&](auto s) {
    sgd_compressed<G, P, decltype(s)::value>(t, k, inv_scale, begin, end, lane, lanes, t.buf != 0, t.param != 0,
                                             k.nesterov, dithered_salt(k.momentum, uint32_t(applied)));
  });
}

template <class G, class P>
FUSED_HD void adamw_compressed_range(const TensorEntry& t, const AdamWCoefs& k, float inv_scale, int state,
                                     int64_t begin, int64_t end, int64_t lane, int64_t lanes) {
  dispatch_state(state, [&](auto s) {
    adamw_compressed<G, P, decltype(s)::value>(t, k, inv_scale, begin, end, lane, lanes, t.param != 0, t.buf3 != 0);
  });
}

// The EMA over elements of one slice of a chunk, after the update of the same elements: it
// reads back the masters just written (still in cache: see for_slices), or rebuilds them from a
// BF16 param and its remainder. A loop of its own keeps the update loops (vectorized, one per
// rule and layout) free of an EMA variant each.
template <class P, class E>
FUSED_HD void ema_range(const TensorEntry& t, float a, int64_t begin, int64_t end, int64_t stride) {
  auto* e = reinterpret_cast<typename E::storage*>(t.ema);
  for (int64_t i = begin; i < end; i += stride) {
    float w;
    if constexpr (P::kRemainder8) {
      w = BF16Remainder8::rebuild(reinterpret_cast<const uint16_t*>(t.param)[i],
                                  reinterpret_cast<const int8_t*>(t.master)[i]);
    } else if constexpr (P::kRemainder) {
      w = BF16Remainder::rebuild(reinterpret_cast<const uint16_t*>(t.param)[i],
                                 reinterpret_cast<const int16_t*>(t.master)[i]);
    } else {
      w = reinterpret_cast<const float*>(t.master)[i];  // an FP32 param is its own master
    }
    e[i] = ema_element<E>(e[i], w, a);
  }
}

// Calls fn(begin, end) over a chunk's range [begin, end): at once, or with an EMA in slices of
// `slice` elements, so that the EMA of a slice reads the masters its update wrote from cache
// (a whole chunk's arrays outgrow a CPU core's L2; on a GPU, a block's chunk is long gone
// from L2 by its end), and the EMA costs its own bytes only.
template <class Fn>
FUSED_HD void for_slices(const TensorEntry& t, int64_t begin, int64_t end, int64_t slice, Fn&& fn) {
  if (t.ema == 0) {
    fn(begin, end);
    return;
  }
  for (int64_t b = begin; b < end; b += slice) fn(b, b + slice < end ? b + slice : end);
}

template <class P>
FUSED_HD void ema_chunk(const TensorEntry& t, bool bf16, float a, int64_t begin, int64_t end, int64_t stride) {
  if (t.ema == 0) return;
  if (bf16) {
    ema_range<P, BF16>(t, a, begin, end, stride);
  } else {
    ema_range<P, F32>(t, a, begin, end, stride);
  }
}

// After an applied AdamW update: the param's step += 1, once per tensor (by the caller of
// its first chunk, start 0: every tensor has one, an empty tensor an empty one).
FUSED_HD void advance_count(const TensorEntry& t, const Chunk& c) {
  if (c.start == 0 && t.count != 0) *reinterpret_cast<float*>(t.count) += 1.0f;
}

// Finalize: N, the clip coefficient, found_inf, the applied-step count, the count of skipped
// steps in a row and the dynamic loss scale, from the reduced partials. Runs once per step.
struct FinalizeArgs {
  float* scale; int32_t* growth_tracker; int32_t* hysteresis_tracker; int32_t* applied_steps;
  int32_t* consecutive_skips; StepScalars* scalars; float* grad_norm; bool* found_inf_out;
  float max_norm, growth_factor, backoff_factor, min_scale, max_scale; int32_t growth_interval, hysteresis;
  bool has_clip, norm_inf, dynamic, consecutive;
};

// The dynamic scale's rule (loss_scaler.py states it): Megatron-core's DynamicGradScaler.
// `hysteresis_tracker` counts overflowing steps since the last growth, saturating at
// `hysteresis` (H): once H of them happened, every overflow backs off until the scale grows
// again (`consecutive`: DeepSpeed's variant, where any clean step restarts the count). Growth
// on the growth_interval-th clean step in a row, as GradScaler. H = 1 is GradScaler.update.
// Counters loaded from elsewhere are clamped into range first, so no arithmetic overflows.
FUSED_HD void update_scale(const FinalizeArgs& a, float scale, bool found_inf) {
  int32_t tracker = *a.growth_tracker, overflows = *a.hysteresis_tracker;
  tracker = tracker < 0 ? 0 : (tracker >= a.growth_interval ? a.growth_interval - 1 : tracker);
  overflows = overflows < 0 ? 0 : (overflows > a.hysteresis ? a.hysteresis : overflows);
  const int32_t clean = found_inf ? 0 : tracker + 1;
  const bool grow = clean == a.growth_interval;
  if (found_inf && overflows < a.hysteresis) overflows += 1;
  if (!found_inf && (grow || a.consecutive)) overflows = 0;
  const bool back_off = found_inf && overflows >= a.hysteresis;
  const float grown = scale * a.growth_factor;
  float next = scale;
  if (back_off) {
    next = scale * a.backoff_factor;
    next = next > a.min_scale ? next : a.min_scale;
  } else if (grow && is_finite(grown)) {
    next = grown < a.max_scale ? grown : a.max_scale;
  }
  *a.scale = next;
  *a.growth_tracker = grow ? 0 : clean;
  *a.hysteresis_tracker = overflows;
}

// An int32 count + 1, saturating at 2^31 - 1: a loaded count never wraps (signed overflow).
FUSED_HD int32_t count_up(int32_t n) { return n < 0x7FFFFFFF ? n + 1 : n; }

FUSED_HD void finalize(const FinalizeArgs& a, float total, bool found_inf) {
  float norm = a.norm_inf ? total : lane_sqrt(total);
  // Finite grads whose FP32 sum of squares overflows (2^64 and more) are an overflow too: the
  // step is skipped, never clipped to a zero gradient (the torch backend decides alike).
  found_inf = found_inf || !is_finite(norm);
  if (found_inf && is_finite(norm)) norm = __builtin_inff();  // a skipped step's N is not finite
  float coef = 1.0f;
  if (a.has_clip) {
    coef = a.max_norm / (norm + 1e-6f);
    coef = coef < 1.0f ? coef : 1.0f;
  }
  const float scale = *a.scale;
  a.scalars->inv_scale = 1.0f / scale;
  a.scalars->clip_coef = coef;
  a.scalars->found_inf = found_inf ? 1.0f : 0.0f;
  *a.grad_norm = norm;
  *a.found_inf_out = found_inf;
  if (!found_inf) *a.applied_steps = count_up(*a.applied_steps);
  a.scalars->ema_weight = ema_weight(a.scalars->ema_one_minus_decay, a.scalars->ema_decay, a.scalars->ema_inv_tau,
                                     *a.applied_steps);
  *a.consecutive_skips = found_inf ? count_up(*a.consecutive_skips) : 0;
  if (a.dynamic) update_scale(a, scale, found_inf);
}

// The inverse scale pass 1 uses: the same IEEE division finalize publishes for pass 2.
FUSED_HD float inverse_scale(const float* scale) { return 1.0f / *scale; }

}  // namespace fused_opt

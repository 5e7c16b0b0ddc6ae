// The C++ CPU path: the same chunk functions as the CUDA kernels (chunks.h), one chunk per
// task, chunks spread over a persistent pool of threads. Each chunk is reduced by one thread in element order and
// the partials are summed in chunk order, so results never depend on the thread count.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "bindings.h"
#include "thread_pool.h"

namespace fused_opt {
namespace {

// Below this many elements per thread, waking a parked worker (microseconds) and sharing
// the pages costs more than it saves.
constexpr int64_t kMinElementsPerThread = int64_t(1) << 16;
// With an EMA, a chunk is updated 4,096 elements at a time (16 KB per FP32 array), each slice's
// EMA right after it: the masters it reads back are still in L1/L2 (chunks.h for_slices).
constexpr int64_t kEmaSlice = 4096;

template <class Fn>
void parallel_chunks(const Chunk* chunks, const TensorEntry* table, int64_t num_chunks, int64_t chunk_size,
                     Fn&& fn) {
  int64_t elements = 0;
  for (int64_t c = 0; c < num_chunks; ++c) elements += chunk_end(table[chunks[c].row], chunks[c], chunk_size) - chunks[c].start;
  const int64_t threads = std::min({ThreadPool::max_threads(), num_chunks, elements / kMinElementsPerThread});
  if (threads <= 1) {
    for (int64_t c = 0; c < num_chunks; ++c) fn(c);
    return;
  }
  // Contiguous ranges of chunks, one per thread: neighbouring chunks share tensors and pages.
  ThreadPool::instance().run(threads, [&](int64_t t) {
    for (int64_t c = num_chunks * t / threads; c < num_chunks * (t + 1) / threads; ++c) fn(c);
  });
}

// Pass 1 over one chunk with kLanes independent (double) accumulators, so the compiler can vectorize
// the loop without reassociating floats (no -ffast-math); lanes are then combined in a fixed
// order, so the result does not depend on the vector width.
constexpr int kLanes = 16;

#if defined(__F16C__) && defined(__AVX2__)
// 8 values of a storage type as FP32 (exact), and 8 FP32 values rounded to nearest even
// (the bits of F16::store and BF16::store).
template <class T>
__m256 load8(const typename T::storage* x);
template <>
__m256 load8<F16>(const uint16_t* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }
template <>
__m256 load8<BF16>(const uint16_t* x) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <>
__m256 load8<F32>(const float* x) { return _mm256_loadu_ps(x); }

template <class T>
__m128i round8(__m256 w);
template <>
__m128i round8<F16>(__m256 w) { return _mm256_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT); }
// BF16::store on 8 lanes (integer round to nearest even, a NaN kept quiet), then the 8 low
// halves packed: packus packs within each 128-bit half, the permute joins the halves.
template <>
__m128i round8<BF16>(__m256 w) {
  const __m256i u = _mm256_castps_si256(w);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

// retake_if_edited (sgd_math.h) on 8 masters: each rounded against its param; only a
// differing lane (an edit made outside the optimizer) takes the param.
template <class P>
__m256 retake8(const uint16_t* p, __m256 w) {
  const __m128i pv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i same = _mm_cmpeq_epi16(round8<P>(w), pv);
  if (_mm_movemask_epi8(same) == 0xFFFF) return w;  // the usual case: nothing was edited
  return _mm256_blendv_ps(load8<P>(p), w, _mm256_castsi256_ps(_mm256_cvtepi16_epi32(same)));
}

// A tensor's masters and params, 8 elements at a time: FP32 masters beside FP16/BF16 params
// (an edited param re-taken, retake8), or BF16 params with int8 remainders
// (master_weights="remainder8": state_math.h BF16Remainder8's rebuild and split on 8 lanes).
template <class P>
struct Masters8 {
  float* w;
  uint16_t* p;
  explicit Masters8(const TensorEntry& t) : w(reinterpret_cast<float*>(t.master)), p(reinterpret_cast<uint16_t*>(t.param)) {}
  explicit Masters8(const MasterOf<P>& m) : w(m.master), p(m.param) {}
  __m256 load(int64_t i) const { return retake8<P>(p + i, _mm256_loadu_ps(w + i)); }
  void store(int64_t i, __m256 wi) const {
    _mm256_storeu_ps(w + i, wi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), round8<P>(wi));
  }
};

template <>
struct Masters8<BF16Remainder8> {
  int8_t* r;
  uint16_t* p;
  explicit Masters8(const TensorEntry& t) : r(reinterpret_cast<int8_t*>(t.master)), p(reinterpret_cast<uint16_t*>(t.param)) {}
  explicit Masters8(const MasterOf<BF16Remainder8>& m) : r(m.master), p(m.param) {}
  __m256 load(int64_t i) const {
    const __m256i top = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))), 16);
    const __m256i r8 = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + i)));
    const __m256i w = _mm256_add_epi32(top, _mm256_slli_epi32(r8, 8));
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
    // BF16Remainder::rebuild's guard: where p + r crosses the sign or makes a NaN of a non-NaN
    // p (an edit no version counter saw), the master is the param itself.
    const __m256i crossed = _mm256_srai_epi32(_mm256_xor_si256(w, top), 31);
    const __m256i made_nan = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_and_si256(top, magnitude), inf),
                                                 _mm256_cmpgt_epi32(_mm256_and_si256(w, magnitude), inf));
    return _mm256_castsi256_ps(_mm256_blendv_epi8(w, top, _mm256_or_si256(crossed, made_nan)));
  }
  void store(int64_t i, __m256 wi) const {  // BF16Remainder8::split on 8 lanes
    const __m256i b = _mm256_castps_si256(wi);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
    const __m256i b24 = _mm256_and_si256(_mm256_add_epi32(b, _mm256_set1_epi32(128)), _mm256_set1_epi32(int32_t(0xFFFFFF00u)));
    const __m256i rounded = _mm256_and_si256(_mm256_add_epi32(b24, _mm256_set1_epi32(0x8000)), _mm256_set1_epi32(int32_t(0xFFFF0000u)));
    const __m256i top = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC00000), nan);
    const __m256i r8 = _mm256_andnot_si256(nan, _mm256_srai_epi32(_mm256_sub_epi32(b24, top), 8));
    const __m256i p16 = _mm256_srli_epi32(top, 16);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(p16, p16), 0x08)));
    const __m256i r16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(r8, r8), 0x08);  // 8 int16 in the low half
    const __m128i r8x8 = _mm_packs_epi16(_mm256_castsi256_si128(r16), _mm256_castsi256_si128(r16));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(r + i), r8x8);
  }
};

// The update with FP16/BF16 params (or grads), 8 values at a time: one pass that streams
// every array, converting 8 values per instruction (F16C, or integer ops for BF16), with
// sgd_element itself as the math on 8 lanes. Compiled from the scalar FP16 conversion of
// sgd_math.h (torch's own algorithm, a dozen operations per value) the loop was
// compute-bound (24 ms per 16M params here). Same bits as the scalar loop: the operators
// are lane-wise and FMA contraction is off (setup.py).
// A state buffer's 8 values stored: FP32, or (state_precision="bf16") rounded to BF16 as
// state_math.h encode_block does.
template <class S>
void store8(typename S::storage* x, __m256 v) {
  if constexpr (std::is_same_v<S, BF16>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x), round8<BF16>(v));
  } else {
    _mm256_storeu_ps(x, v);
  }
}

// S: how the state buffer is stored, F32 or BF16 (state_precision="bf16": the same loop, its
// buffer converted on the way in and out, where the block-wise compressed loop costs 1.5x).
template <class G, class P, bool HasBuf, bool HasParam, bool Nesterov, class S = F32>
void update_chunk_8wide(const TensorEntry& t, const StepCoefs& k, float inv_scale, int64_t begin, int64_t end) {
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  auto* w = reinterpret_cast<float*>(t.master);
  auto* b = reinterpret_cast<typename S::storage*>(t.buf);
  const Masters8<P> masters(t);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 wi;
    if constexpr (HasParam) wi = masters.load(i); else wi = _mm256_loadu_ps(w + i);
    __m256 bi = HasBuf ? load8<S>(b + i) : _mm256_setzero_ps();
    wi = sgd_element<HasBuf, Nesterov>(load8<G>(g + i) * inv_scale, wi, bi, k);
    if constexpr (HasParam) masters.store(i, wi); else _mm256_storeu_ps(w + i, wi);
    if constexpr (HasBuf) store8<S>(b + i, bi);
  }
  if constexpr (std::is_same_v<S, BF16> || P::kRemainder8) {
    sgd_compressed_range<G, P>(t, k, inv_scale, std::is_same_v<S, BF16> ? kStateBF16 : kStateF32, i, end, 0, 1, 0);
  } else {
    update_range<G, P, HasBuf, HasParam, Nesterov>(t, k, inv_scale, i, end, 1);
  }
}

// FP16 and BF16 (not BF16Remainder, whose update is its own loop).
template <class T>
constexpr bool kHalf = std::is_same_v<T, F16> || std::is_same_v<T, BF16>;

// The norm pass with AVX2: lane k of the 16 accumulates elements begin + k + 16j, as in the
// portable loop below, so both give the same bits.
template <class G, bool NormInf>
void partial_chunk_avx2(const typename G::storage* g, float inv_scale, int64_t begin, int64_t end, double& acc,
                        int& bad) {
  __m256 max_lo = _mm256_setzero_ps(), max_hi = _mm256_setzero_ps();
  __m256d sum[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  __m256i bad_lo = _mm256_setzero_si256(), bad_hi = _mm256_setzero_si256();
  const __m256 inv = _mm256_set1_ps(inv_scale);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i exponent = _mm256_set1_epi32(0x7F800000);
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    const __m256 lo = _mm256_mul_ps(load8<G>(g + i), inv);
    const __m256 hi = _mm256_mul_ps(load8<G>(g + i + 8), inv);
    if (NormInf) {
      bad_lo = _mm256_or_si256(bad_lo, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(lo), exponent), exponent));
      bad_hi = _mm256_or_si256(bad_hi, _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(hi), exponent), exponent));
      max_lo = _mm256_max_ps(max_lo, _mm256_andnot_ps(sign, lo));
      max_hi = _mm256_max_ps(max_hi, _mm256_andnot_ps(sign, hi));
    } else {  // squares summed in double, lanes 4k..4k+3 in sum[k] (as the portable loop)
      // The square of an FP32 value is exact in double, so the FMA rounds where mul + add would:
      // same bits, half the instructions (this loop, not memory, bounded the pass).
      const __m256d q[4] = {_mm256_cvtps_pd(_mm256_castps256_ps128(lo)), _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)),
                            _mm256_cvtps_pd(_mm256_castps256_ps128(hi)), _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1))};
      for (int k = 0; k < 4; ++k) sum[k] = _mm256_fmadd_pd(q[k], q[k], sum[k]);
    }
  }
  alignas(32) float maxima[kLanes];
  alignas(32) double sums[kLanes];
  alignas(32) int32_t lane_bad[kLanes];
  _mm256_store_ps(maxima, max_lo);
  _mm256_store_ps(maxima + 8, max_hi);
  for (int k = 0; k < 4; ++k) _mm256_store_pd(sums + 4 * k, sum[k]);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_bad), bad_lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane_bad + 8), bad_hi);
  for (int k = 0; k < kLanes; ++k) {
    acc = NormInf ? std::max(acc, double(maxima[k])) : acc + sums[k];
    // A lane's double sum of squares of finite FP32 values stays finite (65,536 x 3.4e38^2 is
    // far below DBL_MAX), and an inf or NaN anywhere leaves it inf or NaN: no per-value check.
    bad |= NormInf ? lane_bad[k] != 0 : !std::isfinite(sums[k]);
  }
  TensorEntry tail{reinterpret_cast<int64_t>(g), 0, 0, 0, end, 0, 0};
  partial_range<G>(tail, inv_scale, NormInf, i, end, 1, acc, bad);
}
#endif

template <class G, bool NormInf>
void partial_chunk(const TensorEntry& t, float inv_scale, int64_t begin, int64_t end, double& acc, int& bad) {
#if defined(__F16C__) && defined(__AVX2__)
  partial_chunk_avx2<G, NormInf>(reinterpret_cast<const typename G::storage*>(t.grad), inv_scale, begin, end, acc, bad);
#else
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  double lane_acc[kLanes] = {};
  int lane_bad[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      accumulate_norm(unscale<G>(g[i + k], inv_scale), NormInf, lane_acc[k], lane_bad[k]);
    }
  }
  for (int k = 0; k < kLanes; ++k) {
    acc = NormInf ? std::max(acc, lane_acc[k]) : acc + lane_acc[k];
    bad |= lane_bad[k];
  }
  partial_range<G>(t, inv_scale, NormInf, i, end, 1, acc, bad);
#endif
}

template <class G, class P, bool HasBuf, bool HasParam, bool Nesterov>
void update_chunk(const TensorEntry& t, const StepCoefs& coefs, float inv_scale, int64_t begin, int64_t end) {
#if defined(__F16C__) && defined(__AVX2__)
  if constexpr (HasParam ? kHalf<P> : kHalf<G>) {
    update_chunk_8wide<G, P, HasBuf, HasParam, Nesterov>(t, coefs, inv_scale, begin, end);
    return;
  }
#endif
  update_range<G, P, HasBuf, HasParam, Nesterov>(t, coefs, inv_scale, begin, end, 1);
}

void partials(const PartialsArgs& a, int64_t /*stream*/) {
  const auto* chunks = reinterpret_cast<const Chunk*>(a.chunks);
  const auto* table = reinterpret_cast<const TensorEntry*>(a.table);
  const float inv_scale = inverse_scale(reinterpret_cast<const float*>(a.scale));
  dispatch_dtype(a.grad_dtype, [&](auto g) {
    using G = decltype(g);
    parallel_chunks(chunks, table, a.num_chunks, a.chunk_size, [&](int64_t c) {
      const TensorEntry& t = table[chunks[c].row];
      double acc = 0.0;
      int bad = 0;
      const int64_t end = chunk_end(t, chunks[c], a.chunk_size);
      if (a.norm_inf) {
        partial_chunk<G, true>(t, inv_scale, chunks[c].start, end, acc, bad);
      } else {
        partial_chunk<G, false>(t, inv_scale, chunks[c].start, end, acc, bad);
      }
      reinterpret_cast<float*>(a.partials)[c] = float(acc);
      reinterpret_cast<int32_t*>(a.flags)[c] = bad;
    });
  });
}

// The norm pass's partials reduced in order, in double: hundreds of them are summed (see
// accumulate_norm).
void reduce_partials(const ReduceArgs& r, bool norm_inf, double& total, int& bad) {
  const auto* partials = reinterpret_cast<const float*>(r.partials);
  const auto* flags = reinterpret_cast<const int32_t*>(r.flags);
  total = 0.0;
  bad = 0;
  for (int64_t c = 0; c < r.num_chunks; ++c) {
    total = norm_inf ? std::max(total, double(partials[c])) : total + partials[c];
    bad |= flags[c];
  }
}

void finalize_step(const ReduceArgs& r, const FinalizeArgs& a, int64_t /*stream*/) {
  double total;
  int bad;
  reduce_partials(r, a.norm_inf, total, bad);
  finalize(a, float(total), bad != 0);
}

// Sharded params (bindings.h, step): this rank's partials folded into the pair that crosses
// ranks, float[2] = {statistic, inf flag}, and the global pair put back as slot 0.
void fold_partials(const ReduceArgs& r, int64_t stats, bool norm_inf, int64_t /*stream*/) {
  double total;
  int bad;
  reduce_partials(r, norm_inf, total, bad);
  reinterpret_cast<float*>(stats)[0] = float(total);
  reinterpret_cast<float*>(stats)[1] = bad != 0 ? 1.0f : 0.0f;
}

void unfold_partials(const ReduceArgs& r, int64_t stats, int64_t /*stream*/) {
  const auto* pair = reinterpret_cast<const float*>(stats);
  reinterpret_cast<float*>(r.partials)[0] = pair[0];
  reinterpret_cast<int32_t*>(r.flags)[0] = pair[1] != 0.0f;
}

#if defined(__F16C__) && defined(__AVX2__)
// AdamW 8 values at a time (as update_chunk_8wide), adamw_element on 8 lanes.
template <class G, class P, bool HasParam, bool AmsGrad, class S = F32>
void adamw_chunk_8wide(const TensorEntry& t, const AdamWCoefs& k, float inv_scale, int64_t begin, int64_t end) {
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  auto* w = reinterpret_cast<float*>(t.master);
  auto* m = reinterpret_cast<typename S::storage*>(t.buf);
  auto* v = reinterpret_cast<typename S::storage*>(t.buf2);
  auto* vmax = reinterpret_cast<typename S::storage*>(t.buf3);
  const Masters8<P> masters(t);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    __m256 wi;
    if constexpr (HasParam) wi = masters.load(i); else wi = _mm256_loadu_ps(w + i);
    __m256 mi = load8<S>(m + i), vi = load8<S>(v + i);
    __m256 vmaxi = AmsGrad ? load8<S>(vmax + i) : _mm256_setzero_ps();
    wi = adamw_element<AmsGrad>(load8<G>(g + i) * inv_scale, wi, mi, vi, vmaxi, k);
    if constexpr (HasParam) masters.store(i, wi); else _mm256_storeu_ps(w + i, wi);
    store8<S>(m + i, mi);
    store8<S>(v + i, vi);
    if constexpr (AmsGrad) store8<S>(vmax + i, vmaxi);
  }
  if constexpr (std::is_same_v<S, BF16> || P::kRemainder8) {
    adamw_compressed_range<G, P>(t, k, inv_scale, std::is_same_v<S, BF16> ? kStateBF16 : kStateF32, i, end, 0, 1);
  } else {
    adamw_range<G, P, HasParam, AmsGrad>(t, k, inv_scale, i, end, 1);
  }
}
#endif

template <class G, class P, bool HasParam, bool AmsGrad>
void adamw_chunk(const TensorEntry& t, const AdamWCoefs& k, float inv_scale, int64_t begin, int64_t end) {
#if defined(__F16C__) && defined(__AVX2__)
  // BF16 remainders take the scalar loop (their master column is int16).
  if constexpr (!P::kRemainder && (!HasParam || kHalf<P>)) {
    adamw_chunk_8wide<G, P, HasParam, AmsGrad>(t, k, inv_scale, begin, end);
    return;
  }
#endif
  adamw_range<G, P, HasParam, AmsGrad>(t, k, inv_scale, begin, end, 1);
}

// Whether a tensor's update takes an 8-wide loop that keeps state other than FP32, or masters
// that are remainders: the AVX2 module, with BF16 state beside FP16/BF16 params and FP32
// masters, or FP32 or BF16 state beside remainder8 masters (int8 state keeps the block loop).
template <class P>
bool state_8wide(int state, const TensorEntry& t) {
#if defined(__F16C__) && defined(__AVX2__)
  if (t.param == 0) return false;
  if constexpr (P::kRemainder8) return state != kStateInt8;
  return kHalf<P> && state == kStateBF16;
#else
  return false;
#endif
}

void update_adamw(const UpdateArgs& a, const StepScalars& s) {
  const auto* chunks = reinterpret_cast<const Chunk*>(a.chunks);
  const auto* table = reinterpret_cast<const TensorEntry*>(a.table);
  const auto* groups = reinterpret_cast<const AdamWHyper*>(a.groups);
  dispatch_update_dtypes(a, [&](auto g, auto p) {
    using G = decltype(g);
    using P = decltype(p);
    parallel_chunks(chunks, table, a.num_chunks, a.chunk_size, [&](int64_t c) {
      const TensorEntry& t = table[chunks[c].row];
      const float step = t.count != 0 ? *reinterpret_cast<const float*>(t.count) : 0.0f;
      const AdamWCoefs k = adamw_coefs(groups[t.group], s.clip_coef, step);
      for_slices(t, chunks[c].start, chunk_end(t, chunks[c], a.chunk_size), kEmaSlice, [&](int64_t b, int64_t e) {
        if (state_8wide<P>(a.state, t)) {
#if defined(__F16C__) && defined(__AVX2__)
          if constexpr (kHalf<P> || P::kRemainder8) {
            dispatch_adamw_tensor(t, [&](auto, auto amsgrad) {
              if (a.state == kStateBF16) {
                adamw_chunk_8wide<G, P, true, decltype(amsgrad)::value, BF16>(t, k, s.inv_scale, b, e);
              } else {
                adamw_chunk_8wide<G, P, true, decltype(amsgrad)::value, F32>(t, k, s.inv_scale, b, e);
              }
            });
          }
#endif
        } else if (P::kRemainder8 || a.state != kStateF32) {
          adamw_compressed_range<G, P>(t, k, s.inv_scale, a.state, b, e, 0, 1);
        } else {
          dispatch_adamw_tensor(t, [&](auto has_param, auto amsgrad) {
            adamw_chunk<G, P, decltype(has_param)::value, decltype(amsgrad)::value>(t, k, s.inv_scale, b, e);
          });
        }
        ema_chunk<P>(t, a.ema_dtype == kBFloat16, s.ema_weight, b, e, 1);
      });
    });
  });
  for (int64_t c = 0; c < a.num_chunks; ++c) advance_count(table[chunks[c].row], chunks[c]);
}

void update(const UpdateArgs& a, int64_t /*stream*/) {
  const auto* scalars = reinterpret_cast<const StepScalars*>(a.scalars);
  if (scalars->found_inf != 0.0f) return;  // a skipped step writes nothing
  if (a.rule == kAdamW) {
    update_adamw(a, *scalars);
    return;
  }
  const auto* chunks = reinterpret_cast<const Chunk*>(a.chunks);
  const auto* table = reinterpret_cast<const TensorEntry*>(a.table);
  const auto* groups = reinterpret_cast<const SGDHyper*>(a.groups);
  const int32_t applied = *reinterpret_cast<const int32_t*>(a.applied_steps);
  dispatch_update_dtypes(a, [&](auto g, auto p) {
    using G = decltype(g);
    using P = decltype(p);
    parallel_chunks(chunks, table, a.num_chunks, a.chunk_size, [&](int64_t c) {
      const TensorEntry& t = table[chunks[c].row];
      const SGDHyper& h = groups[t.group];
      const StepCoefs coefs = step_coefs(h, scalars->clip_coef, claim_first_step(t, applied, true));
      for_slices(t, chunks[c].start, chunk_end(t, chunks[c], a.chunk_size), kEmaSlice, [&](int64_t b, int64_t e) {
        if (state_8wide<P>(a.state, t)) {
#if defined(__F16C__) && defined(__AVX2__)
          if constexpr (kHalf<P> || P::kRemainder8) {
            dispatch_tensor(t, coefs.nesterov, [&](auto has_buf, auto, auto nesterov) {
              constexpr bool kBuf = decltype(has_buf)::value, kNesterov = decltype(nesterov)::value;
              if (a.state == kStateBF16) {
                update_chunk_8wide<G, P, kBuf, true, kNesterov, BF16>(t, coefs, scalars->inv_scale, b, e);
              } else {
                update_chunk_8wide<G, P, kBuf, true, kNesterov, F32>(t, coefs, scalars->inv_scale, b, e);
              }
            });
          }
#endif
        } else if (P::kRemainder8 || a.state != kStateF32) {  // (no fast loop with an int8 master column)
          sgd_compressed_range<G, P>(t, coefs, scalars->inv_scale, a.state, b, e, 0, 1, applied);
        } else {
          dispatch_tensor(t, coefs.nesterov, [&](auto has_buf, auto has_param, auto nesterov) {
            update_chunk<G, P, decltype(has_buf)::value, decltype(has_param)::value, decltype(nesterov)::value>(
                t, coefs, scalars->inv_scale, b, e);
          });
        }
        ema_chunk<P>(t, a.ema_dtype == kBFloat16, scalars->ema_weight, b, e, 1);
      });
    });
  });
}

// Muon's stages on one stack (muon_math.h): contiguous ranges of its elements, one per thread.
template <class Fn>
void parallel_range(int64_t n, Fn&& fn) {
  const int64_t threads = std::min(ThreadPool::max_threads(), n / kMinElementsPerThread);
  if (threads <= 1) {
    fn(int64_t(0), n);
    return;
  }
  ThreadPool::instance().run(threads, [&](int64_t t) { fn(n * t / threads, n * (t + 1) / threads); });
}

void launch_muon_momentum(const float* u, float* buf, uint16_t* update, int64_t n, const bool* found_inf,
                          const MuonMomentumArgs& k, int64_t) {
  with_flags([&](auto small_b, auto small_u, auto nesterov, auto write) {
    parallel_range(n, [&](int64_t b, int64_t e) {
      muon_momentum_range<small_b.value, small_u.value, nesterov.value, write.value>(UnscaledRows{u}, buf, update, b,
                                                                                     e, 1, k);
    });
  }, lerp_weight_small(k.one_minus_mu), lerp_weight_small(k.mu), k.nesterov, !*found_inf);
}

// The elements [b, e) of a stack of members of `per` elements, member by member, so each inner
// loop runs over one param's contiguous elements: fn(m, begin, end) in the member's indices.
template <class Fn>
void for_members(int64_t per, int64_t b, int64_t e, Fn&& fn) {
  if (per == 0) return;  // empty members (a 0 x n matrix): nothing to step, and no division by 0
  for (int64_t m = b / per; m * per < e; ++m) {
    fn(m, std::max(b, m * per) - m * per, std::min(e, (m + 1) * per) - m * per);
  }
}

// The momentum stage from the members' raw grads (`grads`: their addresses, `per` elements
// each, in the stack's order), unscaled by *inv_scale and clipped by *clip (null: not clipped).
void launch_muon_momentum_grads(const void* const* grads, int grad_dtype, const float* inv_scale, const float* clip,
                                float* buf, uint16_t* update, int64_t per, int64_t n, const bool* found_inf,
                                const MuonMomentumArgs& k, int64_t) {
  const float s = *inv_scale, c = clip != nullptr ? *clip : 1.0f;
  dispatch_dtype(grad_dtype, [&](auto g) {
    using G = decltype(g);
    with_flags([&](auto small_b, auto small_u, auto nesterov, auto write) {
      parallel_range(n, [&](int64_t b, int64_t e) {
        for_members(per, b, e, [&](int64_t m, int64_t lo, int64_t hi) {
          const ScaledGrad<G> u{static_cast<const typename G::storage*>(grads[m]), s, c};
          muon_momentum_range<small_b.value, small_u.value, nesterov.value, write.value>(u, buf + m * per,
                                                                                         update + m * per, lo, hi, 1, k);
        });
      });
    }, lerp_weight_small(k.one_minus_mu), lerp_weight_small(k.mu), k.nesterov, !*found_inf);
  });
}

// Muon's weight step over one member's elements [begin, end): with AVX2, 8 at a time for the
// param storages Masters8 has (FP16/BF16 beside FP32 masters, BF16 with int8 remainders),
// muon_apply on 8 lanes (one FMA, as fmaf; the same bits); the rest element by element. The
// scalar loop's re-take and rounding kept it compute-bound (2x the momentum stage's time).
template <class P>
void muon_apply_member(const MasterOf<P>& m, const uint16_t* update, int64_t begin, int64_t end, float decay,
                       float alpha) {
#if defined(__F16C__) && defined(__AVX2__)
  if constexpr (kHalf<P> || P::kRemainder8) {
    const Masters8<P> masters(m);
    const __m256 d = _mm256_set1_ps(decay), a = _mm256_set1_ps(alpha);
    for (; begin + 8 <= end; begin += 8) {
      masters.store(begin, _mm256_fmadd_ps(a, load8<BF16>(update + begin), _mm256_mul_ps(masters.load(begin), d)));
    }
  }
#endif
  muon_apply_range<P>(m, update, begin, end, 1, decay, alpha);
}

void launch_muon_apply(void* masters, const uint16_t* update, uint16_t* const* params, int64_t per, int64_t n,
                       const bool* found_inf, float decay, float alpha, int param_dtype, int64_t) {
  if (*found_inf) return;  // a skipped step writes nothing
  dispatch_stack_param(param_dtype, [&](auto p) {
    using P = decltype(p);
    parallel_range(n, [&](int64_t b, int64_t e) {
      for_members(per, b, e, [&](int64_t m, int64_t lo, int64_t hi) {
        muon_apply_member<P>(member_of<P>(masters, params, per, m), update + m * per, lo, hi, decay, alpha);
      });
    });
  });
}

// MuSGD's weight step over one member's elements, as muon_apply_member: musgd_apply on 8
// lanes (the Muon part's O * s rounded to BF16 as theirs, (b * mu) + d in two roundings).
template <class P, bool kMuon, bool kDecay, bool kNesterov>
void musgd_apply_member(const MasterOf<P>& m, const uint16_t* update, const float* u, float* buf, int64_t begin,
                        int64_t end, const MuSGDArgs& k) {
#if defined(__F16C__) && defined(__AVX2__)
  if constexpr (kHalf<P> || P::kRemainder8) {
    const Masters8<P> masters(m);
    const __m256 muon_alpha = _mm256_set1_ps(k.muon_alpha), scale = _mm256_set1_ps(k.scale);
    const __m256 weight_decay = _mm256_set1_ps(k.weight_decay), mu = _mm256_set1_ps(k.mu);
    const __m256 sgd_alpha = _mm256_set1_ps(k.sgd_alpha);
    for (; begin + 8 <= end; begin += 8) {
      __m256 w = masters.load(begin);
      if constexpr (kMuon) {
        const __m128i o = round8<BF16>(_mm256_mul_ps(load8<BF16>(update + begin), scale));
        w = _mm256_fmadd_ps(muon_alpha, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(o), 16)), w);
      }
      const __m256 ui = _mm256_loadu_ps(u + begin);
      const __m256 d = kDecay ? _mm256_fmadd_ps(weight_decay, w, ui) : ui;
      const __m256 nb = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(buf + begin), mu), d);
      _mm256_storeu_ps(buf + begin, nb);
      masters.store(begin, _mm256_fmadd_ps(sgd_alpha, kNesterov ? _mm256_fmadd_ps(mu, nb, d) : nb, w));
    }
  }
#endif
  musgd_apply_range<P, kMuon, kDecay, kNesterov>(m, update, u, buf, begin, end, 1, k);
}

void launch_musgd_apply(void* masters, const uint16_t* update, const float* u, float* buf, uint16_t* const* params,
                        int64_t per, int64_t n, const bool* found_inf, const MuSGDArgs& k, bool nesterov,
                        int param_dtype, int64_t) {
  if (*found_inf) return;  // a skipped step writes nothing
  dispatch_stack_param(param_dtype, [&](auto p) {
    using P = decltype(p);
    with_flags([&](auto muon, auto decay, auto nest) {
      parallel_range(n, [&](int64_t b, int64_t e) {
        for_members(per, b, e, [&](int64_t m, int64_t lo, int64_t hi) {
          musgd_apply_member<P, muon.value, decay.value, nest.value>(
              member_of<P>(masters, params, per, m), muon.value ? update + m * per : nullptr, u + m * per,
              buf + m * per, lo, hi, k);
        });
      });
    }, update != nullptr, k.weight_decay != 0.0f, nesterov);
  });
}

// The stack's blocks [j0, j1) as (member, first element in it, count), walked without a
// division per block (two 64-bit divisions per 32 elements were a visible share of the codec's
// time), each asking for the memory of the block kPrefetchBlocks ahead (state_math.h).
template <class Fn>
void for_stack_blocks(int64_t per, int64_t j0, int64_t j1, Fn&& fn) {
  const int64_t blocks_per = (per + kStateBlock - 1) / kStateBlock;
  if (blocks_per == 0 || j0 >= j1) return;  // empty members: no blocks
  int64_t m = j0 / blocks_per, at = (j0 % blocks_per) * kStateBlock;
  for (int64_t j = j0; j < j1; ++j) {
    fn(m, at, int(per - at < kStateBlock ? per - at : kStateBlock));
    at += kStateBlock;
    if (at >= per) {
      at = 0;
      ++m;
    }
  }
}

// fn(member, first element, count) over a stack's blocks, split over the threads.
template <class Fn>
void parallel_stack_blocks(int64_t rows, int64_t per, Fn&& fn) {
  parallel_range(rows * ((per + kStateBlock - 1) / kStateBlock) * kStateBlock, [&](int64_t b, int64_t e) {
    for_stack_blocks(per, b / kStateBlock, e / kStateBlock, fn);
  });
}

void launch_state_decode(const void* codes, const float* scales, float* out, int64_t rows, int64_t per,
                         bool is_signed, int64_t) {
  const int64_t blocks_per = (per + kStateBlock - 1) / kStateBlock;
  auto decode = [&](auto codes_of) {
    using Codes = decltype(codes_of);
    const auto* c = static_cast<const typename Codes::storage*>(codes);
    parallel_stack_blocks(rows, per, [&](int64_t m, int64_t at, int n) {
      prefetch_block<typename Codes::storage>(c + m * per, at);
      decode_block<kStateInt8, Codes>(c + m * per, scales + m * blocks_per, at, n, out + m * per + at);
    });
  };
  if (is_signed) decode(SignedCodes{}); else decode(UnsignedCodes{});
}

// Writes nothing on a skipped step; `salts` one int32 per member, or one for all (salt_per_row).
void launch_state_encode(const float* x, void* codes, float* scales, int64_t rows, int64_t per, bool is_signed,
                         const int32_t* salts, bool salt_per_row, const bool* found_inf, int64_t) {
  if (*found_inf) return;
  const int64_t blocks_per = (per + kStateBlock - 1) / kStateBlock;
  auto encode = [&](auto codes_of) {
    using Codes = decltype(codes_of);
    auto* c = static_cast<typename Codes::storage*>(codes);
    parallel_stack_blocks(rows, per, [&](int64_t m, int64_t at, int n) {
      prefetch_block<float>(x + m * per, at);
      encode_block<kStateInt8, Codes>(c + m * per, scales + m * blocks_per, at, n, x + m * per + at,
                                      uint32_t(salts[salt_per_row ? m : 0]));
    });
  };
  if (is_signed) encode(SignedCodes{}); else encode(UnsignedCodes{});
}

}  // namespace
}  // namespace fused_opt

// Built twice (setup.py): portable as _native_cpu, with AVX2/F16C as _native_cpu_avx2; the
// Python side loads the fastest one the CPU it runs on supports (native_backend.py).
#ifndef FUSED_OPT_CPU_MODULE
#define FUSED_OPT_CPU_MODULE _native_cpu
#endif
#if defined(__F16C__) && defined(__AVX2__)
#define FUSED_OPT_CPU_PATH "avx2"
#else
#define FUSED_OPT_CPU_PATH "portable"
#endif

PYBIND11_MODULE(FUSED_OPT_CPU_MODULE, m) {
  m.doc() = "fused_opt C++ CPU kernels";
  m.attr("CPU_PATH") = FUSED_OPT_CPU_PATH;
  fused_opt::bind_step(m, fused_opt::partials, fused_opt::finalize_step, fused_opt::update, fused_opt::fold_partials,
                       fused_opt::unfold_partials);
  fused_opt::bind_muon(m, fused_opt::launch_muon_momentum, fused_opt::launch_muon_momentum_grads,
                       fused_opt::launch_muon_apply, fused_opt::launch_musgd_apply, fused_opt::launch_state_decode,
                       fused_opt::launch_state_encode);
  // The pool's thread limit, which native_backend.py keeps at torch.get_num_threads().
  m.def("set_num_threads", [](int64_t n) { fused_opt::ThreadPool::thread_limit() = std::max<int64_t>(1, n); });
  m.def("num_threads", [] { return fused_opt::ThreadPool::max_threads(); });
  // Whether each of n host words (at the addresses in `addrs`) still holds the value in
  // `values`: the flat step's check that no param's storage moved (flat_storage.py), which
  // reads one word per param instead of a Python call per param.
  m.def("words_equal", [](int64_t addrs, int64_t values, int64_t n) {
    const auto* a = reinterpret_cast<const int64_t* const*>(addrs);
    const auto* v = reinterpret_cast<const int64_t*>(values);
    for (int64_t i = 0; i < n; ++i) {
      if (*a[i] != v[i]) return false;
    }
    return true;
  });
  // One row of `kRowWords` int64 words per tensor of the Python list `tensors`, read from
  // their TensorImpls at offsets tensor_watch.py finds and verifies once per process (the
  // TensorImpl pointer at `cdata` in the Python object, where torch versions that hold a
  // c10::MaybeOwned<Tensor> there keep its is-borrowed flag at `borrowed`, else -1; the storage's data pointer; the dim,
  // sizes and strides, slots past the dim zeroed since torch leaves them uninitialized; the
  // storage offset, numel, dtype and device; the dispatch key set). A step compares its
  // tensors with the last step's through these rows: one call instead of several Python
  // calls per tensor. False (rows incomplete) when an item is not a `tensor_type`, holds a
  // borrowed tensor, has no storage or more than kInlineDims dims (torch then keeps its sizes
  // elsewhere): the caller reads those lists in Python.
  m.def("tensor_rows", [](pybind11::list tensors, pybind11::handle tensor_type, int64_t borrowed, int64_t cdata,
                          int64_t storage_field,
                          int64_t storage_ptr, int64_t sizes, int64_t type_word, int64_t key_word, int64_t out) {
    constexpr int64_t kInlineDims = 5, kRowWords = 16;
    constexpr int64_t kDtypeDeviceMask = 0xFFFFFFFFFFLL;  // dtype (2 bytes), optional<Device> (3); not the bit flags
    auto* type = reinterpret_cast<PyTypeObject*>(tensor_type.ptr());
    auto* row = reinterpret_cast<int64_t*>(out);
    auto word = [](const char* base, int64_t offset) { return *reinterpret_cast<const int64_t*>(base + offset); };
    const int64_t n = static_cast<int64_t>(PyList_GET_SIZE(tensors.ptr()));
    for (int64_t i = 0; i < n; ++i, row += kRowWords) {
      PyObject* item = PyList_GET_ITEM(tensors.ptr(), i);
      if (!PyObject_TypeCheck(item, type)) return false;
      const char* object = reinterpret_cast<const char*>(item);
      if (borrowed >= 0 && object[borrowed] != 0) return false;  // a c10::MaybeOwned<Tensor> that borrows
      const auto* impl = reinterpret_cast<const char*>(word(object, cdata));
      const auto* storage = reinterpret_cast<const char*>(word(impl, storage_field));
      const int64_t dim = word(impl, sizes);
      if (storage == nullptr || dim < 0 || dim > kInlineDims) return false;
      row[0] = word(storage, storage_ptr);
      row[1] = dim;
      for (int64_t k = 0; k < kInlineDims; ++k) {
        row[2 + k] = k < dim ? word(impl, sizes + 8 * (1 + k)) : 0;
        row[2 + kInlineDims + k] = k < dim ? word(impl, sizes + 8 * (1 + kInlineDims + k)) : 0;
      }
      row[12] = word(impl, sizes + 8 * (1 + 2 * kInlineDims));      // storage offset
      row[13] = word(impl, sizes + 8 * (2 + 2 * kInlineDims));      // numel
      row[14] = word(impl, type_word) & kDtypeDeviceMask;
      row[15] = word(impl, key_word);
    }
    return true;
  });
}

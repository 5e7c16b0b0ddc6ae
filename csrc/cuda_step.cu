// The CUDA path: multi-tensor apply in the style of apex's multi_tensor_apply, with the
// tensor table in device memory (so any number of tensors fits one launch) and 64-bit
// indices. One block per chunk; the chunk work is the CPU's (chunks.h) with stride = threads.
// All launches go on the caller's stream and read the step's scalars from device memory:
// the host never waits.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "bindings.h"

namespace fused_opt {
namespace {

constexpr int kThreads = 512;          // per chunk block: 65536-element chunks = 128 per thread
constexpr int kFinalizeThreads = 1024;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("fused_opt native CUDA: ") + what + ": " + cudaGetErrorString(err));
}

// Fixed-shape tree reduction in shared memory: the same inputs give the same bits (no atomics).
template <int N>
__device__ void block_reduce(float* acc, int* bad, bool norm_inf) {
  for (int width = N / 2; width > 0; width /= 2) {
    __syncthreads();
    if (threadIdx.x < width) {
      const float other = acc[threadIdx.x + width];
      acc[threadIdx.x] = norm_inf ? fmaxf(acc[threadIdx.x], other) : acc[threadIdx.x] + other;
      bad[threadIdx.x] |= bad[threadIdx.x + width];
    }
  }
  __syncthreads();
}

// Vectorized access: 4 consecutive elements per load (16 B of FP32, 8 B of FP16/BF16), used
// when every address of a tensor is aligned for it, so each thread keeps more bytes in flight.
template <class T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

template <class T>
__device__ bool aligned4(int64_t address, int64_t start) {
  return (address + start * int64_t(sizeof(T))) % (4 * sizeof(T)) == 0;
}

template <class G>
__device__ void partial_chunk(const TensorEntry& t, float inv_scale, bool norm_inf, int64_t start, int64_t end,
                              float& acc, int& bad) {
  using GS = typename G::storage;
  int64_t vec_end = start;
  if (aligned4<GS>(t.grad, start)) {
    const int64_t n4 = (end - start) / 4;
    const auto* g4 = reinterpret_cast<const Vec4<GS>*>(reinterpret_cast<const GS*>(t.grad) + start);
    for (int64_t k = threadIdx.x; k < n4; k += kThreads) {
      const Vec4<GS> g = g4[k];
#pragma unroll
      for (int e = 0; e < 4; ++e) accumulate_norm(unscale<G>(g.v[e], inv_scale), norm_inf, acc, bad);
    }
    vec_end = start + 4 * n4;
  }
  partial_range<G>(t, inv_scale, norm_inf, vec_end + threadIdx.x, end, kThreads, acc, bad);
}

template <class G, class P, bool HasBuf, bool HasParam, bool Nesterov>
__device__ void update_chunk(const TensorEntry& t, const StepCoefs& coefs, float inv_scale, int64_t start,
                             int64_t end) {
  using GS = typename G::storage;
  using PS = typename P::storage;
  int64_t vec_end = start;
  // BF16Remainder params take the scalar loop (update_range): their master column is int16.
  if (!P::kRemainder && aligned4<GS>(t.grad, start) && aligned4<float>(t.master, start) &&
      aligned4<float>(t.buf, start) && aligned4<PS>(t.param, start)) {
    const int64_t n4 = (end - start) / 4;
    const auto* g4 = reinterpret_cast<const Vec4<GS>*>(reinterpret_cast<const GS*>(t.grad) + start);
    auto* w4 = reinterpret_cast<Vec4<float>*>(reinterpret_cast<float*>(t.master) + start);
    auto* b4 = reinterpret_cast<Vec4<float>*>(reinterpret_cast<float*>(t.buf) + start);
    auto* p4 = reinterpret_cast<Vec4<PS>*>(reinterpret_cast<PS*>(t.param) + start);
    for (int64_t k = threadIdx.x; k < n4; k += kThreads) {
      const Vec4<GS> g = g4[k];
      Vec4<float> w = w4[k], b;
      if (HasBuf) b = b4[k];
      Vec4<PS> p;
      if (HasParam) p = p4[k];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (HasParam) w.v[e] = retake_if_edited<P>(p.v[e], w.v[e]);
        w.v[e] = sgd_element<HasBuf, Nesterov>(unscale<G>(g.v[e], inv_scale), w.v[e], b.v[e], coefs);
        if (HasParam) p.v[e] = P::store(w.v[e]);
      }
      w4[k] = w;
      if (HasBuf) b4[k] = b;
      if (HasParam) p4[k] = p;
    }
    vec_end = start + 4 * n4;
  }
  update_range<G, P, HasBuf, HasParam, Nesterov>(t, coefs, inv_scale, vec_end + threadIdx.x, end, kThreads);
}

// With an EMA, a block updates its chunk 8,192 elements at a time and runs each slice's EMA
// right after it (chunks.h for_slices), while the slice's masters are in L1/L2; the barrier
// makes the block's writes visible to every thread of it, whichever thread wrote them.
constexpr int64_t kEmaSlice = 8192;

template <class P>
__device__ void ema_slice(const UpdateArgs& a, const StepScalars& s, const TensorEntry& t, int64_t begin,
                          int64_t end) {
  if (t.ema == 0) return;  // uniform over the block
  __syncthreads();
  ema_chunk<P>(t, a.ema_dtype == kBFloat16, s.ema_weight, begin + threadIdx.x, end, kThreads);
}

template <class G>
__global__ void __launch_bounds__(kThreads) partials_kernel(PartialsArgs a) {
  __shared__ float acc[kThreads];
  __shared__ int bad[kThreads];
  const Chunk c = reinterpret_cast<const Chunk*>(a.chunks)[blockIdx.x];
  const TensorEntry t = reinterpret_cast<const TensorEntry*>(a.table)[c.row];
  float my_acc = 0.0f;
  int my_bad = 0;
  partial_chunk<G>(t, inverse_scale(reinterpret_cast<const float*>(a.scale)), a.norm_inf, c.start,
                   chunk_end(t, c, a.chunk_size), my_acc, my_bad);
  acc[threadIdx.x] = my_acc;
  bad[threadIdx.x] = my_bad;
  block_reduce<kThreads>(acc, bad, a.norm_inf);
  if (threadIdx.x == 0) {
    reinterpret_cast<float*>(a.partials)[blockIdx.x] = acc[0];
    reinterpret_cast<int32_t*>(a.flags)[blockIdx.x] = bad[0];
  }
}

// The norm pass's partials reduced by one block into acc[0] and bad[0].
__device__ void reduce_partials(const ReduceArgs& r, bool norm_inf, float* acc, int* bad) {
  const auto* partials = reinterpret_cast<const float*>(r.partials);
  const auto* flags = reinterpret_cast<const int32_t*>(r.flags);
  float my_acc = 0.0f;
  int my_bad = 0;
  for (int64_t i = threadIdx.x; i < r.num_chunks; i += kFinalizeThreads) {
    my_acc = norm_inf ? fmaxf(my_acc, partials[i]) : my_acc + partials[i];
    my_bad |= flags[i];
  }
  acc[threadIdx.x] = my_acc;
  bad[threadIdx.x] = my_bad;
  block_reduce<kFinalizeThreads>(acc, bad, norm_inf);
}

__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(ReduceArgs r, FinalizeArgs a) {
  __shared__ float acc[kFinalizeThreads];
  __shared__ int bad[kFinalizeThreads];
  reduce_partials(r, a.norm_inf, acc, bad);
  if (threadIdx.x == 0) finalize(a, acc[0], bad[0] != 0);
}

// Sharded params (bindings.h, step): this rank's partials folded into the pair that crosses
// ranks, float[2] = {statistic, inf flag}, and the global pair put back as slot 0.
__global__ void __launch_bounds__(kFinalizeThreads) fold_kernel(ReduceArgs r, float* stats, bool norm_inf) {
  __shared__ float acc[kFinalizeThreads];
  __shared__ int bad[kFinalizeThreads];
  reduce_partials(r, norm_inf, acc, bad);
  if (threadIdx.x == 0) {
    stats[0] = acc[0];
    stats[1] = bad[0] != 0 ? 1.0f : 0.0f;
  }
}

__global__ void unfold_kernel(ReduceArgs r, const float* stats) {
  reinterpret_cast<float*>(r.partials)[0] = stats[0];
  reinterpret_cast<int32_t*>(r.flags)[0] = stats[1] != 0.0f;
}

template <class G, class P>
__global__ void __launch_bounds__(kThreads) update_kernel(UpdateArgs a) {
  const StepScalars s = *reinterpret_cast<const StepScalars*>(a.scalars);
  if (s.found_inf != 0.0f) return;  // a skipped step writes nothing
  const Chunk c = reinterpret_cast<const Chunk*>(a.chunks)[blockIdx.x];
  const TensorEntry t = reinterpret_cast<const TensorEntry*>(a.table)[c.row];
  const SGDHyper h = reinterpret_cast<const SGDHyper*>(a.groups)[t.group];
  const int32_t applied = *reinterpret_cast<const int32_t*>(a.applied_steps);
  __shared__ bool first;
  if (threadIdx.x == 0) first = claim_first_step(t, applied, true);
  __syncthreads();
  const StepCoefs k = step_coefs(h, s.clip_coef, first);
  for_slices(t, c.start, chunk_end(t, c, a.chunk_size), kEmaSlice, [&](int64_t b, int64_t e) {
    // Compressed state or masters (chunks.h): one thread per int8 block of the slice.
    if constexpr (P::kRemainder8) {
      sgd_compressed_range<G, P>(t, k, s.inv_scale, a.state, b, e, threadIdx.x, kThreads, applied);
    } else if (a.state != kStateF32) {
      sgd_compressed_range<G, P>(t, k, s.inv_scale, a.state, b, e, threadIdx.x, kThreads, applied);
    } else {
      dispatch_tensor(t, k.nesterov, [&](auto has_buf, auto has_param, auto nesterov) {
        update_chunk<G, P, decltype(has_buf)::value, decltype(has_param)::value, decltype(nesterov)::value>(
            t, k, s.inv_scale, b, e);
      });
    }
    ema_slice<P>(a, s, t, b, e);
  });
}

// AdamW: the param's step is read by every block of the tensor (its t and bias corrections
// are per chunk constants) and advanced by advance_kernel after the whole pass.
template <class G, class P, bool HasParam, bool AmsGrad>
__device__ void adamw_chunk(const TensorEntry& t, const AdamWCoefs& k, float inv_scale, int64_t start, int64_t end) {
  using GS = typename G::storage;
  using PS = typename P::storage;
  int64_t vec_end = start;
  if (!P::kRemainder && aligned4<GS>(t.grad, start) && aligned4<float>(t.master, start) &&
      aligned4<float>(t.buf, start) && aligned4<float>(t.buf2, start) && aligned4<float>(t.buf3, start) &&
      aligned4<PS>(t.param, start)) {
    const int64_t n4 = (end - start) / 4;
    const auto* g4 = reinterpret_cast<const Vec4<GS>*>(reinterpret_cast<const GS*>(t.grad) + start);
    auto* w4 = reinterpret_cast<Vec4<float>*>(reinterpret_cast<float*>(t.master) + start);
    auto* m4 = reinterpret_cast<Vec4<float>*>(reinterpret_cast<float*>(t.buf) + start);
    auto* v4 = reinterpret_cast<Vec4<float>*>(reinterpret_cast<float*>(t.buf2) + start);
    auto* x4 = reinterpret_cast<Vec4<float>*>(reinterpret_cast<float*>(t.buf3) + start);
    auto* p4 = reinterpret_cast<Vec4<PS>*>(reinterpret_cast<PS*>(t.param) + start);
    for (int64_t q = threadIdx.x; q < n4; q += kThreads) {
      const Vec4<GS> g = g4[q];
      Vec4<float> w = w4[q], m = m4[q], v = v4[q], x;
      if (AmsGrad) x = x4[q];
      Vec4<PS> p;
      if (HasParam) p = p4[q];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (HasParam) w.v[e] = retake_if_edited<P>(p.v[e], w.v[e]);
        w.v[e] = adamw_element<AmsGrad>(unscale<G>(g.v[e], inv_scale), w.v[e], m.v[e], v.v[e], x.v[e], k);
        if (HasParam) p.v[e] = P::store(w.v[e]);
      }
      w4[q] = w;
      m4[q] = m;
      v4[q] = v;
      if (AmsGrad) x4[q] = x;
      if (HasParam) p4[q] = p;
    }
    vec_end = start + 4 * n4;
  }
  adamw_range<G, P, HasParam, AmsGrad>(t, k, inv_scale, vec_end + threadIdx.x, end, kThreads);
}

template <class G, class P>
__global__ void __launch_bounds__(kThreads) adamw_kernel(UpdateArgs a) {
  const StepScalars s = *reinterpret_cast<const StepScalars*>(a.scalars);
  if (s.found_inf != 0.0f) return;  // a skipped step writes nothing
  const Chunk c = reinterpret_cast<const Chunk*>(a.chunks)[blockIdx.x];
  const TensorEntry t = reinterpret_cast<const TensorEntry*>(a.table)[c.row];
  const AdamWHyper h = reinterpret_cast<const AdamWHyper*>(a.groups)[t.group];
  const float step = t.count != 0 ? *reinterpret_cast<const float*>(t.count) : 0.0f;
  const AdamWCoefs k = adamw_coefs(h, s.clip_coef, step);
  for_slices(t, c.start, chunk_end(t, c, a.chunk_size), kEmaSlice, [&](int64_t b, int64_t e) {
    if constexpr (P::kRemainder8) {
      adamw_compressed_range<G, P>(t, k, s.inv_scale, a.state, b, e, threadIdx.x, kThreads);
    } else if (a.state != kStateF32) {
      adamw_compressed_range<G, P>(t, k, s.inv_scale, a.state, b, e, threadIdx.x, kThreads);
    } else {
      dispatch_adamw_tensor(t, [&](auto has_param, auto amsgrad) {
        adamw_chunk<G, P, decltype(has_param)::value, decltype(amsgrad)::value>(t, k, s.inv_scale, b, e);
      });
    }
    ema_slice<P>(a, s, t, b, e);
  });
}

// One thread per chunk: the first chunk of each tensor advances its step (after the pass).
__global__ void advance_kernel(UpdateArgs a) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.num_chunks || reinterpret_cast<const StepScalars*>(a.scalars)->found_inf != 0.0f) return;
  const Chunk chunk = reinterpret_cast<const Chunk*>(a.chunks)[c];
  advance_count(reinterpret_cast<const TensorEntry*>(a.table)[chunk.row], chunk);
}

void partials(const PartialsArgs& a, int64_t stream) {
  if (a.num_chunks == 0) return;
  dispatch_dtype(a.grad_dtype, [&](auto g) {
    partials_kernel<decltype(g)><<<unsigned(a.num_chunks), kThreads, 0, cudaStream_t(stream)>>>(a);
  });
  check(cudaGetLastError(), "partials launch");
}

void finalize_step(const ReduceArgs& r, const FinalizeArgs& a, int64_t stream) {
  finalize_kernel<<<1, kFinalizeThreads, 0, cudaStream_t(stream)>>>(r, a);
  check(cudaGetLastError(), "finalize launch");
}

void fold_partials(const ReduceArgs& r, int64_t stats, bool norm_inf, int64_t stream) {
  fold_kernel<<<1, kFinalizeThreads, 0, cudaStream_t(stream)>>>(r, reinterpret_cast<float*>(stats), norm_inf);
  check(cudaGetLastError(), "fold launch");
}

void unfold_partials(const ReduceArgs& r, int64_t stats, int64_t stream) {
  unfold_kernel<<<1, 1, 0, cudaStream_t(stream)>>>(r, reinterpret_cast<const float*>(stats));
  check(cudaGetLastError(), "unfold launch");
}

void update(const UpdateArgs& a, int64_t stream) {
  if (a.num_chunks == 0) return;
  const auto s = cudaStream_t(stream);
  dispatch_update_dtypes(a, [&](auto g, auto p) {
    if (a.rule == kAdamW) {
      adamw_kernel<decltype(g), decltype(p)><<<unsigned(a.num_chunks), kThreads, 0, s>>>(a);
    } else {
      update_kernel<decltype(g), decltype(p)><<<unsigned(a.num_chunks), kThreads, 0, s>>>(a);
    }
  });
  check(cudaGetLastError(), "update launch");
  if (a.rule == kAdamW) {
    advance_kernel<<<unsigned((a.num_chunks + 255) / 256), 256, 0, s>>>(a);
    check(cudaGetLastError(), "step count launch");
  }
}

// Muon's stages on one stack (muon_math.h): a grid-stride loop; the weight steps with one row
// of blocks per member (blockIdx.y), so each block streams one param's contiguous elements.
constexpr int kStackThreads = 256;
constexpr int64_t kStackBlocks = 1024;  // per member at most: enough to fill any GPU with loads in flight

template <bool kSmallB, bool kSmallU, bool kNesterov>
__global__ void muon_momentum_kernel(const float* u, float* buf, uint16_t* update, int64_t n, const bool* found_inf,
                                     MuonMomentumArgs k) {
  const int64_t begin = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  if (*found_inf) {  // the host never reads found_inf: the kernel branches on it
    muon_momentum_range<kSmallB, kSmallU, kNesterov, false>(UnscaledRows{u}, buf, update, begin, n, stride, k);
  } else {
    muon_momentum_range<kSmallB, kSmallU, kNesterov, true>(UnscaledRows{u}, buf, update, begin, n, stride, k);
  }
}

// From the members' raw grads: one row of blocks per member (blockIdx.y), as the weight steps.
template <class G, bool kSmallB, bool kSmallU, bool kNesterov>
__global__ void muon_momentum_grads_kernel(const void* const* grads, const float* inv_scale, const float* clip,
                                           float* buf, uint16_t* update, int64_t per, const bool* found_inf,
                                           MuonMomentumArgs k) {
  const int64_t m = blockIdx.y, begin = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const ScaledGrad<G> u{static_cast<const typename G::storage*>(grads[m]), *inv_scale,
                        clip != nullptr ? *clip : 1.0f};
  if (*found_inf) {
    muon_momentum_range<kSmallB, kSmallU, kNesterov, false>(u, buf + m * per, update + m * per, begin, per, stride, k);
  } else {
    muon_momentum_range<kSmallB, kSmallU, kNesterov, true>(u, buf + m * per, update + m * per, begin, per, stride, k);
  }
}

template <class P>
__global__ void muon_apply_kernel(void* masters, const uint16_t* update, uint16_t* const* params, int64_t per,
                                  const bool* found_inf, float decay, float alpha) {
  if (*found_inf) return;  // a skipped step writes nothing
  const int64_t m = blockIdx.y, stride = int64_t(gridDim.x) * blockDim.x;
  muon_apply_range<P>(member_of<P>(masters, params, per, m), update + m * per,
                      int64_t(blockIdx.x) * blockDim.x + threadIdx.x, per, stride, decay, alpha);
}

template <class P, bool kMuon, bool kDecay, bool kNesterov>
__global__ void musgd_apply_kernel(void* masters, const uint16_t* update, const float* u, float* buf,
                                   uint16_t* const* params, int64_t per, const bool* found_inf, MuSGDArgs k) {
  if (*found_inf) return;  // a skipped step writes nothing
  const int64_t m = blockIdx.y, stride = int64_t(gridDim.x) * blockDim.x;
  musgd_apply_range<P, kMuon, kDecay, kNesterov>(member_of<P>(masters, params, per, m),
                                                 kMuon ? update + m * per : nullptr, u + m * per, buf + m * per,
                                                 int64_t(blockIdx.x) * blockDim.x + threadIdx.x, per, stride, k);
}

unsigned stack_blocks(int64_t n) { return unsigned(std::min<int64_t>((n + kStackThreads - 1) / kStackThreads, kStackBlocks)); }

void launch_muon_momentum(const float* u, float* buf, uint16_t* update, int64_t n, const bool* found_inf,
                          const MuonMomentumArgs& k, int64_t stream) {
  if (n == 0) return;
  with_flags([&](auto small_b, auto small_u, auto nesterov) {
    muon_momentum_kernel<small_b.value, small_u.value, nesterov.value>
        <<<stack_blocks(n), kStackThreads, 0, cudaStream_t(stream)>>>(u, buf, update, n, found_inf, k);
  }, lerp_weight_small(k.one_minus_mu), lerp_weight_small(k.mu), k.nesterov);
  check(cudaGetLastError(), "Muon momentum launch");
}

void launch_muon_momentum_grads(const void* const* grads, int grad_dtype, const float* inv_scale, const float* clip,
                                float* buf, uint16_t* update, int64_t per, int64_t n, const bool* found_inf,
                                const MuonMomentumArgs& k, int64_t stream) {
  if (n == 0) return;
  const dim3 grid(stack_blocks(per), unsigned(n / per));
  dispatch_dtype(grad_dtype, [&](auto g) {
    with_flags([&](auto small_b, auto small_u, auto nesterov) {
      muon_momentum_grads_kernel<decltype(g), small_b.value, small_u.value, nesterov.value>
          <<<grid, kStackThreads, 0, cudaStream_t(stream)>>>(grads, inv_scale, clip, buf, update, per, found_inf, k);
    }, lerp_weight_small(k.one_minus_mu), lerp_weight_small(k.mu), k.nesterov);
  });
  check(cudaGetLastError(), "Muon momentum launch");
}

void launch_muon_apply(void* masters, const uint16_t* update, uint16_t* const* params, int64_t per, int64_t n,
                       const bool* found_inf, float decay, float alpha, int param_dtype, int64_t stream) {
  if (n == 0) return;
  const dim3 grid(stack_blocks(per), unsigned(n / per));
  dispatch_stack_param(param_dtype, [&](auto p) {
    muon_apply_kernel<decltype(p)><<<grid, kStackThreads, 0, cudaStream_t(stream)>>>(masters, update, params, per,
                                                                                     found_inf, decay, alpha);
  });
  check(cudaGetLastError(), "Muon apply launch");
}

void launch_musgd_apply(void* masters, const uint16_t* update, const float* u, float* buf, uint16_t* const* params,
                        int64_t per, int64_t n, const bool* found_inf, const MuSGDArgs& k, bool nesterov,
                        int param_dtype, int64_t stream) {
  if (n == 0) return;
  const dim3 grid(stack_blocks(per), unsigned(n / per));
  dispatch_stack_param(param_dtype, [&](auto p) {
    with_flags([&](auto muon, auto decay, auto nest) {
      musgd_apply_kernel<decltype(p), muon.value, decay.value, nest.value>
          <<<grid, kStackThreads, 0, cudaStream_t(stream)>>>(masters, update, u, buf, params, per, found_inf, k);
    }, update != nullptr, k.weight_decay != 0.0f, nesterov);
  });
  check(cudaGetLastError(), "MuSGD apply launch");
}

// One thread per state block (its scale is a reduction over the block's 32 elements).
template <class Codes>
__global__ void state_decode_kernel(const void* codes, const float* scales, float* out, int64_t per, int64_t blocks) {
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < blocks; j += int64_t(gridDim.x) * blockDim.x) {
    decode_stack_block<Codes>(codes, scales, out, per, j);
  }
}

template <class Codes>
__global__ void state_encode_kernel(const float* x, void* codes, float* scales, int64_t per, int64_t blocks,
                                    const int32_t* salts, bool salt_per_row, const bool* found_inf) {
  if (*found_inf) return;  // a skipped step writes nothing
  const int64_t blocks_per = (per + kStateBlock - 1) / kStateBlock;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < blocks; j += int64_t(gridDim.x) * blockDim.x) {
    encode_stack_block<Codes>(x, codes, scales, per, j, uint32_t(salts[salt_per_row ? j / blocks_per : 0]));
  }
}

void launch_state_decode(const void* codes, const float* scales, float* out, int64_t rows, int64_t per,
                         bool is_signed, int64_t stream) {
  const int64_t blocks = rows * ((per + kStateBlock - 1) / kStateBlock);
  if (blocks == 0) return;
  const auto s = cudaStream_t(stream);
  if (is_signed) {
    state_decode_kernel<SignedCodes><<<stack_blocks(blocks), kStackThreads, 0, s>>>(codes, scales, out, per, blocks);
  } else {
    state_decode_kernel<UnsignedCodes><<<stack_blocks(blocks), kStackThreads, 0, s>>>(codes, scales, out, per, blocks);
  }
  check(cudaGetLastError(), "state decode launch");
}

void launch_state_encode(const float* x, void* codes, float* scales, int64_t rows, int64_t per, bool is_signed,
                         const int32_t* salts, bool salt_per_row, const bool* found_inf, int64_t stream) {
  const int64_t blocks = rows * ((per + kStateBlock - 1) / kStateBlock);
  if (blocks == 0) return;
  const auto s = cudaStream_t(stream);
  if (is_signed) {
    state_encode_kernel<SignedCodes><<<stack_blocks(blocks), kStackThreads, 0, s>>>(
        x, codes, scales, per, blocks, salts, salt_per_row, found_inf);
  } else {
    state_encode_kernel<UnsignedCodes><<<stack_blocks(blocks), kStackThreads, 0, s>>>(
        x, codes, scales, per, blocks, salts, salt_per_row, found_inf);
  }
  check(cudaGetLastError(), "state encode launch");
}

}  // namespace
}  // namespace fused_opt

#ifndef FUSED_OPT_ARCHS
#define FUSED_OPT_ARCHS ""
#endif

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "fused_opt CUDA kernels";
  fused_opt::bind_step(m, fused_opt::partials, fused_opt::finalize_step, fused_opt::update, fused_opt::fold_partials,
                       fused_opt::unfold_partials);
  fused_opt::bind_muon(m, fused_opt::launch_muon_momentum, fused_opt::launch_muon_momentum_grads,
                       fused_opt::launch_muon_apply, fused_opt::launch_musgd_apply, fused_opt::launch_state_decode,
                       fused_opt::launch_state_encode);
  m.attr("CUDA_VERSION") = CUDART_VERSION;          // e.g. 13000
  m.attr("ARCH_LIST") = FUSED_OPT_ARCHS;            // TORCH_CUDA_ARCH_LIST it was built with
}

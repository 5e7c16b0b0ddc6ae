// The per-element math of one step (docs/semantics.md), written once for the C++ CPU path and the
// CUDA path: everything here is FUSED_HD, compiled for the host by g++ and for both by nvcc.
#pragma once
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define FUSED_HD __host__ __device__ __forceinline__
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#else
#if defined(__AVX2__)
#include <immintrin.h>
#endif
// Always inlined on the host: the CPU calls the shared loops with stride 1, and only once the
// constant is propagated does the compiler vectorize them.
#define FUSED_HD inline __attribute__((always_inline))
#endif

namespace fused_opt {

FUSED_HD uint32_t float_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u; std::memcpy(&u, &f, 4); return u;
#endif
}
FUSED_HD float bits_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f; std::memcpy(&f, &u, 4); return f;
#endif
}

// Storage types: how a dtype is loaded to FP32 and stored from FP32 with round-to-nearest-even,
// bit-identical to torch's .to() on both sides (on the host with c10's bit tricks, on the
// device with the _rn intrinsics).
struct F32 {
  using storage = float;
  static constexpr bool kRemainder = false;   // see BF16Remainder
  static constexpr bool kRemainder8 = false;  // see BF16Remainder8 (state_math.h)
  static FUSED_HD float load(float x) { return x; }
  static FUSED_HD float store(float x) { return x; }
};

struct F16 {
  using storage = uint16_t;
  static constexpr bool kRemainder = false;
  static constexpr bool kRemainder8 = false;
  static FUSED_HD float load(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    // c10::detail::fp16_ieee_to_fp32_value: exact, subnormals included.
    const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
    // Selects written as masks: GCC keeps ?: on these as branches, which stops vectorization.
    const uint32_t small = 0u - uint32_t(two_w < (1u << 27));
    return bits_float(sign | (small & float_bits(denormalized)) | (~small & float_bits(normalized)));
#endif
  }
  static FUSED_HD uint16_t store(float f) {
#ifdef __CUDA_ARCH__
    return __half_as_ushort(__float2half_rn(f));
#else
    // c10::detail::fp16_ieee_from_fp32_value: the FP32 adder does the rounding to nearest even.
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
    const uint32_t exponent = shl1_w & 0xFF000000u;
    const uint32_t low = 0u - uint32_t(exponent < 0x71000000u);  // selects as masks (see load)
    const uint32_t bias = (low & 0x71000000u) | (~low & exponent);
    base = bits_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t nan = 0u - uint32_t(shl1_w > 0xFF000000u);
    return uint16_t((sign >> 16) | (nan & 0x7E00u) | (~nan & nonsign));
#endif
  }
};

struct BF16 {
  using storage = uint16_t;
  static constexpr bool kRemainder = false;
  static constexpr bool kRemainder8 = false;
  static FUSED_HD float load(uint16_t h) { return bits_float(uint32_t(h) << 16); }
  static FUSED_HD uint16_t store(float f) {
    // Round to nearest even on the upper 16 bits; a NaN stays a (quiet) NaN.
    const uint32_t u = float_bits(f);
    const uint16_t rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : rounded;
  }
};

// master_weights="remainder": a BF16 param whose FP32 master is not stored, only the int16
// r = bits(w) - (bits(p) << 16), the distance from the param, rounded to nearest even, back
// to the master: w = p + r, exactly, in the bits. RNE puts r in [-0x8000, 0x8000]; int16
// holds all of it but +0x8000 (w half an ulp above an even param: a tie RNE rounds down),
// which is kept as 0x7FFF, so that master comes back 1 FP32 ulp lower and still rounds to the
// same param. No 16 bits can do better: an even BF16 value is the RNE of 65,537 FP32 values.
// (Transformer Engine's store_param_remainders keeps w's low 16 bits instead; its param then
// rounds ties half up, not to nearest even.) Signed zeros, subnormals, infinities and
// rounding across an exponent boundary need nothing special; a NaN master stays a NaN.
// A param edited where no version counter sees it (`p.data.mul_(mask)`) meets the remainder
// of its old value: p + r is then still a value that rounds to p, except where the sum
// crosses into the other sign (p = ±0 and r < 0) or turns an infinite p into a NaN. No
// consistent pair does either, so there the master is the param itself, as an FP32 master
// would be re-taken from an edited param: a pruned weight is 0, not NaN.
struct BF16Remainder : BF16 {
  static constexpr bool kRemainder = true;
  static FUSED_HD float rebuild(uint16_t p, int16_t r) {
    const uint32_t top = uint32_t(p) << 16;
    const uint32_t w = top + uint32_t(int32_t(r));
    const bool crossed = ((w ^ top) & 0x80000000u) != 0;
    const bool made_nan = (w & 0x7FFFFFFFu) > 0x7F800000u && (top & 0x7FFFFFFFu) <= 0x7F800000u;
    return bits_float(crossed || made_nan ? top : w);
  }
  static FUSED_HD int16_t remainder(float w, uint16_t p) {
    const int32_t d = int32_t(float_bits(w) - (uint32_t(p) << 16));
    return int16_t(d > 0x7FFF ? 0x7FFF : (d < -0x8000 ? -0x8000 : d));
  }
};

// One SGD group's hyperparameters, as laid out in the host's group table (update_rules.SGDHyper.row).
struct SGDHyper {
  float lr, momentum, one_minus_dampening, weight_decay, nesterov, maximize, pad[6];  // GROUP_COLUMNS in all
};

// Per-step scalars, written by finalize and read by the update (multi_tensor.py: INV_SCALE..),
// then the EMA's settings finalize reads to write ema_weight (ema.ModelEMA.scalars).
struct StepScalars {
  float inv_scale, clip_coef, found_inf, ema_weight, ema_one_minus_decay, ema_decay, ema_inv_tau, pad;
};

// Step 1: u = float32(g) * (1/S).
template <class G>
FUSED_HD float unscale(typename G::storage g, float inv_scale) { return G::load(g) * inv_scale; }

// Finite by the exponent bits: immune to fast-math folding of float tests like x - x == 0.
FUSED_HD bool is_finite(float x) { return (float_bits(x) & 0x7F800000u) != 0x7F800000u; }

// Accumulates the norm of u (sum of squares, or max |u|) and flags inf/NaN.
// Acc is float on the GPU (short per-thread runs, then a tree) and double on the CPU, where
// one thread sums a whole chunk in 16 lanes: 4096 FP32 additions per lane drift by ~1e-5.
template <class Acc>
FUSED_HD void accumulate_norm(float u, bool norm_inf, Acc& acc, int& bad) {
  bad |= !is_finite(u);
  if (norm_inf) {
    const Acc a = u < 0 ? -u : u;
    acc = a > acc ? a : acc;
  } else {
    acc += Acc(u) * Acc(u);
  }
}

// A param edited outside the optimizer (p.data.clamp_, pruning masks, EMA swaps: writes that
// torch's version counter never sees) no longer equals the master rounded as we last wrote it.
// The update reads the param (+2 B/param for FP16/BF16) and re-takes such an element's master
// from it, so the edit is kept, as torch.optim.SGD keeps it. Bits are compared, not values:
// -0 and +0 differ, and a NaN we wrote equals itself.
template <class P>
FUSED_HD float retake_if_edited(typename P::storage p, float w) {
  return p == P::store(w) ? w : P::load(p);
}

// Per-chunk constants of the update, hoisted out of the element loop: GCC turns a ?: on a
// loop-invariant flag into a branch that stops vectorization (3x slower on the CPU), so the
// flags become coefficients. The maximize sign is folded into the clip coefficient (negation
// is exact), and the buffer's first applied step is b = 0 * b + 1 * d = d (its buffer is zeros).
// Weight decay is added through a bit mask: +0 when it is off, so an inf/NaN weight does
// not leak into d through 0 * w (the oracle skips the term then).
struct StepCoefs {
  float coef, weight_decay, keep, add, momentum, lr;
  uint32_t decay_mask;
  bool nesterov;
};

FUSED_HD StepCoefs step_coefs(const SGDHyper& h, float clip_coef, bool first) {
  return StepCoefs{h.maximize != 0.0f ? -clip_coef : clip_coef, h.weight_decay, first ? 0.0f : h.momentum,
                   first ? 1.0f : h.one_minus_dampening, h.momentum, h.lr,
                   h.weight_decay != 0.0f ? 0xFFFFFFFFu : 0u, h.nesterov != 0.0f};
}

// x where mask is all ones, +0 where it is 0: a term that is off adds nothing, not 0 * x.
FUSED_HD float keep_bits(float x, uint32_t mask) { return bits_float(float_bits(x) & mask); }
#if defined(__AVX2__) && !defined(__CUDACC__)
inline __m256 keep_bits(__m256 x, uint32_t mask) {
  return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(mask))));
}
#endif

// Step 5 for one element: d = c*u (negated if maximize), weight decay, momentum,
// then returns the new w. The operation order is the oracle's, so results differ from it
// only by FMA contraction.
// V is float, or on the host a GCC vector of floats (__m256: the CPU's FP16/BF16 loop), whose
// operators work lane by lane, so every lane computes exactly what the float version does.
template <bool HasBuf, bool Nesterov, class V>
FUSED_HD V sgd_element(V u, V w, V& b, const StepCoefs& k) {
  V d = u * k.coef;
  d = d + keep_bits(k.weight_decay * w, k.decay_mask);
  if (HasBuf) {
    const V nb = b * k.keep + k.add * d;
    b = nb;
    d = Nesterov ? d + k.momentum * nb : nb;
  }
  return w - k.lr * d;
}

}  // namespace fused_opt

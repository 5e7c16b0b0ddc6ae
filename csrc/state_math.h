// Compressed storage, written once for the C++ CPU path and the CUDA path (FUSED_HD): the
// optimizer state in BF16 or blockwise int8 (state_precision="bf16" | "int8") and the 24-bit
// master of master_weights="remainder8". fused_opt/state_precision.py and remainder.py are
// the same encodings in torch ops (the oracle); the operation order here is theirs, so the
// bits agree (FMA contraction is off on the host).
#pragma once
#include <cmath>

#include "sgd_math.h"

namespace fused_opt {

// How a launch's state buffers are stored (state_precision.py: FP32_CODE, BF16_CODE, INT8_CODE).
enum StateCode : int { kStateF32 = 0, kStateBF16 = 1, kStateInt8 = 2 };

// Elements per int8 block (state_precision.BLOCK), each with one FP32 scale. Chunks are a
// multiple of it, and blocks start at each tensor's first element, so one chunk (one CUDA
// block, one CPU task) owns every block it touches.
constexpr int kStateBlock = 32;

// master_weights="remainder8": a 24-bit master (FP32 with its low 8 bits zero: 15 mantissa
// bits where BF16 has 7) beside the BF16 param, as an int8 remainder. A step's FP32 result w is
// rounded to 24 bits half up in its bits (away from zero), and the param is that 24-bit master
// rounded to BF16 half up too: then the master is p + 256 * r8 in the bits with r8 in
// [-128, 127], exactly (rounding the param to nearest even would need r8 = +128 at a tie, and
// a master that cannot move past a tie). The param differs from RNE(w) only where w is within
// half a 24-bit ulp of a BF16 tie. The same guard as BF16Remainder::rebuild keeps an edited
// param's master the param itself. fused_opt/remainder.py split8 is the oracle.
struct BF16Remainder8 : BF16 {
  static constexpr bool kRemainder8 = true;
  static FUSED_HD float rebuild(uint16_t p, int8_t r8) {
    return BF16Remainder::rebuild(p, int16_t(int32_t(r8) * 256));
  }
  // w -> the param and the remainder; returns the 24-bit master they hold. Selects are masks
  // (no branch: the CPU loop vectorizes); a NaN stays a (quiet) NaN.
  static FUSED_HD float split(float w, uint16_t& p, int8_t& r8) {
    const uint32_t b = float_bits(w);
    const uint32_t nan = 0u - uint32_t((b & 0x7FFFFFFFu) > 0x7F800000u);
    const uint32_t b24 = (b + 128u) & 0xFFFFFF00u;
    const uint32_t top = (nan & 0x7FC00000u) | (~nan & ((b24 + 0x8000u) & 0xFFFF0000u));
    p = uint16_t(top >> 16);
    r8 = int8_t(~nan & uint32_t(int32_t(b24 - top) >> 8));
    return bits_float((nan & top) | (~nan & b24));
  }
};

// Block scales are the largest magnitude, compared as integer bits: a NaN (bits above inf)
// wins on every backend, where float max() would disagree about NaN.
FUSED_HD uint32_t magnitude_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

// Codes are floating-point numbers relative to the block's scale (x / scale: a division, not a
// multiplication by 1 / scale, whose reciprocal overflows for a subnormal scale), so a small
// element keeps its relative precision beside a large one. Both are integer operations on the
// bits, exact on every backend (state_precision.py is the oracle).

// Signed state (momentum, exp_avg): |x| / scale in [0, 1] rounded to 3 mantissa bits, rebased
// so that 1.0 is code 121 and 2^-15 is code 1 (below: 0), with the sign: int8 in [-121, 121].
// Relative spacing 6-12 %. Where the stored value is mostly memory (a decay factor beta above
// 1/2: momentum, exp_avg at the usual betas) the rounding is stochastic, with a deterministic
// dither (dither20 of the element's index and the step, `salt`): unbiased, so a slowly moving
// value moves as FP32's does. Rounded to nearest it would stick to its code whenever a step
// moves it by less than half a code (for beta > 15/16 every code near the bottom of its octave
// is a fixed point of x * beta: a momentum that never decays), a different optimizer (a
// GPT-2-style run ended 6 % below FP32 state's loss after 300 steps). Where the fresh value
// outweighs the stored one (beta <= 1/2) the stored error is damped each step, and rounding
// to nearest (half up in the bits) halves it. salt 0 means round to nearest.
constexpr float kDitherAbove = 0.5f;  // beta above which signed codes are dithered

// The salt of a step whose decay factor is beta: the step's count, or 0 (round to nearest).
FUSED_HD uint32_t dithered_salt(float beta, uint32_t step) { return beta > kDitherAbove ? step : 0u; }

FUSED_HD uint32_t dither20(uint32_t index, uint32_t salt) {
  if (salt == 0) return 0x80000u;  // half of a code step: round to nearest, ties up
  uint32_t h = (index * 0x9E3779B1u) ^ (salt * 0x85EBCA77u);
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  // 4 ulps inside the spacing: a decoded value (t * scale) / scale is within 2 ulps of its
  // code's t, and must encode back to that code whatever its dither.
  const uint32_t d = h >> 12;
  return d < 4u ? 4u : (d > 0xFFFFBu ? 0xFFFFBu : d);
}

struct SignedCodes {
  using storage = int8_t;
  static constexpr int32_t kBias = 895, kMax = 121;
  static FUSED_HD float decode(int8_t q, float scale) {
    const int32_t k = q < 0 ? -int32_t(q) : int32_t(q);
    const float t = k == 0 ? 0.0f : bits_float(uint32_t(k + kBias) << 20);
    const float x = t * scale;
    return q < 0 ? -x : x;
  }
  // For a finite, positive scale; `index` is the element's in its tensor, `salt` the step's.
  static FUSED_HD storage encode(float x, float scale, uint32_t index, uint32_t salt) {
    const float t = fabsf(x) / scale;
    int32_t k = int32_t((float_bits(t) + dither20(index, salt)) >> 20) - kBias;
    k = k < 0 ? 0 : (k > kMax ? kMax : k);
    return storage(x < 0.0f ? -k : k);
  }
};

// Unsigned state (exp_avg_sq, max_exp_avg_sq): (x / scale) * 2^15 in [0, 2^15] as IEEE half
// bits (round to nearest even; 11 bits of precision from 2^-29 of the scale, down to 2^-39 in
// half's subnormals). One byte cannot follow v: beta2 = 0.999 moves it 0.1 % a step.
struct UnsignedCodes {
  using storage = uint16_t;
  static FUSED_HD float decode(uint16_t h, float scale) {
    const float t = h < 0x400u ? float(h) * 0x1p-24f : bits_float((uint32_t(h) << 13) + (112u << 23));
    return (t * 0x1p-15f) * scale;
  }
  // For a finite, positive scale (x >= 0: v is never negative; -0 is stored as 0). Round to
  // nearest even: 0.1 % a step (beta2 = 0.999) is above half a spacing (0.05 %).
  static FUSED_HD storage encode(float x, float scale, uint32_t, uint32_t) {
    const float t = (fabsf(x) / scale) * 32768.0f;
    const uint32_t b = float_bits(t);
    // Half's subnormals (t < 2^-14): adding 0.5, whose FP32 ulp is 2^-24, rounds t to them.
    const uint32_t sub = float_bits(t + 0.5f) - float_bits(0.5f);
    const uint32_t normal = (b - (112u << 23) + 0xFFFu + ((b >> 13) & 1u)) >> 13;
    return storage(t < 0x1p-14f ? sub : normal);
  }
};

// One state buffer of a block (n <= kStateBlock elements from `at`), decoded to FP32 in `x`.
// State is a launch constant, so each loop is straight-line code the host compiler vectorizes.
template <int State, class Codes>
FUSED_HD void decode_block(const void* codes, const float* scales, int64_t at, int n, float* x) {
  if constexpr (State == kStateF32) {
    const float* c = reinterpret_cast<const float*>(codes) + at;
    for (int k = 0; k < n; ++k) x[k] = c[k];
  } else if constexpr (State == kStateBF16) {
    const uint16_t* c = reinterpret_cast<const uint16_t*>(codes) + at;
    for (int k = 0; k < n; ++k) x[k] = BF16::load(c[k]);
  } else {
    const auto* c = reinterpret_cast<const typename Codes::storage*>(codes) + at;
    const float scale = scales[at / kStateBlock];
    for (int k = 0; k < n; ++k) x[k] = Codes::decode(c[k], scale);
  }
}

// The host's hardware prefetchers do not keep up with a block loop's streams (grads, masters,
// params and each buffer's codes, with a block's decode, update and encode between their
// loads): the int8 SGD step took twice the FP32 one's time, waiting on its loads, on a 2-core
// x86-64. So each block asks for the memory of the block kPrefetchBlocks ahead in every array
// it streams (a hint: never a fault, past the end included). Nothing on the device.
constexpr int64_t kPrefetchBlocks = 8;

template <class T>
FUSED_HD void prefetch_block(const void* base, int64_t at) {
#ifndef __CUDA_ARCH__
  const char* p = reinterpret_cast<const char*>(static_cast<const T*>(base) + at + kPrefetchBlocks * kStateBlock);
  for (size_t offset = 0; offset < kStateBlock * sizeof(T); offset += 64) __builtin_prefetch(p + offset);
#endif
}

// A buffer's codes in block `at`'s future, for each state precision.
template <int State, class Codes>
FUSED_HD void prefetch_codes(const void* codes, int64_t at) {
  if constexpr (State == kStateF32) {
    prefetch_block<float>(codes, at);
  } else if constexpr (State == kStateBF16) {
    prefetch_block<uint16_t>(codes, at);
  } else {
    prefetch_block<typename Codes::storage>(codes, at);
  }
}

// ... and encoded back from `x`: BF16 rounded to nearest even, int8 with the block's new scale:
// the largest magnitude, compared as bits. A block whose scale is not finite and positive is
// all code 0 (zeros; NaN through its scale), as state_precision.py.
template <int State, class Codes>
FUSED_HD void encode_block(void* codes, float* scales, int64_t at, int n, const float* x, uint32_t salt) {
  if constexpr (State == kStateF32) {
    float* c = reinterpret_cast<float*>(codes) + at;
    for (int k = 0; k < n; ++k) c[k] = x[k];
  } else if constexpr (State == kStateBF16) {
    uint16_t* c = reinterpret_cast<uint16_t*>(codes) + at;
    for (int k = 0; k < n; ++k) c[k] = BF16::store(x[k]);
  } else {
    auto* c = reinterpret_cast<typename Codes::storage*>(codes) + at;
    uint32_t largest = 0;
    for (int k = 0; k < n; ++k) {
      const uint32_t m = magnitude_bits(x[k]);
      largest = m > largest ? m : largest;
    }
    const float scale = bits_float(largest);
    scales[at / kStateBlock] = scale;
    if (largest != 0 && largest < 0x7F800000u) {
      for (int k = 0; k < n; ++k) c[k] = Codes::encode(x[k], scale, uint32_t(at + k), salt);
    } else {
      for (int k = 0; k < n; ++k) c[k] = typename Codes::storage(0);
    }
  }
}

}  // namespace fused_opt

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
  // w -> the param and the remainder; returns the 24-bit master they hold.
  static FUSED_HD float split(float w, uint16_t& p, int8_t& r8) {
    const uint32_t b = float_bits(w);
    if ((b & 0x7FFFFFFFu) > 0x7F800000u) {  // a NaN stays a (quiet) NaN
      p = 0x7FC0;
      r8 = 0;
      return bits_float(0x7FC00000u);
    }
    const uint32_t b24 = (b + 128u) & 0xFFFFFF00u;
    const uint32_t top = (b24 + 0x8000u) & 0xFFFF0000u;
    p = uint16_t(top >> 16);
    r8 = int8_t(int32_t(b24 - top) >> 8);
    return bits_float(b24);
  }
};

// Block scales are the largest magnitude, compared as integer bits: a NaN (bits above inf)
// wins on every backend, where float max() would disagree about NaN.
FUSED_HD uint32_t magnitude_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }

// x / scale, or 0 in an all-zero block (or one with a NaN scale, which decodes to NaN; an
// infinite scale gives 0 or NaN, and decodes to NaN through inf * 0). A division, not a
// multiplication by 1 / scale: the reciprocal of a subnormal scale overflows.
FUSED_HD float over_scale(float x, float scale) { return scale > 0.0f ? x / scale : 0.0f; }

// floor(y + 0.5) clamped to [low, high]; a NaN code is 0. Integer-free, so every backend
// (and the Triton interpreter) rounds alike.
FUSED_HD float round_code(float y, float low, float high) {
  if (!(y == y)) return 0.0f;
  const float q = floorf(y + 0.5f);
  return q < low ? low : (q > high ? high : q);
}

// Signed state (momentum, exp_avg): softsign-companded codes in [-127, 127].
struct SignedCodes {
  using storage = int8_t;
  // What the block's absmax is taken of, for an element.
  static FUSED_HD float magnitude(float x) { return x; }
  static FUSED_HD float decode(int8_t q, float scale) {
    const float y = float(q) / 127.0f;
    return scale * (y / (2.0f - fabsf(y)));
  }
  static FUSED_HD int8_t encode(float x, float scale) {
    const float t = over_scale(x, scale);
    return int8_t(round_code(127.0f * ((2.0f * t) / (1.0f + fabsf(t))), -127.0f, 127.0f));
  }
};

// Unsigned state (exp_avg_sq, max_exp_avg_sq): sqrt(x) in [0, 255] steps of scale / 255,
// scale = the block's largest sqrt(x).
struct UnsignedCodes {
  using storage = uint8_t;
  static FUSED_HD float magnitude(float x) { return lane_sqrt_f(x); }
  static FUSED_HD float decode(uint8_t q, float scale) {
    const float r = (float(q) / 255.0f) * scale;
    return r * r;
  }
  static FUSED_HD uint8_t encode(float x, float scale) {
    return uint8_t(round_code(over_scale(lane_sqrt_f(x), scale) * 255.0f, 0.0f, 255.0f));
  }

 private:
  static FUSED_HD float lane_sqrt_f(float x) {
#ifdef __CUDA_ARCH__
    return __fsqrt_rn(x);
#else
    return __builtin_sqrtf(x);
#endif
  }
};

// One state buffer of a block, decoded to FP32 in `x` (n <= kStateBlock elements from `at`).
template <class Codes>
FUSED_HD void decode_block(const void* codes, const float* scales, int64_t at, int n, int state, float* x) {
  if (state == kStateF32) {
    for (int k = 0; k < n; ++k) x[k] = reinterpret_cast<const float*>(codes)[at + k];
  } else if (state == kStateBF16) {
    for (int k = 0; k < n; ++k) x[k] = BF16::load(reinterpret_cast<const uint16_t*>(codes)[at + k]);
  } else {
    const float scale = scales[at / kStateBlock];
    for (int k = 0; k < n; ++k) x[k] = Codes::decode(reinterpret_cast<const typename Codes::storage*>(codes)[at + k], scale);
  }
}

// ... and encoded back from `x`: BF16 rounded to nearest even, int8 with the block's new scale.
template <class Codes>
FUSED_HD void encode_block(void* codes, float* scales, int64_t at, int n, int state, const float* x) {
  if (state == kStateF32) {
    for (int k = 0; k < n; ++k) reinterpret_cast<float*>(codes)[at + k] = x[k];
  } else if (state == kStateBF16) {
    for (int k = 0; k < n; ++k) reinterpret_cast<uint16_t*>(codes)[at + k] = BF16::store(x[k]);
  } else {
    uint32_t largest = 0;
    for (int k = 0; k < n; ++k) {
      const uint32_t m = magnitude_bits(Codes::magnitude(x[k]));
      largest = m > largest ? m : largest;
    }
    const float scale = bits_float(largest);
    scales[at / kStateBlock] = scale;
    for (int k = 0; k < n; ++k) reinterpret_cast<typename Codes::storage*>(codes)[at + k] = Codes::encode(x[k], scale);
  }
}

}  // namespace fused_opt

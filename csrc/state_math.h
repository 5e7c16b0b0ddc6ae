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

// Codes are x / scale (0 in an all-zero block, or one with a NaN scale, which decodes to NaN;
// an infinite scale gives 0 or NaN, and decodes to NaN through inf * 0), companded. A division,
// not a multiplication by 1 / scale: the reciprocal of a subnormal scale overflows.

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
  static constexpr float kMax = 127.0f;
  // What the block's absmax is taken of, for an element.
  static FUSED_HD float magnitude(float x) { return x; }
  static FUSED_HD float decode(int8_t q, float scale) {
    const float y = float(q) / 127.0f;
    return scale * (y / (2.0f - fabsf(y)));
  }
  // The code before rounding, for a finite, positive scale.
  static FUSED_HD float companded(float x, float scale) {
    const float t = x / scale;
    return 127.0f * ((2.0f * t) / (1.0f + fabsf(t)));
  }
  static constexpr int32_t kLow = -127;
  static FUSED_HD storage code(float q) { return storage(int32_t(q)); }
};

// Unsigned state (exp_avg_sq, max_exp_avg_sq): sqrt(x) in [0, 255] steps of scale / 255,
// scale = the block's largest sqrt(x).
struct UnsignedCodes {
  using storage = uint8_t;
  static constexpr float kMax = 255.0f;
  static FUSED_HD float magnitude(float x) { return lane_sqrt_f(x); }
  static FUSED_HD float decode(uint8_t q, float scale) {
    const float r = (float(q) / 255.0f) * scale;
    return r * r;
  }
  static FUSED_HD float companded(float x, float scale) { return (lane_sqrt_f(x) / scale) * 255.0f; }
  static constexpr int32_t kLow = 0;
  static FUSED_HD storage code(float q) { return storage(int32_t(q)); }

  static FUSED_HD float lane_sqrt_f(float x) {
#ifdef __CUDA_ARCH__
    return __fsqrt_rn(x);
#else
    return __builtin_sqrtf(x);
#endif
  }
};

// floor(v) clamped to [low, high], for |v| < 2^31: by a conversion (truncation) corrected for
// negative v, in integers, so the host loop vectorizes (it does not with floorf and an int8 store).
FUSED_HD int32_t floor_clamped(float v, int32_t low, int32_t high) {
  int32_t i = int32_t(v);
  i -= int32_t(float(i) > v);
  return i < low ? low : (i > high ? high : i);
}

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

// ... and encoded back from `x`: BF16 rounded to nearest even, int8 with the block's new scale:
// the largest magnitude, compared as bits; codes floor(companded + 0.5), clamped. A block
// whose scale is not finite and positive takes the exact, slower loop (round_code: 0 for a
// zero, NaN or infinite scale's elements, as state_precision.py).
template <int State, class Codes>
FUSED_HD void encode_block(void* codes, float* scales, int64_t at, int n, const float* x) {
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
      const uint32_t m = magnitude_bits(Codes::magnitude(x[k]));
      largest = m > largest ? m : largest;
    }
    const float scale = bits_float(largest);
    scales[at / kStateBlock] = scale;
    if (scale > 0.0f && largest < 0x7F800000u) {  // finite: every element is, |code| <= kMax + 1e-5
      for (int k = 0; k < n; ++k) {
        c[k] = typename Codes::storage(floor_clamped(Codes::companded(x[k], scale) + 0.5f, Codes::kLow,
                                                     int32_t(Codes::kMax)));
      }
    } else {
      for (int k = 0; k < n; ++k) {
        const float y = scale > 0.0f ? Codes::companded(x[k], scale) : 0.0f;
        c[k] = Codes::code(round_code(y, float(Codes::kLow), Codes::kMax));
      }
    }
  }
}

}  // namespace fused_opt

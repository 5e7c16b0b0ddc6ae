// Muon's two elementwise stages, around its matrix stage (Newton–Schulz, batched matmuls in
// fused_opt/newton_schulz.py), on one stack of params of one shape: k params, `per` elements
// each, their FP32 masters and momentum the rows of one tensor (fused_opt/backends/buckets.py).
// Written once for the C++ CPU path and the CUDA path (FUSED_HD, sgd_math.h).
//
//   momentum:  B <- lerp(B, u, 1 - mu);  U = nesterov ? lerp(u, B, mu) : B;  stored as BF16,
//              the dtype Newton–Schulz runs in (torch.optim.Muon's grad.bfloat16()).
//   apply:     w <- w * (1 - lr * wd) + (-lr * ratio) * O;  p <- w rounded to p's dtype.
//   MuSGD:     (Ultralytics' hybrid, in use_muon groups) w1 = w + (-lr * muon) * (O * s), then
//              SGD with momentum and L2 decay on w1 at lr * sgd; in the others that SGD alone.
//
// The operation order is torch's (its CPU kernels: lerp and add with alpha as one FMA each),
// so on the CPU the stages give torch.optim.Muon's bits. A skipped step (found_inf, read from
// memory the host never reads) writes nothing.
#pragma once
#include <cmath>
#include <stdexcept>
#include <type_traits>
#include "chunks.h"

namespace fused_opt {

// torch.lerp(start, end, weight): one FMA from the nearer end, as torch's vectorized CPU kernel.
// Which end is a stack's constant (kSmall: |weight| < 0.5), chosen by the host: a select on a
// loop-invariant flag is kept as a branch by GCC, which stops vectorization.
template <bool kSmall>
FUSED_HD float lerp(float start, float end, float weight) {
  return kSmall ? fmaf(weight, end - start, start) : fmaf(weight - 1.0f, end - start, end);
}

FUSED_HD bool lerp_weight_small(float weight) { return weight < 0.5f && weight > -0.5f; }

// One stack's momentum settings, in FP32 as torch's lerp takes its weights.
struct MuonMomentumArgs {
  float one_minus_mu, mu;
  bool nesterov;
};

// The new buffer value in b, the update U returned (in FP32; stored as BF16 by the caller).
// kSmallB, kSmallU: which end each lerp starts from (lerp_weight_small of 1 - mu and of mu).
template <bool kSmallB, bool kSmallU, bool kNesterov>
FUSED_HD float muon_momentum(float u, float& b, const MuonMomentumArgs& k) {
  const float nb = lerp<kSmallB>(b, u, k.one_minus_mu);
  b = nb;
  return kNesterov ? lerp<kSmallU>(u, nb, k.mu) : nb;
}

// Decoupled weight decay, then the orthogonalized update at the adjusted lr:
// (w * decay).add_(O, alpha=alpha), decay = 1 - lr * wd, alpha = -lr * ratio.
FUSED_HD float muon_apply(float w, float o, float decay, float alpha) { return fmaf(alpha, o, w * decay); }

// The stages over elements [begin, end), stride apart (1 on the CPU, the grid on the GPU):
// apply over one member of the stack (`m`: its master column, FP32 or a BF16 param's
// remainders, and its own param storage: a stack's params are the user's tensors, never
// copied; `update` at its row), momentum over the whole stack. A param edited outside the
// optimizer is re-taken first (MasterOf::load), as every other step does.
template <class P>
FUSED_HD void muon_apply_range(const MasterOf<P>& m, const uint16_t* update, int64_t begin, int64_t end,
                               int64_t stride, float decay, float alpha) {
  for (int64_t i = begin; i < end; i += stride) {
    m.store(i, muon_apply(m.load(i, true), BF16::load(update[i]), decay, alpha), true);
  }
}

// Where the momentum stage reads u: FP32 rows the step already holds (UnscaledRows), or one
// member's raw grad (ScaledGrad), unscaled and clipped on the way in as the step does it,
// float32(g) * (1/S), then * c (two roundings; c = 1 where the step is not clipped, exact), so a
// large stack's u is never written out in FP32 and read back.
struct UnscaledRows {
  const float* u;
  FUSED_HD float operator()(int64_t i) const { return u[i]; }
};
template <class G>
struct ScaledGrad {
  const typename G::storage* g;
  float inv_scale, clip;
  FUSED_HD float operator()(int64_t i) const { return unscale<G>(g[i], inv_scale) * clip; }
};

// On a skipped step (kWriteBuffer false) U is still computed, from that step's values, for a
// matrix stage whose result is then discarded: deciding otherwise would need the host to read
// found_inf.
template <bool kSmallB, bool kSmallU, bool kNesterov, bool kWriteBuffer, class U>
FUSED_HD void muon_momentum_range(const U& u, float* buf, uint16_t* update, int64_t begin, int64_t end,
                                  int64_t stride, const MuonMomentumArgs& k) {
  for (int64_t i = begin; i < end; i += stride) {
    float b = buf[i];
    update[i] = BF16::store(muon_momentum<kSmallB, kSmallU, kNesterov>(u(i), b, k));
    if (kWriteBuffer) buf[i] = b;
  }
}

// Calls fn with each of `flags` as a std::integral_constant<bool, ...>, so a kernel gets its
// stack's constants as template arguments (GCC keeps a select on a loop-invariant flag as a
// branch, which stops vectorization).
template <class Fn>
void with_flags(Fn&& fn) { fn(); }
template <class Fn, class... Flags>
void with_flags(Fn&& fn, bool first, Flags... rest) {
  auto bound = [&](auto value) {
    with_flags([&](auto... others) { fn(value, others...); }, rest...);
  };
  if (first) bound(std::true_type{}); else bound(std::false_type{});
}

// MuSGD's weight step for one element, torch's op order (see matrix_rules.MuSGD): the Muon
// part (kMuon: o is the orthogonalized update, already scaled and rounded to BF16 as theirs),
// then SGD: d = u + wd * w1, B <- B * mu + d, step = nesterov ? d + mu * B : B. Returns w2.
struct MuSGDArgs {
  float muon_alpha, weight_decay, mu, sgd_alpha, scale;
};

template <bool kMuon, bool kDecay, bool kNesterov>
FUSED_HD float musgd_apply(float w, float o, float u, float& b, const MuSGDArgs& k) {
  const float w1 = kMuon ? fmaf(k.muon_alpha, o, w) : w;
  const float d = kDecay ? fmaf(k.weight_decay, w1, u) : u;  // u.add(w, alpha=wd), skipped at wd = 0 as theirs
#ifdef __CUDA_ARCH__
  const float nb = __fadd_rn(__fmul_rn(b, k.mu), d);  // (b * mu).add_(d): two roundings, never contracted
#else
  const float nb = b * k.mu + d;  // the CPU modules are built without contraction (setup.py)
#endif
  b = nb;
  return fmaf(k.sgd_alpha, kNesterov ? fmaf(k.mu, nb, d) : nb, w1);
}

// Over one member of a stack ([begin, end), stride apart), as muon_apply_range: `update` null
// outside use_muon groups.
template <class P, bool kMuon, bool kDecay, bool kNesterov>
FUSED_HD void musgd_apply_range(const MasterOf<P>& m, const uint16_t* update, const float* u, float* buf,
                                int64_t begin, int64_t end, int64_t stride, const MuSGDArgs& k) {
  for (int64_t i = begin; i < end; i += stride) {
    float o = 0.0f;
    if (kMuon) o = BF16::load(BF16::store(BF16::load(update[i]) * k.scale));  // their O * s, in BF16
    float b = buf[i];
    const float w = musgd_apply<kMuon, kDecay, kNesterov>(m.load(i, true), o, u[i], b, k);
    buf[i] = b;
    m.store(i, w, true);
  }
}

// Calls fn(P{}) for a stack's param storage: kFloat16, kBFloat16 (FP32 masters), or BF16
// params with int16 / int8 remainders (kBFloat16Remainder, kBFloat16Remainder8).
template <class Fn>
void dispatch_stack_param(int code, Fn&& fn) {
  switch (code) {
    case kFloat16: fn(F16{}); break;
    case kBFloat16: fn(BF16{}); break;
    case 3: fn(BF16Remainder{}); break;
    case 4: fn(BF16Remainder8{}); break;
    default: throw std::invalid_argument("fused_opt native: Muon's stages take FP16 or BF16 params");
  }
}

// Member m's master column of a stack whose columns are rows of `per` elements.
template <class P>
FUSED_HD MasterOf<P> member_of(void* masters, uint16_t* const* params, int64_t per, int64_t m) {
  using M = typename MasterOf<P>::MasterStorage;
  return MasterOf<P>(static_cast<M*>(masters) + m * per, params[m]);
}

// int8 state of a stack (state_precision="int8"), decoded to FP32 before its stages and encoded
// after, one state block (kStateBlock elements, state_math.h) at a time: block j of the stack
// is block j % blocks_per of member j / blocks_per, whose blocks, element indices (the
// dither's) and scales start at its own first element, as for the tensor alone. `salt`: the
// member's (AdamW's count) or the stack's (Muon's applied steps).
template <class Codes>
FUSED_HD void decode_stack_block(const void* codes, const float* scales, float* out, int64_t per, int64_t j) {
  const int64_t blocks_per = (per + kStateBlock - 1) / kStateBlock, m = j / blocks_per;
  const int64_t at = (j % blocks_per) * kStateBlock;
  const int n = int(per - at < kStateBlock ? per - at : kStateBlock);
  const auto* member = static_cast<const typename Codes::storage*>(codes) + m * per;
  decode_block<kStateInt8, Codes>(member, scales + m * blocks_per, at, n, out + m * per + at);
}

template <class Codes>
FUSED_HD void encode_stack_block(const float* x, void* codes, float* scales, int64_t per, int64_t j,
                                 uint32_t salt) {
  const int64_t blocks_per = (per + kStateBlock - 1) / kStateBlock, m = j / blocks_per;
  const int64_t at = (j % blocks_per) * kStateBlock;
  const int n = int(per - at < kStateBlock ? per - at : kStateBlock);
  auto* member = static_cast<typename Codes::storage*>(codes) + m * per;
  encode_block<kStateInt8, Codes>(member, scales + m * blocks_per, at, n, x + m * per + at, salt);
}

}  // namespace fused_opt

// The C++ CPU path: the same chunk functions as the CUDA kernels (chunks.h), one chunk per
// task, chunks spread over threads. Each chunk is reduced by one thread in element order and
// the partials are summed in chunk order, so results never depend on the thread count.
#include <algorithm>
#include <thread>
#include <vector>

#include "bindings.h"

namespace fused_opt {
namespace {

// Below this many elements per thread, starting a thread (tens of microseconds) costs more
// than it saves.
constexpr int64_t kMinElementsPerThread = int64_t(1) << 18;

template <class Fn>
void parallel_chunks(const Chunk* chunks, const TensorEntry* table, int64_t num_chunks, int64_t chunk_size,
                     Fn&& fn) {
  int64_t elements = 0;
  for (int64_t c = 0; c < num_chunks; ++c) elements += chunk_end(table[chunks[c].row], chunks[c], chunk_size) - chunks[c].start;
  const int64_t hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::min({hw, num_chunks, elements / kMinElementsPerThread});
  if (threads <= 1) {
    for (int64_t c = 0; c < num_chunks; ++c) fn(c);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    // Contiguous ranges of chunks: neighbouring chunks share tensors, and pages.
    pool.emplace_back([&, t] {
      for (int64_t c = num_chunks * t / threads; c < num_chunks * (t + 1) / threads; ++c) fn(c);
    });
  }
  for (auto& th : pool) th.join();
}

// Pass 1 over one chunk with kLanes independent accumulators, so the compiler can vectorize
// the loop without reassociating floats (no -ffast-math); lanes are then combined in a fixed
// order, so the result does not depend on the vector width.
constexpr int kLanes = 16;

template <class G, bool NormInf>
void partial_chunk(const TensorEntry& t, float inv_scale, int64_t begin, int64_t end, float& acc, int& bad) {
  const auto* g = reinterpret_cast<const typename G::storage*>(t.grad);
  float lane_acc[kLanes] = {};
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
}

void partials(const PartialsArgs& a, int64_t /*stream*/) {
  const auto* chunks = reinterpret_cast<const Chunk*>(a.chunks);
  const auto* table = reinterpret_cast<const TensorEntry*>(a.table);
  const float inv_scale = inverse_scale(reinterpret_cast<const float*>(a.scale));
  dispatch_dtype(a.grad_dtype, [&](auto g) {
    using G = decltype(g);
    parallel_chunks(chunks, table, a.num_chunks, a.chunk_size, [&](int64_t c) {
      const TensorEntry& t = table[chunks[c].row];
      float acc = 0.0f;
      int bad = 0;
      const int64_t end = chunk_end(t, chunks[c], a.chunk_size);
      if (a.norm_inf) {
        partial_chunk<G, true>(t, inv_scale, chunks[c].start, end, acc, bad);
      } else {
        partial_chunk<G, false>(t, inv_scale, chunks[c].start, end, acc, bad);
      }
      reinterpret_cast<float*>(a.partials)[c] = acc;
      reinterpret_cast<int32_t*>(a.flags)[c] = bad;
    });
  });
}

void finalize_step(const ReduceArgs& r, const FinalizeArgs& a, int64_t /*stream*/) {
  const auto* partials = reinterpret_cast<const float*>(r.partials);
  const auto* flags = reinterpret_cast<const int32_t*>(r.flags);
  float total = 0.0f;
  int bad = 0;
  for (int64_t c = 0; c < r.num_chunks; ++c) {
    total = a.norm_inf ? std::max(total, partials[c]) : total + partials[c];
    bad |= flags[c];
  }
  finalize(a, total, bad != 0);
}

void update(const UpdateArgs& a, int64_t /*stream*/) {
  const auto* scalars = reinterpret_cast<const StepScalars*>(a.scalars);
  if (scalars->found_inf != 0.0f) return;  // a skipped step writes nothing
  const auto* chunks = reinterpret_cast<const Chunk*>(a.chunks);
  const auto* table = reinterpret_cast<const TensorEntry*>(a.table);
  const auto* groups = reinterpret_cast<const Hyper*>(a.groups);
  const int32_t applied = *reinterpret_cast<const int32_t*>(a.applied_steps);
  check_same_dtype(a);
  dispatch_dtype(a.grad_dtype, [&](auto g) {
    using G = decltype(g);  // torch keeps a grad in its param's dtype
    parallel_chunks(chunks, table, a.num_chunks, a.chunk_size, [&](int64_t c) {
      const TensorEntry& t = table[chunks[c].row];
      const Hyper& h = groups[t.group];
      const StepCoefs coefs = step_coefs(h, scalars->clip_coef, claim_first_step(t, applied, true));
      dispatch_tensor(t, coefs.nesterov, [&](auto has_buf, auto has_param, auto nesterov) {
        update_range<G, G, decltype(has_buf)::value, decltype(has_param)::value, decltype(nesterov)::value>(
            t, coefs, scalars->inv_scale, chunks[c].start, chunk_end(t, chunks[c], a.chunk_size), 1);
      });
    });
  });
}

}  // namespace
}  // namespace fused_opt

PYBIND11_MODULE(_native_cpu, m) {
  m.doc() = "fused_opt C++ CPU kernels";
  fused_opt::bind_step(m, fused_opt::partials, fused_opt::finalize_step, fused_opt::update);
}

// CPU kernel behind combine, combine_list and the write-back of every surgery op:
// out = beta * base + coeffs @ x over a huge column dimension, for a list of segments.
//
// Rows are read where they lie (fp16/bf16 converted in registers), each output vector is summed
// in registers and written once, converted back in registers. With beta == 0 the base is never
// read, so NaN in an uninitialised output cannot leak into the result.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "mtunlearn/cpu_parallel.h"
#include "mtunlearn/cpu_simd.h"
#include "mtunlearn/kernels.h"

namespace mtunlearn {
namespace cpu {
namespace {

using namespace cpu_simd;

struct Item {
  int64_t segment;
  int64_t col_begin;
  int64_t col_end;
};

struct CombineProblem {
  const CombineSegment* segments;
  int64_t m;
  int64_t k;
  double beta;
  const void* coeffs;
  int64_t tile;
};

// Each output vector is accumulated in registers over the k rows (read where they lie, fp16/bf16
// converted as loaded) and written once; kVecs independent vectors per step keep the two FMA
// pipes busy (each vector is a chain of k dependent FMAs of latency 4).
template <typename Tag, bool kAvx2>
MTU_ALWAYS_INLINE void combine_item(const CombineProblem& p, const Item& item,
                                    const typename Tag::storage** rows) {
  using Acc = typename Tag::acc;
  using S = typename Tag::storage;
  using IO = VecIO<Tag, kAvx2>;
  using V = typename IO::V;
  constexpr int kVecs = 8;
  constexpr int64_t kStepCols = kVecs * IO::kCols;  // a whole number of load groups
  const CombineSegment& seg = p.segments[item.segment];
  const Acc* coeffs = static_cast<const Acc*>(p.coeffs) + seg.coeff_index * p.m * p.k;
  const S* x = static_cast<const S*>(seg.x);
  const S* base = static_cast<const S*>(seg.base);
  S* out = static_cast<S*>(seg.out);
  const bool use_base = base != nullptr && p.beta != 0.0;
  const Acc beta = static_cast<Acc>(p.beta);
  // One output row reads every input row once: no reuse to keep in L1, no tiles. Several output
  // rows re-read the same tile of the inputs, sized to stay in L1.
  const int64_t ld = p.m == 1 ? item.col_end - item.col_begin : p.tile;
  for (int64_t c0 = item.col_begin; c0 < item.col_end; c0 += ld) {
    const int64_t w = std::min(ld, item.col_end - c0);
    const int64_t steps = w / kStepCols;
    for (int64_t r = 0; r < p.k; ++r) rows[r] = x + r * seg.x_row_stride + c0;
    for (int64_t i = 0; i < p.m; ++i) {
      const Acc* ci = coeffs + i * p.k;
      S* o = out + i * seg.out_row_stride + c0;
      const S* b = use_base ? base + i * seg.base_row_stride + c0 : nullptr;
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t v0 = s * kVecs;  // even: the bf16 half of vector v0 + u is u's parity
        V acc[kVecs];
        if (use_base) {
          for (int u = 0; u < kVecs; ++u) acc[u] = beta * IO::load(b, v0 + u);
        } else {
          for (int u = 0; u < kVecs; ++u) acc[u] = V{};
        }
        for (int64_t j = 0; j < p.k; ++j) {
          const V cj = V{} + ci[j];
          const S* xj = rows[j];
          for (int u = 0; u < kVecs; ++u) acc[u] += cj * IO::load(xj, v0 + u);
        }
        for (int u = 0; u < kVecs; u += IO::kGroup) IO::store_group(o, (v0 + u) / IO::kGroup, acc + u);
      }
      for (int64_t c = steps * kStepCols; c < w; ++c) {
        Acc t = use_base ? beta * to_acc<Tag>(b[c]) : Acc(0);
        for (int64_t j = 0; j < p.k; ++j) t += ci[j] * to_acc<Tag>(rows[j][c]);
        o[c] = from_acc<Tag>(t);
      }
    }
  }
}

// One contiguous range of items, run by one thread; the AVX2 instantiation lives inside a
// target("avx2,fma,f16c") function (parallel_for's lambda would not inherit the attribute).
template <typename Tag, bool kAvx2>
MTU_ALWAYS_INLINE void run_range_impl(const CombineProblem& p, const Item* items, int64_t count) {
  std::vector<const typename Tag::storage*> rows(static_cast<size_t>(std::max<int64_t>(p.k, 1)));
  for (int64_t it = 0; it < count; ++it) combine_item<Tag, kAvx2>(p, items[it], rows.data());
}

using RangeFn = void (*)(const CombineProblem&, const Item*, int64_t);

template <typename Tag>
void run_range_baseline(const CombineProblem& p, const Item* items, int64_t count) {
  run_range_impl<Tag, false>(p, items, count);
}

#if MTU_X86
#define MTU_DEFINE_AVX2_RANGE(TAG)                                                         \
  MTU_AVX2_FLATTEN void run_range_avx2_##TAG(const CombineProblem& p, const Item* items,    \
                                            int64_t count) {                                \
    run_range_impl<TAG, true>(p, items, count);                                             \
  }
MTU_DEFINE_AVX2_RANGE(F64)
MTU_DEFINE_AVX2_RANGE(F32)
MTU_DEFINE_AVX2_RANGE(F16)
MTU_DEFINE_AVX2_RANGE(BF16)
#undef MTU_DEFINE_AVX2_RANGE
#endif

template <typename Tag>
void run_items(const CombineProblem& p, const std::vector<Item>& items, RangeFn avx2_range) {
  const RangeFn fn = (avx2_range && has_avx2()) ? avx2_range : &run_range_baseline<Tag>;
  const int64_t count = static_cast<int64_t>(items.size());
  parallel_for_as_caller(0, count, 1, [&](int64_t begin, int64_t end) {
    fn(p, items.data() + begin, end - begin);
  });
}

}  // namespace

void combine(ScalarKind kind, const CombineSegment* segments, int64_t num_segments, int64_t m,
             int64_t k, const void* coeffs, double beta) {
  if (m == 0) return;
  CombineProblem p{segments, m, k, beta, coeffs, 0};
  p.tile = std::max<int64_t>(64, std::min<int64_t>(4096, 24 * 1024 / (element_size(kind) * std::max<int64_t>(k, 1)) / 64 * 64));
  // Columns per item: enough work per task, independent of the thread count.
  constexpr int64_t kItemCols = 16384;
  std::vector<Item> items;
  for (int64_t s = 0; s < num_segments; ++s)
    for (int64_t c = 0; c < segments[s].ncols; c += kItemCols)
      items.push_back({s, c, std::min(segments[s].ncols, c + kItemCols)});
  if (items.empty()) return;
  switch (kind) {
#if MTU_X86
    case ScalarKind::Float64: run_items<F64>(p, items, run_range_avx2_F64); break;
    case ScalarKind::Float32: run_items<F32>(p, items, run_range_avx2_F32); break;
    case ScalarKind::Float16: run_items<F16>(p, items, run_range_avx2_F16); break;
    case ScalarKind::BFloat16: run_items<BF16>(p, items, run_range_avx2_BF16); break;
#else
    case ScalarKind::Float64: run_items<F64>(p, items, nullptr); break;
    case ScalarKind::Float32: run_items<F32>(p, items, nullptr); break;
    case ScalarKind::Float16: run_items<F16>(p, items, nullptr); break;
    case ScalarKind::BFloat16: run_items<BF16>(p, items, nullptr); break;
#endif
  }
}

}  // namespace cpu
}  // namespace mtunlearn

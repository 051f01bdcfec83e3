// CPU kernel behind combine, combine_list and the write-back of every surgery op:
// out = beta * base + coeffs @ x over a huge column dimension, for a list of segments.
//
// Each tile of the k input rows is converted once to the accumulation type, every output row
// is accumulated in a tile-sized buffer four input rows at a time (fewer passes over it), then
// converted back once. With beta == 0 the base is never read, so NaN in an uninitialised output
// cannot leak into the result.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

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

template <typename Tag, bool kAvx2>
MTU_ALWAYS_INLINE void combine_item(const CombineProblem& p, const Item& item,
                                    typename Tag::acc* x_tile, typename Tag::acc* acc_row) {
  using Acc = typename Tag::acc;
  using S = typename Tag::storage;
  const CombineSegment& seg = p.segments[item.segment];
  const Acc* coeffs = static_cast<const Acc*>(p.coeffs) + seg.coeff_index * p.m * p.k;
  const S* x = static_cast<const S*>(seg.x);
  const S* base = static_cast<const S*>(seg.base);
  S* out = static_cast<S*>(seg.out);
  const bool use_base = base != nullptr && p.beta != 0.0;
  const Acc beta = static_cast<Acc>(p.beta);
  const int64_t ld = p.tile;
  // fp32/fp64 rows are read where they lie; fp16/bf16 rows are converted once per tile.
  constexpr bool kDirect = std::is_same<S, Acc>::value;
  std::vector<const Acc*> rows(static_cast<size_t>(p.k));
  for (int64_t c0 = item.col_begin; c0 < item.col_end; c0 += ld) {
    const int64_t w = std::min(ld, item.col_end - c0);
    for (int64_t r = 0; r < p.k; ++r) {
      if constexpr (kDirect) {
        rows[r] = reinterpret_cast<const Acc*>(x + r * seg.x_row_stride + c0);
      } else {
        load_row<Tag, kAvx2>(x + r * seg.x_row_stride + c0, x_tile + r * ld, w);
        rows[r] = x_tile + r * ld;
      }
    }
    for (int64_t i = 0; i < p.m; ++i) {
      // Accumulate straight into a float/double output row when no conversion is needed.
      Acc* acc = kDirect ? reinterpret_cast<Acc*>(out + i * seg.out_row_stride + c0) : acc_row;
      if (use_base) {
        const S* base_row = base + i * seg.base_row_stride + c0;
        if constexpr (kDirect) {
          const Acc* b = reinterpret_cast<const Acc*>(base_row);
          for (int64_t c = 0; c < w; ++c) acc[c] = beta * b[c];
        } else {
          load_row<Tag, kAvx2>(base_row, acc, w);
          for (int64_t c = 0; c < w; ++c) acc[c] *= beta;
        }
      } else {
        std::fill(acc, acc + w, Acc(0));
      }
      const Acc* ci = coeffs + i * p.k;
      int64_t j = 0;
      for (; j + 4 <= p.k; j += 4) {
        const Acc a0 = ci[j], a1 = ci[j + 1], a2 = ci[j + 2], a3 = ci[j + 3];
        const Acc* x0 = rows[j];
        const Acc* x1 = rows[j + 1];
        const Acc* x2 = rows[j + 2];
        const Acc* x3 = rows[j + 3];
        for (int64_t c = 0; c < w; ++c)
          acc[c] += a0 * x0[c] + a1 * x1[c] + a2 * x2[c] + a3 * x3[c];
      }
      for (; j < p.k; ++j) {
        const Acc a0 = ci[j];
        const Acc* x0 = rows[j];
        for (int64_t c = 0; c < w; ++c) acc[c] += a0 * x0[c];
      }
      if constexpr (!kDirect) store_row<Tag, kAvx2>(acc_row, out + i * seg.out_row_stride + c0, w);
    }
  }
}

// One contiguous range of items, run by one thread; the AVX2 instantiation lives inside a
// target("avx2,fma,f16c") function (parallel_for's lambda would not inherit the attribute).
template <typename Tag, bool kAvx2>
MTU_ALWAYS_INLINE void run_range_impl(const CombineProblem& p, const Item* items, int64_t count) {
  using Acc = typename Tag::acc;
  std::vector<Acc> x_tile(static_cast<size_t>(std::max<int64_t>(p.k, 1) * p.tile));
  std::vector<Acc> acc_row(static_cast<size_t>(p.tile));
  for (int64_t it = 0; it < count; ++it)
    combine_item<Tag, kAvx2>(p, items[it], x_tile.data(), acc_row.data());
}

using RangeFn = void (*)(const CombineProblem&, const Item*, int64_t);

template <typename Tag>
void run_range_baseline(const CombineProblem& p, const Item* items, int64_t count) {
  run_range_impl<Tag, false>(p, items, count);
}

#if MTU_X86
#define MTU_DEFINE_AVX2_RANGE(TAG)                                                         \
  MTU_AVX2_TARGET void run_range_avx2_##TAG(const CombineProblem& p, const Item* items,    \
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
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    fn(p, items.data() + begin, end - begin);
  });
}

}  // namespace

void combine(ScalarKind kind, const CombineSegment* segments, int64_t num_segments, int64_t m,
             int64_t k, const void* coeffs, double beta) {
  if (m == 0) return;
  const int64_t acc_bytes = kind == ScalarKind::Float64 ? 8 : 4;
  CombineProblem p{segments, m, k, beta, coeffs, 0};
  p.tile = std::max<int64_t>(64, std::min<int64_t>(2048, 64 * 1024 / (acc_bytes * (k + 2)) / 64 * 64));
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

// Runs the tensor-core Gram tile of include/mtunlearn/mma_gram.h (what the CUDA backend runs
// with MTUNLEARN_CUDA_TENSOR_CORES=1) on std::threads, one per CUDA thread, with a std::barrier
// for __syncthreads() and the tensor-core products done in plain C++, for bfloat16 (16 x 16 x 16
// products of bit patterns) and float32 (each value split into tf32 hi and lo, three 16 x 16 x 8
// products); every product's sum is cut toward zero, the worst a tensor core may do. Each work
// item's partial is compared with float64 sums of the same values. This checks the indexing
// without a GPU: output tiles on and off the diagonal, tiles strided over a short grid, slabs
// ending inside a 16-byte chunk, unaligned rows (element copies), rows from two tensors (a
// stacked Gram), inner products of m x k rows, long rows (float sums moved into double after
// every slab, 5e-8 of |a||b| off in bfloat16; moved every 2048 columns, as first written,
// 5.9e-6); the shared memory and every output entry are poisoned first, so stale or unwritten
// values show, and a Gram must come out exactly symmetric. What only a GPU shows (wmma's
// fragment layouts, alignment of shared memory, speed) is left to benchmarks/gpu_check.py.
//
// Built and run by tests/test_mma_gram_emulation.py; exit status 0 when every case agrees.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "mtunlearn/mma_gram.h"

namespace {

using namespace mtunlearn;

struct Bf16 {
  uint16_t bits;
};

float to_float(Bf16 v) {
  const uint32_t word = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &word, 4);
  return f;
}

Bf16 to_bf16(float f) {  // round to nearest even (finite values only here)
  uint32_t word;
  std::memcpy(&word, &f, 4);
  word += 0x7fffu + ((word >> 16) & 1u);
  return Bf16{static_cast<uint16_t>(word >> 16)};
}

// mma_gram.h's Block on threads.
class ThreadBlock {
 public:
  ThreadBlock(int rank, int size, std::barrier<>& barrier)
      : rank_(rank), size_(size), barrier_(barrier) {}
  int rank() const { return rank_; }
  int size() const { return size_; }
  void sync() { barrier_.arrive_and_wait(); }

 private:
  int rank_, size_;
  std::barrier<>& barrier_;
};

float to_float(float v) { return v; }

// tf32 as the tensor cores take it (cvt.rna.tf32.f32): 10 mantissa bits, rounded to nearest,
// ties away from zero (finite values only here).
float to_tf32(float f) {
  uint32_t word;
  std::memcpy(&word, &f, 4);
  word = (word + 0x1000u) & ~0x1fffu;
  std::memcpy(&f, &word, 4);
  return f;
}

// wmma's collective fragment operations, done whole by lane 0 of each warp (the other lanes'
// fragments stay zero and are never stored), which keeps the emulation 32x cheaper than
// repeating every product in every lane. element(acc, e) runs over the whole fragment.
// Elem: Bf16 (one 16 x 16 x 16 product per step) or float (the CUDA side's WmmaTf32Ops: every
// value split into tf32 hi and lo, three 16 x 16 x 8 products).
template <typename Elem>
struct EmulatedOps {
  static constexpr bool split = sizeof(Elem) == 4;
  static constexpr int k_step = split ? 8 : 16;
  struct FragA {
    float hi[16 * k_step], lo[16 * k_step];
  };
  struct FragB {
    float hi[16 * k_step], lo[16 * k_step];
  };
  struct Acc {
    float v[256];
  };
  static constexpr int acc_elements = 256;
  bool lead;  // lane 0 of its warp

  static void set(float x, float& hi, float& lo) {
    if (split) {
      hi = to_tf32(x);
      lo = to_tf32(x - hi);
    } else {
      hi = x;
      lo = 0.0f;
    }
  }
  // wmma's demand on every fragment address, which the CUDA side asserts only statically.
  static void check_aligned(const void* p) {
    if ((reinterpret_cast<uintptr_t>(p) & 31u) != 0) {
      std::printf("FAIL: a fragment address not 32-byte aligned\n");
      std::abort();
    }
  }
  void zero(Acc& c) const { std::fill(c.v, c.v + 256, 0.0f); }
  void load_a(FragA& f, const Elem* p, int ldm) const {
    check_aligned(p);
    if (!lead) return;
    for (int r = 0; r < 16; ++r)
      for (int kk = 0; kk < k_step; ++kk)
        set(to_float(p[r * ldm + kk]), f.hi[r * k_step + kk], f.lo[r * k_step + kk]);
  }
  void load_b(FragB& f, const Elem* p, int ldm) const {
    check_aligned(p);
    if (!lead) return;
    for (int kk = 0; kk < k_step; ++kk)
      for (int n = 0; n < 16; ++n)
        set(to_float(p[n * ldm + kk]), f.hi[kk * 16 + n], f.lo[kk * 16 + n]);
  }
  // c += a b as a tensor core may do it at worst (Fasi et al. 2021, measured on V100, T4 and
  // A100): for every group of 8 products, the group and c are aligned to the largest of their
  // exponents, the bits below float's precision there dropped, the exact sum of what is left
  // cut toward zero to float.
  static void product(float* c, const float* a, const float* b) {
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) {
        float acc = c[r * 16 + n];
        for (int g = 0; g < k_step; g += 8) {
          double terms[9];
          terms[0] = acc;
          for (int kk = 0; kk < 8; ++kk)  // each product exact in double
            terms[kk + 1] = static_cast<double>(a[r * k_step + g + kk]) * b[(g + kk) * 16 + n];
          acc = aligned_sum(terms, 9);
        }
        c[r * 16 + n] = acc;
      }
  }
  static float aligned_sum(const double* terms, int count) {
    double largest = 0.0;
    for (int i = 0; i < count; ++i) largest = std::max(largest, std::fabs(terms[i]));
    if (largest == 0.0) return 0.0f;
    int exponent;
    std::frexp(largest, &exponent);  // largest < 2^exponent
    const double quantum = std::ldexp(1.0, exponent - 24);  // float's last bit there
    double sum = 0.0;  // multiples of quantum, a few of them: exact
    for (int i = 0; i < count; ++i) sum += std::trunc(terms[i] / quantum) * quantum;
    const float f = static_cast<float>(sum);
    return std::fabs(static_cast<double>(f)) > std::fabs(sum) ? std::nextafter(f, 0.0f) : f;
  }
  // As WmmaOps / WmmaTf32Ops: a step's products into a fresh fragment, added to the running
  // sums in float.
  void mma(Acc& c, const FragA& a, const FragB& b) const {
    if (!lead) return;
    float step[256] = {};
    if (split) {
      product(step, a.lo, b.hi);
      product(step, a.hi, b.lo);
    }
    product(step, a.hi, b.hi);
    for (int e = 0; e < 256; ++e) c.v[e] += step[e];
  }
  void store(float* p, const Acc& c, int ldm) const {
    check_aligned(p);
    if (!lead) return;
    for (int r = 0; r < 16; ++r)
      for (int n = 0; n < 16; ++n) p[r * ldm + n] = c.v[r * 16 + n];
  }
  float& element(Acc& c, int e) const { return c.v[e]; }
  struct Chunk {
    unsigned char bytes[16];
  };
  bool aligned16(const Elem* p) const { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
  Chunk load_chunk(const Elem* src) const {
    Chunk c;
    std::memcpy(c.bytes, src, 16);
    return c;
  }
  Chunk load_partial(const Elem* src, int n) const {
    Chunk c = zero_chunk();
    std::memcpy(c.bytes, src, static_cast<size_t>(n) * sizeof(Elem));
    return c;
  }
  Chunk zero_chunk() const {
    Chunk c;
    std::memset(c.bytes, 0, 16);
    return c;
  }
  void store_chunk(Elem* dst, const Chunk& c) const {
    if ((reinterpret_cast<uintptr_t>(dst) & 15u) != 0) {
      std::printf("FAIL: a chunk store not 16-byte aligned\n");
      std::abort();
    }
    std::memcpy(dst, c.bytes, 16);
  }
};

// Emulates one launch: every work item a block, grid_y blocks along the tiles (as the CUDA
// launcher: min(num_tiles, 65535); smaller here to exercise the striding).
template <int TILE, bool SYM, typename Elem>
std::vector<float> run_launch(const ReduceSegment& seg, const std::vector<cuda::ReduceItem>& items,
                              int m, int k, int grid_y) {
  using S = mma_gram::Shape<TILE, sizeof(Elem)>;
  const int tiles_m = (m + TILE - 1) / TILE, tiles_k = (k + TILE - 1) / TILE;
  const int num_tiles = SYM ? tiles_k * (tiles_k + 1) / 2 : tiles_m * tiles_k;
  std::vector<float> partials(items.size() * m * k, std::numeric_limits<float>::quiet_NaN());
  for (size_t it = 0; it < items.size(); ++it) {
    for (int by = 0; by < grid_y && by < num_tiles; ++by) {
      alignas(32) unsigned char smem[S::smem_bytes];
      std::memset(smem, 0xff, sizeof(smem));  // NaN in every format: stale data shows
      std::barrier<> barrier(S::threads);
      std::vector<std::thread> pool;
      for (int t = 0; t < S::threads; ++t)
        pool.emplace_back([&, t] {
          ThreadBlock block(t, S::threads, barrier);
          EmulatedOps<Elem> ops{t % 32 == 0};
          mma_gram::reduce_item_tiles<TILE, SYM, ThreadBlock, EmulatedOps<Elem>, Elem>(
              block, ops, seg, items[it].col_begin, items[it].col_end, m, k, tiles_k, num_tiles,
              by, grid_y < num_tiles ? grid_y : num_tiles, partials.data() + it * m * k, smem);
        });
      for (auto& th : pool) th.join();
    }
  }
  return partials;
}

int failures = 0;

// Rows of values inside a larger buffer (offset, row stride); the padding is NaN.
template <typename Elem>
struct Matrix {
  std::vector<Elem> storage;
  int64_t offset, stride;
  const Elem* row(int64_t i) const { return storage.data() + offset + i * stride; }
};

Bf16 make(float v, Bf16) { return to_bf16(v); }
float make(float v, float) { return v; }

template <typename Elem>
Matrix<Elem> random_rows(std::mt19937& gen, int rows, int64_t cols, int64_t stride,
                         int64_t offset, bool positive) {
  std::normal_distribution<float> normal;
  const Elem nan = make(std::numeric_limits<float>::quiet_NaN(), Elem{});
  Matrix<Elem> mat{std::vector<Elem>(offset + rows * stride + 8, nan), offset, stride};
  for (int i = 0; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c)
      mat.storage[offset + i * stride + c] =
          make(positive ? 0.5f + std::fabs(normal(gen)) : normal(gen), Elem{});
  return mat;
}

std::vector<cuda::ReduceItem> column_items(int64_t ncols, int64_t cols_per_item) {
  std::vector<cuda::ReduceItem> items;
  for (int64_t c = 0; c < ncols; c += cols_per_item)
    items.push_back({0, c, std::min(ncols, c + cols_per_item)});
  return items;
}

// rows_a(i) / rows_b(j): pointers to the rows the segment describes.
template <int TILE, bool SYM, typename Elem, class RowA, class RowB>
void check(const std::string& name, const ReduceSegment& seg, int m, int k, int64_t ncols,
           int64_t cols_per_item, int grid_y, RowA row_a, RowB row_b) {
  const auto items = column_items(ncols, cols_per_item);
  const std::vector<float> partials = run_launch<TILE, SYM, Elem>(seg, items, m, k, grid_y);
  double worst = 0.0;
  bool unwritten = false, asymmetric = false;
  for (size_t it = 0; it < items.size(); ++it)
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < k; ++j) {
        const float got = partials[it * m * k + i * k + j];
        if (std::isnan(got)) unwritten = true;
        if (SYM && got != partials[it * m * k + j * k + i]) asymmetric = true;
        double want = 0.0, na = 0.0, nb = 0.0;
        for (int64_t c = items[it].col_begin; c < items[it].col_end; ++c) {
          const double a = to_float(row_a(i)[c]), b = to_float(row_b(j)[c]);
          want += a * b;
          na += a * a;
          nb += b * b;
        }
        const double err = std::fabs(got - want) / (std::sqrt(na * nb) + 1e-300);
        if (err > worst) worst = err;
      }
  // bfloat16: exact products, float sums of at most one slab. 3xTF32 also leaves out
  // lo_a lo_b and the split's remainders, up to 3 * 2^-22 = 7.2e-7 of |a_i b_i| per product.
  const double tolerance = sizeof(Elem) == 4 ? 1e-6 : 3e-7;
  const bool ok = !unwritten && !asymmetric && worst <= tolerance;
  if (!ok) ++failures;
  std::printf("%s %s: tile=%d m=%d k=%d n=%lld items=%zu grid_y=%d, worst %.2e of |a||b|%s%s\n",
              ok ? "ok  " : "FAIL", name.c_str(), TILE, m, k, static_cast<long long>(ncols),
              items.size(), grid_y, worst, unwritten ? ", UNWRITTEN entries" : "",
              asymmetric ? ", NOT SYMMETRIC" : "");
}

template <int TILE, typename Elem>
void gram_case(std::mt19937& gen, const std::string& name, int m, int64_t ncols, int64_t stride,
               int64_t offset, int64_t cols_per_item, int grid_y, bool positive = false) {
  const Matrix<Elem> x = random_rows<Elem>(gen, m, ncols, stride, offset, positive);
  ReduceSegment seg{x.row(0), x.row(0), stride, stride, ncols, 0};
  auto row = [&](int64_t i) { return x.row(i); };
  check<TILE, true, Elem>(name, seg, m, m, ncols, cols_per_item, grid_y, row, row);
}

// Every case for one element type (names prefixed with `type`).
template <typename Elem>
void run_cases(std::mt19937& gen, const std::string& type) {
  // Gram, 64-wide tiles: 130 rows (3 tiles a side, 6 on or above the diagonal), aligned rows
  // (16-byte copies) with a ragged end, three items; then unaligned rows (element copies),
  // tiles strided over a grid of 4; 40 rows; long rows (positive values, so the rounding of
  // long float sums would add up).
  gram_case<64, Elem>(gen, type + " gram aligned", 130, 1000, 1000, 0, 384, 65535);
  gram_case<64, Elem>(gen, type + " gram unaligned rows", 130, 997, 1003, 3, 448, 4);
  gram_case<64, Elem>(gen, type + " gram 40 rows", 40, 333, 333, 1, 128, 65535);
  gram_case<64, Elem>(gen, type + " gram of long rows", 70, 5000, 5000, 0, 5056, 65535, true);
  // 32-wide tiles: 9 rows (the fewest it takes), 32, and 17 over 5 columns (one partial chunk).
  gram_case<32, Elem>(gen, type + " gram 9 rows", 9, 200, 200, 0, 64, 65535);
  gram_case<32, Elem>(gen, type + " gram 32 rows", 32, 777, 780, 2, 320, 1);
  gram_case<32, Elem>(gen, type + " gram 17 rows, 5 columns", 17, 5, 5, 0, 64, 65535);

  {  // A stacked Gram: rows 0..6 from one tensor, 7..39 from another (a_split).
    const int64_t n = 515;
    const Matrix<Elem> g = random_rows<Elem>(gen, 7, n, 520, 0, false);
    const Matrix<Elem> r = random_rows<Elem>(gen, 33, n, 515, 5, false);
    ReduceSegment seg{g.row(0), g.row(0), 520, 520, n, 0, r.row(0), 515, 7};
    auto row = [&](int64_t i) { return i < 7 ? g.row(i) : r.row(i - 7); };
    check<64, true, Elem>(type + " stacked gram", seg, 40, 40, n, 192, 65535, row, row);
  }
  // Inner products: 3 x 100 (64-wide tiles, 1 x 2), 17 x 9 (32-wide), 70 x 33 on a grid of 3.
  // (The CUDA dispatcher sends those with fewer than 16 rows a side to the tiled kernel; the
  // tile takes them all.)
  struct Case {
    int m, k;
    int64_t n, per_item;
    int grid_y;
    bool wide;
  };
  for (const Case& c : {Case{3, 100, 1000, 256, 65535, true}, Case{17, 9, 300, 128, 65535, false},
                        Case{70, 33, 2100, 2112, 3, true}}) {
    const Matrix<Elem> a = random_rows<Elem>(gen, c.m, c.n, c.n + 1, 1, false);
    const Matrix<Elem> b = random_rows<Elem>(gen, c.k, c.n, c.n, 0, false);
    ReduceSegment seg{a.row(0), b.row(0), c.n + 1, c.n, c.n, 0};
    auto ra = [&](int64_t i) { return a.row(i); };
    auto rb = [&](int64_t j) { return b.row(j); };
    if (c.wide)
      check<64, false, Elem>(type + " inner", seg, c.m, c.k, c.n, c.per_item, c.grid_y, ra, rb);
    else
      check<32, false, Elem>(type + " inner", seg, c.m, c.k, c.n, c.per_item, c.grid_y, ra, rb);
  }
}

}  // namespace

int main() {
  std::mt19937 gen(20261204);
  run_cases<Bf16>(gen, "bf16");
  run_cases<float>(gen, "fp32 (3xtf32)");
  std::printf("ok: %d mismatching case(s)\n", failures);
  return failures == 0 ? 0 : 1;
}

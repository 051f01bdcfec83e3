// CPU kernel behind gram, gram_list and inner: inner products of m rows with k rows over a huge
// column dimension, for a list of segments (batch entries or per-parameter tensors).
//
// Work split: every segment is cut into column ranges ("items") whose size depends only on the
// problem, never on the thread count, and items are reduced in a fixed order: results are
// bitwise reproducible. Within an item, columns are processed in cache-sized tiles: each tile of
// every row is converted once to the accumulation type (fp16/bf16 -> fp32), then a 3 x 4
// register-blocked micro-kernel computes the inner products (upper triangle only for a Gram).
// Tile sums are accumulated in double, so fp32 inputs lose nothing over long rows. On CPUs with
// AVX-512 the micro-kernel runs as grids of up to 6 x 8 products on zmm registers, each lane
// doing the AVX2 kernel's operations in its order (block_dot_wide_grid): the same bits, faster.
//
// Small problems (a Gram of <= 16 rows, <= 8 x 16 inner products: every surgery step) take
// another path: exact register blocks over the rows where they lie, fp16/bf16 converted in
// registers as they are loaded (no converted copy), no padding rows (see SmallBlock).
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "mtunlearn/cpu_parallel.h"
#include "mtunlearn/cpu_simd.h"
#include "mtunlearn/kernels.h"

namespace mtunlearn {
namespace cpu {
namespace {

using namespace cpu_simd;

constexpr int kMR = 3;
constexpr int kNR = 4;
constexpr int64_t kMinItemCols = 4096;
constexpr int64_t kMaxPartialDoubles = int64_t(1) << 22;  // bounds the partials buffer (32 MiB)

struct AlignedBuffer {
  void* ptr = nullptr;
  explicit AlignedBuffer(size_t bytes) {
    ptr = std::aligned_alloc(64, round_up(static_cast<int64_t>(std::max<size_t>(bytes, 64)), 64));
    if (!ptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { std::free(ptr); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

struct Item {
  int64_t segment;
  int64_t col_begin;
  int64_t col_end;
};

struct ReduceProblem {
  const ReduceSegment* segments;
  int64_t m;
  int64_t k;
  bool symmetric;
  int64_t rows_a;         // rows of A covered by kMR-row blocks (m rounded up to kMR)
  int64_t rows_b;         // rows of B covered by kNR-row blocks
  int64_t buffer_rows_a;  // rows allocated for the A tile (a Gram's blocks read it as B too)
  int64_t buffer_rows_b;
  int64_t tile;    // columns per tile
  // Small problems (see SmallBlock): exact register blocks instead of padded kMR x kNR ones.
  const std::vector<struct SmallBlock>* small_plan = nullptr;
  int64_t small_lanes = 0;  // accumulator vectors over all blocks of the plan
  cpu_isa::Isa isa = cpu_isa::Isa::Baseline;  // the call's instruction set, read once (reduce)
};

// One register block of the small-problem path: rows [r0, r0 + mr) of A against rows
// [c0, c0 + nr) of B, or, for a diagonal block of a Gram (sym), the pairs r <= c of rows
// [r0, r0 + mr). The padded 3 x 4 blocks of the general path spend most of their multiplies on
// zero rows and on the lower triangle when k is small (k = 8: 60 products for 36 wanted), and
// the Gram pass at k <= 16 is compute-bound out of cache; these blocks compute each wanted
// product once (k = 8: 36; k = 16: 136 instead of 180).
struct SmallBlock {
  int code;  // template instance, see small_code
  int64_t r0, c0;
  int mr, nr;
  bool sym;
  int64_t lane_off;
};

// C[MR x NR] += A[MR rows] . B[NR rows] over `width` columns, with the running sums kept as
// vectors in `lanes` (float lanes are summed into double only every kFlushCols columns, so the
// horizontal sums cost nothing per tile and fp32 accuracy does not depend on the row length).
// Only the first MU rows and NU columns of the block are computed: with m % kMR rows of A left
// in the last block (one direction against many rows: m = 1) or k < kNR rows of B (many rows
// against one direction) the others would be padding, whose lanes stay zero and are never
// read. Each computed product accumulates exactly as in the full block (same vectors, same
// order), so the results do not depend on which variant ran.
template <typename Acc, int MR, int NR, int NU = NR, int MU = MR>
MTU_ALWAYS_INLINE void block_dot(const Acc* const* a_rows, const Acc* const* b_rows, int64_t width,
                                 typename VecOf<Acc>::type* lanes) {
  static_assert(NU >= 1 && NU <= NR, "block_dot: 1 <= NU <= NR");
  static_assert(MU >= 1 && MU <= MR, "block_dot: 1 <= MU <= MR");
  using V = typename VecOf<Acc>::type;
  constexpr int L = VecOf<Acc>::lanes;
  V acc[MU][NU];
  const Acc* a[MU];
  const Acc* b[NU];
  for (int r = 0; r < MU; ++r) a[r] = a_rows[r];
  for (int c = 0; c < NU; ++c) b[c] = b_rows[c];
  for (int r = 0; r < MU; ++r)
    for (int c = 0; c < NU; ++c) acc[r][c] = lanes[r * NR + c];
  for (int64_t col = 0; col < width; col += L) {
    V av[MU];
    for (int r = 0; r < MU; ++r) av[r] = load_vec<V>(a[r] + col);
    for (int c = 0; c < NU; ++c) {
      const V bv = load_vec<V>(b[c] + col);
      for (int r = 0; r < MU; ++r) acc[r][c] += av[r] * bv;
    }
  }
  for (int r = 0; r < MU; ++r)
    for (int c = 0; c < NU; ++c) lanes[r * NR + c] = acc[r][c];
}

// block_dot over the first `nu` (1..kNR) rows of B, MU rows of A.
template <typename Acc, int MU, int MR = kMR>
MTU_ALWAYS_INLINE void block_dot_nu(int nu, const Acc* const* a_rows, const Acc* const* b_rows,
                                    int64_t width, typename VecOf<Acc>::type* lanes) {
  switch (nu) {
    case 1: block_dot<Acc, MR, kNR, 1, MU>(a_rows, b_rows, width, lanes); break;
    case 2: block_dot<Acc, MR, kNR, 2, MU>(a_rows, b_rows, width, lanes); break;
    case 3: block_dot<Acc, MR, kNR, 3, MU>(a_rows, b_rows, width, lanes); break;
    default: block_dot<Acc, MR, kNR, kNR, MU>(a_rows, b_rows, width, lanes); break;
  }
}

#if MTU_HAVE_AVX512_KERNELS
// block_dot on AVX-512, over two full blocks of B side by side (rows [0, 2 kNR) of b_rows) and
// NA blocks of A (NA = 2: rows [0, 2 kMR) of a_rows, both full): the lanes of block (i, j) are
// at lanes[i] + j * kMR * kNR. The lanes of products (r, c) and (r, c + 1) sit side by side, so
// one zmm register holds both, and twice(a_r) * join(b_c, b_c+1) updates both in one FMA; every
// lane sees the operations of block_dot, in its order, so the results are bitwise those of the
// AVX2 kernel. The 8 rows of B are paired once per column step and every row of A repeated
// once for all of them: a 6 x 8 grid makes 24 zmm FMAs per 14 vector loads, where
// 3 x 4 blocks make 6 per 7 (and the AVX2 kernel 12 ymm FMAs per 7), so the pass is no longer
// bound by loads from L2 (32 x 192 rows of 227k values: 36.8 ms with AVX2, 30 with 3 x 8
// grids, 25.5 with 6 x 8; benchmarks/memory_inner_shapes.py).
template <typename Acc, int MU, int NA>
MTU_ALWAYS_INLINE void block_dot_wide_grid(const Acc* const* a_rows, const Acc* const* b_rows,
                                           int64_t width,
                                           typename VecOf<Acc>::type* const* lanes) {
  static_assert(NA == 1 || MU == kMR, "block_dot_wide_grid: two blocks of A must be full");
  using V = typename VecOf<Acc>::type;
  using W = typename VecOf<Acc>::pair;
  constexpr int L = VecOf<Acc>::lanes;
  constexpr int NP = kNR;     // pairs over 2 * kNR rows of B
  constexpr int R = NA * MU;  // rows of A
  W acc[R][NP];
  const Acc* a[R];
  const Acc* b[2 * kNR];
  for (int r = 0; r < R; ++r) a[r] = a_rows[r];
  for (int c = 0; c < 2 * kNR; ++c) b[c] = b_rows[c];
  // Pair q of row r: rows 2q, 2q + 1 of B, in block (r / MU, q / (kNR / 2)).
  auto lane_of = [&](int r, int q) MTU_ALWAYS_INLINE_LAMBDA {
    return lanes[r / MU] + (q / (kNR / 2)) * kMR * kNR + (r % MU) * kNR + 2 * (q % (kNR / 2));
  };
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NP; ++q) acc[r][q] = load_vec<W>(lane_of(r, q));
  for (int64_t col = 0; col < width; col += L) {
    W bw[NP];
    for (int q = 0; q < NP; ++q)
      bw[q] = join(load_vec<V>(b[2 * q] + col), load_vec<V>(b[2 * q + 1] + col));
    for (int r = 0; r < R; ++r) {
      const W aw = twice_at<W>(a[r] + col);
      for (int q = 0; q < NP; ++q) acc[r][q] += aw * bw[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NP; ++q) store_vec(lane_of(r, q), acc[r][q]);
}

#endif

constexpr int64_t kFlushCols = 2048;
// A rows per pass of the many-rows-against-a-direction sweep (process_item_impl). Against one
// row of B the 8 accumulators fit the 16 AVX2 registers; against 4 some spill, and the sweep
// is still faster than the tiles (192 x 4: 11.5 -> 9.7 ms).
constexpr int kSweepRows = 8;
constexpr int64_t kManyRowsTile = 256;  // see reduce(): a divisor of kFlushCols
static_assert(kFlushCols % kManyRowsTile == 0 && kFlushCols % 64 == 0,
              "tiles of many-row problems must flush at the same columns as 64-column tiles");

// Prefetches of the next tile's rows into L2, spread over the current tile's block calls.
// A tile reads every row of A and B for a few cache lines (256 columns: 16 lines), hundreds of
// short streams that the hardware prefetchers do not follow: each row's first touch waited on
// memory while the FMAs idled (32 x 192 rows over 227k columns, one thread, Intel Xeon: 52 ms,
// where the reads alone take ~17 ms and the products ~28). Fetching tile t + 1 while tile t is
// computed overlaps the two. Prefetches change no arithmetic: the results are bitwise the same.
class NextTilePrefetch {
 public:
  explicit NextTilePrefetch(int64_t max_rows) { rows_.reserve(static_cast<size_t>(max_rows)); }

  // Start on the rows of the next tile (`bytes` of each from its pointer), to be fetched over
  // about `calls` calls of step().
  void start(int64_t bytes, int64_t calls) {
    lines_per_row_ = (bytes + 63) / 64 + 1;  // +1: a row need not start on a line boundary
    total_ = static_cast<int64_t>(rows_.size()) * lines_per_row_;
    per_call_ = (total_ + std::max<int64_t>(calls, 1) - 1) / std::max<int64_t>(calls, 1);
    row_ = 0;
    line_ = 0;
    issued_ = 0;
  }
  void clear() { rows_.clear(); total_ = issued_ = 0; }
  void add_row(const void* row) { rows_.push_back(static_cast<const char*>(row)); }

  MTU_ALWAYS_INLINE void step() { issue(per_call_); }
  void finish() { issue(total_ - issued_); }

 private:
  MTU_ALWAYS_INLINE void issue(int64_t count) {
    for (int64_t i = 0; i < count && issued_ < total_; ++i, ++issued_) {
      __builtin_prefetch(rows_[static_cast<size_t>(row_)] + line_ * 64, 0, 2);
      if (++line_ == lines_per_row_) {
        line_ = 0;
        ++row_;
      }
    }
  }

  std::vector<const char*> rows_;
  int64_t lines_per_row_ = 0, total_ = 0, per_call_ = 0, row_ = 0, line_ = 0, issued_ = 0;
};

template <typename Tag, bool kAvx2, bool kWide>
MTU_ALWAYS_INLINE void process_item_impl(const ReduceProblem& p, const Item& item,
                                         typename Tag::acc* tile_a, typename Tag::acc* tile_b,
                                         typename VecOf<typename Tag::acc>::type* lanes,
                                         double* item_acc, const Item* next_item) {
  using Acc = typename Tag::acc;
  using S = typename Tag::storage;
  using V = typename VecOf<Acc>::type;
  constexpr int L = VecOf<Acc>::lanes;
  const ReduceSegment& seg = p.segments[item.segment];
  const S* b = static_cast<const S*>(seg.b);
  const int64_t ld = p.tile;
  const int64_t blocks_i = p.rows_a / kMR, blocks_j = p.rows_b / kNR;
  const int64_t lane_count = blocks_i * blocks_j * kMR * kNR;
  std::fill(item_acc, item_acc + p.rows_a * p.rows_b, 0.0);
  std::fill(lanes, lanes + lane_count, V{});
  // Rows past m (or k) stay zero for the whole item; padded tail columns are zeroed per tile.
  std::fill(tile_a, tile_a + p.buffer_rows_a * ld, Acc(0));
  if (!p.symmetric) std::fill(tile_b, tile_b + p.buffer_rows_b * ld, Acc(0));
  auto flush = [&]() {
    for (int64_t bi = 0; bi < blocks_i; ++bi)
      for (int64_t bj = 0; bj < blocks_j; ++bj) {
        V* blk = lanes + (bi * blocks_j + bj) * kMR * kNR;
        for (int r = 0; r < kMR; ++r)
          for (int c = 0; c < kNR; ++c) {
            item_acc[(bi * kMR + r) * p.rows_b + bj * kNR + c] += hsum(blk[r * kNR + c]);
            blk[r * kNR + c] = V{};
          }
      }
  };
  int64_t since_flush = 0;
  // Rows are read where they lie when no conversion is needed (fp32/fp64 full tiles); rows
  // past m (or k), conversions and ragged tails go through the zero-padded tile buffers.
  constexpr bool kDirect = std::is_same<S, Acc>::value;
  std::vector<const Acc*> a_rows(p.rows_a), b_rows(p.rows_b);
  const Acc* zeros = p.symmetric ? tile_a + (p.buffer_rows_a - 1) * ld : tile_b + (p.buffer_rows_b - 1) * ld;
  // Row r of A (of B) from column c0 on: in place when `direct`, else converted into the tile
  // buffer and zero-padded from w to wpad columns. Rows past m (or k) are the zero row.
  auto row_a = [&](int64_t r, int64_t c0, int64_t w, int64_t wpad, bool direct) -> const Acc* {
    if (r >= p.m) return zeros;
    if (direct) return reinterpret_cast<const Acc*>(segment_row_a<S>(seg, r) + c0);
    load_row<Tag, kAvx2>(segment_row_a<S>(seg, r) + c0, tile_a + r * ld, w);
    std::fill(tile_a + r * ld + w, tile_a + r * ld + wpad, Acc(0));
    return tile_a + r * ld;
  };
  auto row_b = [&](int64_t r, int64_t c0, int64_t w, int64_t wpad, bool direct) -> const Acc* {
    if (r >= p.k) return zeros;
    if (direct) return reinterpret_cast<const Acc*>(b + r * seg.b_row_stride + c0);
    load_row<Tag, kAvx2>(b + r * seg.b_row_stride + c0, tile_b + r * ld, w);
    std::fill(tile_b + r * ld + w, tile_b + r * ld + wpad, Acc(0));
    return tile_b + r * ld;
  };
  if (!p.symmetric && blocks_j == 1 && p.m >= 2 * kSweepRows) {
    // Many rows of A against at most kNR rows of B (rows against one direction): kSweepRows
    // rows of A at a time over every column of the item, consecutive in-place tiles in one
    // call, so each pass streams kSweepRows long rows (and the few B rows from cache) instead
    // of visiting every A row once per tile (192 x 1: 7.5 -> 6.0 ms,
    // benchmarks/memory_inner_shapes.py). Each product still sees the same vectors in the
    // same order and is flushed after the same columns: the results are those of the
    // tile-major loop below, bit for bit. With one block of B the lanes are row-major
    // [rows_a][kNR], so a group's lanes are contiguous.
    const int nu = static_cast<int>(p.k);
    for (int64_t r0 = 0; r0 < p.m; r0 += kSweepRows) {
      const int mu = static_cast<int>(std::min<int64_t>(kSweepRows, p.m - r0));
      V* blk = lanes + r0 * kNR;
      auto dot = [&](int64_t width) {
        const Acc* const* ab = a_rows.data() + r0;
        const Acc* const* bb = b_rows.data();
        switch (mu) {
          case 1: block_dot_nu<Acc, 1, kSweepRows>(nu, ab, bb, width, blk); break;
          case 2: block_dot_nu<Acc, 2, kSweepRows>(nu, ab, bb, width, blk); break;
          case 3: block_dot_nu<Acc, 3, kSweepRows>(nu, ab, bb, width, blk); break;
          case 4: block_dot_nu<Acc, 4, kSweepRows>(nu, ab, bb, width, blk); break;
          case 5: block_dot_nu<Acc, 5, kSweepRows>(nu, ab, bb, width, blk); break;
          case 6: block_dot_nu<Acc, 6, kSweepRows>(nu, ab, bb, width, blk); break;
          case 7: block_dot_nu<Acc, 7, kSweepRows>(nu, ab, bb, width, blk); break;
          default: block_dot_nu<Acc, kSweepRows, kSweepRows>(nu, ab, bb, width, blk); break;
        }
      };
      int64_t run_begin = 0, run_width = 0;  // pending in-place columns
      auto run = [&]() {
        if (run_width == 0) return;
        for (int64_t r = r0; r < r0 + mu; ++r) a_rows[r] = row_a(r, run_begin, 0, 0, true);
        for (int64_t r = 0; r < p.rows_b; ++r) b_rows[r] = row_b(r, run_begin, 0, 0, true);
        dot(run_width);
        run_width = 0;
      };
      auto flush_block = [&]() {
        for (int r = 0; r < mu; ++r)
          for (int c = 0; c < kNR; ++c) {
            item_acc[(r0 + r) * p.rows_b + c] += hsum(blk[r * kNR + c]);
            blk[r * kNR + c] = V{};
          }
      };
      int64_t block_since_flush = 0;
      for (int64_t c0 = item.col_begin; c0 < item.col_end; c0 += ld) {
        const int64_t w = std::min(ld, item.col_end - c0);
        const int64_t wpad = round_up(w, L);
        if (kDirect && w == wpad) {
          if (run_width == 0) run_begin = c0;
          run_width += w;
        } else {
          run();
          for (int64_t r = r0; r < r0 + mu; ++r) a_rows[r] = row_a(r, c0, w, wpad, false);
          for (int64_t r = 0; r < p.rows_b; ++r) b_rows[r] = row_b(r, c0, w, wpad, false);
          dot(wpad);
        }
        block_since_flush += w;
        if (block_since_flush >= kFlushCols) {
          run();
          flush_block();
          block_since_flush = 0;
        }
      }
      run();
      flush_block();
    }
    return;
  }
  NextTilePrefetch ahead(p.m + (p.symmetric ? 0 : p.k));
  // Block calls per tile (a Gram computes about half its blocks; an AVX-512 grid is four
  // blocks): the prefetches are spread over about that many calls, the rest issued after the
  // last.
  const int64_t calls_per_tile = std::max<int64_t>(
      1, blocks_i * blocks_j / (kWide ? 4 : 1) / (p.symmetric ? 2 : 1));
  for (int64_t c0 = item.col_begin; c0 < item.col_end; c0 += ld) {
    const int64_t w = std::min(ld, item.col_end - c0);
    const int64_t wpad = round_up(w, L);
    const bool direct = kDirect && w == wpad;
    for (int64_t r = 0; r < p.rows_a; ++r) a_rows[r] = row_a(r, c0, w, wpad, direct);
    for (int64_t r = 0; r < p.rows_b; ++r)
      b_rows[r] = p.symmetric ? (r < p.m ? a_rows[r] : zeros) : row_b(r, c0, w, wpad, direct);
    // The next tile: this item's, or after its last, the first of the thread's next item
    // (per-parameter segments of a few thousand columns make items of a few tiles).
    ahead.clear();
    const Item* next = c0 + ld < item.col_end ? &item : next_item;
    if (next != nullptr) {
      const ReduceSegment& next_seg = p.segments[next->segment];
      const S* next_b = static_cast<const S*>(next_seg.b);
      const int64_t c1 = next == &item ? c0 + ld : next->col_begin;
      for (int64_t r = 0; r < p.m; ++r) ahead.add_row(segment_row_a<S>(next_seg, r) + c1);
      if (!p.symmetric)
        for (int64_t r = 0; r < p.k; ++r) ahead.add_row(next_b + r * next_seg.b_row_stride + c1);
      ahead.start(static_cast<int64_t>(sizeof(S)) * std::min(ld, next->col_end - c1),
                  calls_per_tile);
    }
    // Block (bi, bj) with the padding rows of the last blocks skipped (never in a Gram,
    // whose rows are read as both), or nothing when a Gram's block lies below the diagonal.
    auto one_block = [&](int64_t bi, int64_t bj) MTU_ALWAYS_INLINE_LAMBDA {
      if (p.symmetric && (bj + 1) * kNR <= bi * kMR) return;
      ahead.step();
      const Acc* const* ab = a_rows.data() + bi * kMR;
      const Acc* const* bb = b_rows.data() + bj * kNR;
      V* blk = lanes + (bi * blocks_j + bj) * kMR * kNR;
      const int nu = p.symmetric ? kNR : static_cast<int>(std::min<int64_t>(kNR, p.k - bj * kNR));
      const int mu = p.symmetric ? kMR : static_cast<int>(std::min<int64_t>(kMR, p.m - bi * kMR));
      switch (mu) {
        case 1: block_dot_nu<Acc, 1>(nu, ab, bb, wpad, blk); break;
        case 2: block_dot_nu<Acc, 2>(nu, ab, bb, wpad, blk); break;
        default: block_dot_nu<Acc, kMR>(nu, ab, bb, wpad, blk); break;
      }
    };
#if MTU_HAVE_AVX512_KERNELS
    if constexpr (kWide) {
      // Grids of two blocks of A (when both are full) by two full blocks of B; whatever
      // is left (a last single block of A or B, blocks a Gram skips) goes block by block
      // through the AVX2 blocks (zmm pairs there measured no faster: 1-3%, within noise).
      auto full_b = [&](int64_t bj) { return p.k - bj * kNR >= kNR; };
      for (int64_t bi = 0; bi < blocks_i;) {
        const bool two_a = bi + 1 < blocks_i && p.m - (bi + 1) * kMR >= kMR;
        const int64_t na = two_a ? 2 : 1;
        const int mu = static_cast<int>(std::min<int64_t>(kMR, p.m - bi * kMR));
        for (int64_t bj = 0; bj < blocks_j; ++bj) {
          // Every block of the grid is needed: in a Gram, (bi + na - 1, bj) reaches the
          // diagonal (then so do the blocks above and to its right).
          const bool grid = bj + 1 < blocks_j && full_b(bj) && full_b(bj + 1) &&
                            !(p.symmetric && (bj + 1) * kNR <= (bi + na - 1) * kMR);
          if (!grid) {
            for (int64_t i = bi; i < bi + na; ++i) one_block(i, bj);
            continue;
          }
          V* blk[2] = {lanes + (bi * blocks_j + bj) * kMR * kNR,
                       lanes + ((bi + 1) * blocks_j + bj) * kMR * kNR};
          const Acc* const* ab = a_rows.data() + bi * kMR;
          const Acc* const* bb = b_rows.data() + bj * kNR;
          ahead.step();
          if (two_a) {
            block_dot_wide_grid<Acc, kMR, 2>(ab, bb, wpad, blk);
          } else {
            switch (p.symmetric ? kMR : mu) {
              case 1: block_dot_wide_grid<Acc, 1, 1>(ab, bb, wpad, blk); break;
              case 2: block_dot_wide_grid<Acc, 2, 1>(ab, bb, wpad, blk); break;
              default: block_dot_wide_grid<Acc, kMR, 1>(ab, bb, wpad, blk); break;
            }
          }
          ++bj;
        }
        bi += na;
      }
    } else
#endif
    {
      for (int64_t bi = 0; bi < blocks_i; ++bi)
        for (int64_t bj = 0; bj < blocks_j; ++bj) one_block(bi, bj);
    }
    ahead.finish();
    since_flush += w;
    if (since_flush >= kFlushCols) {
      flush();
      since_flush = 0;
    }
  }
  flush();
}


// ---- small problems: m <= 16 rows for a Gram, m <= 8 by k <= 16 otherwise ----

constexpr int small_code(bool sym, int mr, int nr) { return sym ? mr : 4 + (mr - 1) * 4 + nr; }
constexpr int small_products(bool sym, int mr, int nr) { return sym ? mr * (mr + 1) / 2 : mr * nr; }
constexpr int64_t kSmallTileBytes = 24 * 1024;  // all rows of a tile stay in L1 across blocks

bool use_small_path(int64_t m, int64_t k, bool symmetric) {
  return symmetric ? m <= 16 : (m <= 8 && k <= 16);
}

// Gram: groups of 4 rows, a triangular block per group and 2 x 4 blocks between groups;
// otherwise 2 x 4 blocks over the m x k products.
std::vector<SmallBlock> plan_small(int64_t m, int64_t k, bool symmetric, int64_t* lanes) {
  std::vector<SmallBlock> plan;
  int64_t off = 0;
  auto add = [&](bool sym, int64_t r0, int mr, int64_t c0, int nr) {
    plan.push_back({small_code(sym, mr, nr), r0, c0, mr, nr, sym, off});
    off += small_products(sym, mr, nr);
  };
  if (symmetric) {
    for (int64_t g = 0; g < m; g += 4) {
      const int sg = static_cast<int>(std::min<int64_t>(4, m - g));
      add(true, g, sg, g, sg);
      for (int64_t h = g + 4; h < m; h += 4) {
        const int sh = static_cast<int>(std::min<int64_t>(4, m - h));
        for (int r = 0; r < sg; r += 2) add(false, g + r, std::min(2, sg - r), h, sh);
      }
    }
  } else {
    for (int64_t r = 0; r < m; r += 2)
      for (int64_t c = 0; c < k; c += 4)
        add(false, r, static_cast<int>(std::min<int64_t>(2, m - r)), c,
            static_cast<int>(std::min<int64_t>(4, k - c)));
  }
  *lanes = off;
  return plan;
}

// lanes[0..P) += products of the block over vectors [0, nvec) of its rows (nvec a multiple of
// the loader's group). U independent accumulator sets keep enough FMAs in flight when the block
// has few products (FMA latency 4 x 2 pipes: about 8 chains needed).
template <typename Tag, bool kAvx2, bool SYM, int MR, int NR, int U>
MTU_ALWAYS_INLINE void small_block(const typename Tag::storage* const* a_rows,
                                   const typename Tag::storage* const* b_rows, int64_t nvec,
                                   typename VecOf<typename Tag::acc>::type* lanes) {
  using IO = VecIO<Tag, kAvx2>;
  using V = typename IO::V;
  using S = typename Tag::storage;
  constexpr int P = small_products(SYM, MR, NR);
  constexpr int Q = IO::kGroup;
  const S* a[MR];
  const S* b[NR];
  for (int r = 0; r < MR; ++r) a[r] = a_rows[r];
  for (int c = 0; c < NR; ++c) b[c] = SYM ? a_rows[c] : b_rows[c];
  V acc[U][P];
  for (int u = 0; u < U; ++u)
    for (int p = 0; p < P; ++p) acc[u][p] = u == 0 ? lanes[p] : V{};
  auto step = [&](V* ac, int64_t v) MTU_ALWAYS_INLINE_LAMBDA {
    V av[MR];
    for (int r = 0; r < MR; ++r) av[r] = IO::load(a[r], v);
    if constexpr (SYM) {
      int p = 0;
      for (int r = 0; r < MR; ++r)
        for (int c = r; c < MR; ++c) ac[p++] += av[r] * av[c];
    } else {
      for (int c = 0; c < NR; ++c) {
        const V bv = IO::load(b[c], v);
        for (int r = 0; r < MR; ++r) ac[r * NR + c] += av[r] * bv;
      }
    }
  };
  // Vector index s * (U * Q) + u * Q + q: its parity (bf16 even/odd half) is q, known here.
  const int64_t supers = nvec / (U * Q);
  for (int64_t s = 0; s < supers; ++s)
    for (int u = 0; u < U; ++u)
      for (int q = 0; q < Q; ++q) step(acc[u], s * (U * Q) + u * Q + q);
  for (int64_t g = supers * U; g < nvec / Q; ++g)
    for (int q = 0; q < Q; ++q) step(acc[0], g * Q + q);
  for (int p = 0; p < P; ++p) {
    V t = acc[0][p];
    for (int u = 1; u < U; ++u) t += acc[u][p];
    lanes[p] = t;
  }
}

template <typename Tag, bool kAvx2>
MTU_ALWAYS_INLINE void run_small_block(const SmallBlock& blk, const typename Tag::storage* const* a,
                                       const typename Tag::storage* const* b, int64_t nvec,
                                       typename VecOf<typename Tag::acc>::type* lanes) {
  const auto* ar = a + blk.r0;
  const auto* br = blk.sym ? ar : b + blk.c0;
  auto* ln = lanes + blk.lane_off;
  switch (blk.code) {
#define MTU_SMALL_CASE(SYM, MR, NR, U)                                     \
  case small_code(SYM, MR, NR):                                            \
    small_block<Tag, kAvx2, SYM, MR, NR, U>(ar, br, nvec, ln);             \
    break;
    MTU_SMALL_CASE(true, 1, 1, 4)
    MTU_SMALL_CASE(true, 2, 2, 3)
    MTU_SMALL_CASE(true, 3, 3, 2)
    MTU_SMALL_CASE(true, 4, 4, 1)
    MTU_SMALL_CASE(false, 1, 1, 4)
    MTU_SMALL_CASE(false, 1, 2, 4)
    MTU_SMALL_CASE(false, 1, 3, 3)
    MTU_SMALL_CASE(false, 1, 4, 2)
    MTU_SMALL_CASE(false, 2, 1, 4)
    MTU_SMALL_CASE(false, 2, 2, 2)
    MTU_SMALL_CASE(false, 2, 3, 2)
    MTU_SMALL_CASE(false, 2, 4, 1)
#undef MTU_SMALL_CASE
  }
}

template <typename Tag, bool kAvx2>
MTU_ALWAYS_INLINE void process_item_small(const ReduceProblem& p, const Item& item,
                                          typename VecOf<typename Tag::acc>::type* lanes,
                                          double* item_acc) {
  using S = typename Tag::storage;
  using V = typename VecOf<typename Tag::acc>::type;
  using IO = VecIO<Tag, kAvx2>;
  constexpr int64_t kAlign = IO::kCols * IO::kGroup;
  const ReduceSegment& seg = p.segments[item.segment];
  const std::vector<SmallBlock>& plan = *p.small_plan;
  std::fill(item_acc, item_acc + p.m * p.k, 0.0);
  std::fill(lanes, lanes + p.small_lanes, V{});
  auto flush = [&]() {
    for (const SmallBlock& blk : plan) {
      V* ln = lanes + blk.lane_off;
      int q = 0;
      for (int r = 0; r < blk.mr; ++r)
        for (int c = blk.sym ? r : 0; c < blk.nr; ++c, ++q) {
          item_acc[(blk.r0 + r) * p.k + blk.c0 + c] += hsum(ln[q]);
          ln[q] = V{};
        }
    }
  };
  const S* a_base[16];
  const S* b_base[16];
  for (int64_t r = 0; r < p.m; ++r) a_base[r] = segment_row_a<S>(seg, r);
  if (!p.symmetric)
    for (int64_t r = 0; r < p.k; ++r) b_base[r] = static_cast<const S*>(seg.b) + r * seg.b_row_stride;
  const S* a[16];
  const S* b[16];
  int64_t since_flush = 0;
  for (int64_t c0 = item.col_begin; c0 < item.col_end; c0 += p.tile) {
    const int64_t w = std::min(p.tile, item.col_end - c0);
    const int64_t wv = w / kAlign * kAlign;
    for (int64_t r = 0; r < p.m; ++r) a[r] = a_base[r] + c0;
    if (!p.symmetric)
      for (int64_t r = 0; r < p.k; ++r) b[r] = b_base[r] + c0;
    if (wv > 0)
      for (const SmallBlock& blk : plan)
        run_small_block<Tag, kAvx2>(blk, a, p.symmetric ? a : b, wv / IO::kCols, lanes);
    // Ragged end of a segment (under kAlign columns): scalar, in double.
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = p.symmetric ? i : 0; j < p.k; ++j) {
        const S* bj = p.symmetric ? a[j] : b[j];
        double t = 0.0;
        for (int64_t c = wv; c < w; ++c)
          t += static_cast<double>(to_acc<Tag>(a[i][c])) * static_cast<double>(to_acc<Tag>(bj[c]));
        item_acc[i * p.k + j] += t;
      }
    since_flush += w;
    if (since_flush >= kFlushCols) {
      flush();
      since_flush = 0;
    }
  }
  flush();
}

// One contiguous range of items, run by one thread. Instantiated for the baseline target and,
// inside target("avx2,fma,f16c") / target("...,avx512f") functions, for AVX2 and AVX-512
// (kWide): parallel_for's lambda would not inherit a target attribute, so the dispatch happens
// below it.
template <typename Tag, bool kAvx2, bool kWide = false>
MTU_ALWAYS_INLINE void run_range_impl(const ReduceProblem& p, const Item* items, int64_t count,
                                      double* partials) {
  using Acc = typename Tag::acc;
  using V = typename VecOf<Acc>::type;
  if (p.small_plan) {
    AlignedBuffer lane_buf(sizeof(V) * p.small_lanes);
    for (int64_t it = 0; it < count; ++it)
      process_item_small<Tag, kAvx2>(p, items[it], static_cast<V*>(lane_buf.ptr),
                                     partials + it * p.m * p.k);
    return;
  }
  AlignedBuffer a_buf(sizeof(Acc) * p.buffer_rows_a * p.tile);
  AlignedBuffer b_buf(p.symmetric ? 64 : sizeof(Acc) * p.buffer_rows_b * p.tile);
  AlignedBuffer lane_buf(sizeof(V) * p.rows_a * p.rows_b);
  std::vector<double> acc(p.rows_a * p.rows_b);
  for (int64_t it = 0; it < count; ++it) {
    process_item_impl<Tag, kAvx2, kWide>(p, items[it], static_cast<Acc*>(a_buf.ptr),
                                  static_cast<Acc*>(b_buf.ptr), static_cast<V*>(lane_buf.ptr),
                                  acc.data(), it + 1 < count ? &items[it + 1] : nullptr);
    double* dst = partials + it * p.m * p.k;
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < p.k; ++j) dst[i * p.k + j] = acc[i * p.rows_b + j];
  }
}

using RangeFn = void (*)(const ReduceProblem&, const Item*, int64_t, double*);

template <typename Tag>
void run_range_baseline(const ReduceProblem& p, const Item* items, int64_t count, double* out) {
  run_range_impl<Tag, false>(p, items, count, out);
}

#if MTU_X86
#define MTU_DEFINE_AVX2_RANGE(TAG)                                                          \
  MTU_AVX2_FLATTEN void run_range_avx2_##TAG(const ReduceProblem& p, const Item* items,      \
                                            int64_t count, double* out) {                    \
    run_range_impl<TAG, true>(p, items, count, out);                                         \
  }
MTU_DEFINE_AVX2_RANGE(F64)
MTU_DEFINE_AVX2_RANGE(F32)
MTU_DEFINE_AVX2_RANGE(F16)
MTU_DEFINE_AVX2_RANGE(BF16)
#undef MTU_DEFINE_AVX2_RANGE
#if MTU_HAVE_AVX512_KERNELS
// The AVX-512 entries: the general path's register grids on zmm pairs (block_dot_wide_grid);
// conversions, the sweep and the small-problem path are the AVX2 code.
#define MTU_DEFINE_AVX512_RANGE(TAG)                                                        \
  MTU_AVX512_FLATTEN void run_range_avx512_##TAG(const ReduceProblem& p, const Item* items,  \
                                                int64_t count, double* out) {                \
    run_range_impl<TAG, true, true>(p, items, count, out);                                   \
  }
MTU_DEFINE_AVX512_RANGE(F64)
MTU_DEFINE_AVX512_RANGE(F32)
MTU_DEFINE_AVX512_RANGE(F16)
MTU_DEFINE_AVX512_RANGE(BF16)
#undef MTU_DEFINE_AVX512_RANGE
#define MTU_AVX512_RANGE(TAG) run_range_avx512_##TAG
#else
#define MTU_AVX512_RANGE(TAG) nullptr
#endif
#endif

template <typename Tag>
void run_items(const ReduceProblem& p, const Item* items, int64_t count, double* partials,
               RangeFn avx2_range, RangeFn avx512_range) {
  RangeFn fn = &run_range_baseline<Tag>;
  if (avx512_range && p.isa >= cpu_isa::Isa::Avx512 && !p.small_plan) {
    fn = avx512_range;
  } else if (avx2_range && p.isa >= cpu_isa::Isa::Avx2) {
    fn = avx2_range;
  }
  parallel_for_as_caller(0, count, 1, [&](int64_t begin, int64_t end) {
    fn(p, items + begin, end - begin, partials + begin * p.m * p.k);
  });
}

}  // namespace

namespace {

void reduce_impl(ScalarKind kind, const ReduceSegment* segments, int64_t num_segments, int64_t m,
                 int64_t k, bool symmetric, int64_t num_outputs, void* out, cpu_isa::Isa isa,
                 int64_t tile_override, int64_t max_items_override = 0);

// Columns per tile of the general path for an m x k problem (see reduce_impl).
int64_t general_tile(int64_t m, int64_t k, bool symmetric, bool dbl) {
  const int64_t rows_a = round_up(m, kMR), rows_b = round_up(k, kNR);
  const int64_t buffer_rows = (symmetric ? std::max(rows_a, rows_b) : rows_a) + 1 +
                              (symmetric ? 0 : rows_b + 1);
  const int64_t tile_budget = 24 * 1024 / ((dbl ? 8 : 4) * buffer_rows);
  const int64_t tile = std::max<int64_t>(64, std::min<int64_t>(1024, tile_budget / 64 * 64));
  // Past ~50 rows (fp32) the L1 budget leaves 64-column tiles: every tile then visits each row
  // for 4 cache lines, and the prefetchers, which follow a few long streams, lose track of
  // hundreds of short ones (192 rows x 1: 20 ms against 12 ms with 256 columns; 32 x 192: 47
  // against 35 ms; benchmarks/memory_inner_shapes.py). Such problems take L2-sized tiles
  // instead. 256 divides kFlushCols as 64 does, so the sums are flushed after the same columns
  // and every result is bitwise what it was.
  return tile == 64 ? kManyRowsTile : tile;
}

bool reduce_blocked(ScalarKind kind, const ReduceSegment* segments, int64_t num_segments,
                    int64_t m, int64_t k, bool symmetric, int64_t num_outputs, void* out,
                    cpu_isa::Isa isa);

// A few rows against many (m <= kNR, k > 16: one direction against the rows of a memory) run
// as the transposed problem, many rows against a few, which the sweep of process_item_impl
// streams (1 x 32: 1.2 -> 0.7 ms). Each product meets the same columns, vectors, tiles (the
// original problem's, passed down) and flushes, with its two factors swapped, and floating
// point multiplication commutes: the result is the same bit for bit.
bool reduce_transposed(ScalarKind kind, const ReduceSegment* segments, int64_t num_segments,
                       int64_t m, int64_t k, bool symmetric, int64_t num_outputs, void* out,
                       cpu_isa::Isa isa) {
  if (symmetric || m > kNR || k <= 16 || k < 2 * kSweepRows) return false;
  for (int64_t s = 0; s < num_segments; ++s)
    if (segments[s].a2 != nullptr) return false;  // A's rows from two tensors: B cannot hold them
  std::vector<ReduceSegment> swapped(segments, segments + num_segments);
  for (ReduceSegment& seg : swapped) {
    std::swap(seg.a, seg.b);
    std::swap(seg.a_row_stride, seg.b_row_stride);
  }
  const bool dbl = kind == ScalarKind::Float64;
  const int64_t elem = dbl ? 8 : 4;
  AlignedBuffer transposed(static_cast<size_t>(num_outputs * m * k * elem));
  // Past reduce_blocked's size the transposed problem is cut into its output blocks, as the
  // same problem given the other way round is: unblocked, each thread's buffer held all k rows
  // (1.15 KiB a row: 1.1 GiB for one direction against a million rows, 12x slower).
  if (!reduce_blocked(kind, swapped.data(), num_segments, k, m, false, num_outputs,
                      transposed.ptr, isa))
    reduce_impl(kind, swapped.data(), num_segments, k, m, false, num_outputs, transposed.ptr,
                isa, general_tile(m, k, false, dbl));
  for (int64_t o = 0; o < num_outputs; ++o)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < k; ++j) {
        const int64_t src = (o * k + j) * m + i, dst = (o * m + i) * k + j;
        if (dbl) {
          static_cast<double*>(out)[dst] = static_cast<const double*>(transposed.ptr)[src];
        } else {
          static_cast<float*>(out)[dst] = static_cast<const float*>(transposed.ptr)[src];
        }
      }
  return true;
}

// Output blocks of a large problem. Column items alone split an m x k problem into at most
// 2^22 / (m k) items, so a Gram of 1024 rows ran on 4 threads and one of 2048 rows on one, and
// every item's buffers grew with m k (226 MiB of them for 2048 rows). Past kOutputBlock^2
// entries the output is cut into kOutputBlock x kOutputBlock blocks (for a Gram those on or
// above the diagonal, mirrored), each an independent problem of one item on one thread. The cut
// depends on m and k only, so the result does not depend on the thread count.
constexpr int64_t kOutputBlock = 256;

bool reduce_blocked(ScalarKind kind, const ReduceSegment* segments, int64_t num_segments,
                    int64_t m, int64_t k, bool symmetric, int64_t num_outputs, void* out,
                    cpu_isa::Isa isa) {
  if (m * k <= kOutputBlock * kOutputBlock) return false;
  // A stacked [g; r] (gram_list_stacked) is cut at its split too, so that every block's rows
  // come from one tensor; unblocked, a stack of 2048 rows ran on one thread with 224 MiB of
  // buffers. The split must be the same in every segment (it is: the rows of g).
  const int64_t split = segments[0].a2 != nullptr ? segments[0].a_split : m;
  for (int64_t s = 0; s < num_segments; ++s) {
    const bool stacked = segments[s].a2 != nullptr;
    if (stacked != (segments[0].a2 != nullptr) || (stacked && (!symmetric ||
                                                              segments[s].a_split != split)))
      return false;
  }
  auto starts = [](int64_t rows, int64_t cut) {
    std::vector<int64_t> at;
    for (int64_t i = 0; i < std::min(cut, rows); i += kOutputBlock) at.push_back(i);
    for (int64_t i = cut; i < rows; i += kOutputBlock) at.push_back(i);
    at.push_back(rows);  // the end of the last range
    return at;
  };
  const std::vector<int64_t> row_starts = starts(m, split);
  const std::vector<int64_t> col_starts = symmetric ? row_starts : starts(k, k);
  const int64_t blocks_m = static_cast<int64_t>(row_starts.size()) - 1;
  const int64_t blocks_k = static_cast<int64_t>(col_starts.size()) - 1;
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t i = 0; i < blocks_m; ++i)
    for (int64_t j = symmetric ? i : 0; j < blocks_k; ++j) blocks.emplace_back(i, j);
  const int64_t in_size = element_size(kind);
  const bool dbl = kind == ScalarKind::Float64;
  // Row i of a segment's A (for a Gram, also of its B): from g, or past the split from r.
  auto row_of = [in_size](const ReduceSegment& seg, int64_t i) {
    if (seg.a2 != nullptr && i >= seg.a_split)
      return std::make_pair(static_cast<const char*>(seg.a2) +
                                (i - seg.a_split) * seg.a2_row_stride * in_size,
                            seg.a2_row_stride);
    return std::make_pair(static_cast<const char*>(seg.a) + i * seg.a_row_stride * in_size,
                          seg.a_row_stride);
  };
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  parallel_for_as_caller(0, num_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t bi = blocks[b].first, bj = blocks[b].second;
      const int64_t i0 = row_starts[bi], j0 = col_starts[bj];
      const int64_t rows = row_starts[bi + 1] - i0, cols = col_starts[bj + 1] - j0;
      const bool diagonal = symmetric && bi == bj;
      std::vector<ReduceSegment> sub(segments, segments + num_segments);
      for (ReduceSegment& seg : sub) {
        const auto [a, a_stride] = row_of(seg, i0);
        // A Gram's B is its A: the block's columns are rows j0.. of the same stack.
        const auto [bp, b_stride] = symmetric ? row_of(seg, j0) : std::make_pair(
            static_cast<const char*>(seg.b) + j0 * seg.b_row_stride * in_size, seg.b_row_stride);
        seg.a = a;
        seg.a_row_stride = a_stride;
        seg.b = bp;
        seg.b_row_stride = b_stride;
        seg.a2 = nullptr;
        seg.a_split = INT64_MAX;
      }
      AlignedBuffer block(static_cast<size_t>(num_outputs * rows * cols * (dbl ? 8 : 4)));
      // Inside this parallel region the block's own parallel_for runs inline, on this thread.
      reduce_impl(kind, sub.data(), num_segments, rows, cols, diagonal, num_outputs, block.ptr,
                  isa, 0, /*max_items_override=*/1);
      for (int64_t o = 0; o < num_outputs; ++o)
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t src = (o * rows + r) * cols + c;
            const int64_t dst = (o * m + i0 + r) * k + j0 + c;
            const int64_t mirror = (o * m + j0 + c) * k + i0 + r;
            if (dbl) {
              const double v = static_cast<const double*>(block.ptr)[src];
              static_cast<double*>(out)[dst] = v;
              if (symmetric && !diagonal) static_cast<double*>(out)[mirror] = v;
            } else {
              const float v = static_cast<const float*>(block.ptr)[src];
              static_cast<float*>(out)[dst] = v;
              if (symmetric && !diagonal) static_cast<float*>(out)[mirror] = v;
            }
          }
    }
  });
  return true;
}

}  // namespace

void reduce(ScalarKind kind, const ReduceSegment* segments, int64_t num_segments, int64_t m,
            int64_t k, bool symmetric, int64_t num_outputs, void* out) {
  if (num_outputs * m * k == 0) return;
  // The cap is process-wide (set_cpu_isa): read once, so that another thread changing it while
  // this call runs cannot leave some waves or blocks on one variant and the rest on another
  // (a 1024-row float32 Gram under a cap toggled between baseline and avx2 gave neither
  // variant's bits in 10 calls of 10).
  const cpu_isa::Isa isa = cpu_isa::active();
  if (reduce_transposed(kind, segments, num_segments, m, k, symmetric, num_outputs, out, isa))
    return;
  if (reduce_blocked(kind, segments, num_segments, m, k, symmetric, num_outputs, out, isa))
    return;
  reduce_impl(kind, segments, num_segments, m, k, symmetric, num_outputs, out, isa, 0);
}

namespace {

void reduce_impl(ScalarKind kind, const ReduceSegment* segments, int64_t num_segments, int64_t m,
                 int64_t k, bool symmetric, int64_t num_outputs, void* out, cpu_isa::Isa isa,
                 int64_t tile_override, int64_t max_items_override) {
  const bool dbl = kind == ScalarKind::Float64;
  const int64_t out_elems = num_outputs * m * k;
  if (out_elems == 0) return;
  // Items: column ranges sized from the problem alone (reproducible for any thread count),
  // and from each output's own columns: a batch of problems (vmap, a list per tensor) cuts
  // each as the problem alone is cut, so each output is the same bits as a call of its own.
  // (Sized from the whole batch's columns, rows past 4096 x max_items columns in all were cut
  // wider in a batch than alone, their sums flushed elsewhere.) The waves below bound the
  // partials whatever the item count.
  std::vector<int64_t> output_cols(num_outputs, 0);
  for (int64_t s = 0; s < num_segments; ++s)
    output_cols[segments[s].out_index] += segments[s].ncols;
  const int64_t max_items = max_items_override > 0 ? max_items_override : std::max<int64_t>(
      1, std::min<int64_t>(1024, kMaxPartialDoubles / (m * k)));
  std::vector<Item> items;
  std::vector<int64_t> item_out;
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t cols_of_output = output_cols[segments[s].out_index];
    const int64_t item_cols = round_up(
        std::max<int64_t>(kMinItemCols, (cols_of_output + max_items - 1) / max_items), 64);
    for (int64_t c = 0; c < segments[s].ncols; c += item_cols) {
      items.push_back({s, c, std::min(segments[s].ncols, c + item_cols)});
      item_out.push_back(segments[s].out_index);
    }
  }
  ReduceProblem p;
  p.segments = segments;
  p.m = m;
  p.k = k;
  p.symmetric = symmetric;
  p.isa = isa;
  p.rows_a = round_up(m, kMR);
  p.rows_b = round_up(k, kNR);
  // One extra all-zero row at the end of each buffer stands in for rows past m (or k).
  p.buffer_rows_a = (symmetric ? std::max(p.rows_a, p.rows_b) : p.rows_a) + 1;
  p.buffer_rows_b = symmetric ? 0 : p.rows_b + 1;
  // Tiles sized to stay in L1 (small k, memory-bound) or L2 (large k, compute-bound).
  p.tile = tile_override > 0 ? tile_override : general_tile(m, k, symmetric, dbl);
  std::vector<SmallBlock> small_plan;
  if (use_small_path(m, k, symmetric)) {
    small_plan = plan_small(m, k, symmetric, &p.small_lanes);
    p.small_plan = &small_plan;
    const int64_t rows = symmetric ? m : m + k;
    p.tile = std::max<int64_t>(
        64, std::min<int64_t>(4096, kSmallTileBytes / (rows * element_size(kind)) / 64 * 64));
  }

  // Items run in waves whose partials fit kMaxPartialDoubles, each wave reduced into the
  // outputs in item order before the next: a list of many tensors (at least one item each)
  // needs no partial per tensor at once (1000 tensors at m = k = 256 took 500 MiB), and every
  // output element is summed in the same order, so the bits do not depend on the wave size.
  const int64_t per_item = m * k;
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int64_t wave = std::max<int64_t>(1, kMaxPartialDoubles / per_item);
  std::vector<double> partials(std::min(wave, num_items) * per_item);
  std::vector<double> total(out_elems, 0.0);
  for (int64_t first = 0; first < num_items; first += wave) {
    const int64_t count = std::min(wave, num_items - first);
    const Item* batch = items.data() + first;
    double* buf = partials.data();
    switch (kind) {
#if MTU_X86
      case ScalarKind::Float64: run_items<F64>(p, batch, count, buf, run_range_avx2_F64,
                                                 MTU_AVX512_RANGE(F64)); break;
      case ScalarKind::Float32: run_items<F32>(p, batch, count, buf, run_range_avx2_F32,
                                                 MTU_AVX512_RANGE(F32)); break;
      case ScalarKind::Float16: run_items<F16>(p, batch, count, buf, run_range_avx2_F16,
                                                 MTU_AVX512_RANGE(F16)); break;
      case ScalarKind::BFloat16: run_items<BF16>(p, batch, count, buf, run_range_avx2_BF16,
                                                 MTU_AVX512_RANGE(BF16)); break;
#else
      case ScalarKind::Float64: run_items<F64>(p, batch, count, buf, nullptr, nullptr); break;
      case ScalarKind::Float32: run_items<F32>(p, batch, count, buf, nullptr, nullptr); break;
      case ScalarKind::Float16: run_items<F16>(p, batch, count, buf, nullptr, nullptr); break;
      case ScalarKind::BFloat16: run_items<BF16>(p, batch, count, buf, nullptr, nullptr); break;
#endif
    }
    for (int64_t it = 0; it < count; ++it) {
      double* dst = total.data() + item_out[first + it] * per_item;
      const double* src = buf + it * per_item;
      for (int64_t e = 0; e < per_item; ++e) dst[e] += src[e];
    }
  }
  if (symmetric) {
    for (int64_t o = 0; o < num_outputs; ++o) {
      double* g = total.data() + o * m * k;
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < i; ++j) g[i * k + j] = g[j * k + i];
    }
  }
  if (dbl) {
    std::copy(total.begin(), total.end(), static_cast<double*>(out));
  } else {
    float* o = static_cast<float*>(out);
    for (int64_t e = 0; e < out_elems; ++e) o[e] = static_cast<float>(total[e]);
  }
}

}  // namespace

}  // namespace cpu
}  // namespace mtunlearn

// The tensor-core tile of the CUDA Gram / inner-product reduction, written once for two
// executors: csrc/ops/gram/cuda/reduce_mma_kernel.cu runs it on a thread block with
// nvcuda::wmma (float16 / bfloat16 inputs: 16 x 16 x 16 products; float32 inputs: each value
// split into a tf32 part and a tf32 remainder, three 16 x 16 x 8 products, float accumulators),
// and tests/cpp/mma_gram_emulation.cpp runs the same code on std::threads with the products
// done in plain C++, so that CI checks its indexing (output tiles, column slabs, padding, the
// moves into double, the symmetric write-out) without a GPU. What only a GPU shows (wmma's
// fragment layouts, shared-memory alignment, speed) is left to benchmarks/gpu_check.py.
//
// One call handles one work item (a column range of one segment) for the output tiles
// tile_first, tile_first + tile_step, ...: each tile of TILE x TILE outputs is summed slab by
// slab (64 columns staged in shared memory with 16-byte copies, zeros past the rows and
// columns; the next slab's loads in flight while the current one's products run), each warp
// owning one or two 16 x 16 accumulator fragments. After every slab the
// float accumulators move into double, so long column ranges keep float32 accuracy (the other
// kernels flush every 2048 columns, but their float sums run over strided columns). A Gram
// computes only tiles on or above the diagonal and, on a diagonal tile, writes only entries
// (i, j) with i <= j and mirrors them: the result is exactly symmetric whatever order the
// tensor cores sum in.
//
// Ops provides: FragA / FragB / Acc, acc_elements and k_step (the products' depth); zero(acc),
// load_a(frag, p, ldm) (16 x k_step, row-major), load_b(frag, p, ldm) (k_step x 16,
// column-major: element (kk, n) at p[n * ldm + kk]), mma(acc, a, b) (acc += a b), store(p,
// acc, ldm) (row-major floats), element(acc, e) (a thread's e-th accumulator value: the same
// position in every fragment of one thread); aligned16(p), copy16(dst, src),
// Chunk (16 bytes of elements), aligned16(p), load_chunk(p) (16 aligned bytes),
// load_partial(p, n) (n < 16 bytes' worth of elements, zeros after), zero_chunk(),
// store_chunk(p, chunk) (16 aligned bytes). Block provides rank(), size() (Shape::threads) and
// sync() (a barrier that orders memory).
#pragma once

#include <cstdint>

#include "mtunlearn/kernels.h"

#if defined(__CUDACC__)
#define MTU_MMA __device__ inline
#define MTU_MMA_UNROLL _Pragma("unroll")
#else
#define MTU_MMA inline
#define MTU_MMA_UNROLL
#endif

namespace mtunlearn {
namespace mma_gram {

constexpr int kFrag = 16;       // the fragments' m and n (their k: Ops::k_step)
constexpr int kSlabCols = 64;   // columns staged per slab

// Sizes for TILE x TILE output tiles of elements of `Bytes` bytes (2: float16 / bfloat16, 4:
// float32 split into tf32 parts).
template <int TILE, int Bytes>
struct Shape {
  static_assert(TILE == 32 || TILE == 64, "tiles of 32 or 64 outputs a side");
  static constexpr int frags = TILE / kFrag;                  // fragments a side
  static constexpr int per_warp = TILE == 64 ? 2 : 1;         // fragments per warp
  static constexpr int warps = frags * frags / per_warp;
  static constexpr int threads = warps * 32;
  static constexpr int chunk = 16 / Bytes;                    // elements per 16-byte copy
  // Rows one chunk longer than the slab (144 or 272 bytes apart): each 16 rows stay 32-byte
  // aligned for wmma, and consecutive rows start 16 bytes apart in the banks.
  static constexpr int pitch = kSlabCols + chunk;
  static constexpr int slab_bytes = TILE * pitch * Bytes;
  // Floats; rows 8 floats longer than the tile, so that a fragment's rows fall in other banks.
  static constexpr int out_pitch = TILE + 8;
  // The output tile is staged in the slabs' memory, free once a tile's last slab is summed.
  static constexpr int smem_bytes = 2 * slab_bytes;
  static_assert(TILE * out_pitch * 4 <= smem_bytes, "the output tile fits in the slabs");
  // What wmma asks of every fragment address and leading dimension (the CPU emulation cannot
  // see it): 32-byte aligned fragments (16 rows apart, and k steps apart in a row), and a
  // leading dimension of a multiple of 16 bytes.
  static_assert(kFrag * pitch * Bytes % 32 == 0 && pitch * Bytes % 16 == 0, "slab fragments");
  static_assert(kFrag * out_pitch * 4 % 32 == 0 && out_pitch % 4 == 0, "output fragments");
  static_assert(kFrag * 4 % 32 == 0, "output fragments along a row");
};

// One thread's share of a slab (rows row0 .. row0 + TILE - 1 of the segment's A rows, or B
// rows, columns c0 .. c0 + 63), held in registers between fetch() and put(): the next slab's
// global loads are issued before the current slab's products, so their latency is hidden
// behind them. Zeros for rows >= rows and columns >= col_end.
template <int TILE, class Ops, typename T>
struct SlabShare {
  using S = Shape<TILE, sizeof(T)>;
  static constexpr int chunks = kSlabCols / S::chunk;  // per row
  static_assert(TILE * chunks % S::threads == 0, "chunks split evenly over the threads");
  static constexpr int count = TILE * chunks / S::threads;
  typename Ops::Chunk held[count];

  template <class Block>
  MTU_MMA void fetch(const Block& block, const Ops& ops, const ReduceSegment& seg,
                     bool rows_of_a, int64_t row0, int64_t rows, int64_t c0, int64_t col_end) {
MTU_MMA_UNROLL
    for (int i = 0; i < count; ++i) {
      const int e = block.rank() + i * S::threads;
      const int r = e / chunks, q = e % chunks;
      const int64_t row = row0 + r, col = c0 + static_cast<int64_t>(q) * S::chunk;
      if (row >= rows || col >= col_end) {
        held[i] = ops.zero_chunk();
        continue;
      }
      const T* src = (rows_of_a ? segment_row_a<T>(seg, row)
                                : static_cast<const T*>(seg.b) + row * seg.b_row_stride) + col;
      held[i] = col + S::chunk <= col_end && ops.aligned16(src)
                    ? ops.load_chunk(src)
                    : ops.load_partial(src, static_cast<int>(
                          col_end - col < S::chunk ? col_end - col : S::chunk));
    }
  }

  template <class Block>
  MTU_MMA void put(const Block& block, const Ops& ops, T* slab) const {
MTU_MMA_UNROLL
    for (int i = 0; i < count; ++i) {
      const int e = block.rank() + i * S::threads;
      ops.store_chunk(slab + (e / chunks) * S::pitch + (e % chunks) * S::chunk, held[i]);
    }
  }
};

// One work item's partial [m, k] (row-major floats at dst) for the tiles of this block.
// smem: Shape<TILE, sizeof(T)>::smem_bytes, 32-byte aligned.
template <int TILE, bool SYM, class Block, class Ops, typename T>
MTU_MMA void reduce_item_tiles(Block& block, Ops& ops, const ReduceSegment& seg,
                               int64_t col_begin, int64_t col_end, int m, int k, int tiles_k,
                               int num_tiles, int tile_first, int tile_step, float* dst,
                               unsigned char* smem) {
  using S = Shape<TILE, sizeof(T)>;
  constexpr int P = S::per_warp;
  constexpr int E = Ops::acc_elements;
  T* sa = reinterpret_cast<T*>(smem);
  T* sb = reinterpret_cast<T*>(smem + S::slab_bytes);
  float* so = reinterpret_cast<float*>(smem);
  const int warp = block.rank() / 32;
  // A warp's fragments share their row: (fr, fc[0]) and (fr, fc[1]).
  const int fr = warp * P / S::frags;
  int fc[P];
MTU_MMA_UNROLL
  for (int p = 0; p < P; ++p) fc[p] = (warp * P + p) % S::frags;

  SlabShare<TILE, Ops, T> share_a, share_b;
  for (int tile = tile_first; tile < num_tiles; tile += tile_step) {
    int ti, tj;
    tile_coords(tile, tiles_k, SYM, ti, tj);
    const bool diagonal = SYM && ti == tj;
    const int64_t i0 = static_cast<int64_t>(ti) * TILE, j0 = static_cast<int64_t>(tj) * TILE;
    // On a diagonal tile the fragments below the diagonal hold only entries i > j, which the
    // mirror writes from above: not computed.
    bool active[P], any_active = false;
    typename Ops::Acc acc[P];
    double wide[P][E];
MTU_MMA_UNROLL
    for (int p = 0; p < P; ++p) {
      active[p] = !(diagonal && fr > fc[p]);
      any_active = any_active || active[p];
      ops.zero(acc[p]);
MTU_MMA_UNROLL
      for (int e = 0; e < E; ++e) wide[p][e] = 0.0;
    }
    const int64_t rows_b_count = SYM ? m : k;
    share_a.fetch(block, ops, seg, true, i0, m, col_begin, col_end);
    if (!diagonal) share_b.fetch(block, ops, seg, SYM, j0, rows_b_count, col_begin, col_end);
    for (int64_t c0 = col_begin; c0 < col_end; c0 += kSlabCols) {
      share_a.put(block, ops, sa);
      if (!diagonal) share_b.put(block, ops, sb);
      block.sync();
      if (c0 + kSlabCols < col_end) {  // the next slab's loads, in flight during the products
        share_a.fetch(block, ops, seg, true, i0, m, c0 + kSlabCols, col_end);
        if (!diagonal)
          share_b.fetch(block, ops, seg, SYM, j0, rows_b_count, c0 + kSlabCols, col_end);
      }
      const T* rows_b = diagonal ? sa : sb;
      // Two steps at a time, not all: unrolled whole, the loop kept the fetched chunks and
      // every step's fragments live together (sm_90: 254-255 registers for float32's 64-wide
      // tiles, 150-166 for 16-bit 32-wide ones; now 191-224 and 96); same operations, same
      // order. A warp whose fragments all lie below a diagonal skips the loads too.
      if (any_active) {
#if defined(__CUDACC__)
#pragma unroll 2
#endif
        for (int kk = 0; kk < kSlabCols; kk += Ops::k_step) {
          typename Ops::FragA a;
          ops.load_a(a, sa + fr * kFrag * S::pitch + kk, S::pitch);
MTU_MMA_UNROLL
          for (int p = 0; p < P; ++p) {
            if (!active[p]) continue;
            typename Ops::FragB b;
            ops.load_b(b, rows_b + fc[p] * kFrag * S::pitch + kk, S::pitch);
            ops.mma(acc[p], a, b);
          }
        }
      }
      block.sync();  // the slabs are refilled next
      // Each slab's sums (64 columns) move into double: the float rounding stays that of
      // 64-term sums at any length (one float chain over all 4099 columns of a test's Gram
      // was off 1.5e-6 of |a||b| in the emulation), for 16 double adds per thread and slab.
MTU_MMA_UNROLL
      for (int p = 0; p < P; ++p) {
MTU_MMA_UNROLL
        for (int e = 0; e < E; ++e) wide[p][e] += static_cast<double>(ops.element(acc[p], e));
        ops.zero(acc[p]);
      }
    }
    // Every warp is past the last slab's barrier: the slabs' memory takes the output tile.
MTU_MMA_UNROLL
    for (int p = 0; p < P; ++p) {
      if (!active[p]) continue;
MTU_MMA_UNROLL
      for (int e = 0; e < E; ++e) ops.element(acc[p], e) = static_cast<float>(wide[p][e]);
      ops.store(so + fr * kFrag * S::out_pitch + fc[p] * kFrag, acc[p], S::out_pitch);
    }
    block.sync();
    for (int e = block.rank(); e < TILE * TILE; e += block.size()) {
      const int r = e / TILE, c = e % TILE;
      const int64_t i = i0 + r, j = j0 + c;
      if (i >= m || j >= k || (diagonal && i > j)) continue;
      const float total = so[r * S::out_pitch + c];
      dst[i * k + j] = total;
      if (SYM && i != j) dst[j * k + i] = total;
    }
    block.sync();  // the next tile's slabs overwrite the output tile
  }
}

}  // namespace mma_gram
}  // namespace mtunlearn

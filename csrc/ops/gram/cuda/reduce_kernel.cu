// CUDA kernels behind gram, gram_list and inner.
//
// Stage 1: one block per work item (a column range of one segment; many segments = one launch
// for a whole parameter list). For m, k <= 16 (Gram) or <= 8 (inner), each thread keeps every
// inner product of its columns in registers, reading each element once with 16-byte loads; a
// fixed-order warp-shuffle + shared-memory reduction writes the block's partial. Larger m, k
// use a shared-memory tiled kernel (32 x 32 outputs per block, upper tiles only for a Gram);
// with MTUNLEARN_CUDA_TENSOR_CORES=1, float16 / bfloat16 Grams of more than 8 rows and every
// float32 or 16-bit problem past the register kernel take tensor cores (reduce_mma_kernel.cu).
// Stage 2: one warp per output entry sums the partials of its items in a fixed order, in double
// (rounded once, as on the CPU). No atomics, so results are deterministic.
#include "mtunlearn/cuda_common.cuh"

namespace mtunlearn {
namespace cuda {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == kReduceWarpsPerBlock, "the host bounds the final pass's grid by it");

template <typename T, int P, bool SYM>
__global__ void __launch_bounds__(kThreads)
reduce_register_kernel(const ReduceSegment* __restrict__ segments,
                       const ReduceItem* __restrict__ items, int m, int k,
                       typename AccOf<T>::type* __restrict__ partials) {
  using A = typename AccOf<T>::type;
  constexpr int V = Vec<T>::n;
  const ReduceItem item = items[blockIdx.x];
  const ReduceSegment seg = segments[item.segment];
  const T* b = static_cast<const T*>(seg.b);
  A acc[P][P];
#pragma unroll
  for (int i = 0; i < P; ++i)
#pragma unroll
    for (int j = 0; j < P; ++j) acc[i][j] = A(0);

  // 16-byte loads need every row start aligned; item boundaries are multiples of 64 columns.
  const bool rows_aligned = ((seg.a_row_stride * sizeof(T)) & 15) == 0 &&
                            ((seg.a2_row_stride * sizeof(T)) & 15) == 0 &&
                            ((seg.b_row_stride * sizeof(T)) & 15) == 0;
  const int64_t begin = item.col_begin;
  const int64_t end = item.col_end;
  const int64_t vec_end = rows_aligned ? begin + (end - begin) / V * V : begin;
  for (int64_t col = begin + static_cast<int64_t>(threadIdx.x) * V; col < vec_end;
       col += static_cast<int64_t>(kThreads) * V) {
    A av[P][V];
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if (i < m) {
        load16(segment_row_a<T>(seg, i) + col, av[i]);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) av[i][v] = A(0);
      }
    }
    if constexpr (SYM) {
#pragma unroll
      for (int i = 0; i < P; ++i)
#pragma unroll
        for (int j = i; j < P; ++j)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[i][j] += av[i][v] * av[j][v];
    } else {
      A bv[P][V];
#pragma unroll
      for (int j = 0; j < P; ++j) {
        if (j < k) {
          load16(b + j * seg.b_row_stride + col, bv[j]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) bv[j][v] = A(0);
        }
      }
#pragma unroll
      for (int i = 0; i < P; ++i)
#pragma unroll
        for (int j = 0; j < P; ++j)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[i][j] += av[i][v] * bv[j][v];
    }
  }
  // Columns left over: a tail shorter than V, or everything when rows are not aligned.
  for (int64_t c = vec_end + threadIdx.x; c < end; c += kThreads) {
    A ai[P];
#pragma unroll
    for (int i = 0; i < P; ++i) ai[i] = i < m ? to_acc(segment_row_a<T>(seg, i)[c]) : A(0);
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int j = (SYM ? i : 0); j < P; ++j) {
        A bj;
        if constexpr (SYM) {
          bj = ai[j];
        } else {
          bj = j < k ? to_acc(b[j * seg.b_row_stride + c]) : A(0);
        }
        acc[i][j] += ai[i] * bj;
      }
  }

  // Block reduction in a fixed order: warp shuffles, then warps summed in index order.
  __shared__ A warp_sums[kWarps][P * P];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < P; ++i)
#pragma unroll
    for (int j = (SYM ? i : 0); j < P; ++j) {
      A v = acc[i][j];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) warp_sums[warp][i * P + j] = v;
    }
  __syncthreads();
  A* dst = partials + static_cast<int64_t>(blockIdx.x) * m * k;
  for (int e = threadIdx.x; e < m * k; e += kThreads) {
    int i = e / k, j = e % k;
    if (SYM && j < i) {
      const int t = i;
      i = j;
      j = t;
    }
    A s = A(0);
    for (int w = 0; w < kWarps; ++w) s += warp_sums[w][i * P + j];
    dst[e] = s;
  }
}

constexpr int kTile = 32;
constexpr int kSlab = 32;
// A tiled thread sums its outputs over the whole column range of its item (up to n / 4 columns
// for a Gram of 2048 rows); in float32 such a sum of ~1e6 positive terms drifts by ~1e-3
// relative (a Gram's diagonal, which the solves read). The float accumulators are moved into
// double every kFlushSlabs slabs, 2048 columns, as the CPU kernel flushes.
constexpr int kFlushSlabs = 64;

template <typename T, bool SYM>
__global__ void __launch_bounds__(kThreads)
reduce_tiled_kernel(const ReduceSegment* __restrict__ segments,
                    const ReduceItem* __restrict__ items, int m, int k, int tiles_k, int num_tiles,
                    typename AccOf<T>::type* __restrict__ partials) {
  using A = typename AccOf<T>::type;
  const ReduceItem item = items[blockIdx.x];
  const ReduceSegment seg = segments[item.segment];
  const T* b = static_cast<const T*>(seg.b);
  __shared__ A sa[kTile][kSlab + 1];
  __shared__ A sb[kTile][kSlab + 1];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  // Output tiles stride over gridDim.y, which holds at most 65535 blocks (a Gram of k >= 11553
  // rows has more tiles). The loop bound is the same for the whole block, and every tile ends
  // on the column loop's last barrier, so the next tile may refill the shared slabs.
  for (int tile = blockIdx.y; tile < num_tiles; tile += gridDim.y) {
    int ti, tj;  // for a Gram only tiles on or above the diagonal
    tile_coords(tile, tiles_k, SYM, ti, tj);
    A acc[2][2] = {{A(0), A(0)}, {A(0), A(0)}};
    double wide[2][2] = {{0.0, 0.0}, {0.0, 0.0}};
    int slabs = 0;
    const int i0 = ti * kTile, j0 = tj * kTile;
    for (int64_t c0 = item.col_begin; c0 < item.col_end; c0 += kSlab) {
      for (int e = threadIdx.x; e < kTile * kSlab; e += kThreads) {
        const int r = e / kSlab, c = e % kSlab;
        const int64_t col = c0 + c;
        const bool in_cols = col < item.col_end;
        sa[r][c] = (in_cols && i0 + r < m) ? to_acc(segment_row_a<T>(seg, i0 + r)[col]) : A(0);
        if constexpr (SYM) {
          sb[r][c] = (in_cols && j0 + r < k) ? to_acc(segment_row_a<T>(seg, j0 + r)[col]) : A(0);
        } else {
          sb[r][c] = (in_cols && j0 + r < k) ? to_acc(b[(j0 + r) * seg.b_row_stride + col]) : A(0);
        }
      }
      __syncthreads();
#pragma unroll 8
      for (int c = 0; c < kSlab; ++c) {
        const A a0 = sa[ty][c], a1 = sa[ty + 16][c];
        const A b0 = sb[tx][c], b1 = sb[tx + 16][c];
        acc[0][0] += a0 * b0;
        acc[0][1] += a0 * b1;
        acc[1][0] += a1 * b0;
        acc[1][1] += a1 * b1;
      }
      __syncthreads();
      if (++slabs == kFlushSlabs) {  // the same count in every thread: no divergence
        slabs = 0;
#pragma unroll
        for (int di = 0; di < 2; ++di)
#pragma unroll
          for (int dj = 0; dj < 2; ++dj) {
            wide[di][dj] += static_cast<double>(acc[di][dj]);
            acc[di][dj] = A(0);
          }
      }
    }
    A* dst = partials + static_cast<int64_t>(blockIdx.x) * m * k;
#pragma unroll
    for (int di = 0; di < 2; ++di)
#pragma unroll
      for (int dj = 0; dj < 2; ++dj) {
        const int i = i0 + ty + 16 * di, j = j0 + tx + 16 * dj;
        if (i < m && j < k) {
          const A total = static_cast<A>(wide[di][dj] + static_cast<double>(acc[di][dj]));
          dst[static_cast<int64_t>(i) * k + j] = total;
          if (SYM && ti != tj) dst[static_cast<int64_t>(j) * k + i] = total;
        }
      }
  }
}

// One warp per output entry: lane l sums items l, l + 32, ... in order, then a fixed shuffle
// tree adds the lanes, so the result is the same on every run. (One thread per entry left a
// k = 2 Gram waiting ~60 us on 2048 dependent adds: a fifth of the whole call at n = 1e8.)
// The sums run in double and are rounded once, as the CPU kernel sums its items' partials: in
// float, a lane's running sum dropped every later item below half its ulp (one item of 2**14
// and 2047 of 2**-12: 16384.484375 where the CPU gives the nearest float, 16384.5).
template <typename A>
__global__ void __launch_bounds__(kThreads)
sum_partials_kernel(const A* __restrict__ partials, const int64_t* __restrict__ output_item_begin,
                    int64_t num_outputs, int64_t mk, A* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (e >= num_outputs * mk) return;  // whole warps leave together: e is per warp
  const int64_t o = e / mk, entry = e % mk;
  double s = 0.0;
  for (int64_t it = output_item_begin[o] + lane; it < output_item_begin[o + 1]; it += 32)
    s += static_cast<double>(partials[it * mk + entry]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  if (lane == 0) out[e] = static_cast<A>(s);
}

int padded(int64_t v) { return v <= 1 ? 1 : v <= 2 ? 2 : v <= 4 ? 4 : v <= 8 ? 8 : 16; }

template <typename T>
void launch_stage1(const ReduceSegment* segments, const ReduceItem* items, int64_t num_items,
                   int m, int k, bool symmetric, void* partials, cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  A* part = static_cast<A*>(partials);
  const dim3 grid(static_cast<unsigned>(num_items));
  if (reduce_uses_register_path(m, k, symmetric)) {
    const int p = padded(symmetric ? m : (m > k ? m : k));
    if (symmetric) {
      switch (p) {
        case 1: reduce_register_kernel<T, 1, true><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
        case 2: reduce_register_kernel<T, 2, true><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
        case 4: reduce_register_kernel<T, 4, true><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
        case 8: reduce_register_kernel<T, 8, true><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
        default: reduce_register_kernel<T, 16, true><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
      }
    } else {
      switch (p) {
        case 1: reduce_register_kernel<T, 1, false><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
        case 2: reduce_register_kernel<T, 2, false><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
        case 4: reduce_register_kernel<T, 4, false><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
        default: reduce_register_kernel<T, 8, false><<<grid, kThreads, 0, stream>>>(segments, items, m, k, part); break;
      }
    }
    return;
  }
  const int tiles_m = (m + kTile - 1) / kTile, tiles_k = (k + kTile - 1) / kTile;
  const int num_tiles = symmetric ? tiles_k * (tiles_k + 1) / 2 : tiles_m * tiles_k;
  const dim3 g2(static_cast<unsigned>(num_items), static_cast<unsigned>(num_tiles < 65535 ? num_tiles : 65535));
  if (symmetric) {
    reduce_tiled_kernel<T, true><<<g2, kThreads, 0, stream>>>(segments, items, m, k, tiles_k,
                                                             num_tiles, part);
  } else {
    reduce_tiled_kernel<T, false><<<g2, kThreads, 0, stream>>>(segments, items, m, k, tiles_k,
                                                              num_tiles, part);
  }
}

}  // namespace

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

bool reduce_uses_register_path(int64_t m, int64_t k, bool symmetric) {
  return symmetric ? m <= 16 : (m <= 8 && k <= 8);
}

int reduce(ScalarKind kind, const ReduceSegment* segments, const ReduceItem* items,
           int64_t num_items, const int64_t* output_item_begin, int64_t num_outputs, int64_t m,
           int64_t k, bool symmetric, void* partials, void* out, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (num_items > 0) {
    const bool on_tensor_cores = reduce_stage1_mma(kind, segments, items, num_items, m, k,
                                                   symmetric, static_cast<float*>(partials),
                                                   stream_ptr);
    if (!on_tensor_cores) {
      switch (kind) {
        case ScalarKind::Float64: launch_stage1<double>(segments, items, num_items, m, k, symmetric, partials, stream); break;
        case ScalarKind::Float32: launch_stage1<float>(segments, items, num_items, m, k, symmetric, partials, stream); break;
        case ScalarKind::Float16: launch_stage1<__half>(segments, items, num_items, m, k, symmetric, partials, stream); break;
        case ScalarKind::BFloat16: launch_stage1<__nv_bfloat16>(segments, items, num_items, m, k, symmetric, partials, stream); break;
      }
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const int64_t total = num_outputs * m * k;
  const unsigned blocks = static_cast<unsigned>((total + kWarps - 1) / kWarps);
  if (kind == ScalarKind::Float64) {
    sum_partials_kernel<double><<<blocks, kThreads, 0, stream>>>(
        static_cast<const double*>(partials), output_item_begin, num_outputs, m * k,
        static_cast<double*>(out));
  } else {
    sum_partials_kernel<float><<<blocks, kThreads, 0, stream>>>(
        static_cast<const float*>(partials), output_item_begin, num_outputs, m * k,
        static_cast<float*>(out));
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mtunlearn

// Plain launcher interfaces between the torch-facing entries (ops/*/X.cpp) and the backend
// kernels (ops/*/cpu/*.cpp, ops/*/cuda/*.cu). No torch headers here: kernel files stay cheap to
// compile and the .cu files never see ATen.
#pragma once

#include <cstdint>
#include <climits>

namespace mtunlearn {

enum class ScalarKind : int { Float64 = 0, Float32 = 1, Float16 = 2, BFloat16 = 3 };

inline int element_size(ScalarKind kind) {
  return kind == ScalarKind::Float64 ? 8 : kind == ScalarKind::Float32 ? 4 : 2;
}

// Inner products of `m` rows of A with `k` rows of B over `ncols` contiguous columns, added into
// output matrix `out_index` ([m, k]). For a Gram matrix b == a and m == k.
struct ReduceSegment {
  const void* a;
  const void* b;
  int64_t a_row_stride;  // in elements
  int64_t b_row_stride;
  int64_t ncols;
  int64_t out_index;
  // Rows of A from a_split on come from a second tensor: the Gram of [g; r] stacked, in one
  // pass over both, without copying them together (for a Gram, B is the same stack).
  const void* a2 = nullptr;
  int64_t a2_row_stride = 0;
  int64_t a_split = INT64_MAX;
};

#if defined(__CUDACC__)
#define MTU_SEGMENT_HD __host__ __device__ inline
#else
#define MTU_SEGMENT_HD inline
#endif

// Row i of A in a segment (first or second row group).
template <typename T>
MTU_SEGMENT_HD const T* segment_row_a(const ReduceSegment& s, int64_t i) {
  return i < s.a_split ? static_cast<const T*>(s.a) + i * s.a_row_stride
                       : static_cast<const T*>(s.a2) + (i - s.a_split) * s.a2_row_stride;
}

// The output tile `tile` of tiles_k a side, in the order the CUDA tiled kernels take them:
// row by row, and for a Gram (symmetric) only the tiles on or above the diagonal.
MTU_SEGMENT_HD void tile_coords(int tile, int tiles_k, bool symmetric, int& ti, int& tj) {
  if (symmetric) {
    int y = tile;
    ti = 0;
    while (y >= tiles_k - ti) {
      y -= tiles_k - ti;
      ++ti;
    }
    tj = ti + y;
  } else {
    ti = tile / tiles_k;
    tj = tile % tiles_k;
  }
}

// out rows = beta * base rows + coeffs[coeff_index] ([m, k]) @ x rows, over `ncols` columns.
// base may alias out (in-place update) or be null (beta ignored).
struct CombineSegment {
  void* out;
  const void* base;
  const void* x;
  int64_t out_row_stride;
  int64_t base_row_stride;
  int64_t x_row_stride;
  int64_t ncols;
  int64_t coeff_index;
};

namespace cpu {
// out: [num_outputs, m, k] of the accumulation type (double for Float64, float otherwise),
// overwritten. Deterministic: the work split depends on the problem, not on the thread count.
void reduce(ScalarKind kind, const ReduceSegment* segments, int64_t num_segments, int64_t m,
            int64_t k, bool symmetric, int64_t num_outputs, void* out);

// coeffs: [num_coeffs, m, k] of the accumulation type.
void combine(ScalarKind kind, const CombineSegment* segments, int64_t num_segments, int64_t m,
             int64_t k, const void* coeffs, double beta);
}  // namespace cpu

namespace cuda {
// Work items: column ranges of segments. The partials of each output are reduced by a second
// kernel in item order, so results are deterministic for a given problem and device.
struct ReduceItem {
  int64_t segment;
  int64_t col_begin;
  int64_t col_end;
};

// Every launcher returns 0 on success or a cudaError_t code (see error_string).
const char* error_string(int code);

// reduce's final pass runs one warp per output entry, this many warps a block; with gridDim.x
// at most 2**31 - 1 that bounds the entries one call can write (the host refuses more: a
// larger grid would fail to launch, or wrap past 2**32 and leave entries unwritten).
constexpr int64_t kReduceWarpsPerBlock = 8;
constexpr int64_t kMaxReduceEntries = kReduceWarpsPerBlock * 2147483647LL;

// True when the small register-blocked reduce kernel handles (m, k); else the tiled kernel.
bool reduce_uses_register_path(int64_t m, int64_t k, bool symmetric);

// Stage 1 of reduce on tensor cores (reduce_mma_kernel.cu), when it applies: float16 /
// bfloat16 Grams of more than 8 rows, or float32 or 16-bit problems past the register kernel
// (inner products with at least 16 rows a side), with MTUNLEARN_CUDA_TENSOR_CORES=1 (read at
// every call; off by default until the kernel has passed the op tests on a GPU) and a kernel
// built for sm_80 or newer. Returns false, launching nothing, otherwise: the caller then takes
// the other kernels.
bool reduce_stage1_mma(ScalarKind kind, const ReduceSegment* segments, const ReduceItem* items,
                       int64_t num_items, int64_t m, int64_t k, bool symmetric, float* partials,
                       void* stream);

// All pointers are device pointers; `stream` is a cudaStream_t. `partials` holds
// num_items * m * k accumulation-type values; `output_item_begin` num_outputs + 1 offsets.
int reduce(ScalarKind kind, const ReduceSegment* segments, const ReduceItem* items,
           int64_t num_items, const int64_t* output_item_begin, int64_t num_outputs, int64_t m,
           int64_t k, bool symmetric, void* partials, void* out, void* stream);

int combine(ScalarKind kind, const CombineSegment* segments, const ReduceItem* items,
            int64_t num_items, int64_t m, int64_t k, const void* coeffs, double beta,
            void* stream);

// One thread per problem, in double; inputs/outputs in the accumulation type (dbl: double).
int ridge_solve(bool dbl, const void* gram, const void* rhs, void* out, int64_t batch, int k,
                int m, double ridge, double pivot_floor, double* workspace, void* stream);
// workspace / int_workspace: nonconflicting_dual_slots(batch, k, m) slots of 2 k^2 + 4 k doubles /
// k ints (the rows share them, walked grid-stride).
int64_t nonconflicting_dual_slots(int64_t batch, int k, int m);
int nonconflicting_dual(bool dbl, const void* gram, const void* rhs, void* out, int64_t batch,
                        int k, int m, double pivot_floor, double* workspace, int* int_workspace,
                        void* stream);
int pcgrad_weights(bool dbl, const void* gram, void* out, int64_t batch, int k, int64_t seed,
                   double* workspace, int* int_workspace, void* stream);
}  // namespace cuda

}  // namespace mtunlearn

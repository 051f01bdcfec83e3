// CUDA kernel behind combine, combine_list and the write-back of the surgery ops:
// out = beta * base + coeffs @ x. One block per work item (a column range of one segment), so
// a whole parameter list is one launch; each thread owns 16 bytes of columns, reads the k
// input rows with 16-byte loads and writes its m outputs once. Coefficients are read through
// the read-only cache. Elementwise: no reduction, trivially deterministic.
#include "mtunlearn/cuda_common.cuh"

namespace mtunlearn {
namespace cuda {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
combine_kernel(const CombineSegment* __restrict__ segments, const ReduceItem* __restrict__ items,
               int m, int k, const typename AccOf<T>::type* __restrict__ coeffs, double beta_d) {
  using A = typename AccOf<T>::type;
  constexpr int V = Vec<T>::n;
  const ReduceItem item = items[blockIdx.x];
  const CombineSegment seg = segments[item.segment];
  const T* x = static_cast<const T*>(seg.x);
  const T* base = static_cast<const T*>(seg.base);
  T* out = static_cast<T*>(seg.out);
  const A* c = coeffs + seg.coeff_index * static_cast<int64_t>(m) * k;
  const A beta = static_cast<A>(beta_d);
  const bool use_base = base != nullptr && beta_d != 0.0;
  const bool aligned = ((seg.x_row_stride * sizeof(T)) & 15) == 0 &&
                       ((seg.out_row_stride * sizeof(T)) & 15) == 0 &&
                       (!use_base || ((seg.base_row_stride * sizeof(T)) & 15) == 0);
  const int64_t begin = item.col_begin, end = item.col_end;
  const int64_t vec_end = aligned ? begin + (end - begin) / V * V : begin;
  for (int64_t col = begin + static_cast<int64_t>(threadIdx.x) * V; col < vec_end;
       col += static_cast<int64_t>(kThreads) * V) {
    for (int i = 0; i < m; ++i) {
      A acc[V];
      if (use_base) {
        // Not through the read-only cache: base may be out itself (combine_, combine_list_).
        load16<T, false>(base + i * seg.base_row_stride + col, acc);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] *= beta;
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] = A(0);
      }
      for (int j = 0; j < k; ++j) {
        A xv[V];
        load16(x + j * seg.x_row_stride + col, xv);
        const A cij = __ldg(c + static_cast<int64_t>(i) * k + j);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += cij * xv[v];
      }
      store16(out + i * seg.out_row_stride + col, acc);
    }
  }
  for (int64_t col = vec_end + threadIdx.x; col < end; col += kThreads) {
    for (int i = 0; i < m; ++i) {
      A acc = use_base ? beta * to_acc(base[i * seg.base_row_stride + col]) : A(0);
      for (int j = 0; j < k; ++j) acc += __ldg(c + static_cast<int64_t>(i) * k + j) * to_acc(x[j * seg.x_row_stride + col]);
      store1(out + i * seg.out_row_stride + col, acc);
    }
  }
}

}  // namespace

int combine(ScalarKind kind, const CombineSegment* segments, const ReduceItem* items,
            int64_t num_items, int64_t m, int64_t k, const void* coeffs, double beta,
            void* stream_ptr) {
  if (num_items == 0) return 0;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const dim3 grid(static_cast<unsigned>(num_items));
  const int mi = static_cast<int>(m), ki = static_cast<int>(k);
  switch (kind) {
    case ScalarKind::Float64:
      combine_kernel<double><<<grid, kThreads, 0, stream>>>(segments, items, mi, ki, static_cast<const double*>(coeffs), beta);
      break;
    case ScalarKind::Float32:
      combine_kernel<float><<<grid, kThreads, 0, stream>>>(segments, items, mi, ki, static_cast<const float*>(coeffs), beta);
      break;
    case ScalarKind::Float16:
      combine_kernel<__half><<<grid, kThreads, 0, stream>>>(segments, items, mi, ki, static_cast<const float*>(coeffs), beta);
      break;
    case ScalarKind::BFloat16:
      combine_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(segments, items, mi, ki, static_cast<const float*>(coeffs), beta);
      break;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mtunlearn

// Stage 1 of the Gram / inner-product reduction on tensor cores, for inputs with more rows than
// the register kernel takes: the tile of include/mtunlearn/mma_gram.h with nvcuda::wmma.
// float16 / bfloat16: 16 x 16 x 16 products into float accumulators (each product of two
// 16-bit values is exact in float; the tensor cores' sums may cut low bits, see add_step). float32: three tf32 products per
// step on a split of every value ("3xTF32", WmmaTf32Ops), float32 accuracy, not tf32's. Stage 2
// (the fixed-order sum of the work items' partials) is reduce_kernel.cu's.
//
// Opt-in (MTUNLEARN_CUDA_TENSOR_CORES=1, read at every call) until it has passed the op tests
// on a GPU: written and checked on the CPU emulation (tests/cpp/mma_gram_emulation.cpp) and
// compiled for sm_80 / sm_90 here, not yet run on a device. benchmarks/gpu_check.py runs the
// op tests and the timings with it on.
#include <mma.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "mtunlearn/cuda_common.cuh"
#include "mtunlearn/mma_gram.h"

namespace mtunlearn {
namespace cuda {
namespace {

using namespace nvcuda;
using mma_gram::Shape;

constexpr int kMaxDevices = 64;

// The device side's helpers exist only where the kernel has a body (sm_80 or newer).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
struct CudaBlock {
  __device__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
};

// What every executor of the tile does the same way: 16-byte chunks through registers.
template <typename T>
struct SlabCopies {
  using Chunk = uint4;
  // Whole elements as raw words: the build's -D__CUDA_NO_HALF_CONVERSIONS__ leaves the 16-bit
  // types without conversions from numbers, and zero bits are +0 in every format here.
  using Word = std::conditional_t<sizeof(T) == 2, unsigned short, unsigned int>;
  static constexpr int words = 16 / sizeof(T);

  __device__ bool aligned16(const T* p) const {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
  }
  __device__ Chunk load_chunk(const T* src) const {
    return __ldg(reinterpret_cast<const uint4*>(src));
  }
  // Unrolled, so that the words stay in registers (a loop to n kept them in local memory).
  __device__ Chunk load_partial(const T* src, int n) const {
    const Word* s = reinterpret_cast<const Word*>(src);
    union {
      uint4 raw;
      Word v[words];
    } u;
#pragma unroll
    for (int i = 0; i < words; ++i) u.v[i] = i < n ? __ldg(s + i) : Word(0);
    return u.raw;
  }
  __device__ Chunk zero_chunk() const { return make_uint4(0u, 0u, 0u, 0u); }
  __device__ void store_chunk(T* dst, const Chunk& chunk) const {
    *reinterpret_cast<uint4*>(dst) = chunk;
  }
};

// Tensor cores may cut their sums' low bits instead of rounding them (truncation was measured
// on V100, T4 and A100 by Fasi et al., 2021): each group of products and the accumulator are
// aligned to the largest exponent and the bits below float's precision dropped, an error in
// one direction of up to a few ulps of the accumulator per group. So each step's products are
// summed into a fresh fragment and added to the running sums with float adds (rounded to
// nearest): the cut is a few ulps of one step's sum, not of the running one.
// (tests/cpp/mma_gram_emulation.cpp models every step's sum that way.)
template <typename Acc>
__device__ inline void add_step(Acc& c, const Acc& step) {
#pragma unroll
  for (int e = 0; e < Acc::num_elements; ++e) c.x[e] += step.x[e];
}

// float16 / bfloat16: one 16 x 16 x 16 product per step.
template <typename T>
struct WmmaOps : SlabCopies<T> {
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static constexpr int acc_elements = Acc::num_elements;
  static constexpr int k_step = 16;

  __device__ void zero(Acc& c) const { wmma::fill_fragment(c, 0.0f); }
  __device__ void load_a(FragA& f, const T* p, int ldm) const { wmma::load_matrix_sync(f, p, ldm); }
  __device__ void load_b(FragB& f, const T* p, int ldm) const { wmma::load_matrix_sync(f, p, ldm); }
  __device__ void mma(Acc& c, const FragA& a, const FragB& b) const {
    Acc step;
    wmma::fill_fragment(step, 0.0f);
    wmma::mma_sync(step, a, b, step);
    add_step(c, step);
  }
  __device__ void store(float* p, const Acc& c, int ldm) const {
    wmma::store_matrix_sync(p, c, ldm, wmma::mem_row_major);
  }
  __device__ float& element(Acc& c, int e) const { return c.x[e]; }
};

// float32 ("3xTF32"): each value x = hi + lo + r with hi = tf32(x), lo = tf32(x - hi) and
// |r| <= 2^-22 |x|; a b is summed as lo_a hi_b + hi_a lo_b + hi_a hi_b (the small terms first),
// leaving out lo_a lo_b and the remainders: at most about 3 * 2^-22 = 7.2e-7 of |a_i b_i| per
// product, within the tests' float32 tolerance, at three tf32 products per step. Inf and NaN
// inputs give NaN outputs (0 * Inf in a cross term) where the other kernels may give +-Inf;
// both are non-finite, which the ops' check reports.
struct WmmaTf32Ops : SlabCopies<float> {
  template <typename Use, typename Layout>
  struct Split {
    wmma::fragment<Use, 16, 16, 8, wmma::precision::tf32, Layout> hi, lo;
  };
  using FragA = Split<wmma::matrix_a, wmma::row_major>;
  using FragB = Split<wmma::matrix_b, wmma::col_major>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  static constexpr int acc_elements = Acc::num_elements;
  static constexpr int k_step = 8;

  template <typename F>
  __device__ static void split(F& f) {
#pragma unroll
    for (int i = 0; i < f.hi.num_elements; ++i) {
      const float x = f.hi.x[i];
      float hi = wmma::__float_to_tf32(x);
      // Within half a tf32 step of FLT_MAX rounding gives Inf (and lo = -Inf, products NaN
      // that are finite in float32): cut instead.
      if (isinf(hi) && isfinite(x)) hi = __uint_as_float(__float_as_uint(x) & 0xffffe000u);
      f.hi.x[i] = hi;
      f.lo.x[i] = isfinite(x) ? wmma::__float_to_tf32(x - hi) : 0.0f;
    }
  }
  __device__ void zero(Acc& c) const { wmma::fill_fragment(c, 0.0f); }
  __device__ void load_a(FragA& f, const float* p, int ldm) const {
    wmma::load_matrix_sync(f.hi, p, ldm);
    split(f);
  }
  __device__ void load_b(FragB& f, const float* p, int ldm) const {
    wmma::load_matrix_sync(f.hi, p, ldm);
    split(f);
  }
  __device__ void mma(Acc& c, const FragA& a, const FragB& b) const {
    Acc step;
    wmma::fill_fragment(step, 0.0f);
    wmma::mma_sync(step, a.lo, b.hi, step);
    wmma::mma_sync(step, a.hi, b.lo, step);
    wmma::mma_sync(step, a.hi, b.hi, step);
    add_step(c, step);
  }
  __device__ void store(float* p, const Acc& c, int ldm) const {
    wmma::store_matrix_sync(p, c, ldm, wmma::mem_row_major);
  }
  __device__ float& element(Acc& c, int e) const { return c.x[e]; }
};

template <typename T> struct OpsFor { using type = WmmaOps<T>; };
template <> struct OpsFor<float> { using type = WmmaTf32Ops; };
#endif

template <typename T, bool SYM, int TILE>
__global__ void __launch_bounds__(Shape<TILE, sizeof(T)>::threads)
reduce_mma_kernel(const ReduceSegment* __restrict__ segments,
                  const ReduceItem* __restrict__ items, int m, int k, int tiles_k, int num_tiles,
                  float* __restrict__ partials) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // never launched: the host checks that the kernel was compiled for sm_80 or newer
#else
  // wmma needs 32-byte aligned fragment addresses. Raw bytes: the 16-bit types have
  // constructors, which __shared__ arrays may not run.
  __shared__ __align__(32) unsigned char smem[Shape<TILE, sizeof(T)>::smem_bytes];
  const ReduceItem item = items[blockIdx.x];
  const ReduceSegment seg = segments[item.segment];
  CudaBlock block;
  typename OpsFor<T>::type ops;
  mma_gram::reduce_item_tiles<TILE, SYM, CudaBlock, typename OpsFor<T>::type, T>(
      block, ops, seg, item.col_begin, item.col_end, m, k, tiles_k, num_tiles,
      static_cast<int>(blockIdx.y), static_cast<int>(gridDim.y),
      partials + static_cast<int64_t>(blockIdx.x) * m * k, smem);
#endif
}

// 1, true, on or yes (any case) turn it on; unset or anything else leaves it off.
bool tensor_cores_requested() {
  const char* value = std::getenv("MTUNLEARN_CUDA_TENSOR_CORES");
  if (value == nullptr) return false;
  std::string text(value);
  for (char& ch : text) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return text == "1" || text == "true" || text == "on" || text == "yes";
}

// Whether the image of `kernel` the current device runs was compiled for sm_80 or newer (an
// older arch list, or PTX JIT-compiled from an older virtual arch, holds the __trap body).
// Cached per device (a process keeps its devices; the ops may run on several host threads).
// An error already pending is left for the launch check of reduce() to report, and only "no
// image for this device" is remembered as a no.
template <typename Kernel>
bool built_for_tensor_cores(Kernel kernel, std::atomic<signed char>* cache) {
  if (cudaPeekAtLastError() != cudaSuccess) return false;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (device < 0 || device >= kMaxDevices) return false;
  signed char known = cache[device].load(std::memory_order_relaxed);
  if (known == 0) {
    cudaFuncAttributes attr;
    const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
    if (err == cudaSuccess) {
      known = attr.ptxVersion >= 80 ? 1 : -1;
    } else {
      cudaGetLastError();
      const bool no_image =
          err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction;
      if (!no_image) return false;  // asked again at the next call
      known = -1;
    }
    cache[device].store(known, std::memory_order_relaxed);
  }
  return known == 1;
}

template <typename T, bool SYM, int TILE>
bool launch(const ReduceSegment* segments, const ReduceItem* items, int64_t num_items, int m,
            int k, float* partials, cudaStream_t stream) {
  static std::atomic<signed char> cache[kMaxDevices] = {};
  if (!built_for_tensor_cores(reduce_mma_kernel<T, SYM, TILE>, cache)) return false;
  const int tiles_m = (m + TILE - 1) / TILE, tiles_k = (k + TILE - 1) / TILE;
  const int num_tiles = SYM ? tiles_k * (tiles_k + 1) / 2 : tiles_m * tiles_k;
  const dim3 grid(static_cast<unsigned>(num_items),
                  static_cast<unsigned>(num_tiles < 65535 ? num_tiles : 65535));
  reduce_mma_kernel<T, SYM, TILE><<<grid, Shape<TILE, sizeof(T)>::threads, 0, stream>>>(
      segments, items, m, k, tiles_k, num_tiles, partials);
  return true;
}

template <typename T>
bool launch_sized(const ReduceSegment* segments, const ReduceItem* items, int64_t num_items,
                  int m, int k, bool symmetric, float* partials, cudaStream_t stream) {
  const int rows = symmetric ? m : (m > k ? m : k);
  if (symmetric) {
    return rows <= 32 ? launch<T, true, 32>(segments, items, num_items, m, k, partials, stream)
                      : launch<T, true, 64>(segments, items, num_items, m, k, partials, stream);
  }
  return rows <= 32 ? launch<T, false, 32>(segments, items, num_items, m, k, partials, stream)
                    : launch<T, false, 64>(segments, items, num_items, m, k, partials, stream);
}

bool takes_tensor_cores(ScalarKind kind, int64_t m, int64_t k, bool symmetric) {
  if (kind == ScalarKind::Float64) return false;
  // 16-bit Grams of 9-16 rows too: there the register kernel took 1.8x cuBLAS's tensor-core
  // time (k = 16, n = 1e8, bfloat16, H200; RESULTS.md); in float32 0.74x.
  const bool sixteen_bit = kind == ScalarKind::Float16 || kind == ScalarKind::BFloat16;
  const bool register_path = (symmetric && sixteen_bit) ? m <= 8
                                                         : reduce_uses_register_path(m, k, symmetric);
  // Inner products with fewer than 16 rows on a side would fill most of each fragment with
  // zero rows: the tiled kernel's.
  if (register_path || (!symmetric && (m < 16 || k < 16))) return false;
  return tensor_cores_requested();
}

}  // namespace

bool reduce_stage1_mma(ScalarKind kind, const ReduceSegment* segments, const ReduceItem* items,
                       int64_t num_items, int64_t m, int64_t k, bool symmetric, float* partials,
                       void* stream_ptr) {
  if (!takes_tensor_cores(kind, m, k, symmetric)) return false;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int mi = static_cast<int>(m), ki = static_cast<int>(k);
  if (kind == ScalarKind::Float16)
    return launch_sized<__half>(segments, items, num_items, mi, ki, symmetric, partials, stream);
  if (kind == ScalarKind::Float32)
    return launch_sized<float>(segments, items, num_items, mi, ki, symmetric, partials, stream);
  if (kind == ScalarKind::BFloat16)
    return launch_sized<__nv_bfloat16>(segments, items, num_items, mi, ki, symmetric, partials,
                                       stream);
  return false;
}

}  // namespace cuda
}  // namespace mtunlearn

// Device helpers shared by the CUDA kernels: element conversions and 16-byte vector loads.
// Pure CUDA (no torch headers), so the .cu files compile in seconds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "mtunlearn/kernels.h"

namespace mtunlearn {
namespace cuda_detail {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
__device__ __forceinline__ double from_acc_double(double v) { return v; }

// Elements per 16-byte load.
template <typename T> struct Vec { static constexpr int n = 16 / sizeof(T); };

// A 16-byte load when the address is aligned, element loads otherwise. ReadOnly goes through
// the read-only data cache (__ldg), which CUDA allows only for memory no thread writes during
// the kernel: a load of memory the kernel also writes (combine_'s base, which is its out) uses
// ReadOnly = false.
template <typename T, bool ReadOnly = true>
__device__ __forceinline__ void load16(const T* p, typename AccOf<T>::type* dst) {
  constexpr int N = Vec<T>::n;
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    union {
      uint4 raw;
      T v[N];
    } u;
    const uint4* wide = reinterpret_cast<const uint4*>(p);
    if constexpr (ReadOnly) {
      u.raw = __ldg(wide);
    } else {
      u.raw = *wide;
    }
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = to_acc(u.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = to_acc(p[i]);
  }
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const typename AccOf<T>::type* src) {
  constexpr int N = Vec<T>::n;
  union {
    uint4 raw;
    T v[N];
  } u;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (sizeof(T) == 8) {
      u.v[i] = src[i];
    } else {
      u.v[i] = from_acc<T>(src[i]);
    }
  }
  if ((reinterpret_cast<uintptr_t>(p) & 15u) == 0) {
    *reinterpret_cast<uint4*>(p) = u.raw;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) p[i] = u.v[i];
  }
}

template <typename T>
__device__ __forceinline__ void store1(T* p, typename AccOf<T>::type v) {
  if constexpr (sizeof(T) == 8) {
    *p = v;
  } else {
    *p = from_acc<T>(v);
  }
}

}  // namespace cuda_detail
}  // namespace mtunlearn

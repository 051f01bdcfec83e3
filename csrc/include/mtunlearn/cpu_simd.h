// CPU building blocks shared by the reduce and combine kernels: 32-byte vector types (GCC vector
// extensions: AVX2 registers in the AVX2 build of a kernel, pairs of SSE registers otherwise),
// dtype conversions that turn fp16/bf16 rows into float tiles, and the runtime AVX2 check.
//
// Each kernel body is an always-inline template instantiated twice: once inside a function
// compiled with target("avx2,fma,f16c") and once for the baseline x86-64 target, picked at run
// time. That keeps one portable binary (no -march=native) that still runs at AVX2 speed.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MTU_X86 1
#define MTU_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
#else
#define MTU_X86 0
#define MTU_AVX2_TARGET
#endif

#define MTU_ALWAYS_INLINE inline __attribute__((always_inline))

namespace mtunlearn {
namespace cpu_simd {

typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));

template <typename Acc> struct VecOf;
template <> struct VecOf<float> { using type = v8f; static constexpr int lanes = 8; };
template <> struct VecOf<double> { using type = v4d; static constexpr int lanes = 4; };

template <typename V>
MTU_ALWAYS_INLINE V load_vec(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
MTU_ALWAYS_INLINE void store_vec(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V>
MTU_ALWAYS_INLINE double hsum(V v) {
  constexpr int lanes = sizeof(V) / sizeof(v[0]);
  double s = 0.0;
  for (int l = 0; l < lanes; ++l) s += static_cast<double>(v[l]);
  return s;
}

inline bool has_avx2() {
#if MTU_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// ---- scalar conversions (exact, round-to-nearest-even) ----
MTU_ALWAYS_INLINE float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

MTU_ALWAYS_INLINE uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

MTU_ALWAYS_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

MTU_ALWAYS_INLINE uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u; // rounds to Inf
  if (abs < 0x38800000u) {                       // subnormal or zero in half
    if (abs < 0x33000000u) return sign;
    const uint32_t e = abs >> 23;
    const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    // value = m * 2^(e-150) and the half subnormal unit is 2^-24, so q = m >> (126 - e).
    const uint32_t s = 126u - e;
    uint32_t q = m >> s;
    const uint32_t rem = m & ((1u << s) - 1u);
    const uint32_t halfway = 1u << (s - 1u);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

// ---- row conversions: n elements of storage type into accumulation type ----
#if MTU_X86
MTU_AVX2_TARGET inline void half_row_to_float_avx2(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

MTU_AVX2_TARGET inline void float_row_to_half_avx2(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}
#endif

// Storage type tags.
struct F64 { using storage = double; using acc = double; };
struct F32 { using storage = float; using acc = float; };
struct F16 { using storage = uint16_t; using acc = float; };
struct BF16 { using storage = uint16_t; using acc = float; };

template <typename Tag, bool kAvx2>
MTU_ALWAYS_INLINE void load_row(const typename Tag::storage* src, typename Tag::acc* dst,
                                int64_t n) {
  if constexpr (std::is_same<Tag, F16>::value) {
#if MTU_X86
    if constexpr (kAvx2) {
      half_row_to_float_avx2(src, dst, n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
  } else if constexpr (std::is_same<Tag, BF16>::value) {
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(typename Tag::acc));
  }
}

template <typename Tag, bool kAvx2>
MTU_ALWAYS_INLINE void store_row(const typename Tag::acc* src, typename Tag::storage* dst,
                                 int64_t n) {
  if constexpr (std::is_same<Tag, F16>::value) {
#if MTU_X86
    if constexpr (kAvx2) {
      float_row_to_half_avx2(src, dst, n);
      return;
    }
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
  } else if constexpr (std::is_same<Tag, BF16>::value) {
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
  } else {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(typename Tag::acc));
  }
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace cpu_simd
}  // namespace mtunlearn

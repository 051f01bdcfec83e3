// CPU building blocks shared by the reduce and combine kernels: 32-byte vector types (GCC vector
// extensions: AVX2 registers in the AVX2 build of a kernel, pairs of SSE registers otherwise),
// 64-byte pairs of them for AVX-512, dtype conversions that turn fp16/bf16 rows into float
// tiles, and the runtime instruction-set checks (cpu_isa.h).
//
// Each kernel body is an always-inline template instantiated once inside a function compiled
// with target("avx2,fma,f16c"), once for the baseline x86-64 target and, where a kernel has an
// AVX-512 variant, once with target("avx512f,..."), picked at run time. That keeps one portable
// binary (no -march=native) that still runs at the machine's vector width.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mtunlearn/cpu_isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MTU_X86 1
#define MTU_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
// The AVX2 entry of a kernel: everything it calls is inlined into it, so that the fp16
// conversion intrinsics (target functions, which GCC refuses to always-inline into the
// target-less templates between) end up in AVX2 code.
#define MTU_AVX2_FLATTEN __attribute__((target("avx2,fma,f16c"), flatten))
#define MTU_AVX512_FLATTEN __attribute__((target("avx2,fma,f16c,avx512f"), flatten))
#else
#define MTU_X86 0
#define MTU_AVX2_TARGET
#define MTU_AVX2_FLATTEN
#define MTU_AVX512_FLATTEN
#endif

#define MTU_ALWAYS_INLINE inline __attribute__((always_inline))
#define MTU_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))

namespace mtunlearn {
namespace cpu_simd {

typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v16f __attribute__((vector_size(64)));
typedef double v8d __attribute__((vector_size(64)));

template <typename Acc> struct VecOf;
template <> struct VecOf<float> { using type = v8f; using pair = v16f; static constexpr int lanes = 8; };
template <> struct VecOf<double> { using type = v4d; using pair = v8d; static constexpr int lanes = 4; };

#if MTU_HAVE_AVX512_KERNELS
// Two 32-byte vectors side by side in one 64-byte (zmm) register: `twice(a)` repeats one,
// `join(a, b)` concatenates two. An AVX-512 kernel multiplies twice(a) by join(b, c) to compute
// a * b and a * c in one instruction, each half exactly as the 32-byte kernel computes it.
MTU_ALWAYS_INLINE v16f twice(v8f a) {
  return __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
}
MTU_ALWAYS_INLINE v8d twice(v4d a) { return __builtin_shufflevector(a, a, 0, 1, 2, 3, 0, 1, 2, 3); }
MTU_ALWAYS_INLINE v16f join(v8f a, v8f b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
MTU_ALWAYS_INLINE v8d join(v4d a, v4d b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7);
}
// twice() of the 32 bytes at `p`, loaded by the broadcast itself: vbroadcastf64x4 from memory
// runs on the load ports alone, where a load and the shuffle of twice() put a uop on port 5,
// one of the two ports that run zmm FMAs on Intel cores (the 6 x 8 grid spent 6 of its 34
// port-0/5 uops per column step on those shuffles). GCC does not fold a shuffle of a load into
// the broadcast, hence the asm. It moves bits and computes nothing: the results are unchanged.
template <typename Pair, typename T>
MTU_ALWAYS_INLINE Pair twice_at(const T* p) {
  static_assert(sizeof(Pair) == 64 && sizeof(Pair) / sizeof(T) * sizeof(T) == 64 &&
                    std::is_floating_point<T>::value,
                "twice_at: a 64-byte pair of 32-byte float or double vectors");
  Pair out;
  asm("vbroadcastf64x4 %1, %0" : "=v"(out) : "m"(*reinterpret_cast<const char(*)[32]>(p)));
  return out;
}
#endif

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

inline bool has_avx2() { return cpu_isa::active() >= cpu_isa::Isa::Avx2; }

inline bool has_avx512() { return cpu_isa::active() >= cpu_isa::Isa::Avx512; }

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

// ---- whole-vector loads and stores with the conversion fused in ----
// A kernel that reads rows through these never writes a converted copy: for fp16/bf16 the
// conversion costs one or two register operations per vector, not a store and a reload.
//
// bf16 uses an even/odd split: 16 bf16 values loaded as 8 uint32 lanes hold element 2i in the
// low half and 2i+1 in the high half of lane i, so `lane << 16` is the even elements as fp32 and
// `lane & 0xffff0000` the odd ones (bf16 -> fp32 is exact: the bits shifted up). Vector 2c of a
// row is the even half of its 16-column chunk c and vector 2c+1 the odd half. Inner products do
// not care about that permutation (both operands use it); a combine packs it back on store.
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

#if MTU_X86
MTU_AVX2_TARGET inline v8f load_half8_avx2(const uint16_t* p) {
  return (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MTU_AVX2_TARGET inline void store_half8_avx2(uint16_t* p, v8f v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
}
#endif

// fp32 lanes -> bf16 bits in the high 16 bits of each lane (round to nearest even, NaN kept
// quiet), as float_to_bf16 does one value at a time.
MTU_ALWAYS_INLINE v8u bf16_round_high(v8f f) {
  const v8u bits = (v8u)f;
  const v8u rounded = bits + 0x7fffu + ((bits >> 16) & 1u);
  const v8i is_nan = (v8i)(bits & 0x7fffffffu) > 0x7f800000;
  return (rounded & ~(v8u)is_nan) | ((bits | 0x00400000u) & (v8u)is_nan);
}

// VecIO<Tag, kAvx2>: kCols columns per vector, kGroup vectors per aligned load unit (a kernel
// steps in whole groups, so vector parity is known at compile time), load(row, v) = vector v.
template <typename Tag, bool kAvx2> struct VecIO;

template <bool kAvx2> struct VecIO<F64, kAvx2> {
  using V = v4d;
  static constexpr int kCols = 4, kGroup = 1;
  static MTU_ALWAYS_INLINE V load(const double* row, int64_t v) { return load_vec<V>(row + v * 4); }
  static MTU_ALWAYS_INLINE void store_group(double* row, int64_t g, const V* v) {
    store_vec(row + g * 4, v[0]);
  }
};

template <bool kAvx2> struct VecIO<F32, kAvx2> {
  using V = v8f;
  static constexpr int kCols = 8, kGroup = 1;
  static MTU_ALWAYS_INLINE V load(const float* row, int64_t v) { return load_vec<V>(row + v * 8); }
  static MTU_ALWAYS_INLINE void store_group(float* row, int64_t g, const V* v) {
    store_vec(row + g * 8, v[0]);
  }
};

template <bool kAvx2> struct VecIO<F16, kAvx2> {
  using V = v8f;
  static constexpr int kCols = 8, kGroup = 1;
  static MTU_ALWAYS_INLINE V load(const uint16_t* row, int64_t v) {
#if MTU_X86
    if constexpr (kAvx2) return load_half8_avx2(row + v * 8);
#endif
    V out;
    for (int l = 0; l < 8; ++l) out[l] = half_to_float(row[v * 8 + l]);
    return out;
  }
  static MTU_ALWAYS_INLINE void store_group(uint16_t* row, int64_t g, const V* v) {
#if MTU_X86
    if constexpr (kAvx2) {
      store_half8_avx2(row + g * 8, v[0]);
      return;
    }
#endif
    for (int l = 0; l < 8; ++l) row[g * 8 + l] = float_to_half(v[0][l]);
  }
};

template <bool kAvx2> struct VecIO<BF16, kAvx2> {
  using V = v8f;
  static constexpr int kCols = 8, kGroup = 2;
  static MTU_ALWAYS_INLINE V load(const uint16_t* row, int64_t v) {
    const v8u raw = load_vec<v8u>(row + (v >> 1) * 16);
    return (v8f)((v & 1) ? (raw & 0xffff0000u) : (raw << 16));
  }
  // v[0], v[1]: the even and odd halves of 16-column group g.
  static MTU_ALWAYS_INLINE void store_group(uint16_t* row, int64_t g, const V* v) {
    store_vec(row + g * 16, (bf16_round_high(v[0]) >> 16) | (bf16_round_high(v[1]) & 0xffff0000u));
  }
};

// Scalar element j of a row in the accumulation type (ragged tails).
template <typename Tag>
MTU_ALWAYS_INLINE typename Tag::acc to_acc(typename Tag::storage s) {
  if constexpr (std::is_same<Tag, F16>::value) return half_to_float(s);
  else if constexpr (std::is_same<Tag, BF16>::value) return bf16_to_float(s);
  else return s;
}

template <typename Tag>
MTU_ALWAYS_INLINE typename Tag::storage from_acc(typename Tag::acc a) {
  if constexpr (std::is_same<Tag, F16>::value) return float_to_half(a);
  else if constexpr (std::is_same<Tag, BF16>::value) return float_to_bf16(a);
  else return a;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

}  // namespace cpu_simd
}  // namespace mtunlearn

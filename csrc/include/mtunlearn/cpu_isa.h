// Which x86 vector instruction set the CPU kernels may use: what the CPU (and its OS) supports,
// capped by a limit that the environment (MTUNLEARN_CPU_ISA=baseline|avx2|avx512, read once)
// or the Python layer (mtunlearn_ext.set_cpu_isa) can lower. Lowering it lets one machine run
// and compare every kernel variant: the AVX-512 variants are bitwise equal to the AVX2 ones
// (same per-lane operations in the same order), and tests check that.
//
// Header-only: the state is a function-local static of an inline function, one per shared
// library, so kernels and the pybind module agree without another translation unit.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

// The AVX-512 kernels pair 32-byte vectors with __builtin_shufflevector (GCC 12+, clang); a
// compiler without it builds the AVX2 and baseline kernels only, and reports AVX2 at most.
// (-DMTU_HAVE_AVX512_KERNELS=0 builds without them anywhere.)
#ifndef MTU_HAVE_AVX512_KERNELS
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define MTU_HAVE_AVX512_KERNELS 1
#endif
#endif
#endif
#ifndef MTU_HAVE_AVX512_KERNELS
#define MTU_HAVE_AVX512_KERNELS 0
#endif

namespace mtunlearn {
namespace cpu_isa {

enum class Isa : int { Baseline = 0, Avx2 = 1, Avx512 = 2 };

inline const char* name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

// Parses a name; false when unknown.
inline bool parse(const char* text, Isa* isa) {
  if (text == nullptr) return false;
  if (std::strcmp(text, "avx512") == 0) { *isa = Isa::Avx512; return true; }
  if (std::strcmp(text, "avx2") == 0) { *isa = Isa::Avx2; return true; }
  if (std::strcmp(text, "baseline") == 0) { *isa = Isa::Baseline; return true; }
  return false;
}

// What this CPU runs (with this build's kernels). __builtin_cpu_supports also checks that the
// OS saves the vector state (XCR0), so "avx512f" here means zmm registers are usable.
inline Isa detected() {
#if defined(__x86_64__) || defined(_M_X64)
  static const Isa isa = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    if (!avx2) return Isa::Baseline;
    return MTU_HAVE_AVX512_KERNELS && __builtin_cpu_supports("avx512f") ? Isa::Avx512
                                                                         : Isa::Avx2;
  }();
  return isa;
#else
  return Isa::Baseline;
#endif
}

inline std::atomic<int>& limit_storage() {
  static std::atomic<int> limit{[] {
    Isa isa = Isa::Avx512;
    const char* env = std::getenv("MTUNLEARN_CPU_ISA");
    if (env != nullptr && *env != '\0' && !parse(env, &isa)) isa = Isa::Avx512;  // unknown: no cap
    return static_cast<int>(isa);
  }()};
  return limit;
}

inline Isa limit() { return static_cast<Isa>(limit_storage().load(std::memory_order_relaxed)); }

inline void set_limit(Isa isa) { limit_storage().store(static_cast<int>(isa), std::memory_order_relaxed); }

// The instruction set the kernels use now: the lower of what the CPU supports and the limit.
inline Isa active() {
  const Isa d = detected(), l = limit();
  return static_cast<int>(d) < static_cast<int>(l) ? d : l;
}

}  // namespace cpu_isa
}  // namespace mtunlearn

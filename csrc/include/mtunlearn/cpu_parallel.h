// at::parallel_for for the CPU kernels, with the calling thread's floating-point control state
// on every thread that runs a chunk.
//
// Chunks run on pool threads, and the x86 MXCSR (flush-to-zero, denormals-are-zero, rounding)
// belongs to each thread: torch.set_flush_denormal(True) sets the calling thread's only. Chunks
// on the pool then kept subnormals that the caller's chunk flushed, so the result depended on
// the thread count (the Gram of rows whose products are ~1e-40, in float32: 0 on one thread,
// 9.7e-36 on two). Each chunk now runs under the caller's MXCSR, as a one-thread call does.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define MTU_HAS_MXCSR 1
#else
#define MTU_HAS_MXCSR 0
#endif

namespace mtunlearn {
namespace cpu {

#if MTU_HAS_MXCSR
// Sets this thread's MXCSR for its lifetime, and puts the thread's own back (also when the
// chunk throws: the pool thread outlives the call).
class ScopedMxcsr {
 public:
  explicit ScopedMxcsr(unsigned int state) : own_(_mm_getcsr()) {
    if (state != own_) _mm_setcsr(state);
  }
  ~ScopedMxcsr() {
    if (_mm_getcsr() != own_) _mm_setcsr(own_);
  }
  ScopedMxcsr(const ScopedMxcsr&) = delete;
  ScopedMxcsr& operator=(const ScopedMxcsr&) = delete;

 private:
  unsigned int own_;
};
#endif

template <typename Body>
void parallel_for_as_caller(int64_t begin, int64_t end, int64_t grain, const Body& body) {
#if MTU_HAS_MXCSR
  // Only the control bits: the exception flags (sticky status) are each thread's own.
  constexpr unsigned int kControlBits = ~0x3fu;
  const unsigned int caller = _mm_getcsr() & kControlBits;
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    const ScopedMxcsr same_as_caller((_mm_getcsr() & ~kControlBits) | caller);
    body(chunk_begin, chunk_end);
  });
#else
  at::parallel_for(begin, end, grain, body);
#endif
}

}  // namespace cpu
}  // namespace mtunlearn

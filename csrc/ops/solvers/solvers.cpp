// Entries of the coefficient-space solvers: ridge_solve, nonconflicting_dual, pcgrad_weights.
// The algorithms are in include/mtunlearn/small_solvers.h, shared verbatim with the CUDA
// kernels (cuda/solvers_kernel.cu), so both backends give the same answers.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mtunlearn/checks.h"
#include "mtunlearn/cpu_parallel.h"
#include "mtunlearn/entries.h"
#include "mtunlearn/small_solvers.h"
#include "mtunlearn/registration.h"
#ifdef MTU_WITH_CUDA
#include "mtunlearn/cuda_host.h"
#endif

namespace mtunlearn {
namespace {

void check_gram(const at::Tensor& gram, const char* op) {
  check_min_dim(gram, 2, op, "gram");
  scalar_kind(gram, op, "gram");
  TORCH_CHECK_VALUE(gram.size(-1) == gram.size(-2), op, ": `gram` must be square [..., k, k], got ",
                    gram.sizes());
  check_solver_k(gram.size(-1), op, "gram");
}

void check_rhs(const at::Tensor& gram, const at::Tensor& rhs, bool rows_are_k, const char* op) {
  check_min_dim(rhs, 2, op, "rhs");
  scalar_kind(rhs, op, "rhs");
  check_same_device(gram, "gram", rhs, "rhs", op);
  const int64_t k = gram.size(-1);
  const bool lead_ok = rhs.dim() == gram.dim() &&
                       rhs.sizes().slice(0, rhs.dim() - 2) == gram.sizes().slice(0, gram.dim() - 2);
  TORCH_CHECK_VALUE(lead_ok && (rows_are_k ? rhs.size(-2) == k : rhs.size(-1) == k), op,
                    ": `rhs` must be ", rows_are_k ? "[..., k, m]" : "[..., m, k]",
                    " with k=", k, " and the Gram's leading dims ", gram.sizes().slice(0, gram.dim() - 2),
                    ", got ", rhs.sizes());
}

// Relative rounding level of a Gram matrix of this dtype (fp32 accumulation vs fp64): a row whose
// Cholesky pivot falls to this fraction of its own diagonal is taken as dependent.
double pivot_floor(const at::Tensor& gram) { return gram.scalar_type() == at::kDouble ? 1e-12 : 1e-6; }

// Below this pivot (relative to the row's own diagonal) nonconflicting_dual's active set takes a constraint
// row to lie in the span of the passive ones (see solvers::dual_active_set): a few tens of ulps
// of the row's own diagonal, where the pivot is rounding. Lower than ridge_solve's fp64 floor,
// which regularises a solve: here a row whose independent part is above rounding can still move
// the projection by O(|d|) (SciPy-NNLS scans of k > n rows near one direction, cond(R) 1e3-1e4:
// 1e-12 left some 2e-3 |g| off, 1e-14 none above 1e-6 |g|). In fp32, the pivots below 1e-6 are
// rounding noise that selects rows and inflates w.
double dual_dependence_floor(const at::Tensor& gram) {
  return gram.scalar_type() == at::kDouble ? 1e-14 : 1e-6;
}

// Solver inputs as contiguous double on the CPU path (the problems are tiny).
at::Tensor as_double(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

// Where the CPU solvers write (they compute in float64): `out` itself when it is float64, else a
// float64 buffer that finish_double_result copies into `out`.
at::Tensor double_result(const at::Tensor& out) {
  if (out.scalar_type() == at::kDouble) return out;
  return at::empty(out.sizes(), out.options().dtype(at::kDouble));
}

void finish_double_result(const at::Tensor& out, const at::Tensor& written) {
  if (!written.is_same(out)) out.copy_(written);
}

#ifdef MTU_WITH_CUDA
// The CUDA solver kernels exist for float and double, with the Gram and rhs of one type: a
// half-precision Gram is solved in float (it was read as float: out-of-bounds reads and
// writes), a double rhs makes the solve double (the CPU path solves everything in double). The
// launchers write the result in the output's dtype.
at::ScalarType cuda_solve_type(const at::Tensor& gram, const at::Tensor* rhs) {
  const bool wide = gram.scalar_type() == at::kDouble ||
                    (rhs != nullptr && rhs->scalar_type() == at::kDouble);
  return wide ? at::kDouble : at::kFloat;
}
#endif

}  // namespace

at::Tensor ridge_solve(const at::Tensor& gram, const at::Tensor& rhs, double ridge) {
  constexpr const char* op = "mtunlearn::ridge_solve";
  check_gram(gram, op);
  check_rhs(gram, rhs, /*rows_are_k=*/true, op);
  TORCH_CHECK_VALUE(std::isfinite(ridge) && ridge >= 0.0, op,
                    ": `ridge` must be a finite number >= 0, got ", ridge);
  const int64_t k = gram.size(-1), m = rhs.size(-1);
  // The solver indexes one problem's k x m right-hand sides with 32-bit ints (on both backends).
  TORCH_CHECK_VALUE(k * m <= std::numeric_limits<int32_t>::max(), op,
                    ": `rhs` must have at most 2**31 - 1 entries per problem (k x m), got k=", k,
                    ", m=", m, "; split its columns into several calls");
  at::Tensor out = at::empty(rhs.sizes(), rhs.options().dtype(gram.scalar_type()));
  if (out.numel() == 0) return out;
  if (!gram.is_cpu()) {
#ifdef MTU_WITH_CUDA
    const at::ScalarType type = cuda_solve_type(gram, &rhs);
    cuda_host::ridge_solve(gram.to(type).contiguous(), rhs.to(type).contiguous(), out, ridge,
                           pivot_floor(gram));
    return out;
#else
    TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
  }
  at::Tensor g = as_double(gram), r = as_double(rhs);
  at::Tensor o = double_result(out);
  const int64_t batch = g.numel() / (k * k);
  const double* gp = g.data_ptr<double>();
  const double* rp = r.data_ptr<double>();
  double* op_ = o.data_ptr<double>();
  const double floor = pivot_floor(gram);
  cpu::parallel_for_as_caller(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(k * k);
    for (int64_t b = begin; b < end; ++b)
      solvers::ridge_solve(gp + b * k * k, static_cast<int>(k), rp + b * k * m, static_cast<int>(m),
                           ridge, floor, op_ + b * k * m, scratch.data());
  });
  finish_double_result(out, o);
  return out;
}

at::Tensor nonconflicting_dual(const at::Tensor& gram, const at::Tensor& rhs) {
  constexpr const char* op = "mtunlearn::nonconflicting_dual";
  check_gram(gram, op);
  check_rhs(gram, rhs, /*rows_are_k=*/false, op);
  const int64_t k = gram.size(-1), m = rhs.size(-2);
  at::Tensor out = at::empty(rhs.sizes(), rhs.options().dtype(gram.scalar_type()));
  if (out.numel() == 0) return out;
  if (!gram.is_cpu()) {
#ifdef MTU_WITH_CUDA
    const at::ScalarType type = cuda_solve_type(gram, &rhs);
    cuda_host::nonconflicting_dual(gram.to(type).contiguous(), rhs.to(type).contiguous(), out,
                                   dual_dependence_floor(gram));
    return out;
#else
    TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
  }
  at::Tensor g = as_double(gram), r = as_double(rhs);
  at::Tensor o = double_result(out);
  const int64_t batch = g.numel() / (k * k);
  const double* gp = g.data_ptr<double>();
  const double* rp = r.data_ptr<double>();
  double* op_ = o.data_ptr<double>();
  const double floor = dual_dependence_floor(gram);
  cpu::parallel_for_as_caller(0, batch * m, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(k * k + 2 * k);
    std::vector<int> idx(k);
    // The rows of one Gram share its dependence test (an O(k^3) factorization each).
    int64_t cached_gram = -1;
    int singular = -1;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / m;
      if (b != cached_gram) {
        cached_gram = b;
        singular = -1;
      }
      solvers::nonconflicting_dual(gp + b * k * k, static_cast<int>(k), rp + p * k, floor,
                                   op_ + p * k, scratch.data(), idx.data(), &singular);
    }
  });
  finish_double_result(out, o);
  return out;
}

at::Tensor pcgrad_weights(const at::Tensor& gram, int64_t seed) {
  constexpr const char* op = "mtunlearn::pcgrad_weights";
  check_gram(gram, op);
  const int64_t k = gram.size(-1);
  at::Tensor out = at::empty(gram.sizes().slice(0, gram.dim() - 1), gram.options());
  if (out.numel() == 0) return out;
  if (!gram.is_cpu()) {
#ifdef MTU_WITH_CUDA
    cuda_host::pcgrad_weights(gram.to(cuda_solve_type(gram, nullptr)).contiguous(), out, seed);
    return out;
#else
    TORCH_CHECK(false, op, ": this build has no CUDA kernels");
#endif
  }
  at::Tensor g = as_double(gram);
  at::Tensor o = double_result(out);
  const int64_t batch = g.numel() / (k * k);
  const double* gp = g.data_ptr<double>();
  double* op_ = o.data_ptr<double>();
  cpu::parallel_for_as_caller(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(k);
    std::vector<int> order(k);
    for (int64_t b = begin; b < end; ++b)
      solvers::pcgrad_weights(gp + b * k * k, static_cast<int>(k), seed, op_ + b * k,
                              scratch.data(), order.data());
  });
  finish_double_result(out, o);
  return out;
}

MTU_LIBRARY_IMPL(CPU, m) {
  m.impl("ridge_solve", &ridge_solve);
  m.impl("nonconflicting_dual", &nonconflicting_dual);
  m.impl("pcgrad_weights", &pcgrad_weights);
}

#ifdef MTU_WITH_CUDA
MTU_LIBRARY_IMPL(CUDA, m) {
  m.impl("ridge_solve", &ridge_solve);
  m.impl("nonconflicting_dual", &nonconflicting_dual);
  m.impl("pcgrad_weights", &pcgrad_weights);
}
#endif

}  // namespace mtunlearn

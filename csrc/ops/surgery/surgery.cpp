// The whole-step surgery ops, composed from the primitives on any device: the Gram of r and
// its inner products with g (one pass over both, or two: see gram_and_cross), a tiny solve on
// the device, one combine pass that writes the result directly (g - a^T B is produced without
// first copying g). No host synchronisation.
#include <ATen/core/Tensor.h>

#include <cmath>
#include <tuple>
#include <utility>

#include "mtunlearn/checks.h"
#include "mtunlearn/entries.h"
#include "mtunlearn/registration.h"

namespace mtunlearn {
namespace {

void check_pair(const at::Tensor& g, const char* g_name, const at::Tensor& r, const char* r_name,
                const char* op) {
  check_min_dim(g, 2, op, g_name);
  check_min_dim(r, 2, op, r_name);
  scalar_kind(g, op, g_name);
  check_same_device(g, g_name, r, r_name, op);
  check_same_dtype(g, g_name, r, r_name, op);
  TORCH_CHECK_VALUE(g.dim() == r.dim() &&
                        g.sizes().slice(0, g.dim() - 2) == r.sizes().slice(0, r.dim() - 2) &&
                        g.size(-1) == r.size(-1),
                    op, ": `", g_name, "` [..., m, n] and `", r_name,
                    "` [..., k, n] must share leading dims and n; got ", g.sizes(), " and ", r.sizes());
  check_solver_k(r.size(-2), op, r_name);
}

// r r^T [..., k, k] and r g^T [..., k, m], the two blocks both projections solve with. One pass
// over the stacked [g; r] reads every row once but also computes g g^T, which nothing reads:
// (m + k)^2 / 2 products per column against k^2 / 2 + m k. Measured on one CPU core at
// n = 2^20 (float32, ms, one pass against two): m = 1, k = 192: 568 / 659; m = 4, k = 32:
// 20.5 / 32.8; m = k = 16: 17.6 / 19.5; m = k = 32: 73.7 / 54.9; m = 12, k = 8: 14.4 / 10.4;
// m = 64, k = 4: 76 / 26; m = 256, k = 4: 1067 / 101. So more directions than rows (or a
// square past the register kernels' 16 rows) take two passes.
std::pair<at::Tensor, at::Tensor> gram_and_cross(const at::Tensor& g, const at::Tensor& r) {
  const int64_t m = g.size(-2), k = r.size(-2);
  if (m > k || (m == k && m > 16)) return {mtunlearn::gram(r), mtunlearn::inner(r, g)};
  const at::Tensor full = mtunlearn::stacked_gram(g, r);  // [..., m+k, m+k]
  return {full.narrow(-2, m, k).narrow(-1, m, k).contiguous(),
          full.narrow(-2, m, k).narrow(-1, 0, m).contiguous()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> project_out(const at::Tensor& g, const at::Tensor& basis,
                                               double ridge) {
  constexpr const char* op = "mtunlearn::project_out";
  check_pair(g, "g", basis, "basis", op);
  TORCH_CHECK_VALUE(std::isfinite(ridge) && ridge >= 0.0, op,
                    ": `ridge` must be a finite number >= 0, got ", ridge);
  const auto [gm, rhs] = gram_and_cross(g, basis);                     // B B^T, B g^T [..., k, m]
  const at::Tensor a = mtunlearn::ridge_solve(gm, rhs, ridge);         // [..., k, m]
  const at::Tensor coeffs = a.transpose(-1, -2).contiguous();          // [..., m, k]
  at::Tensor out = combine_with_base(coeffs.neg(), basis, g, 1.0);
  return {out, coeffs};
}

std::tuple<at::Tensor, at::Tensor> project_nonconflicting(const at::Tensor& g, const at::Tensor& r,
                                                          int64_t sign) {
  constexpr const char* op = "mtunlearn::project_nonconflicting";
  check_pair(g, "g", r, "r", op);
  TORCH_CHECK_VALUE(sign == 1 || sign == -1, op, ": `sign` must be 1 or -1, got ", sign);
  const auto [gm, cross] = gram_and_cross(g, r);                       // R R^T, R g^T
  at::Tensor rhs = cross.transpose(-1, -2).contiguous();               // g R^T [..., m, k]
  if (sign < 0) rhs = rhs.neg();
  const at::Tensor w = mtunlearn::nonconflicting_dual(gm, rhs);        // [..., m, k]
  at::Tensor out = combine_with_base(sign < 0 ? w.neg() : w, r, g, 1.0);
  return {out, w};
}

std::tuple<at::Tensor, at::Tensor> pcgrad(const at::Tensor& x, int64_t seed) {
  constexpr const char* op = "mtunlearn::pcgrad";
  check_min_dim(x, 2, op, "x");
  scalar_kind(x, op, "x");
  check_solver_k(x.size(-2), op, "x");
  const at::Tensor w = mtunlearn::pcgrad_weights(mtunlearn::gram(x), seed);  // [..., k]
  at::Tensor out = mtunlearn::combine(w.unsqueeze(-2), x).squeeze(-2);     // [..., n]
  return {out, w};
}

MTU_LIBRARY_IMPL(CPU, m) {
  m.impl("project_out", &project_out);
  m.impl("project_nonconflicting", &project_nonconflicting);
  m.impl("pcgrad", &pcgrad);
}

#ifdef MTU_WITH_CUDA
MTU_LIBRARY_IMPL(CUDA, m) {
  m.impl("project_out", &project_out);
  m.impl("project_nonconflicting", &project_nonconflicting);
  m.impl("pcgrad", &pcgrad);
}
#endif

}  // namespace mtunlearn

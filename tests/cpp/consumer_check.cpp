// A C++ program linked to libmtunlearn_ops the plain CMake way (target_link_libraries), the
// way a C++ user links it: every op through the mtunlearn::ops API against a float64 ATen
// reference, in float64 and float32, and an op error arriving as c10::Error. Built by
// CMakeLists.txt (MTUNLEARN_BUILD_CONSUMER_CHECK) and run by scripts/build_cmake.sh.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "mtunlearn/ops.h"

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const at::Tensor g = got.to(at::kDouble), w = want.to(at::kDouble);
  const double scale = std::max(w.abs().max().item<double>(), 1.0);
  const double error = (g - w).abs().max().item<double>() / scale;
  const bool ok = got.sizes() == want.sizes() && error <= tol;
  std::printf("%-44s %s (relative error %.2e, tolerance %.0e)\n", what, ok ? "ok" : "FAILED",
              error, tol);
  failures += ok ? 0 : 1;
}

void check_dtype(at::ScalarType dtype, double tol) {
  const std::string name = dtype == at::kDouble ? "float64" : "float32";
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const int64_t k = 4, m = 3, n = 1003;  // n: not a multiple of any SIMD width
  const at::Tensor x64 = at::randn({k, n}, f64), g64 = at::randn({m, n}, f64);
  const at::Tensor x = x64.to(dtype), g = g64.to(dtype);
  const at::Tensor gram64 = at::matmul(x64, x64.t());
  auto label = [&](const char* op) { return name + " " + op; };

  expect_close(label("gram").c_str(), mtunlearn::ops::gram(x), gram64, tol);
  const std::vector<at::Tensor> parts = {x.narrow(1, 0, 500).reshape({k, 20, 25}),
                                         x.narrow(1, 500, 503)};
  expect_close(label("gram_list").c_str(), mtunlearn::ops::gram_list(parts), gram64, tol);
  expect_close(label("inner").c_str(), mtunlearn::ops::inner(g, x), at::matmul(g64, x64.t()),
               tol);
  const at::Tensor coeffs64 = at::randn({m, k}, f64), coeffs = coeffs64.to(dtype);
  expect_close(label("combine").c_str(), mtunlearn::ops::combine(coeffs, x),
               at::matmul(coeffs64, x64), tol);
  at::Tensor out = g.clone();
  mtunlearn::ops::combine_(out, coeffs, x, 1.0);
  expect_close(label("combine_ (beta = 1)").c_str(), out, g64 + at::matmul(coeffs64, x64), tol);
  const at::Tensor weights64 = at::randn({k}, f64);
  std::vector<at::Tensor> outs = {at::empty({n}, x.options())};
  mtunlearn::ops::combine_list_(outs, weights64.to(dtype), {x});
  expect_close(label("combine_list_").c_str(), outs[0], at::matmul(weights64, x64), tol);

  const at::Tensor rhs64 = at::matmul(x64, g64.t());  // B g^T, in the Gram's range
  const double ridge = 1e-3;
  const double lambda = ridge * gram64.trace().item<double>() / k;
  const at::Tensor regular = gram64 + lambda * at::eye(k, f64);
  expect_close(label("ridge_solve").c_str(),
               mtunlearn::ops::ridge_solve(mtunlearn::ops::gram(x), rhs64.to(dtype), ridge),
               at::linalg_solve(regular, rhs64), 100 * tol);
  const auto [projected, a] = mtunlearn::ops::project_out(g, x, ridge);
  const at::Tensor a64 = at::linalg_solve(regular, rhs64).t();
  expect_close(label("project_out").c_str(), projected, g64 - at::matmul(a64, x64), 100 * tol);

  // The dual of the cone projection: w >= 0 and, at the optimum, G w + c >= 0 with
  // complementary slackness; the projected vector conflicts with no row.
  // Solved on the Gram and c in the dtype under test; the conditions are read in float64 on
  // those same (rounded) inputs, to the output's rounding.
  const at::Tensor gram_d = gram64.to(dtype), c_d = at::matmul(g64, x64.t()).to(dtype);
  const at::Tensor w = mtunlearn::ops::nonconflicting_dual(gram_d, c_d).to(at::kDouble);
  const at::Tensor slack = at::matmul(w, gram_d.to(at::kDouble)) + c_d.to(at::kDouble);
  const double scale = gram64.abs().max().item<double>() * w.abs().max().item<double>() + 1.0;
  const double kkt_tol = dtype == at::kDouble ? 1e-10 : 1e-5;
  const bool dual_ok = (w >= 0).all().item<bool>() &&
                       (slack >= -kkt_tol * scale).all().item<bool>() &&
                       (w * slack).abs().max().item<double>() < kkt_tol * scale * scale;
  std::printf("%-44s %s\n", label("nonconflicting_dual (KKT)").c_str(), dual_ok ? "ok" : "FAILED");
  failures += dual_ok ? 0 : 1;
  const auto [d, wd] = mtunlearn::ops::project_nonconflicting(g, x, 1);
  const double worst = at::matmul(d.to(at::kDouble), x64.t()).min().item<double>();
  const bool cone_ok = worst >= -tol * gram64.abs().max().item<double>();
  std::printf("%-44s %s (min <d, r_j> %.2e)\n", label("project_nonconflicting").c_str(),
              cone_ok ? "ok" : "FAILED", worst);
  failures += cone_ok ? 0 : 1;

  // PCGrad: the weights combine the rows into the returned update.
  const auto [update, pc_weights] = mtunlearn::ops::pcgrad(x, 7);
  expect_close(label("pcgrad").c_str(), update,
               at::matmul(pc_weights.to(at::kDouble), x64), tol);
  expect_close(label("pcgrad_weights").c_str(),
               mtunlearn::ops::pcgrad_weights(gram64.to(dtype), 7), pc_weights, 100 * tol);
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_dtype(at::kDouble, 1e-12);
  check_dtype(at::kFloat, 1e-5);
  // Bad calls: each error names the op and what is wrong with which argument (the first two
  // are refused before dispatch, where torch's own words named neither).
  const std::vector<at::Tensor> with_undefined{at::randn({2, 5}), at::Tensor()};
  const std::vector<std::pair<const char*, std::function<void()>>> bad_calls{
      {"inner with mismatched n",
       [] { mtunlearn::ops::inner(at::randn({2, 10}), at::randn({2, 11})); }},
      {"gram of an undefined tensor", [] { mtunlearn::ops::gram(at::Tensor()); }},
      {"gram_list with an undefined xs[1]",
       [&] { mtunlearn::ops::gram_list(with_undefined, false); }},
      {"inner of cpu and meta tensors",
       [] { mtunlearn::ops::inner(at::randn({2, 4}), at::empty({2, 4}, at::kMeta)); }},
      {"backward through gram",  // PyTorch's default: a warning and no gradient
       [] {
         const at::Tensor x = at::randn({3, 5}).set_requires_grad(true);
         mtunlearn::ops::gram(x).sum().backward();
       }},
  };
  const char* expected[] = {"mtunlearn::inner", "mtunlearn::gram: `x` is an undefined tensor",
                            "mtunlearn::gram_list: `xs[1]` is an undefined tensor",
                            "mtunlearn::inner: `b` is on meta but `a` is on cpu",
                            "derivative for mtunlearn::gram is not implemented"};
  for (size_t i = 0; i < bad_calls.size(); ++i) {
    const auto& [what, call] = bad_calls[i];
    try {
      call();
      std::printf("%-44s FAILED: no error\n", what);
      ++failures;
    } catch (const c10::Error& error) {
      const bool named = std::string(error.what()).find(expected[i]) != std::string::npos;
      std::printf("%-44s %s (c10::Error: \"%s\"%s)\n", what, named ? "ok" : "FAILED",
                  expected[i], named ? "" : (std::string(", got: ") + error.what()).c_str());
      failures += named ? 0 : 1;
    }
  }
  std::printf("%s\n", failures == 0 ? "consumer check passed" : "consumer check FAILED");
  return failures == 0 ? 0 : 1;
}

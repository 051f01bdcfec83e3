// Ops reached only by name, through the dispatcher, as a program does that runs a TorchScript
// model or calls torch::ops by their schema: it references no symbol of libmtunlearn_ops, so
// only the link option of mtunlearn::ops keeps the library (and the static initialisers that
// register its ops) in a link with --as-needed. Each op against a float64 ATen reference.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/linalg_solve.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/randn.h>

#include <algorithm>
#include <cstdio>
#include <tuple>

namespace {

template <class Signature>
c10::TypedOperatorHandle<Signature> op_named(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

bool close(const char* what, const at::Tensor& got, const at::Tensor& want) {
  const double scale = std::max(want.abs().max().item<double>(), 1.0);
  const double error = (got - want).abs().max().item<double>() / scale;
  const bool ok = got.sizes() == want.sizes() && error <= 1e-10;
  std::printf("by name: %-36s %s (relative error %.2e)\n", what, ok ? "ok" : "FAILED", error);
  return ok;
}

}  // namespace

int main() {
  using Pair = std::tuple<at::Tensor, at::Tensor>;
  try {
    const auto gram = op_named<at::Tensor(const at::Tensor&)>("mtunlearn::gram");
    const auto combine =
        op_named<at::Tensor(const at::Tensor&, const at::Tensor&)>("mtunlearn::combine");
    const auto project_out =
        op_named<Pair(const at::Tensor&, const at::Tensor&, double)>("mtunlearn::project_out");

    at::manual_seed(0);
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    const int64_t k = 4, m = 3, n = 1003;
    const at::Tensor x = at::randn({k, n}, f64), g = at::randn({m, n}, f64);
    const at::Tensor coeffs = at::randn({m, k}, f64);
    const at::Tensor gram_x = at::matmul(x, x.t());
    // project_out's ridge is relative to the Gram's mean diagonal.
    const double ridge = 1e-3;
    const at::Tensor regular = gram_x + ridge * gram_x.trace().item<double>() / k * at::eye(k, f64);
    const at::Tensor a = at::linalg_solve(regular, at::matmul(x, g.t())).t();

    bool ok = close("mtunlearn::gram", gram.call(x), gram_x);
    ok &= close("mtunlearn::combine", combine.call(coeffs, x), at::matmul(coeffs, x));
    ok &= close("mtunlearn::project_out", std::get<0>(project_out.call(g, x, ridge)),
                g - at::matmul(a, x));
    std::printf("%s\n", ok ? "by-name check passed" : "by-name check FAILED");
    return ok ? 0 : 1;
  } catch (const c10::Error& error) {
    // "Could not find schema for mtunlearn::gram": the linker dropped the library.
    std::printf("by-name check FAILED: %s\n", error.what_without_backtrace());
    return 1;
  }
}

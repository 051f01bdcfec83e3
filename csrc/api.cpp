// mtunlearn::ops (include/mtunlearn/ops.h): each function looks its op up once and calls it
// through the dispatcher, as at::matmul does for aten ops.
#include <ATen/core/dispatch/Dispatcher.h>

#include "mtunlearn/ops.h"

namespace mtunlearn::ops {
namespace {

template <class Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

at::Tensor gram(const at::Tensor& x) {
  static const auto op = find<at::Tensor(const at::Tensor&)>("mtunlearn::gram");
  return op.call(x);
}

at::Tensor gram_list(at::TensorList xs, bool per_tensor) {
  static const auto op = find<at::Tensor(at::TensorList, bool)>("mtunlearn::gram_list");
  return op.call(xs, per_tensor);
}

at::Tensor inner(const at::Tensor& a, const at::Tensor& b) {
  static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&)>("mtunlearn::inner");
  return op.call(a, b);
}

at::Tensor inner_list(at::TensorList a_list, at::TensorList b_list, bool per_tensor) {
  static const auto op =
      find<at::Tensor(at::TensorList, at::TensorList, bool)>("mtunlearn::inner_list");
  return op.call(a_list, b_list, per_tensor);
}

at::Tensor gram_list_stacked(at::TensorList xs, at::TensorList ys, bool per_tensor) {
  static const auto op =
      find<at::Tensor(at::TensorList, at::TensorList, bool)>("mtunlearn::gram_list_stacked");
  return op.call(xs, ys, per_tensor);
}

at::Tensor combine(const at::Tensor& coeffs, const at::Tensor& x) {
  static const auto op =
      find<at::Tensor(const at::Tensor&, const at::Tensor&)>("mtunlearn::combine");
  return op.call(coeffs, x);
}

void combine_(const at::Tensor& out, const at::Tensor& coeffs, const at::Tensor& x, double beta) {
  static const auto op =
      find<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "mtunlearn::combine_");
  op.call(out, coeffs, x, beta);
}

void combine_list_(at::TensorList outs, const at::Tensor& coeffs, at::TensorList xs, double beta,
                   bool per_tensor) {
  static const auto op =
      find<void(at::TensorList, const at::Tensor&, at::TensorList, double, bool)>(
          "mtunlearn::combine_list_");
  op.call(outs, coeffs, xs, beta, per_tensor);
}

void combine_list_from_(at::TensorList outs, at::TensorList bases, const at::Tensor& coeffs,
                        at::TensorList xs, double beta, bool per_tensor) {
  static const auto op =
      find<void(at::TensorList, at::TensorList, const at::Tensor&, at::TensorList, double,
                bool)>("mtunlearn::combine_list_from_");
  op.call(outs, bases, coeffs, xs, beta, per_tensor);
}

at::Tensor ridge_solve(const at::Tensor& gram, const at::Tensor& rhs, double ridge) {
  static const auto op =
      find<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("mtunlearn::ridge_solve");
  return op.call(gram, rhs, ridge);
}

at::Tensor nonconflicting_dual(const at::Tensor& gram, const at::Tensor& rhs) {
  static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&)>(
      "mtunlearn::nonconflicting_dual");
  return op.call(gram, rhs);
}

at::Tensor pcgrad_weights(const at::Tensor& gram, int64_t seed) {
  static const auto op =
      find<at::Tensor(const at::Tensor&, int64_t)>("mtunlearn::pcgrad_weights");
  return op.call(gram, seed);
}

std::tuple<at::Tensor, at::Tensor> project_out(const at::Tensor& g, const at::Tensor& basis,
                                               double ridge) {
  static const auto op =
      find<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>(
          "mtunlearn::project_out");
  return op.call(g, basis, ridge);
}

std::tuple<at::Tensor, at::Tensor> project_nonconflicting(const at::Tensor& g,
                                                          const at::Tensor& r, int64_t sign) {
  static const auto op =
      find<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>(
          "mtunlearn::project_nonconflicting");
  return op.call(g, r, sign);
}

std::tuple<at::Tensor, at::Tensor> pcgrad(const at::Tensor& x, int64_t seed) {
  static const auto op =
      find<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>("mtunlearn::pcgrad");
  return op.call(x, seed);
}

}  // namespace mtunlearn::ops

// mtunlearn::ops (include/mtunlearn/ops.h): each function looks its op up once and calls it
// through the dispatcher, as at::matmul does for aten ops.
#include <ATen/core/dispatch/Dispatcher.h>

#include "mtunlearn/ops.h"

#include <string>

namespace mtunlearn::ops {
namespace {

template <class Signature>
c10::TypedOperatorHandle<Signature> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Checks that the dispatcher makes before any kernel sees the call, and so cannot name the
// argument: an undefined tensor (its message: "There were no tensor arguments to this
// function") and tensors on two devices where one is meta (the call went to the Meta key,
// whose kernels only Python registers). No string is built unless a check fails.
class ArgCheck {
 public:
  explicit ArgCheck(const char* op) : op_(op) {}

  ArgCheck& operator()(const char* name, const at::Tensor& t) {
    check(name, -1, t);
    return *this;
  }

  ArgCheck& operator()(const char* name, at::TensorList ts) {
    for (size_t i = 0; i < ts.size(); ++i) check(name, static_cast<int64_t>(i), ts[i]);
    return *this;
  }

 private:
  static std::string label(const char* name, int64_t index) {
    return index < 0 ? std::string(name) : std::string(name) + "[" + std::to_string(index) + "]";
  }

  void check(const char* name, int64_t index, const at::Tensor& t) {
    TORCH_CHECK_VALUE(t.defined(), op_, ": `", label(name, index),
                      "` is an undefined tensor (a default-constructed at::Tensor)");
    if (first_ == nullptr) {
      first_ = &t;
      first_name_ = name;
      first_index_ = index;
      return;
    }
    TORCH_CHECK_VALUE(t.device() == first_->device(), op_, ": `", label(name, index), "` is on ",
                      t.device(), " but `", label(first_name_, first_index_), "` is on ",
                      first_->device(), "; pass tensors on one device");
  }

  const char* op_;
  const at::Tensor* first_ = nullptr;
  const char* first_name_ = nullptr;
  int64_t first_index_ = -1;
};

}  // namespace

at::Tensor gram(const at::Tensor& x) {
  static const auto op = find<at::Tensor(const at::Tensor&)>("mtunlearn::gram");
  ArgCheck("mtunlearn::gram")("x", x);
  return op.call(x);
}

at::Tensor gram_list(at::TensorList xs, bool per_tensor) {
  static const auto op = find<at::Tensor(at::TensorList, bool)>("mtunlearn::gram_list");
  ArgCheck("mtunlearn::gram_list")("xs", xs);
  return op.call(xs, per_tensor);
}

at::Tensor inner(const at::Tensor& a, const at::Tensor& b) {
  static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&)>("mtunlearn::inner");
  ArgCheck("mtunlearn::inner")("a", a)("b", b);
  return op.call(a, b);
}

at::Tensor inner_list(at::TensorList a_list, at::TensorList b_list, bool per_tensor) {
  static const auto op =
      find<at::Tensor(at::TensorList, at::TensorList, bool)>("mtunlearn::inner_list");
  ArgCheck("mtunlearn::inner_list")("a_list", a_list)("b_list", b_list);
  return op.call(a_list, b_list, per_tensor);
}

at::Tensor gram_list_stacked(at::TensorList xs, at::TensorList ys, bool per_tensor) {
  static const auto op =
      find<at::Tensor(at::TensorList, at::TensorList, bool)>("mtunlearn::gram_list_stacked");
  ArgCheck("mtunlearn::gram_list_stacked")("xs", xs)("ys", ys);
  return op.call(xs, ys, per_tensor);
}

at::Tensor combine(const at::Tensor& coeffs, const at::Tensor& x) {
  static const auto op =
      find<at::Tensor(const at::Tensor&, const at::Tensor&)>("mtunlearn::combine");
  ArgCheck("mtunlearn::combine")("coeffs", coeffs)("x", x);
  return op.call(coeffs, x);
}

void combine_(const at::Tensor& out, const at::Tensor& coeffs, const at::Tensor& x, double beta) {
  static const auto op =
      find<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "mtunlearn::combine_");
  ArgCheck("mtunlearn::combine_")("out", out)("coeffs", coeffs)("x", x);
  op.call(out, coeffs, x, beta);
}

void combine_list_(at::TensorList outs, const at::Tensor& coeffs, at::TensorList xs, double beta,
                   bool per_tensor) {
  static const auto op =
      find<void(at::TensorList, const at::Tensor&, at::TensorList, double, bool)>(
          "mtunlearn::combine_list_");
  ArgCheck("mtunlearn::combine_list_")("outs", outs)("coeffs", coeffs)("xs", xs);
  op.call(outs, coeffs, xs, beta, per_tensor);
}

void combine_list_from_(at::TensorList outs, at::TensorList bases, const at::Tensor& coeffs,
                        at::TensorList xs, double beta, bool per_tensor) {
  static const auto op =
      find<void(at::TensorList, at::TensorList, const at::Tensor&, at::TensorList, double,
                bool)>("mtunlearn::combine_list_from_");
  ArgCheck("mtunlearn::combine_list_from_")("outs", outs)("bases", bases)("coeffs", coeffs)(
      "xs", xs);
  op.call(outs, bases, coeffs, xs, beta, per_tensor);
}

at::Tensor ridge_solve(const at::Tensor& gram, const at::Tensor& rhs, double ridge) {
  static const auto op =
      find<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("mtunlearn::ridge_solve");
  ArgCheck("mtunlearn::ridge_solve")("gram", gram)("rhs", rhs);
  return op.call(gram, rhs, ridge);
}

at::Tensor nonconflicting_dual(const at::Tensor& gram, const at::Tensor& rhs) {
  static const auto op = find<at::Tensor(const at::Tensor&, const at::Tensor&)>(
      "mtunlearn::nonconflicting_dual");
  ArgCheck("mtunlearn::nonconflicting_dual")("gram", gram)("rhs", rhs);
  return op.call(gram, rhs);
}

at::Tensor pcgrad_weights(const at::Tensor& gram, int64_t seed) {
  static const auto op =
      find<at::Tensor(const at::Tensor&, int64_t)>("mtunlearn::pcgrad_weights");
  ArgCheck("mtunlearn::pcgrad_weights")("gram", gram);
  return op.call(gram, seed);
}

std::tuple<at::Tensor, at::Tensor> project_out(const at::Tensor& g, const at::Tensor& basis,
                                               double ridge) {
  static const auto op =
      find<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, double)>(
          "mtunlearn::project_out");
  ArgCheck("mtunlearn::project_out")("g", g)("basis", basis);
  return op.call(g, basis, ridge);
}

std::tuple<at::Tensor, at::Tensor> project_nonconflicting(const at::Tensor& g,
                                                          const at::Tensor& r, int64_t sign) {
  static const auto op =
      find<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>(
          "mtunlearn::project_nonconflicting");
  ArgCheck("mtunlearn::project_nonconflicting")("g", g)("r", r);
  return op.call(g, r, sign);
}

std::tuple<at::Tensor, at::Tensor> pcgrad(const at::Tensor& x, int64_t seed) {
  static const auto op =
      find<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>("mtunlearn::pcgrad");
  ArgCheck("mtunlearn::pcgrad")("x", x);
  return op.call(x, seed);
}

}  // namespace mtunlearn::ops

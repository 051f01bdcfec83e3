// Argument checks shared by every op entry (CPU and CUDA): one place for the messages, which
// name the op, the argument, what was expected and what was received.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <ostream>

#include "mtunlearn/kernels.h"

namespace mtunlearn {

// An argument's name as the messages print it, `xs[3]` for a list element. Only formatted when
// a check fails: building the strings for every tensor of a parameter list on each call cost
// more than the checks.
struct ArgName {
  const char* name;
  int64_t index = -1;
  ArgName(const char* n) : name(n) {}  // NOLINT(google-explicit-constructor)
  ArgName(const char* n, int64_t i) : name(n), index(i) {}
};

inline std::ostream& operator<<(std::ostream& os, const ArgName& arg) {
  os << arg.name;
  if (arg.index >= 0) os << "[" << arg.index << "]";
  return os;
}

inline ScalarKind scalar_kind(const at::Tensor& t, const char* op, ArgName name) {
  switch (t.scalar_type()) {
    case at::kDouble: return ScalarKind::Float64;
    case at::kFloat: return ScalarKind::Float32;
    case at::kHalf: return ScalarKind::Float16;
    case at::kBFloat16: return ScalarKind::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": `", name,
                       "` must have dtype float64, float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return ScalarKind::Float32;
}

// Gram matrices, inner products and solver outputs use this dtype.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_min_dim(const at::Tensor& t, int64_t dim, const char* op, ArgName name) {
  TORCH_CHECK_VALUE(t.dim() >= dim, op, ": `", name, "` must have at least ", dim,
                    " dims, got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, ArgName a_name, const at::Tensor& b,
                              ArgName b_name, const char* op) {
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": `", b_name, "` is on ", b.device(),
                    " but `", a_name, "` is on ", a.device(), "; all tensors must be on one device");
}

inline void check_same_dtype(const at::Tensor& a, ArgName a_name, const at::Tensor& b,
                             ArgName b_name, const char* op) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), op, ": `", b_name, "` has dtype ",
                   b.scalar_type(), " but `", a_name, "` has ", a.scalar_type(),
                   "; they must match");
}

inline void check_solver_k(int64_t k, const char* op, const char* name) {
  TORCH_CHECK_VALUE(k <= 256, op, ": `", name, "` has k=", k,
                    " rows; the coefficient-space solvers support at most 256");
}

}  // namespace mtunlearn

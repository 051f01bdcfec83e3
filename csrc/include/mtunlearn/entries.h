// Device-generic entry points of the primitive ops, callable from the composite surgery ops
// without going through the dispatcher. Each checks its arguments and picks the backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace mtunlearn {

at::Tensor gram(const at::Tensor& x);
at::Tensor gram_list(at::TensorList xs, bool per_tensor);
at::Tensor inner(const at::Tensor& a, const at::Tensor& b);
at::Tensor inner_list(at::TensorList as, at::TensorList bs, bool per_tensor);
// Gram of the rows of xs[p] stacked above those of ys[p]: [m + k, m + k] (or one per tensor).
at::Tensor gram_list_stacked(at::TensorList xs, at::TensorList ys, bool per_tensor);
// Gram of the rows of g ([..., m, n]) and r ([..., k, n]) stacked: [..., m+k, m+k], one pass
// over both (shape/dtype/device checks are the caller's).
at::Tensor stacked_gram(const at::Tensor& g, const at::Tensor& r);
at::Tensor combine(const at::Tensor& coeffs, const at::Tensor& x);
void combine_(const at::Tensor& out, const at::Tensor& coeffs, const at::Tensor& x, double beta);
void combine_list_(at::TensorList outs, const at::Tensor& coeffs, at::TensorList xs, double beta,
                   bool per_tensor);
void combine_list_from_(at::TensorList outs, at::TensorList bases, const at::Tensor& coeffs,
                        at::TensorList xs, double beta, bool per_tensor);
at::Tensor ridge_solve(const at::Tensor& gram, const at::Tensor& rhs, double ridge);
at::Tensor nonconflicting_dual(const at::Tensor& gram, const at::Tensor& rhs);
at::Tensor pcgrad_weights(const at::Tensor& gram, int64_t seed);

// out = beta * base + coeffs @ x, with out freshly allocated like base (used by the composites:
// g - a^T basis is written in one pass, without copying g first).
at::Tensor combine_with_base(const at::Tensor& coeffs, const at::Tensor& x, const at::Tensor& base,
                             double beta);

}  // namespace mtunlearn

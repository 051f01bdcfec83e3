// Layout helpers shared by the op entries.
#pragma once

#include <ATen/core/Tensor.h>

namespace mtunlearn {

// Rows must be unit-stride along the reduced dimension; anything else is copied once.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  if (t.size(-1) <= 1 || t.stride(-1) == 1) return t;
  return t.contiguous();
}

inline int64_t leading_numel(const at::Tensor& t) {
  int64_t batch = 1;
  for (int64_t d = 0; d + 2 < t.dim(); ++d) batch *= t.size(d);
  return batch;
}

// View a [..., r, n] tensor as [B, r, n] (a copy only when the leading dims cannot merge).
inline at::Tensor as_batched(const at::Tensor& t) {
  const int64_t r = t.size(-2), n = t.size(-1);
  at::Tensor u = rows_unit_stride(t);
  return u.dim() == 3 ? u : u.reshape({leading_numel(t), r, n});
}

}  // namespace mtunlearn

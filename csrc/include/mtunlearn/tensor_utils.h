// Layout helpers shared by the op entries.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mtunlearn {

// Rows must be unit-stride along the reduced dimension; anything else is copied once.
inline at::Tensor rows_unit_stride(const at::Tensor& t) {
  if (t.size(-1) <= 1 || t.stride(-1) == 1) return t;
  return t.contiguous();
}

// A stack [k, *shape] read as k rows of n = prod(shape) unit-stride elements.
struct StackRows {
  const void* data;    // row 0
  int64_t row_stride;  // elements from one row to the next
  int64_t n;
};

// The stack's own memory when its trailing dims are dense, the usual case, without making a
// tensor (a reshape view per parameter cost ~1 us of allocation and refcounting, more than the
// work on small parameters); otherwise one dense copy, kept alive in `copies` until the launch.
// With `row_dims` 0 the whole tensor is one row.
inline StackRows stack_rows(const at::Tensor& t, std::vector<at::Tensor>& copies,
                            int64_t row_dims = 1) {
  int64_t n = 1;
  bool dense = true;
  for (int64_t d = t.dim() - 1; d >= row_dims; --d) {
    const int64_t size = t.size(d);
    if (size != 1 && t.stride(d) != n) dense = false;
    n *= size;
  }
  const bool no_rows = row_dims == 0 || t.dim() == 0;
  if (dense || n == 0 || (!no_rows && t.size(0) == 0)) {
    return {t.data_ptr(), no_rows ? n : t.stride(0), n};
  }
  copies.push_back(t.contiguous());
  return {copies.back().data_ptr(), n, n};
}

inline int64_t leading_numel(const at::Tensor& t) {
  int64_t batch = 1;
  for (int64_t d = 0; d + 2 < t.dim(); ++d) batch *= t.size(d);
  return batch;
}

// Whether the leading dims of a [..., r, n] tensor merge into one batch dim without a copy (a
// view [B, r, n]): each dim of size > 1 steps over the whole of the next such dim.
inline bool leading_dims_merge(const at::Tensor& t) {
  int64_t inner_stride = -1, inner_size = 1;  // of the last leading dim of size > 1 seen
  for (int64_t d = t.dim() - 3; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (inner_stride >= 0 && t.stride(d) != inner_stride * inner_size) return false;
    inner_stride = t.stride(d);
    inner_size = t.size(d);
  }
  return true;
}

// Where the [r, n] matrices of a [..., r, n] tensor start, in elements from its data pointer,
// the leading index in row-major order, each from the leading dims' own strides. Merging them
// into one batch dim (reshape) copied the whole tensor whenever they could not merge (a
// permuted or sliced batch), though the kernels read every matrix where it lies.
inline std::vector<int64_t> matrix_offsets(const at::Tensor& t) {
  std::vector<int64_t> offsets{0};
  for (int64_t d = 0; d + 2 < t.dim(); ++d) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * static_cast<size_t>(t.size(d)));
    for (const int64_t base : offsets)
      for (int64_t i = 0; i < t.size(d); ++i) next.push_back(base + i * t.stride(d));
    offsets.swap(next);
  }
  return offsets;
}

}  // namespace mtunlearn

// Entries of gram, gram_list and inner: argument checks, segment lists, output allocation and
// the choice of backend. The kernels live in cpu/reduce_kernel.cpp and cuda/reduce_kernel.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/accumulate.h>

#include <vector>

#include "mtunlearn/checks.h"
#include "mtunlearn/entries.h"
#include "mtunlearn/kernels.h"
#include "mtunlearn/tensor_utils.h"
#include "mtunlearn/registration.h"
#ifdef MTU_WITH_CUDA
#include "mtunlearn/cuda_host.h"
#endif

namespace mtunlearn {
namespace {


void run_reduce(ScalarKind kind, const std::vector<ReduceSegment>& segments, int64_t m, int64_t k,
                bool symmetric, const at::Tensor& out) {
  if (out.numel() == 0) return;
  if (out.is_cpu()) {
    cpu::reduce(kind, segments.data(), static_cast<int64_t>(segments.size()), m, k, symmetric,
                out.numel() / (m * k), out.data_ptr());
    return;
  }
#ifdef MTU_WITH_CUDA
  cuda_host::reduce(kind, segments, m, k, symmetric, out);
#else
  TORCH_CHECK(false, "mtunlearn: this build has no CUDA kernels (device ", out.device(), ")");
#endif
}

at::Tensor batched_inner(const at::Tensor& a_in, const at::Tensor& b_in, bool symmetric,
                         const char* op) {
  const int64_t m = a_in.size(-2), k = b_in.size(-2);
  std::vector<int64_t> out_shape(a_in.sizes().begin(), a_in.sizes().end() - 2);
  out_shape.push_back(m);
  out_shape.push_back(k);
  at::Tensor out = at::empty(out_shape, a_in.options().dtype(acc_type(a_in.scalar_type())));
  if (out.numel() == 0) return out;
  const ScalarKind kind = scalar_kind(a_in, op, symmetric ? "x" : "a");
  const at::Tensor a = rows_unit_stride(a_in);
  const at::Tensor b = symmetric ? a : rows_unit_stride(b_in);
  const std::vector<int64_t> a_at = matrix_offsets(a);
  const std::vector<int64_t> b_at = symmetric ? a_at : matrix_offsets(b);
  const int64_t n = a.size(-1);
  const int64_t esize = element_size(kind);
  std::vector<ReduceSegment> segments;
  segments.reserve(a_at.size());
  const char* a_base = static_cast<const char*>(a.data_ptr());
  const char* b_base = static_cast<const char*>(b.data_ptr());
  for (size_t i = 0; i < a_at.size(); ++i) {
    segments.push_back({a_base + a_at[i] * esize, b_base + b_at[i] * esize, a.stride(-2),
                        b.stride(-2), n, static_cast<int64_t>(i)});
  }
  run_reduce(kind, segments, m, k, symmetric, out);
  return out;
}

// Two lists of stacks cutting the same parameters: as[p] is [m, *shape_p], bs[p] is [k, *shape_p]
// (one m and one k for all, same dtype and device), as row views [m, n_p] / [k, n_p].
struct PairedRows {
  std::vector<StackRows> a, b;
  std::vector<at::Tensor> copies;  // only for stacks whose trailing dims are not dense
  int64_t m, k;
};

PairedRows paired_rows(at::TensorList as, at::TensorList bs, const char* op, const char* a_name,
                       const char* b_name) {
  TORCH_CHECK_VALUE(!as.empty() && as.size() == bs.size(), op, ": `", a_name, "` and `", b_name,
                    "` must be non-empty lists of the same length, got ", as.size(), " and ",
                    bs.size());
  PairedRows rows{{}, {}, {}, as[0].dim() >= 1 ? as[0].size(0) : -1,
                  bs[0].dim() >= 1 ? bs[0].size(0) : -1};
  const ArgName a0(a_name, 0);
  for (size_t p = 0; p < as.size(); ++p) {
    const ArgName an(a_name, static_cast<int64_t>(p)), bn(b_name, static_cast<int64_t>(p));
    TORCH_CHECK_VALUE(as[p].dim() >= 1, op, ": ", an, " must be a stack [m, ...], got shape ",
                      as[p].sizes());
    TORCH_CHECK_VALUE(bs[p].dim() >= 1, op, ": ", bn, " must be a stack [k, ...], got shape ",
                      bs[p].sizes());
    TORCH_CHECK_VALUE(as[p].size(0) == rows.m, op, ": ", an, " must be [m, ...] with m=", rows.m,
                      ", got ", as[p].sizes());
    TORCH_CHECK_VALUE(bs[p].size(0) == rows.k, op, ": ", bn, " must be [k, ...] with k=", rows.k,
                      ", got ", bs[p].sizes());
    TORCH_CHECK_VALUE(as[p].sizes().slice(1) == bs[p].sizes().slice(1), op, ": ", an, " and ", bn,
                      " must have the same trailing shape, got ", as[p].sizes(), " and ",
                      bs[p].sizes());
    check_same_device(as[0], a0, as[p], an, op);
    check_same_device(as[0], a0, bs[p], bn, op);
    check_same_dtype(as[0], a0, as[p], an, op);
    check_same_dtype(as[0], a0, bs[p], bn, op);
  }
  rows.a.reserve(as.size());
  rows.b.reserve(as.size());
  for (size_t p = 0; p < as.size(); ++p) {
    rows.a.push_back(stack_rows(as[p], rows.copies));
    rows.b.push_back(stack_rows(bs[p], rows.copies));
  }
  return rows;
}

// The result of a list op: ``[rows, cols]`` summed over the list, or one per tensor
// (``[count, rows, cols]``), in the accumulation dtype of ``like``.
at::Tensor list_output(const at::Tensor& like, size_t count, bool per_tensor, int64_t rows,
                       int64_t cols) {
  std::vector<int64_t> shape = per_tensor
                                   ? std::vector<int64_t>{static_cast<int64_t>(count), rows, cols}
                                   : std::vector<int64_t>{rows, cols};
  return at::empty(shape, like.options().dtype(acc_type(like.scalar_type())));
}

}  // namespace

at::Tensor gram(const at::Tensor& x) {
  constexpr const char* op = "mtunlearn::gram";
  check_min_dim(x, 2, op, "x");
  scalar_kind(x, op, "x");
  return batched_inner(x, x, /*symmetric=*/true, op);
}

at::Tensor inner(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "mtunlearn::inner";
  check_min_dim(a, 2, op, "a");
  check_min_dim(b, 2, op, "b");
  scalar_kind(a, op, "a");
  check_same_device(a, "a", b, "b", op);
  check_same_dtype(a, "a", b, "b", op);
  TORCH_CHECK_VALUE(a.dim() == b.dim() && a.sizes().slice(0, a.dim() - 2) ==
                                              b.sizes().slice(0, b.dim() - 2) &&
                        a.size(-1) == b.size(-1),
                    op, ": `a` [..., m, n] and `b` [..., k, n] must share leading dims and n; got ",
                    a.sizes(), " and ", b.sizes());
  return batched_inner(a, b, /*symmetric=*/false, op);
}

at::Tensor gram_list(at::TensorList xs, bool per_tensor) {
  constexpr const char* op = "mtunlearn::gram_list";
  TORCH_CHECK_VALUE(!xs.empty(), op, ": `xs` must hold at least one tensor");
  const int64_t k = xs[0].dim() >= 1 ? xs[0].size(0) : -1;
  const ScalarKind kind = scalar_kind(xs[0], op, ArgName("xs", 0));
  for (size_t p = 0; p < xs.size(); ++p) {
    const ArgName name("xs", static_cast<int64_t>(p));
    TORCH_CHECK_VALUE(xs[p].dim() >= 1, op, ": ", name, " must be a stack [k, ...], got shape ",
                      xs[p].sizes());
    TORCH_CHECK_VALUE(xs[p].size(0) == k, op,
                      ": every tensor in `xs` must be [k, ...] with the same k=", k, "; ", name,
                      " has shape ", xs[p].sizes());
    check_same_device(xs[0], ArgName("xs", 0), xs[p], name, op);
    check_same_dtype(xs[0], ArgName("xs", 0), xs[p], name, op);
  }
  at::Tensor out = list_output(xs[0], xs.size(), per_tensor, k, k);
  if (out.numel() == 0) return out;
  std::vector<at::Tensor> copies;  // only for stacks whose trailing dims are not dense
  std::vector<ReduceSegment> segments;
  segments.reserve(xs.size());
  for (size_t p = 0; p < xs.size(); ++p) {
    const StackRows r = stack_rows(xs[p], copies);
    segments.push_back({r.data, r.data, r.row_stride, r.row_stride, r.n,
                        per_tensor ? static_cast<int64_t>(p) : 0});
  }
  run_reduce(kind, segments, k, k, /*symmetric=*/true, out);
  return out;
}

at::Tensor stacked_gram(const at::Tensor& g_in, const at::Tensor& r_in) {
  constexpr const char* op = "mtunlearn::stacked_gram";
  const int64_t m = g_in.size(-2), k = r_in.size(-2), s = m + k;
  std::vector<int64_t> out_shape(g_in.sizes().begin(), g_in.sizes().end() - 2);
  out_shape.push_back(s);
  out_shape.push_back(s);
  at::Tensor out = at::empty(out_shape, g_in.options().dtype(acc_type(g_in.scalar_type())));
  if (out.numel() == 0) return out;
  const ScalarKind kind = scalar_kind(g_in, op, "g");
  const at::Tensor g = rows_unit_stride(g_in), r = rows_unit_stride(r_in);
  const std::vector<int64_t> g_at = matrix_offsets(g), r_at = matrix_offsets(r);
  const int64_t esize = element_size(kind);
  std::vector<ReduceSegment> segments;
  segments.reserve(g_at.size());
  for (size_t i = 0; i < g_at.size(); ++i) {
    ReduceSegment seg{static_cast<const char*>(g.data_ptr()) + g_at[i] * esize, nullptr,
                      g.stride(-2), 0, g.size(-1), static_cast<int64_t>(i)};
    seg.b = seg.a;
    seg.a2 = static_cast<const char*>(r.data_ptr()) + r_at[i] * esize;
    seg.a2_row_stride = r.stride(-2);
    seg.a_split = m;
    segments.push_back(seg);
  }
  run_reduce(kind, segments, s, s, /*symmetric=*/true, out);
  return out;
}

at::Tensor inner_list(at::TensorList as, at::TensorList bs, bool per_tensor) {
  constexpr const char* op = "mtunlearn::inner_list";
  const PairedRows rows = paired_rows(as, bs, op, "a_list", "b_list");
  const int64_t m = rows.m, k = rows.k;
  const ScalarKind kind = scalar_kind(as[0], op, "a_list[0]");
  at::Tensor out = list_output(as[0], as.size(), per_tensor, m, k);
  if (out.numel() == 0) return out;
  std::vector<ReduceSegment> segments;
  segments.reserve(rows.a.size());
  for (size_t p = 0; p < rows.a.size(); ++p) {
    const StackRows& a = rows.a[p];
    const StackRows& b = rows.b[p];
    segments.push_back({a.data, b.data, a.row_stride, b.row_stride, a.n,
                        per_tensor ? static_cast<int64_t>(p) : 0});
  }
  run_reduce(kind, segments, m, k, /*symmetric=*/false, out);
  return out;
}

at::Tensor gram_list_stacked(at::TensorList xs, at::TensorList ys, bool per_tensor) {
  constexpr const char* op = "mtunlearn::gram_list_stacked";
  const PairedRows rows = paired_rows(xs, ys, op, "xs", "ys");
  const int64_t m = rows.m, k = rows.k;
  const ScalarKind kind = scalar_kind(xs[0], op, "xs[0]");
  const int64_t s = m + k;
  at::Tensor out = list_output(xs[0], xs.size(), per_tensor, s, s);
  if (out.numel() == 0) return out;
  std::vector<ReduceSegment> segments;
  segments.reserve(rows.a.size());
  for (size_t p = 0; p < rows.a.size(); ++p) {
    const StackRows& x = rows.a[p];
    const StackRows& y = rows.b[p];
    // Rows 0..m-1 from xs[p], rows m..m+k-1 from ys[p]: one pass over both, no stacked copy.
    ReduceSegment seg{x.data, x.data, x.row_stride, x.row_stride, y.n,
                      per_tensor ? static_cast<int64_t>(p) : 0};
    seg.a2 = y.data;
    seg.a2_row_stride = y.row_stride;
    seg.a_split = m;
    segments.push_back(seg);
  }
  run_reduce(kind, segments, s, s, /*symmetric=*/true, out);
  return out;
}

namespace {

// The list ops' kernel for inputs that select no backend: an empty list (no tensor, so no
// dispatch key: without this the dispatcher's own "no fallback function is registered" error
// named no argument) or tensors on a device this build has no kernels for.
[[noreturn]] void no_kernel_for(const char* op, at::TensorList xs, const char* name) {
  TORCH_CHECK_VALUE(!xs.empty(), op, ": `", name,
                    "` must hold at least one tensor, got an empty list");
#ifdef MTU_WITH_CUDA
  constexpr const char* devices = "CPU or CUDA";
#else
  constexpr const char* devices = "CPU (this build has no CUDA kernels)";
#endif
  TORCH_CHECK(false, op, ": expected tensors on ", devices, ", got `", name, "[0]` on ",
              xs[0].device());
}

at::Tensor gram_list_no_kernel(at::TensorList xs, bool) {
  no_kernel_for("mtunlearn::gram_list", xs, "xs");
}

at::Tensor inner_list_no_kernel(at::TensorList as, at::TensorList, bool) {
  no_kernel_for("mtunlearn::inner_list", as, "a_list");
}

at::Tensor gram_list_stacked_no_kernel(at::TensorList xs, at::TensorList, bool) {
  no_kernel_for("mtunlearn::gram_list_stacked", xs, "xs");
}

}  // namespace

MTU_LIBRARY_IMPL(CompositeExplicitAutograd, m) {
  m.impl("gram_list", &gram_list_no_kernel);
  m.impl("inner_list", &inner_list_no_kernel);
  m.impl("gram_list_stacked", &gram_list_stacked_no_kernel);
}

MTU_LIBRARY_IMPL(CPU, m) {
  m.impl("gram", &gram);
  m.impl("gram_list", &gram_list);
  m.impl("inner", &inner);
  m.impl("inner_list", &inner_list);
  m.impl("gram_list_stacked", &gram_list_stacked);
}

#ifdef MTU_WITH_CUDA
MTU_LIBRARY_IMPL(CUDA, m) {
  m.impl("gram", &gram);
  m.impl("gram_list", &gram_list);
  m.impl("inner", &inner);
  m.impl("inner_list", &inner_list);
  m.impl("gram_list_stacked", &gram_list_stacked);
}
#endif

}  // namespace mtunlearn

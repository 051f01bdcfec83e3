// Entries of combine, combine_, combine_list_ and combine_list_from_: checks, segment lists, and
// the backend choice.
// Kernels: cpu/combine_kernel.cpp and cuda/combine_kernel.cu.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <vector>

#include "mtunlearn/checks.h"
#include "mtunlearn/entries.h"
#include "mtunlearn/kernels.h"
#include "mtunlearn/tensor_utils.h"
#ifdef MTU_WITH_CUDA
#include "mtunlearn/cuda_host.h"
#endif

namespace mtunlearn {
namespace {


void run_combine(ScalarKind kind, const std::vector<CombineSegment>& segments, int64_t m,
                 int64_t k, const at::Tensor& coeffs, double beta, const at::Device& device) {
  if (segments.empty() || m == 0) return;
  if (device.is_cpu()) {
    cpu::combine(kind, segments.data(), static_cast<int64_t>(segments.size()), m, k,
                 coeffs.data_ptr(), beta);
    return;
  }
#ifdef MTU_WITH_CUDA
  cuda_host::combine(kind, segments, m, k, coeffs, beta);
#else
  TORCH_CHECK(false, "mtunlearn: this build has no CUDA kernels (device ", device, ")");
#endif
}

void check_combine_args(const at::Tensor& coeffs, const at::Tensor& x, const char* op) {
  check_min_dim(coeffs, 2, op, "coeffs");
  check_min_dim(x, 2, op, "x");
  scalar_kind(coeffs, op, "coeffs");
  scalar_kind(x, op, "x");
  check_same_device(x, "x", coeffs, "coeffs", op);
  TORCH_CHECK_VALUE(coeffs.dim() == x.dim() &&
                        coeffs.sizes().slice(0, coeffs.dim() - 2) == x.sizes().slice(0, x.dim() - 2) &&
                        coeffs.size(-1) == x.size(-2),
                    op, ": `coeffs` [..., m, k] and `x` [..., k, n] must share leading dims and k; got ",
                    coeffs.sizes(), " and ", x.sizes());
}

// out ([..., m, n], contiguous) = beta * base + coeffs @ x; base may be out itself or undefined.
void combine_into(const at::Tensor& out, const at::Tensor& base, const at::Tensor& coeffs_in,
                  const at::Tensor& x_in, double beta, const char* op) {
  if (out.numel() == 0) return;
  const ScalarKind kind = scalar_kind(x_in, op, "x");
  const int64_t m = coeffs_in.size(-2), k = coeffs_in.size(-1), n = x_in.size(-1);
  at::Tensor coeffs =
      coeffs_in.to(acc_type(x_in.scalar_type())).contiguous().reshape({leading_numel(coeffs_in), m, k});
  at::Tensor x = as_batched(x_in);
  at::Tensor o = out.view({leading_numel(out), m, n});
  at::Tensor b = base.defined() ? as_batched(base) : at::Tensor();
  const int64_t esize = element_size(kind);
  std::vector<CombineSegment> segments;
  segments.reserve(o.size(0));
  for (int64_t i = 0; i < o.size(0); ++i) {
    CombineSegment s;
    s.out = static_cast<char*>(o.data_ptr()) + i * o.stride(0) * esize;
    s.base = b.defined() ? static_cast<const char*>(b.data_ptr()) + i * b.stride(0) * esize : nullptr;
    s.x = static_cast<const char*>(x.data_ptr()) + i * x.stride(0) * esize;
    s.out_row_stride = o.stride(1);
    s.base_row_stride = b.defined() ? b.stride(1) : 0;
    s.x_row_stride = x.stride(1);
    s.ncols = n;
    s.coeff_index = i;
    segments.push_back(s);
  }
  run_combine(kind, segments, m, k, coeffs, b.defined() ? beta : 0.0, out.device());
}

}  // namespace

at::Tensor combine(const at::Tensor& coeffs, const at::Tensor& x) {
  constexpr const char* op = "mtunlearn::combine";
  check_combine_args(coeffs, x, op);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(coeffs.size(-2));
  shape.push_back(x.size(-1));
  at::Tensor out = at::empty(shape, x.options());
  advise_huge_pages(out);
  combine_into(out, at::Tensor(), coeffs, x, 0.0, op);
  return out;
}

at::Tensor combine_with_base(const at::Tensor& coeffs, const at::Tensor& x, const at::Tensor& base,
                             double beta) {
  constexpr const char* op = "mtunlearn::combine";
  check_combine_args(coeffs, x, op);
  at::Tensor out = at::empty(base.sizes(), base.options());
  advise_huge_pages(out);
  combine_into(out, base, coeffs, x, beta, op);
  return out;
}

void combine_(const at::Tensor& out, const at::Tensor& coeffs, const at::Tensor& x, double beta) {
  constexpr const char* op = "mtunlearn::combine_";
  check_combine_args(coeffs, x, op);
  check_same_device(x, "x", out, "out", op);
  check_same_dtype(x, "x", out, "out", op);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(coeffs.size(-2));
  shape.push_back(x.size(-1));
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape), op, ": `out` must have shape ",
                    at::IntArrayRef(shape), ", got ", out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": `out` must be contiguous (it is written in place)");
  at::assert_no_overlap(out, x);
  combine_into(out, beta != 0.0 ? out : at::Tensor(), coeffs, x, beta, op);
}

namespace {

// outs[p] = beta * bases[p] + C_p @ xs[p] for every p; without `bases` (null) bases = outs.
void combine_list_impl(at::TensorList outs, const at::TensorList* bases,
                       const at::Tensor& coeffs_in, at::TensorList xs, double beta,
                       bool per_tensor, const char* op) {
  TORCH_CHECK_VALUE(outs.size() == xs.size(), op, ": `xs` and `outs` must have the same length, got ",
                    xs.size(), " and ", outs.size());
  TORCH_CHECK_VALUE(bases == nullptr || bases->size() == outs.size(), op,
                    ": `bases` must have one tensor per output (", outs.size(), "), got ",
                    bases == nullptr ? 0 : bases->size());
  const int64_t lead = per_tensor ? 1 : 0;  // per_tensor: one [k] or [m, k] block per tensor
  TORCH_CHECK_VALUE(coeffs_in.dim() == 1 + lead || coeffs_in.dim() == 2 + lead, op,
                    ": `coeffs` must be ", per_tensor ? "[P, k] or [P, m, k]" : "[k] or [m, k]",
                    ", got ", coeffs_in.sizes());
  TORCH_CHECK_VALUE(!per_tensor || coeffs_in.size(0) == static_cast<int64_t>(xs.size()), op,
                    ": with per_tensor=True `coeffs` must have one block per tensor (",
                    xs.size(), "), got ", coeffs_in.sizes());
  scalar_kind(coeffs_in, op, "coeffs");
  if (xs.empty()) return;
  const int64_t k = coeffs_in.size(-1);
  const bool has_rows = coeffs_in.dim() == 2 + lead;
  const int64_t m = has_rows ? coeffs_in.size(-2) : 1;
  const ScalarKind kind = scalar_kind(xs[0], op, ArgName("xs", 0));
  std::vector<at::Tensor> copies;  // only for stacks whose trailing dims are not dense
  std::vector<CombineSegment> segments;
  segments.reserve(xs.size());
  std::vector<int64_t> expected;
  for (size_t p = 0; p < xs.size(); ++p) {
    const auto i = static_cast<int64_t>(p);
    const ArgName xn("xs", i), on("outs", i), bn("bases", i);
    TORCH_CHECK_VALUE(xs[p].dim() >= 1 && xs[p].size(0) == k, op, ": ", xn,
                      " must have leading size k=", k, " (from `coeffs`), got shape ", xs[p].sizes());
    check_same_device(coeffs_in, "coeffs", xs[p], xn, op);
    check_same_device(xs[p], xn, outs[p], on, op);
    check_same_dtype(xs[0], ArgName("xs", 0), xs[p], xn, op);
    check_same_dtype(xs[p], xn, outs[p], on, op);
    // The exact shape, not only the size: a [k] block writes shape_p, [m, k] [m, *shape_p].
    expected.clear();
    if (has_rows) expected.push_back(m);
    const auto trailing = xs[p].sizes().slice(1);
    expected.insert(expected.end(), trailing.begin(), trailing.end());
    TORCH_CHECK_VALUE(outs[p].sizes() == at::IntArrayRef(expected), op, ": ", on,
                      " must have shape ", at::IntArrayRef(expected), " (from ", xn, " ",
                      xs[p].sizes(), " and `coeffs`), got ", outs[p].sizes());
    TORCH_CHECK_VALUE(outs[p].is_contiguous(), op, ": ", on,
                      " must be contiguous (it is written in place)");
    at::assert_no_overlap(outs[p], xs[p]);
    const int64_t cols = outs[p].numel() / std::max<int64_t>(m, 1);
    const StackRows x = k == 0 ? StackRows{xs[p].data_ptr(), 0, cols} : stack_rows(xs[p], copies);
    CombineSegment s;
    s.out = outs[p].data_ptr();
    s.base = nullptr;
    s.base_row_stride = cols;
    if (beta != 0.0 && bases == nullptr) {
      s.base = outs[p].data_ptr();
    } else if (beta != 0.0) {
      const at::Tensor& b = (*bases)[p];
      check_same_device(outs[p], on, b, bn, op);
      check_same_dtype(outs[p], on, b, bn, op);
      TORCH_CHECK_VALUE(b.sizes() == outs[p].sizes(), op, ": ", bn, " must have the shape of ", on,
                        ", ", outs[p].sizes(), ", got ", b.sizes());
      // Each output element reads its own base element: the base may be the output itself,
      // but not a shifted or re-strided view of its memory.
      const bool same_memory = b.data_ptr() == outs[p].data_ptr() && b.strides() == outs[p].strides();
      TORCH_CHECK_VALUE(same_memory || !b.storage().is_alias_of(outs[p].storage()) ||
                            at::get_overlap_status(outs[p], b) == at::MemOverlapStatus::No,
                        op, ": ", bn, " overlaps ", on, " without being the same tensor");
      const StackRows base = stack_rows(b, copies, has_rows ? 1 : 0);
      s.base = base.data;
      s.base_row_stride = base.row_stride;
    }
    s.x = x.data;
    s.out_row_stride = cols;
    s.x_row_stride = x.row_stride;
    s.ncols = cols;
    s.coeff_index = per_tensor ? i : 0;
    segments.push_back(s);
  }
  at::Tensor coeffs = coeffs_in.to(acc_type(xs[0].scalar_type())).contiguous();
  run_combine(kind, segments, m, k, coeffs, beta, xs[0].device());
}

}  // namespace

void combine_list_(at::TensorList outs, const at::Tensor& coeffs, at::TensorList xs, double beta,
                   bool per_tensor) {
  combine_list_impl(outs, nullptr, coeffs, xs, beta, per_tensor, "mtunlearn::combine_list_");
}

void combine_list_from_(at::TensorList outs, at::TensorList bases, const at::Tensor& coeffs,
                        at::TensorList xs, double beta, bool per_tensor) {
  combine_list_impl(outs, &bases, coeffs, xs, beta, per_tensor, "mtunlearn::combine_list_from_");
}

TORCH_LIBRARY_IMPL(mtunlearn, CPU, m) {
  m.impl("combine", &combine);
  m.impl("combine_", &combine_);
  m.impl("combine_list_", &combine_list_);
  m.impl("combine_list_from_", &combine_list_from_);
}

#ifdef MTU_WITH_CUDA
TORCH_LIBRARY_IMPL(mtunlearn, CUDA, m) {
  m.impl("combine", &combine);
  m.impl("combine_", &combine_);
  m.impl("combine_list_", &combine_list_);
  m.impl("combine_list_from_", &combine_list_from_);
}
#endif

}  // namespace mtunlearn

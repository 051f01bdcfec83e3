// Entries of gram, gram_list and inner: argument checks, segment lists, output allocation and
// the choice of backend. The kernels live in cpu/reduce_kernel.cpp and cuda/reduce_kernel.cu.
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
  at::Tensor a = as_batched(a_in);
  at::Tensor b = symmetric ? a : as_batched(b_in);
  const int64_t batch = a.size(0), n = a.size(2);
  const int64_t esize = element_size(kind);
  std::vector<ReduceSegment> segments;
  segments.reserve(batch);
  const char* a_base = static_cast<const char*>(a.data_ptr());
  const char* b_base = static_cast<const char*>(b.data_ptr());
  for (int64_t i = 0; i < batch; ++i) {
    segments.push_back({a_base + i * a.stride(0) * esize, b_base + i * b.stride(0) * esize,
                        a.stride(1), b.stride(1), n, i});
  }
  run_reduce(kind, segments, m, k, symmetric, out);
  return out;
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
  const ScalarKind kind = scalar_kind(xs[0], op, "xs[0]");
  std::vector<at::Tensor> rows;  // [k, numel/k] views (copies only for non-unit inner stride)
  rows.reserve(xs.size());
  for (size_t p = 0; p < xs.size(); ++p) {
    const std::string name = indexed("xs", p);
    TORCH_CHECK_VALUE(xs[p].dim() >= 1 && xs[p].size(0) == k, op, ": every tensor in `xs` must be [k, ...] with the same k=",
                      k, "; ", name, " has shape ", xs[p].sizes());
    check_same_device(xs[0], "xs[0]", xs[p], name.c_str(), op);
    check_same_dtype(xs[0], "xs[0]", xs[p], name.c_str(), op);
    const int64_t n = k == 0 ? 0 : xs[p].numel() / k;
    at::Tensor flat = xs[p].dim() == 2 ? xs[p] : (xs[p].dim() == 1 ? xs[p].unsqueeze(1) : at::Tensor());
    if (!flat.defined()) {
      // [k, *shape] -> [k, n]: a view when the trailing dims are contiguous, else one copy.
      flat = xs[p].reshape({k, n});
    }
    rows.push_back(rows_unit_stride(flat));
  }
  const int64_t num_outputs = per_tensor ? static_cast<int64_t>(xs.size()) : 1;
  std::vector<int64_t> shape = per_tensor ? std::vector<int64_t>{num_outputs, k, k}
                                          : std::vector<int64_t>{k, k};
  at::Tensor out = at::empty(shape, xs[0].options().dtype(acc_type(xs[0].scalar_type())));
  if (out.numel() == 0) return out;
  std::vector<ReduceSegment> segments;
  segments.reserve(rows.size());
  for (size_t p = 0; p < rows.size(); ++p) {
    const at::Tensor& r = rows[p];
    segments.push_back({r.data_ptr(), r.data_ptr(), r.stride(0), r.stride(0), r.size(1),
                        per_tensor ? static_cast<int64_t>(p) : 0});
  }
  run_reduce(kind, segments, k, k, /*symmetric=*/true, out);
  return out;
}

TORCH_LIBRARY_IMPL(mtunlearn, CPU, m) {
  m.impl("gram", &gram);
  m.impl("gram_list", &gram_list);
  m.impl("inner", &inner);
}

#ifdef MTU_WITH_CUDA
TORCH_LIBRARY_IMPL(mtunlearn, CUDA, m) {
  m.impl("gram", &gram);
  m.impl("gram_list", &gram_list);
  m.impl("inner", &inner);
}
#endif

}  // namespace mtunlearn

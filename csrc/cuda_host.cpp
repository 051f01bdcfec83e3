// Host side of the CUDA backend: device guard, current stream, one pinned-memory upload of the
// launch metadata (segments, work items, output ranges) per op, workspaces from the caching
// allocator, and a launch check after every kernel. Nothing here waits for the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <cstring>
#include <vector>

#include "mtunlearn/cuda_host.h"
#include "mtunlearn/kernels.h"

namespace mtunlearn {
namespace cuda_host {
namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "mtunlearn: CUDA launch of ", what, " failed: ", cuda::error_string(code));
}

// Copies `bytes` of host data to the device without a host sync: the pinned staging block is
// kept by the caching host allocator until the copy has run.
at::Tensor upload(const std::vector<char>& host, const at::Device& device) {
  at::Tensor pinned = at::empty({static_cast<int64_t>(host.size())},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(pinned.data_ptr(), host.data(), host.size());
  return pinned.to(device, /*non_blocking=*/true);
}

template <typename T>
size_t append(std::vector<char>& buf, const T* data, size_t count) {
  const size_t offset = round_up(static_cast<int64_t>(buf.size()), 16);
  buf.resize(offset + count * sizeof(T));
  if (count) std::memcpy(buf.data() + offset, data, count * sizeof(T));
  return offset;
}

// Column ranges per segment: sized from the problem only, multiples of 64 columns (so 16-byte
// loads stay aligned), enough of them to fill a large GPU, few enough to bound the partials.
template <typename Segment>
std::vector<cuda::ReduceItem> make_items(const std::vector<Segment>& segments, int64_t mk,
                                         int64_t min_cols) {
  int64_t total_cols = 0;
  for (const auto& s : segments) total_cols += s.ncols;
  const int64_t max_items = std::max<int64_t>(1, std::min<int64_t>(2048, (int64_t(1) << 24) / std::max<int64_t>(mk, 1)));
  const int64_t cols = round_up(std::max<int64_t>(min_cols, (total_cols + max_items - 1) / max_items), 64);
  std::vector<cuda::ReduceItem> items;
  for (size_t s = 0; s < segments.size(); ++s)
    for (int64_t c = 0; c < segments[s].ncols; c += cols)
      items.push_back({static_cast<int64_t>(s), c, std::min(segments[s].ncols, c + cols)});
  return items;
}

// The kernels take the row counts as 32-bit integers: more rows than that would be truncated
// silently, so they are refused (the CPU kernels take any count).
void check_row_counts(int64_t m, int64_t k, const char* what) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(m <= kMax && k <= kMax, "mtunlearn: the CUDA ", what,
              " kernels take at most 2**31 - 1 rows on each side; got ", m, " x ", k);
}

}  // namespace

void reduce(ScalarKind kind, const std::vector<ReduceSegment>& segments_in, int64_t m, int64_t k,
            bool symmetric, const at::Tensor& out) {
  check_row_counts(m, k, "Gram/inner product");
  const c10::cuda::CUDAGuard guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  std::vector<ReduceSegment> segments(segments_in);
  std::stable_sort(segments.begin(), segments.end(),
                   [](const ReduceSegment& a, const ReduceSegment& b) { return a.out_index < b.out_index; });
  const int64_t num_outputs = out.numel() / (m * k);
  TORCH_CHECK(out.numel() <= cuda::kMaxReduceEntries, "mtunlearn: the CUDA Gram/inner product "
              "kernels write at most ", cuda::kMaxReduceEntries, " entries in one call; got ",
              num_outputs, " outputs of ", m, " x ", k, " (split the batch into several calls)");
  const std::vector<cuda::ReduceItem> items = make_items(segments, m * k, 16384);
  std::vector<int64_t> item_begin(num_outputs + 1, 0);
  for (const auto& it : items) item_begin[segments[it.segment].out_index + 1] += 1;
  for (int64_t o = 0; o < num_outputs; ++o) item_begin[o + 1] += item_begin[o];

  std::vector<char> meta;
  const size_t seg_off = append(meta, segments.data(), segments.size());
  const size_t item_off = append(meta, items.data(), items.size());
  const size_t begin_off = append(meta, item_begin.data(), item_begin.size());
  at::Tensor meta_dev = upload(meta, out.device());
  const char* base = static_cast<const char*>(meta_dev.data_ptr());
  at::Tensor partials = at::empty({std::max<int64_t>(1, static_cast<int64_t>(items.size()) * m * k)},
                                  out.options());
  check_launch(cuda::reduce(kind, reinterpret_cast<const ReduceSegment*>(base + seg_off),
                            reinterpret_cast<const cuda::ReduceItem*>(base + item_off),
                            static_cast<int64_t>(items.size()),
                            reinterpret_cast<const int64_t*>(base + begin_off), num_outputs, m, k,
                            symmetric, partials.data_ptr(), out.data_ptr(), stream),
               "reduce");
}

void combine(ScalarKind kind, const std::vector<CombineSegment>& segments, int64_t m, int64_t k,
             const at::Tensor& coeffs, double beta) {
  check_row_counts(m, k, "combination");
  const c10::cuda::CUDAGuard guard(coeffs.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(coeffs.device().index()).stream();
  const std::vector<cuda::ReduceItem> items = make_items(segments, 1, 8192);
  if (items.empty()) return;
  std::vector<char> meta;
  const size_t seg_off = append(meta, segments.data(), segments.size());
  const size_t item_off = append(meta, items.data(), items.size());
  at::Tensor meta_dev = upload(meta, coeffs.device());
  const char* base = static_cast<const char*>(meta_dev.data_ptr());
  check_launch(cuda::combine(kind, reinterpret_cast<const CombineSegment*>(base + seg_off),
                             reinterpret_cast<const cuda::ReduceItem*>(base + item_off),
                             static_cast<int64_t>(items.size()), m, k, coeffs.data_ptr(), beta,
                             stream),
               "combine");
}

// The solver kernels read the Gram and rhs as one type, float or double (the entries convert
// anything else first), and write that type: an output of another dtype, or not contiguous, is
// written through a buffer of it (see solver_result and write_back).
static void check_solver_types(const at::Tensor& gram, const at::Tensor* rhs) {
  const at::ScalarType type = gram.scalar_type();
  TORCH_INTERNAL_ASSERT(type == at::kFloat || type == at::kDouble, "solver kernels: gram is ", type);
  TORCH_INTERNAL_ASSERT(rhs == nullptr || rhs->scalar_type() == type,
                        "solver kernels: gram and rhs must share one dtype");
}

static at::Tensor solver_result(const at::Tensor& gram, const at::Tensor& out) {
  const bool direct = out.is_contiguous() && out.scalar_type() == gram.scalar_type();
  return direct ? out : at::empty(out.sizes(), out.options().dtype(gram.scalar_type()));
}

static void write_back(const at::Tensor& result, const at::Tensor& out) {
  if (!result.is_same(out)) out.copy_(result);
}

void ridge_solve(const at::Tensor& gram, const at::Tensor& rhs, const at::Tensor& out, double ridge,
                 double pivot_floor) {
  check_solver_types(gram, &rhs);
  const c10::cuda::CUDAGuard guard(gram.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gram.device().index()).stream();
  const int64_t k = gram.size(-1), m = rhs.size(-1);
  const int64_t batch = gram.numel() / (k * k);
  at::Tensor work = at::empty({batch * (2 * k * k + 2 * k * m)}, gram.options().dtype(at::kDouble));
  at::Tensor result = solver_result(gram, out);
  check_launch(cuda::ridge_solve(gram.scalar_type() == at::kDouble, gram.data_ptr(), rhs.data_ptr(),
                                 result.data_ptr(), batch, static_cast<int>(k), static_cast<int>(m),
                                 ridge, pivot_floor, work.data_ptr<double>(), stream),
               "ridge_solve");
  write_back(result, out);
}

void nonconflicting_dual(const at::Tensor& gram, const at::Tensor& rhs, const at::Tensor& out,
                         double pivot_floor) {
  check_solver_types(gram, &rhs);
  const c10::cuda::CUDAGuard guard(gram.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gram.device().index()).stream();
  const int64_t k = gram.size(-1), m = rhs.size(-2);
  const int64_t batch = gram.numel() / (k * k);
  // The kernels take a problem's row count as a 32-bit int: past it m would wrap negative, every
  // thread would leave at once and the output would stay unwritten. (Their grids count rows over
  // all problems in 64 bits.)
  TORCH_CHECK_VALUE(m <= std::numeric_limits<int32_t>::max(),
                    "mtunlearn::nonconflicting_dual: `rhs` must have at most 2**31 - 1 rows per "
                    "problem on CUDA, got ", m, "; split its rows into several calls");
  // A workspace per slot, not per row: slots are bounded (about 1 GiB of them), rows are not.
  const int64_t slots = cuda::nonconflicting_dual_slots(batch, static_cast<int>(k),
                                                        static_cast<int>(m));
  at::Tensor work = at::empty({slots * (2 * k * k + 4 * k)}, gram.options().dtype(at::kDouble));
  at::Tensor iwork = at::empty({slots * k}, gram.options().dtype(at::kInt));
  at::Tensor result = solver_result(gram, out);
  check_launch(cuda::nonconflicting_dual(gram.scalar_type() == at::kDouble, gram.data_ptr(),
                                         rhs.data_ptr(), result.data_ptr(), batch,
                                         static_cast<int>(k), static_cast<int>(m), pivot_floor,
                                         work.data_ptr<double>(), iwork.data_ptr<int>(), stream),
               "nonconflicting_dual");
  write_back(result, out);
}

void pcgrad_weights(const at::Tensor& gram, const at::Tensor& out, int64_t seed) {
  check_solver_types(gram, nullptr);
  const c10::cuda::CUDAGuard guard(gram.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gram.device().index()).stream();
  const int64_t k = gram.size(-1);
  const int64_t batch = gram.numel() / (k * k);
  // The Gram in double and every task's weight vector: 2 k^2 doubles per problem; an order of
  // k ints per task.
  at::Tensor work = at::empty({batch * 2 * k * k}, gram.options().dtype(at::kDouble));
  at::Tensor iwork = at::empty({batch * k * k}, gram.options().dtype(at::kInt));
  at::Tensor result = solver_result(gram, out);
  check_launch(cuda::pcgrad_weights(gram.scalar_type() == at::kDouble, gram.data_ptr(),
                                    result.data_ptr(), batch, static_cast<int>(k), seed,
                                    work.data_ptr<double>(), iwork.data_ptr<int>(), stream),
               "pcgrad_weights");
  write_back(result, out);
}

}  // namespace cuda_host
}  // namespace mtunlearn

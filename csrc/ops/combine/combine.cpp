// Entries of combine, combine_, combine_list_ and combine_list_from_: checks, segment lists, and
// the backend choice.
// Kernels: cpu/combine_kernel.cpp and cuda/combine_kernel.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
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

// Rows read by a kernel: row i is [start + i * stride, start + i * stride + length) in bytes.
struct RowsRead {
  std::intptr_t start = 0;
  int64_t stride = 0;  // >= 0 (torch strides are)
  int64_t rows = 0;
  int64_t length = 0;
  bool empty() const { return rows <= 0 || length <= 0; }
  std::intptr_t end() const { return start + (rows - 1) * stride + length; }  // of the last row
};

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// Whether any of the rows meets the byte range [lo, hi).
bool rows_meet(const RowsRead& r, std::intptr_t lo, std::intptr_t hi) {
  if (r.empty() || hi <= lo) return false;
  const int64_t a = lo - r.start, b = hi - r.start;  // row i meets it iff i*S < b and i*S + L > a
  if (r.stride == 0) return 0 < b && r.length > a;
  const int64_t first = std::max<int64_t>(0, floor_div(a - r.length, r.stride) + 1);
  const int64_t last = std::min<int64_t>(r.rows - 1, floor_div(b - 1, r.stride));
  return first <= last;
}

RowsRead rows_read(const void* data, int64_t row_stride, int64_t rows, int64_t cols,
                   int64_t esize) {
  return {reinterpret_cast<std::intptr_t>(data), row_stride * esize, rows, cols * esize};
}

// Whether any row that `x` ([..., r, n], unit-stride or single-element rows, as the kernels read
// it; its matrices at `offsets`, in elements) has meets the byte range [lo, hi). First the byte
// extent of x (O(1); disjoint extents are the usual case), then exact: each matrix's rows
// against the byte range, one rows_meet per matrix (O(B), as building the B segments is).
bool batched_rows_meet(const at::Tensor& x, const std::vector<int64_t>& offsets,
                       std::intptr_t lo, std::intptr_t hi) {
  if (x.numel() == 0 || hi <= lo) return false;
  const int64_t esize = static_cast<int64_t>(x.element_size());
  const int64_t r = x.size(-2), n = x.size(-1);
  int64_t last_offset = 0;  // of the last matrix: the largest, strides being >= 0
  for (int64_t d = 0; d + 2 < x.dim(); ++d) last_offset += (x.size(d) - 1) * x.stride(d);
  const auto start = reinterpret_cast<std::intptr_t>(x.data_ptr());
  const std::intptr_t end = start + (last_offset + (r - 1) * x.stride(-2) + n) * esize;
  if (end <= lo || hi <= start) return false;
  return std::any_of(offsets.begin(), offsets.end(), [&](int64_t offset) {
    return rows_meet({start + offset * esize, x.stride(-2) * esize, r, n * esize}, lo, hi);
  });
}

// Whether two tensors of one shape put every element at the same address (strides compared only
// along dims of size > 1, where they matter).
bool same_elements(const at::Tensor& a, const at::Tensor& b) {
  if (a.data_ptr() != b.data_ptr() || a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

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

// The coefficients as the kernels read them: in the accumulation type, contiguous. The kernels
// read them while they write the outputs, so where an output's bytes meet theirs
// (combine(A, X, out=A)) they get a private copy; otherwise a tensor that already has that dtype
// and layout is used as it is, with no copy per call. Tiny: [B, m, k] or [P, m, k]. Byte ranges,
// not storage identity: two storages can share memory (torch.from_dlpack, from_numpy twice).
at::Tensor coeffs_for_kernels(const at::Tensor& coeffs, at::ScalarType x_type, at::TensorList outs) {
  // .contiguous(), not to(..., MemoryFormat::Contiguous): `to` counts a transposed matrix as
  // contiguous enough (its suggested memory format is) and returns it as it is.
  at::Tensor c = coeffs.to(acc_type(x_type)).contiguous();
  if (!c.is_same(coeffs) || c.numel() == 0) return c;  // converted: memory of its own
  const auto lo = reinterpret_cast<std::uintptr_t>(c.data_ptr());
  const std::uintptr_t hi = lo + c.nbytes();
  const bool meets_an_output = std::any_of(outs.begin(), outs.end(), [&](const at::Tensor& out) {
    if (out.numel() == 0) return false;
    const auto out_lo = reinterpret_cast<std::uintptr_t>(out.data_ptr());
    return out_lo < hi && lo < out_lo + out.nbytes();  // outputs are contiguous: one range
  });
  return meets_an_output ? c.clone() : c;
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
  at::Tensor x = rows_unit_stride(x_in);
  std::vector<int64_t> x_at = matrix_offsets(x);
  // The kernels write `out` while they read any row of `x`, on any thread, so `x` as they read
  // it may not meet `out`'s bytes. Byte ranges, not storages: two storages can share memory
  // (torch.from_numpy twice, torch.from_dlpack). The coefficients may meet `out`: the kernels
  // read a private copy of them then.
  const auto out_lo = reinterpret_cast<std::intptr_t>(out.data_ptr());
  const auto out_hi = out_lo + static_cast<std::intptr_t>(out.nbytes());
  if (batched_rows_meet(x, x_at, out_lo, out_hi)) {
    // Leading dims that do not merge used to cost a copy of `x` on every call (it is read in
    // place now), so such an `x` was allowed to meet `out`: it still is, read from a copy.
    TORCH_CHECK_VALUE(!leading_dims_merge(x), op,
                      ": `out` overlaps `x`; `out` must not share memory with `x`, which is read "
                      "while `out` is written (clone() one of them first)");
    x = x.contiguous();
    x_at = matrix_offsets(x);
  }
  at::Tensor coeffs = coeffs_for_kernels(coeffs_in, x_in.scalar_type(), {out})
                          .reshape({leading_numel(coeffs_in), m, k});
  at::Tensor o = out.view({leading_numel(out), m, n});
  const at::Tensor b = base.defined() ? rows_unit_stride(base) : at::Tensor();
  const std::vector<int64_t> b_at = b.defined() ? matrix_offsets(b) : std::vector<int64_t>();
  const int64_t esize = element_size(kind);
  std::vector<CombineSegment> segments;
  segments.reserve(o.size(0));
  for (int64_t i = 0; i < o.size(0); ++i) {
    CombineSegment s;
    s.out = static_cast<char*>(o.data_ptr()) + i * o.stride(0) * esize;
    s.base = b.defined() ? static_cast<const char*>(b.data_ptr()) + b_at[i] * esize : nullptr;
    s.x = static_cast<const char*>(x.data_ptr()) + x_at[i] * esize;
    s.out_row_stride = o.stride(1);
    s.base_row_stride = b.defined() ? b.stride(-2) : 0;
    s.x_row_stride = x.stride(-2);
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
  combine_into(out, at::Tensor(), coeffs, x, 0.0, op);
  return out;
}

at::Tensor combine_with_base(const at::Tensor& coeffs, const at::Tensor& x, const at::Tensor& base,
                             double beta) {
  constexpr const char* op = "mtunlearn::combine";
  check_combine_args(coeffs, x, op);
  at::Tensor out = at::empty(base.sizes(), base.options());
  combine_into(out, base, coeffs, x, beta, op);
  return out;
}

void combine_(const at::Tensor& out, const at::Tensor& coeffs, const at::Tensor& x, double beta) {
  constexpr const char* op = "mtunlearn::combine_";
  check_combine_args(coeffs, x, op);
  // As combine_list_: autograd does not record an in-place write (a parameter overwritten, or
  // x's gradient lost), so while it records no argument may require grad.
  if (c10::GradMode::is_enabled()) {
    const char* culprit = out.requires_grad()      ? "`out`"
                          : coeffs.requires_grad() ? "`coeffs`"
                          : x.requires_grad()      ? "`x`"
                                                   : nullptr;
    TORCH_CHECK(culprit == nullptr, op,
                ": writes into `out` in place, which autograd does not record, but ", culprit,
                " requires grad; call it under torch.no_grad() or on detached tensors");
  }
  check_same_device(x, "x", out, "out", op);
  check_same_dtype(x, "x", out, "out", op);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(coeffs.size(-2));
  shape.push_back(x.size(-1));
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(shape), op, ": `out` must have shape ",
                    at::IntArrayRef(shape), ", got ", out.sizes());
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": `out` must be contiguous (it is written in place)");
  combine_into(out, beta != 0.0 ? out : at::Tensor(), coeffs, x, beta, op);
}

namespace {

// ---- Memory shared between the tensors of one combine_list call -------------------------------
// The kernels write every output while they read every input and base, in any order and on any
// thread, so an output may share memory with none of them, except that bases[p] may be outs[p]
// itself (each element reads its own base element first; checked in combine_list_impl). What
// counts is the memory the kernels touch, by address (never storage identity: two storages can
// hold one buffer): an output is one dense byte range; an input or a base is read as rows of
// dense elements (stack_rows), or from a private copy when its trailing dims are not dense (then
// nothing is shared). Exact, no false refusals. mtunlearn_ext.ops.combine.check_combine_list
// makes the same decisions and raises the same message.

// The first tensor, in the order below, that shares memory with outs[p]: outs[q] (q != p), xs[q],
// bases[q] (q != p); for p in order. The error names it.
std::optional<std::pair<const char*, int64_t>> first_overlap(
    const std::vector<RowsRead>& outs, const std::vector<RowsRead>& xs,
    const std::vector<RowsRead>& bases, int64_t p) {
  const RowsRead& o = outs[p];
  const std::intptr_t lo = o.start, hi = o.end();
  for (size_t q = 0; q < outs.size(); ++q) {
    const bool other = static_cast<int64_t>(q) != p;
    if (other && rows_meet(outs[q], lo, hi)) return std::make_pair("outs", static_cast<int64_t>(q));
    if (rows_meet(xs[q], lo, hi)) return std::make_pair("xs", static_cast<int64_t>(q));
    if (other && !bases.empty() && rows_meet(bases[q], lo, hi))
      return std::make_pair("bases", static_cast<int64_t>(q));
  }
  return std::nullopt;
}

// An output's byte range [start, end) and its index p.
struct OutSpan {
  std::intptr_t start;
  std::intptr_t end;
  int64_t p;
};

// A read's rows and the output it may share memory with (its own base's output; -1: none).
struct Read {
  RowsRead rows;
  int64_t own;
};

// Whether an output of `spans` (sorted by start) meets another, or a row of a read meets an
// output other than its own: O((P + R) log P) for P outputs and R reads of few rows. Once the
// outputs are disjoint, sorted by start is sorted by end, so the ones a read's extent covers are
// a run; each is tested against the read's rows, or, where the run is longer than the read has
// rows, each row is looked up among the outputs instead (walking the run cost O(P) per read,
// O(P^2) in all when every input straddles every output: 1.1 s at 16,000).
bool any_meeting(const std::vector<OutSpan>& spans, const std::vector<Read>& reads) {
  const size_t count = spans.size();
  for (size_t i = 1; i < count; ++i)
    if (spans[i].start < spans[i - 1].end) return true;
  auto ends_past = [&](size_t from, size_t to, std::intptr_t at) {  // first end > at
    return static_cast<size_t>(
        std::partition_point(spans.begin() + from, spans.begin() + to,
                             [&](const OutSpan& s) { return s.end <= at; }) -
        spans.begin());
  };
  for (const Read& read : reads) {
    const RowsRead& r = read.rows;
    if (r.empty()) continue;
    const size_t first = ends_past(0, count, r.start);
    const std::intptr_t hi = r.end();
    const size_t last = static_cast<size_t>(
        std::partition_point(spans.begin() + first, spans.end(),
                             [&](const OutSpan& s) { return s.start < hi; }) -
        spans.begin());
    if (first == last) continue;
    if (r.rows == 1 || r.stride <= r.length) {  // the rows make one range: the run all meet it
      if (last - first > 1 || spans[first].p != read.own) return true;
    } else if (last - first <= static_cast<size_t>(r.rows)) {
      for (size_t j = first; j < last; ++j)
        if (spans[j].p != read.own && rows_meet(r, spans[j].start, spans[j].end)) return true;
    } else {
      for (int64_t i = 0; i < r.rows; ++i) {
        const std::intptr_t row = r.start + i * r.stride, row_end = row + r.length;
        size_t j = ends_past(first, last, row);  // the first output past the row's start
        if (j < last && spans[j].start < row_end && spans[j].p == read.own) ++j;
        if (j < last && spans[j].start < row_end) return true;
      }
    }
  }
  return false;
}

// Refuses a call whose outputs share memory with another tensor of the call (see above), in
// O((P + R) log P) (any_meeting). On a conflict the error names the first output, by index,
// that shares memory: the smallest p whose outputs 0..p meet anything (a test that only turns
// true as p grows; the outputs after p taken as ranges read), found by bisection, then the
// first tensor it meets (first_overlap). The pairs scanned in order took 2 s at 16,000.
void check_no_cross_overlap(const std::vector<CombineSegment>& segments, int64_t m, int64_t k,
                            int64_t esize, bool reads_bases, bool has_rows, const char* op) {
  if (m == 0) return;  // nothing is written
  const size_t count = segments.size();
  std::vector<RowsRead> outs(count), xs(count), bases(reads_bases ? count : 0);
  std::vector<OutSpan> spans;
  spans.reserve(count);
  std::vector<Read> reads;
  reads.reserve(reads_bases ? 2 * count : count);
  for (size_t p = 0; p < count; ++p) {
    const CombineSegment& s = segments[p];
    outs[p] = rows_read(s.out, 0, 1, m * s.ncols, esize);  // contiguous: one range
    xs[p] = rows_read(s.x, s.x_row_stride, k, s.ncols, esize);
    if (reads_bases)
      bases[p] = rows_read(s.base, s.base_row_stride, has_rows ? m : 1, s.ncols, esize);
    if (!outs[p].empty()) spans.push_back({outs[p].start, outs[p].end(), static_cast<int64_t>(p)});
    reads.push_back({xs[p], -1});
    if (reads_bases) reads.push_back({bases[p], static_cast<int64_t>(p)});  // may be outs[p]
  }
  std::sort(spans.begin(), spans.end(), [](const OutSpan& a, const OutSpan& b) {
    return a.start < b.start || (a.start == b.start && a.p < b.p);
  });
  if (!any_meeting(spans, reads)) return;
  int64_t lo = 0, hi = static_cast<int64_t>(count) - 1;
  std::vector<OutSpan> within;
  std::vector<Read> with_after;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    within.clear();
    with_after = reads;
    for (const OutSpan& s : spans) {
      if (s.p <= mid)
        within.push_back(s);
      else
        with_after.push_back({RowsRead{s.start, 0, 1, s.end - s.start}, -1});
    }
    if (any_meeting(within, with_after))
      hi = mid;
    else
      lo = mid + 1;
  }
  auto refuse_if_met = [&](int64_t p) {
    if (outs[p].empty()) return;
    const auto hit = first_overlap(outs, xs, bases, p);
    TORCH_CHECK_VALUE(!hit, op, ": ", ArgName("outs", p), " overlaps ",
                      ArgName(hit->first, hit->second),
                      "; an output must not share memory with any input, another output or "
                      "another output's base (clone() one of them first)");
  };
  refuse_if_met(lo);
  // A safeguard only (outs[lo] meets something): the scan in order that named it before.
  for (size_t p = 0; p < count; ++p) refuse_if_met(static_cast<int64_t>(p));
}

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
  // In-place writes are not recorded by autograd: while it records, an argument that requires
  // grad is refused (as torch's out= functions do). Here rather than in Python, where the
  // check cost about 15 us per call on lists of hundreds of tensors.
  const bool recording = c10::GradMode::is_enabled();
  TORCH_CHECK(!(recording && coeffs_in.requires_grad()), op,
              ": writes into its outputs in place, which autograd does not record, but `coeffs` "
              "requires grad; call it under torch.no_grad() or on detached tensors");
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
    if (recording) {
      const bool base_grad = bases != nullptr && (*bases)[p].requires_grad();
      TORCH_CHECK(!(xs[p].requires_grad() || outs[p].requires_grad() || base_grad), op,
                  ": writes into its outputs in place, which autograd does not record, but ",
                  xs[p].requires_grad() ? xn : outs[p].requires_grad() ? on : bn,
                  " requires grad; call it under torch.no_grad() or on detached tensors");
    }
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
      // Each output element reads its own base element first: the base may be the output
      // itself, but no other memory of it: not a shifted or re-strided view, nor the same bytes
      // under another storage (torch.from_numpy twice, from_dlpack), so bytes are compared, not
      // storages. As with the inputs, what counts is the memory the kernels read: the base's
      // rows (exact, O(1)), or a private copy when its trailing dims are not dense.
      const StackRows base = stack_rows(b, copies, has_rows ? 1 : 0);
      if (base.data == b.data_ptr() && !same_elements(b, outs[p])) {
        const auto out_lo = reinterpret_cast<std::intptr_t>(outs[p].data_ptr());
        const auto out_hi = out_lo + static_cast<std::intptr_t>(outs[p].nbytes());
        const RowsRead read = rows_read(base.data, base.row_stride, has_rows ? m : 1, cols,
                                        element_size(kind));
        TORCH_CHECK_VALUE(!rows_meet(read, out_lo, out_hi), op, ": ", bn, " overlaps ", on,
                          " without being the same tensor");
      }
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
  check_no_cross_overlap(segments, m, k, element_size(kind), bases != nullptr && beta != 0.0,
                         has_rows, op);
  at::Tensor coeffs = coeffs_for_kernels(coeffs_in, xs[0].scalar_type(), outs);
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

MTU_LIBRARY_IMPL(CPU, m) {
  m.impl("combine", &combine);
  m.impl("combine_", &combine_);
  m.impl("combine_list_", &combine_list_);
  m.impl("combine_list_from_", &combine_list_from_);
}

namespace {

// The ADInplaceOrView kernels of the ops that write through `out` / `outs` (annotated `(a!)`,
// returning nothing): each runs the op below this key, then bumps the version counter of every
// tensor written, as torch's own in-place ops do, so that autograd refuses a backward through a
// tensor these ops overwrote after a graph saved it (without the bump it computed wrong
// gradients silently). torch's ADInplaceOrView fallback bumps written *returns* only; typed
// kernels, not a boxed one, because boxing a list of 50 tensors cost ~1.7 us a call. Inference
// tensors carry no version counter (nor autograd history) and are left as they are.
void bump_version(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

void combine_bumping(c10::DispatchKeySet keys, const at::Tensor& out, const at::Tensor& coeffs,
                     const at::Tensor& x, double beta) {
  static const auto op = typed_op<decltype(combine_)>("mtunlearn::combine_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, out, coeffs, x, beta);
  }
  bump_version(out);
}

void combine_list_bumping(c10::DispatchKeySet keys, at::TensorList outs,
                          const at::Tensor& coeffs, at::TensorList xs, double beta,
                          bool per_tensor) {
  static const auto op = typed_op<decltype(combine_list_)>("mtunlearn::combine_list_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, outs, coeffs, xs, beta, per_tensor);
  }
  for (const at::Tensor& t : outs) bump_version(t);
}

void combine_list_from_bumping(c10::DispatchKeySet keys, at::TensorList outs,
                               at::TensorList bases, const at::Tensor& coeffs, at::TensorList xs,
                               double beta, bool per_tensor) {
  static const auto op = typed_op<decltype(combine_list_from_)>("mtunlearn::combine_list_from_");
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, outs, bases, coeffs, xs, beta,
                  per_tensor);
  }
  for (const at::Tensor& t : outs) bump_version(t);
}

}  // namespace

MTU_LIBRARY_IMPL(ADInplaceOrView, m) {
  m.impl("combine_", &combine_bumping);
  m.impl("combine_list_", &combine_list_bumping);
  m.impl("combine_list_from_", &combine_list_from_bumping);
}

#ifdef MTU_WITH_CUDA
MTU_LIBRARY_IMPL(CUDA, m) {
  m.impl("combine", &combine);
  m.impl("combine_", &combine_);
  m.impl("combine_list_", &combine_list_);
  m.impl("combine_list_from_", &combine_list_from_);
}
#endif

}  // namespace mtunlearn

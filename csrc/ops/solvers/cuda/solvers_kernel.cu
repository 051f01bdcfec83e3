// CUDA kernels of the coefficient-space solvers: the same code as the CPU
// (include/mtunlearn/small_solvers.h) in double, one thread per problem (PCGrad: one per task of
// each problem; from k = 32 one block per problem, unless MTUNLEARN_CUDA_BLOCK_SOLVERS=0), on a
// per-problem workspace (nonconflicting_dual: per slot, rows walked grid-stride). The problems are
// k x k with k <= 256; keeping them on the device avoids any host sync.
#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "mtunlearn/block_solvers.h"
#include "mtunlearn/cuda_common.cuh"
#include "mtunlearn/small_solvers.h"

namespace mtunlearn {
namespace cuda {
namespace {

constexpr int kThreads = 64;

template <typename A>
__global__ void ridge_solve_kernel(const A* __restrict__ gram, const A* __restrict__ rhs,
                                   A* __restrict__ out, int64_t batch, int k, int m, double ridge,
                                   double pivot_floor, double* __restrict__ workspace) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const int64_t kk = static_cast<int64_t>(k) * k, km = static_cast<int64_t>(k) * m;
  double* w = workspace + b * (2 * kk + 2 * km);
  double* g = w;
  double* scratch = w + kk;
  double* r = w + 2 * kk;
  double* o = r + km;
  for (int64_t e = 0; e < kk; ++e) g[e] = static_cast<double>(gram[b * kk + e]);
  for (int64_t e = 0; e < km; ++e) r[e] = static_cast<double>(rhs[b * km + e]);
  solvers::ridge_solve(g, k, r, m, ridge, pivot_floor, o, scratch);
  for (int64_t e = 0; e < km; ++e) out[b * km + e] = static_cast<A>(o[e]);
}

// Rows (one dual problem each) are walked grid-stride, each thread on the workspace of its own
// slot: a workspace per row (2 k^2 + 4 k doubles, 1 MB at k = 256) ran out of memory for tens
// of thousands of rows (nonconflicting_dual_slots bounds the slots).
template <typename A>
__global__ void nonconflicting_dual_kernel(const A* __restrict__ gram, const A* __restrict__ rhs,
                                           A* __restrict__ out, int64_t batch, int k, int m,
                                           double pivot_floor, double* __restrict__ workspace,
                                           int* __restrict__ int_workspace) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t kk = static_cast<int64_t>(k) * k;
  double* w = workspace + slot * (2 * kk + 4 * k);
  double* g = w;
  double* c = w + kk;
  double* sol = c + k;
  double* scratch = sol + k;  // kk + 2k
  int* idx = int_workspace + slot * k;
  for (int64_t p = slot; p < batch * m; p += stride) {
    const int64_t b = p / m;
    for (int64_t e = 0; e < kk; ++e) g[e] = static_cast<double>(gram[b * kk + e]);
    for (int e = 0; e < k; ++e) c[e] = static_cast<double>(rhs[p * k + e]);
    solvers::nonconflicting_dual(g, k, c, pivot_floor, sol, scratch, idx);
    for (int e = 0; e < k; ++e) out[p * k + e] = static_cast<A>(sol[e]);
  }
}

// ---- One block per problem, for k >= kBlockSolverMinK ------------------------------------------
// The algorithms are in include/mtunlearn/block_solvers.h (shared with a CPU emulation that CI
// runs); here only the CUDA Block and the kernels that hand each block its problem.

constexpr int kBlockSolverMinK = 32;
constexpr int kBlockSolverThreads = 256;

// On by default since they passed the solver, projection and unlearning tests on an H200
// (2026-11-30: 120 passed, memcheck and racecheck clean; about 5x faster than one thread per
// problem at k = 256). MTUNLEARN_CUDA_BLOCK_SOLVERS=0 selects the one-thread solvers instead
// (benchmarks/gpu_check.py tests both ways).
bool block_solvers_enabled() {
  static const bool enabled = [] {
    // Read once, at the first CUDA solver call. Off: 0, false, off or no (any case).
    const char* value = std::getenv("MTUNLEARN_CUDA_BLOCK_SOLVERS");
    if (value == nullptr) return true;
    std::string text(value);
    for (char& ch : text) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return !(text == "0" || text == "false" || text == "off" || text == "no");
  }();
  return enabled;
}

unsigned block_threads_for(int k) {
  const int rounded = (k + 31) / 32 * 32;
  return static_cast<unsigned>(rounded < kBlockSolverThreads ? rounded : kBlockSolverThreads);
}

// A thread block as block_solvers.h's Block. blockDim.x is a multiple of 32.
struct CudaBlock {
  double* warp_slots;  // blockDim.x / 32 shared doubles
  __device__ int rank() const { return static_cast<int>(threadIdx.x); }
  __device__ int size() const { return static_cast<int>(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  __device__ bool any(bool v) const { return __syncthreads_or(v) != 0; }
  __device__ bool all(bool v) const { return __syncthreads_and(v) != 0; }
  // Largest value over the block (exact in any order); every thread gets it.
  __device__ double max(double v) const {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
      v = solvers::dmax(v, __shfl_down_sync(0xffffffffu, v, off));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_slots[warp] = v;
    __syncthreads();
    double m = warp_slots[0];
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) m = solvers::dmax(m, warp_slots[w]);
    __syncthreads();
    return m;
  }
};

template <typename A>
__global__ void __launch_bounds__(kBlockSolverThreads)
ridge_solve_block_kernel(const A* gram, const A* rhs, A* out, int k, int m, double ridge,
                         double pivot_floor, double* workspace) {
  __shared__ double s_scalar;
  CudaBlock block{nullptr};
  const int64_t b = blockIdx.x;
  const int64_t kk = static_cast<int64_t>(k) * k, km = static_cast<int64_t>(k) * m;
  block_solvers::ridge_solve(block, gram + b * kk, rhs + b * km, out + b * km, k, m, ridge,
                             pivot_floor, workspace + b * (2 * kk + 2 * km), &s_scalar);
}

template <typename A>
__global__ void __launch_bounds__(kBlockSolverThreads)
nonconflicting_dual_block_kernel(const A* gram, const A* rhs, A* out, int64_t rows, int k, int m,
                                 double pivot_floor, double* workspace, int* int_workspace) {
  __shared__ double s_w[solvers::kMaxSolverK], s_grad[solvers::kMaxSolverK];
  __shared__ double s_trial[solvers::kMaxSolverK];
  __shared__ double s_warps[kBlockSolverThreads / 32];
  __shared__ double s_scalar;
  __shared__ int s_count;
  CudaBlock block{s_warps};
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t slot = blockIdx.x;
  // Grid-stride over rows, on this block's slot of the workspace (see the thread kernel). The
  // loop's bounds are the same for every thread of the block, so the barrier is reached by all.
  for (int64_t p = slot; p < rows; p += gridDim.x) {
    const int64_t b = p / m;
    block_solvers::nonconflicting_dual(block, gram + b * kk, rhs + p * k, out + p * k, k,
                                       pivot_floor, workspace + slot * (2 * kk + 4 * k),
                                       int_workspace + slot * k,
                                       s_w, s_grad, s_trial, &s_scalar, &s_count);
    __syncthreads();  // the shared arrays are the next row's only once every thread is done
  }
}

// PCGrad in three launches, so that the O(k^3) work runs on k threads per problem instead of
// one: the Gram in double, one thread per (problem, task) for that task's projected weights,
// one thread per (problem, entry) summing the tasks in index order (as the CPU does).
template <typename A>
__global__ void to_double_kernel(const A* __restrict__ in, double* __restrict__ out, int64_t n) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < n) out[e] = static_cast<double>(in[e]);
}

__global__ void pcgrad_task_kernel(const double* __restrict__ gram, int64_t batch, int k,
                                   int64_t seed, double* __restrict__ task_weights,
                                   int* __restrict__ orders) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= batch * k) return;
  const int64_t b = p / k;
  const int task = static_cast<int>(p % k);
  solvers::pcgrad_task_weights(gram + b * k * k, k, seed, task, task_weights + p * k,
                               orders + p * k);
}

template <typename A>
__global__ void pcgrad_sum_kernel(const double* __restrict__ task_weights, A* __restrict__ out,
                                  int64_t batch, int k) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= batch * k) return;
  const int64_t b = e / k, l = e % k;
  const double* v = task_weights + b * k * k;
  double total = 0.0;
  for (int i = 0; i < k; ++i) total += v[static_cast<int64_t>(i) * k + l];
  out[e] = static_cast<A>(total);
}

unsigned blocks_for(int64_t problems) {
  return static_cast<unsigned>((problems + kThreads - 1) / kThreads);
}

bool by_block(int k) { return k >= kBlockSolverMinK && block_solvers_enabled(); }

// The nonconflicting_dual launch: its grid (blocks) and its workspace slots (one per thread, or
// per block for the block kernel), as many as rows up to a workspace of kSolverWorkspaceBytes,
// and never fewer than kMinSolverSlots (or rows) so that a large GPU stays busy.
constexpr int64_t kSolverWorkspaceBytes = int64_t(1) << 30;
constexpr int64_t kMinSolverSlots = 2048;

struct DualLaunch {
  int64_t blocks, slots;
};

DualLaunch dual_launch(int64_t batch, int k, int m) {
  const int64_t rows = batch * m, kk = static_cast<int64_t>(k) * k;
  const int64_t slot_bytes = (2 * kk + 4 * k) * int64_t(sizeof(double)) + k * int64_t(sizeof(int));
  const int64_t wanted = std::min(rows, std::max(kMinSolverSlots,
                                                 kSolverWorkspaceBytes / slot_bytes));
  if (by_block(k)) return {wanted, wanted};
  const int64_t blocks = std::max<int64_t>(1, (wanted + kThreads - 1) / kThreads);
  return {blocks, blocks * kThreads};
}

template <typename A>
void launch_ridge_solve(const void* gram, const void* rhs, void* out, int64_t batch, int k, int m,
                        double ridge, double pivot_floor, double* workspace, cudaStream_t stream) {
  auto* g = static_cast<const A*>(gram);
  auto* r = static_cast<const A*>(rhs);
  auto* o = static_cast<A*>(out);
  if (by_block(k)) {
    ridge_solve_block_kernel<A><<<static_cast<unsigned>(batch), block_threads_for(k), 0, stream>>>(
        g, r, o, k, m, ridge, pivot_floor, workspace);
  } else {
    ridge_solve_kernel<A><<<blocks_for(batch), kThreads, 0, stream>>>(
        g, r, o, batch, k, m, ridge, pivot_floor, workspace);
  }
}

template <typename A>
void launch_nonconflicting_dual(const void* gram, const void* rhs, void* out, int64_t batch, int k,
                                int m, double pivot_floor, double* workspace, int* int_workspace,
                                cudaStream_t stream) {
  auto* g = static_cast<const A*>(gram);
  auto* r = static_cast<const A*>(rhs);
  auto* o = static_cast<A*>(out);
  const DualLaunch launch = dual_launch(batch, k, m);
  if (by_block(k)) {
    nonconflicting_dual_block_kernel<A>
        <<<static_cast<unsigned>(launch.blocks), block_threads_for(k), 0, stream>>>(
            g, r, o, batch * m, k, m, pivot_floor, workspace, int_workspace);
  } else {
    nonconflicting_dual_kernel<A><<<static_cast<unsigned>(launch.blocks), kThreads, 0, stream>>>(
        g, r, o, batch, k, m, pivot_floor, workspace, int_workspace);
  }
}

// workspace: the Gram in double, then every task's weight vector (2 k^2 doubles per problem);
// int_workspace: an order of k ints per task.
template <typename A>
void launch_pcgrad_weights(const void* gram, void* out, int64_t batch, int k, int64_t seed,
                           double* workspace, int* int_workspace, cudaStream_t stream) {
  const int64_t kk = static_cast<int64_t>(k) * k;
  double* gram_double = workspace;
  double* task_weights = workspace + batch * kk;
  to_double_kernel<A><<<blocks_for(batch * kk), kThreads, 0, stream>>>(
      static_cast<const A*>(gram), gram_double, batch * kk);
  pcgrad_task_kernel<<<blocks_for(batch * k), kThreads, 0, stream>>>(
      gram_double, batch, k, seed, task_weights, int_workspace);
  pcgrad_sum_kernel<A><<<blocks_for(batch * k), kThreads, 0, stream>>>(
      task_weights, static_cast<A*>(out), batch, k);
}

}  // namespace

int ridge_solve(bool dbl, const void* gram, const void* rhs, void* out, int64_t batch, int k,
                int m, double ridge, double pivot_floor, double* workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (dbl) {
    launch_ridge_solve<double>(gram, rhs, out, batch, k, m, ridge, pivot_floor, workspace, stream);
  } else {
    launch_ridge_solve<float>(gram, rhs, out, batch, k, m, ridge, pivot_floor, workspace, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

int64_t nonconflicting_dual_slots(int64_t batch, int k, int m) {
  return dual_launch(batch, k, m).slots;
}

int nonconflicting_dual(bool dbl, const void* gram, const void* rhs, void* out, int64_t batch,
                        int k, int m, double pivot_floor, double* workspace, int* int_workspace,
                        void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (dbl) {
    launch_nonconflicting_dual<double>(gram, rhs, out, batch, k, m, pivot_floor, workspace,
                                       int_workspace, stream);
  } else {
    launch_nonconflicting_dual<float>(gram, rhs, out, batch, k, m, pivot_floor, workspace,
                                      int_workspace, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

int pcgrad_weights(bool dbl, const void* gram, void* out, int64_t batch, int k, int64_t seed,
                   double* workspace, int* int_workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (dbl) {
    launch_pcgrad_weights<double>(gram, out, batch, k, seed, workspace, int_workspace, stream);
  } else {
    launch_pcgrad_weights<float>(gram, out, batch, k, seed, workspace, int_workspace, stream);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mtunlearn

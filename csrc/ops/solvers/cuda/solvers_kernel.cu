// CUDA kernels of the coefficient-space solvers: the same code as the CPU
// (include/mtunlearn/small_solvers.h) in double, one thread per problem (PCGrad: one per task of
// each problem; opt-in: one block per problem from k = 32), on a per-problem workspace. The
// problems are k x k with k <= 256; keeping them on the device avoids any host sync.
#include <cstdlib>

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

template <typename A>
__global__ void nonconflicting_dual_kernel(const A* __restrict__ gram, const A* __restrict__ rhs,
                                           A* __restrict__ out, int64_t batch, int k, int m,
                                           double* __restrict__ workspace,
                                           int* __restrict__ int_workspace) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= batch * m) return;
  const int64_t b = p / m;
  const int64_t kk = static_cast<int64_t>(k) * k;
  double* w = workspace + p * (2 * kk + 4 * k);
  double* g = w;
  double* c = w + kk;
  double* sol = c + k;
  double* scratch = sol + k;  // kk + 2k
  int* idx = int_workspace + p * k;
  for (int64_t e = 0; e < kk; ++e) g[e] = static_cast<double>(gram[b * kk + e]);
  for (int e = 0; e < k; ++e) c[e] = static_cast<double>(rhs[p * k + e]);
  solvers::nonconflicting_dual(g, k, c, sol, scratch, idx);
  for (int e = 0; e < k; ++e) out[p * k + e] = static_cast<A>(sol[e]);
}

// ---- One block per problem, for k >= kBlockSolverMinK (opt-in, below) --------------------------
// No __restrict__ on these kernels' pointers: threads pass values to each other through global
// memory across __syncthreads(), and with noalias pointers nvcc kept a value loaded before a
// barrier instead of reloading it after (seen in the back substitution's PTX; the first GPU run
// of these kernels gave wrong ridge solutions from k = 32).
// One thread per problem runs an O(k^3) Cholesky or O(k^2)-per-sweep coordinate descent alone:
// ~44-68 ms at k = 256 on an H200. These kernels run the same algorithms with a block per
// problem: the inner loops over rows are spread over the threads, the sequential order of the
// outer loops (columns, coordinates) is kept, so each entry sees the same operations in the same
// order as on the CPU (except the back substitution, whose sums run in the opposite order).

constexpr int kBlockSolverMinK = 32;
constexpr int kBlockSolverThreads = 256;

// Opt-in (MTUNLEARN_CUDA_BLOCK_SOLVERS=1) until a GPU run has passed the solver tests with them:
// their first run gave wrong ridge solutions (the __restrict__ issue above, fixed since, checked
// in the PTX and in a CPU emulation with one std::thread per CUDA thread, not yet on a GPU).
// benchmarks/gpu_check.py runs the solver tests both ways.
bool block_solvers_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("MTUNLEARN_CUDA_BLOCK_SOLVERS");
    return value != nullptr && value[0] == '1';
  }();
  return enabled;
}

unsigned block_threads_for(int k) {
  const int rounded = (k + 31) / 32 * 32;
  return static_cast<unsigned>(rounded < kBlockSolverThreads ? rounded : kBlockSolverThreads);
}

// Largest value over the block (exact in any order); every thread gets it.
__device__ double block_max(double v, double* warp_slots) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = solvers::dmax(v, __shfl_down_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_slots[warp] = v;
  __syncthreads();
  double m = warp_slots[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) m = solvers::dmax(m, warp_slots[w]);
  __syncthreads();
  return m;
}

// solvers::cholesky_dropping with the rows of each column spread over the block. Returns the
// number of dropped rows (the same on every thread).
__device__ int block_cholesky_dropping(const double* a, int lda, const int* idx, int k_sub,
                                       double lam, double floor, double* l, double* s_pivot) {
  int dropped = 0;
  for (int j = 0; j < k_sub; ++j) {
    const int gj = idx ? idx[j] : j;
    if (threadIdx.x == 0) {
      double d = a[gj * lda + gj] + lam;
      for (int p = 0; p < j; ++p) d -= l[j * k_sub + p] * l[j * k_sub + p];
      *s_pivot = (!(d > floor) && d == d) ? 0.0 : sqrt(d);  // 0: dropped (sqrt(d) > 0 otherwise)
    }
    __syncthreads();
    const double ljj = *s_pivot;
    for (int i = threadIdx.x; i < j; i += blockDim.x) l[i * k_sub + j] = 0.0;
    if (ljj == 0.0) {
      ++dropped;
      for (int i = j + threadIdx.x; i < k_sub; i += blockDim.x) l[i * k_sub + j] = 0.0;
    } else {
      if (threadIdx.x == 0) l[j * k_sub + j] = ljj;
      for (int i = j + 1 + threadIdx.x; i < k_sub; i += blockDim.x) {
        const int gi = idx ? idx[i] : i;
        double s = a[gi * lda + gj];
        for (int p = 0; p < j; ++p) s -= l[i * k_sub + p] * l[j * k_sub + p];
        l[i * k_sub + j] = s / ljj;
      }
    }
    __syncthreads();
  }
  return dropped;
}

// solvers::cholesky_solve, column-oriented: once b[i] is final, every later row subtracts its
// share at once. Dropped rows (diagonal 0) get 0.
__device__ void block_cholesky_solve(const double* l, int k, double* b, int64_t inc) {
  for (int i = 0; i < k; ++i) {
    const double lii = l[i * k + i];
    if (threadIdx.x == 0) b[i * inc] = lii == 0.0 ? 0.0 : b[i * inc] / lii;
    __syncthreads();
    const double bi = b[i * inc];
    for (int p = i + 1 + threadIdx.x; p < k; p += blockDim.x) b[p * inc] -= l[p * k + i] * bi;
    __syncthreads();
  }
  for (int i = k - 1; i >= 0; --i) {
    const double lii = l[i * k + i];
    if (threadIdx.x == 0 && lii != 0.0) b[i * inc] = b[i * inc] / lii;
    __syncthreads();
    const double bi = b[i * inc];
    for (int p = threadIdx.x; p < i; p += blockDim.x) b[p * inc] -= l[i * k + p] * bi;
    __syncthreads();
  }
}

template <typename A>
__global__ void __launch_bounds__(kBlockSolverThreads)
ridge_solve_block_kernel(const A* gram, const A* rhs,
                         A* out, int k, int m, double ridge, double pivot_floor,
                         double* workspace) {
  __shared__ double s_scalar;
  const int64_t b = blockIdx.x;
  const int64_t kk = static_cast<int64_t>(k) * k, km = static_cast<int64_t>(k) * m;
  double* g = workspace + b * (2 * kk + 2 * km);
  double* l = g + kk;
  double* r = l + kk;
  bool bad = false;
  for (int64_t e = threadIdx.x; e < kk; e += blockDim.x) {
    g[e] = static_cast<double>(gram[b * kk + e]);
    bad = bad || !solvers::is_finite(g[e]);
  }
  for (int64_t e = threadIdx.x; e < km; e += blockDim.x) {
    r[e] = static_cast<double>(rhs[b * km + e]);
    bad = bad || !solvers::is_finite(r[e]);
  }
  if (__syncthreads_or(bad)) {  // non-finite input must surface in the coefficients
    for (int64_t e = threadIdx.x; e < km; e += blockDim.x) out[b * km + e] = static_cast<A>(NAN);
    return;
  }
  if (threadIdx.x == 0) s_scalar = solvers::ridge_lambda(g, k, ridge);
  __syncthreads();
  const double lam = s_scalar;
  __syncthreads();
  if (threadIdx.x == 0) s_scalar = pivot_floor * solvers::max_diagonal(g, k) + DBL_MIN;
  __syncthreads();
  const double floor = s_scalar;
  __syncthreads();
  block_cholesky_dropping(g, k, nullptr, k, lam, floor, l, &s_scalar);
  for (int c = 0; c < m; ++c) block_cholesky_solve(l, k, r + c, m);
  for (int64_t e = threadIdx.x; e < km; e += blockDim.x) out[b * km + e] = static_cast<A>(r[e]);
}

// solvers::nonconflicting_dual for one (problem, row) per block. w and grad live in shared
// memory; every thread computes each coordinate's step itself (same inputs, same result), so
// only the gradient update is shared out, with a barrier on each side of it.
template <typename A>
__global__ void __launch_bounds__(kBlockSolverThreads)
nonconflicting_dual_block_kernel(const A* gram, const A* rhs,
                                 A* out, int k, int m,
                                 double* workspace, int* int_workspace) {
  __shared__ double s_w[solvers::kMaxSolverK], s_grad[solvers::kMaxSolverK];
  __shared__ double s_trial[solvers::kMaxSolverK];
  __shared__ double s_warps[kBlockSolverThreads / 32];
  __shared__ double s_scalar;
  __shared__ int s_count;
  const int64_t p = blockIdx.x, b = p / m;
  const int64_t kk = static_cast<int64_t>(k) * k;
  double* g = workspace + p * (2 * kk + 4 * k);
  double* c = g + kk;
  double* factor = c + 2 * k;
  int* idx = int_workspace + p * k;
  A* dst = out + p * k;
  bool bad = false;
  for (int64_t e = threadIdx.x; e < kk; e += blockDim.x) {
    g[e] = static_cast<double>(gram[b * kk + e]);
    bad = bad || !solvers::is_finite(g[e]);
  }
  for (int e = threadIdx.x; e < k; e += blockDim.x) {
    c[e] = static_cast<double>(rhs[p * k + e]);
    bad = bad || !solvers::is_finite(c[e]);
  }
  if (__syncthreads_or(bad)) {
    for (int e = threadIdx.x; e < k; e += blockDim.x) dst[e] = static_cast<A>(NAN);
    return;
  }
  double local_scale = 0.0;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    s_w[i] = 0.0;
    s_grad[i] = c[i];
    const double gii = g[i * k + i];
    if (gii > 0.0) local_scale = solvers::dmax(local_scale, solvers::dabs(c[i]) / sqrt(gii));
  }
  const double scale = block_max(local_scale, s_warps);  // also publishes s_w, s_grad
  if (scale == 0.0) {
    for (int e = threadIdx.x; e < k; e += blockDim.x) dst[e] = static_cast<A>(0.0);
    return;
  }
  const double tol = 1e-13 * scale;
  const int max_sweeps = 200 + 40 * k;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    double largest = 0.0;
    for (int i = 0; i < k; ++i) {
      const double gii = g[i * k + i];
      if (!(gii > 0.0)) continue;
      double next = s_w[i] - s_grad[i] / gii;
      if (next < 0.0) next = 0.0;
      const double delta = next - s_w[i];
      if (delta != 0.0) {  // the same on every thread
        __syncthreads();   // everyone has read s_w[i] and s_grad[i]
        if (threadIdx.x == 0) s_w[i] = next;
        for (int j = threadIdx.x; j < k; j += blockDim.x) s_grad[j] += delta * g[j * k + i];
        largest = solvers::dmax(largest, solvers::dabs(delta) * sqrt(gii));
        __syncthreads();
      }
    }
    if (largest <= tol) break;
  }
  // Polish on the active set, as in solvers::nonconflicting_dual.
  if (threadIdx.x == 0) {
    int na = 0;
    double active_scale = 0.0;
    for (int i = 0; i < k; ++i)
      if (s_w[i] > 0.0) {
        idx[na++] = i;
        active_scale = solvers::dmax(active_scale, g[i * k + i]);
      }
    s_count = na;
    s_scalar = active_scale;
  }
  __syncthreads();
  const int na = s_count;
  const double active_scale = s_scalar;
  __syncthreads();
  bool keep_descent = na == 0;
  if (!keep_descent)
    keep_descent = block_cholesky_dropping(g, k, idx, na, 0.0, 1e-9 * active_scale + DBL_MIN,
                                           factor, &s_scalar) > 0;
  if (!keep_descent) {
    for (int a = threadIdx.x; a < na; a += blockDim.x) s_trial[a] = -c[idx[a]];
    __syncthreads();
    block_cholesky_solve(factor, na, s_trial, 1);
    bool positive = true;
    for (int a = threadIdx.x; a < na; a += blockDim.x) positive = positive && s_trial[a] > 0.0;
    keep_descent = !__syncthreads_and(positive);
  }
  if (!keep_descent) {
    bool violated = false;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      if (s_w[i] > 0.0) continue;  // active: idx holds exactly the i with w_i > 0
      double gi = c[i];
      for (int a = 0; a < na; ++a) gi += g[i * k + idx[a]] * s_trial[a];
      violated = violated || gi < -1e-9 * scale * sqrt(solvers::dmax(g[i * k + i], 0.0));
    }
    keep_descent = __syncthreads_or(violated);
  }
  if (!keep_descent) {
    for (int i = threadIdx.x; i < k; i += blockDim.x) s_w[i] = 0.0;
    __syncthreads();
    for (int a = threadIdx.x; a < na; a += blockDim.x) s_w[idx[a]] = s_trial[a];
    __syncthreads();
  }
  for (int e = threadIdx.x; e < k; e += blockDim.x) dst[e] = static_cast<A>(s_w[e]);
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

}  // namespace

int ridge_solve(bool dbl, const void* gram, const void* rhs, void* out, int64_t batch, int k,
                int m, double ridge, double pivot_floor, double* workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool by_block = k >= kBlockSolverMinK && block_solvers_enabled();
  const unsigned grid = by_block ? static_cast<unsigned>(batch) : blocks_for(batch);
  const unsigned threads = by_block ? block_threads_for(k) : kThreads;
  if (dbl) {
    auto* g = static_cast<const double*>(gram);
    auto* r = static_cast<const double*>(rhs);
    auto* o = static_cast<double*>(out);
    if (by_block) {
      ridge_solve_block_kernel<double><<<grid, threads, 0, stream>>>(g, r, o, k, m, ridge, pivot_floor, workspace);
    } else {
      ridge_solve_kernel<double><<<grid, threads, 0, stream>>>(g, r, o, batch, k, m, ridge, pivot_floor, workspace);
    }
  } else {
    auto* g = static_cast<const float*>(gram);
    auto* r = static_cast<const float*>(rhs);
    auto* o = static_cast<float*>(out);
    if (by_block) {
      ridge_solve_block_kernel<float><<<grid, threads, 0, stream>>>(g, r, o, k, m, ridge, pivot_floor, workspace);
    } else {
      ridge_solve_kernel<float><<<grid, threads, 0, stream>>>(g, r, o, batch, k, m, ridge, pivot_floor, workspace);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

int nonconflicting_dual(bool dbl, const void* gram, const void* rhs, void* out, int64_t batch,
                        int k, int m, double* workspace, int* int_workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool by_block = k >= kBlockSolverMinK && block_solvers_enabled();
  const unsigned grid = by_block ? static_cast<unsigned>(batch * m) : blocks_for(batch * m);
  const unsigned threads = by_block ? block_threads_for(k) : kThreads;
  if (dbl) {
    auto* g = static_cast<const double*>(gram);
    auto* r = static_cast<const double*>(rhs);
    auto* o = static_cast<double*>(out);
    if (by_block) {
      nonconflicting_dual_block_kernel<double><<<grid, threads, 0, stream>>>(g, r, o, k, m, workspace, int_workspace);
    } else {
      nonconflicting_dual_kernel<double><<<grid, threads, 0, stream>>>(g, r, o, batch, k, m, workspace, int_workspace);
    }
  } else {
    auto* g = static_cast<const float*>(gram);
    auto* r = static_cast<const float*>(rhs);
    auto* o = static_cast<float*>(out);
    if (by_block) {
      nonconflicting_dual_block_kernel<float><<<grid, threads, 0, stream>>>(g, r, o, k, m, workspace, int_workspace);
    } else {
      nonconflicting_dual_kernel<float><<<grid, threads, 0, stream>>>(g, r, o, batch, k, m, workspace, int_workspace);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

int pcgrad_weights(bool dbl, const void* gram, void* out, int64_t batch, int k, int64_t seed,
                   double* workspace, int* int_workspace, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t kk = static_cast<int64_t>(k) * k;
  double* gram_double = workspace;
  double* task_weights = workspace + batch * kk;
  if (dbl) {
    to_double_kernel<double><<<blocks_for(batch * kk), kThreads, 0, stream>>>(
        static_cast<const double*>(gram), gram_double, batch * kk);
  } else {
    to_double_kernel<float><<<blocks_for(batch * kk), kThreads, 0, stream>>>(
        static_cast<const float*>(gram), gram_double, batch * kk);
  }
  pcgrad_task_kernel<<<blocks_for(batch * k), kThreads, 0, stream>>>(
      gram_double, batch, k, seed, task_weights, int_workspace);
  if (dbl) {
    pcgrad_sum_kernel<double><<<blocks_for(batch * k), kThreads, 0, stream>>>(
        task_weights, static_cast<double*>(out), batch, k);
  } else {
    pcgrad_sum_kernel<float><<<blocks_for(batch * k), kThreads, 0, stream>>>(
        task_weights, static_cast<float*>(out), batch, k);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace mtunlearn

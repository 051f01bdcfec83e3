// The coefficient-space solvers of small_solvers.h for one problem on a group of cooperating
// threads: the CUDA backend runs them with one thread block per problem (k >= 32), and
// tests/cpp/block_solvers_emulation.cpp runs the same code on std::threads with a barrier, so
// that CI checks their logic without a GPU.
//
// The inner loops over rows are spread over the threads; the sequential order of the outer loops
// (Cholesky columns, coordinate-descent coordinates) is kept, so every entry sees the same
// operations in the same order as the one-thread code, except the back substitution, whose sums
// run in the opposite order (rounding-level differences).
//
// A Block provides: rank() and size(); sync() (a barrier that also orders memory); any(bool) and
// all(bool) (a barrier that reduces a flag); max(double) (a barrier that reduces a value). Values
// pass between threads through the workspace and the "shared" buffers only across those calls.
// No pointer here may be __restrict__: with noalias pointers nvcc kept a value loaded before a
// barrier instead of reloading it after (seen in the PTX of the back substitution).
#pragma once

#include "mtunlearn/small_solvers.h"

#if defined(__CUDACC__)
#define MTU_BLOCK __device__ inline
#else
#define MTU_BLOCK inline
#endif

namespace mtunlearn {
namespace block_solvers {

// solvers::cholesky_dropping with the rows of each column spread over the block. Returns the
// number of dropped rows (the same on every thread). s_pivot: one shared double.
template <class Block>
MTU_BLOCK int cholesky_dropping(Block& block, const double* a, int lda, const int* idx, int k_sub,
                                double lam, double relative_floor, double* l,
                                double* s_pivot) {
  const int rank = block.rank(), size = block.size();
  int dropped = 0;
  for (int j = 0; j < k_sub; ++j) {
    const int gj = idx ? idx[j] : j;
    if (rank == 0) {
      const double own = a[gj * lda + gj] + lam;
      double d = own;
      for (int p = 0; p < j; ++p) d -= l[j * k_sub + p] * l[j * k_sub + p];
      // 0: dropped (sqrt(d) > 0 otherwise)
      *s_pivot = (!(d > relative_floor * own + DBL_MIN) && d == d) ? 0.0 : sqrt(d);
    }
    block.sync();
    const double ljj = *s_pivot;
    for (int i = rank; i < j; i += size) l[i * k_sub + j] = 0.0;
    if (ljj == 0.0) {
      ++dropped;
      for (int i = j + rank; i < k_sub; i += size) l[i * k_sub + j] = 0.0;
    } else {
      if (rank == 0) l[j * k_sub + j] = ljj;
      for (int i = j + 1 + rank; i < k_sub; i += size) {
        const int gi = idx ? idx[i] : i;
        double s = a[gi * lda + gj];
        for (int p = 0; p < j; ++p) s -= l[i * k_sub + p] * l[j * k_sub + p];
        l[i * k_sub + j] = s / ljj;
      }
    }
    block.sync();
  }
  return dropped;
}

// solvers::cholesky_solve, column-oriented: once b[i] is final, every other row it enters
// subtracts its share at once. Dropped rows (diagonal 0) get 0.
template <class Block>
MTU_BLOCK void cholesky_solve(Block& block, const double* l, int k, double* b, int64_t inc) {
  const int rank = block.rank(), size = block.size();
  for (int i = 0; i < k; ++i) {
    const double lii = l[i * k + i];
    if (rank == 0) b[i * inc] = lii == 0.0 ? 0.0 : b[i * inc] / lii;
    block.sync();
    const double bi = b[i * inc];
    for (int p = i + 1 + rank; p < k; p += size) b[p * inc] -= l[p * k + i] * bi;
    block.sync();
  }
  for (int i = k - 1; i >= 0; --i) {
    const double lii = l[i * k + i];
    if (rank == 0 && lii != 0.0) b[i * inc] = b[i * inc] / lii;
    block.sync();
    const double bi = b[i * inc];
    for (int p = rank; p < i; p += size) b[p * inc] -= l[i * k + p] * bi;
    block.sync();
  }
}

// Copies n values of the input dtype into double, spread over the block; whether one of this
// thread's values is NaN or Inf (reduce with block.any).
template <class Block, typename A>
MTU_BLOCK bool load_as_double(const Block& block, const A* in, double* out, int64_t n) {
  bool bad = false;
  for (int64_t e = block.rank(); e < n; e += block.size()) {
    out[e] = static_cast<double>(in[e]);
    bad = bad || !solvers::is_finite(out[e]);
  }
  return bad;
}

// solvers::ridge_solve for one problem: gram k x k, rhs/out k x m (row stride m), in the input
// dtype A. workspace: 2 k^2 + k m doubles. s_scalar: one shared double.
template <class Block, typename A>
MTU_BLOCK void ridge_solve(Block& block, const A* gram, const A* rhs, A* out, int k, int m,
                           double ridge, double pivot_floor, double* workspace,
                           double* s_scalar) {
  const int rank = block.rank(), size = block.size();
  const int64_t kk = static_cast<int64_t>(k) * k, km = static_cast<int64_t>(k) * m;
  double* g = workspace;
  double* l = g + kk;
  double* r = l + kk;
  const bool bad_gram = load_as_double(block, gram, g, kk);
  const bool bad_rhs = load_as_double(block, rhs, r, km);
  if (block.any(bad_gram || bad_rhs)) {  // non-finite input must surface in the coefficients
    for (int64_t e = rank; e < km; e += size) out[e] = static_cast<A>(NAN);
    return;
  }
  if (rank == 0) s_scalar[0] = solvers::ridge_lambda(g, k, ridge);
  block.sync();
  const double lam = s_scalar[0];
  block.sync();
  cholesky_dropping(block, g, k, nullptr, k, lam, pivot_floor, l, s_scalar);
  for (int c = 0; c < m; ++c) cholesky_solve(block, l, k, r + c, m);
  for (int64_t e = rank; e < km; e += size) out[e] = static_cast<A>(r[e]);
}

// solvers::nonconflicting_dual for one (problem, row): gram k x k, c and out k, in the input
// dtype A; pivot_floor: the Gram's relative rounding level (the active-set fallback's dependence
// floor). workspace: 2 k^2 + 3k doubles; idx: k ints. Shared: s_w, s_grad, s_trial (k doubles
// each), s_scalar (one double), s_count (one int). Every thread computes each coordinate's step
// itself (same inputs, same result), so only the gradient update is shared out, with a barrier
// on each side of it.
template <class Block, typename A>
MTU_BLOCK void nonconflicting_dual(Block& block, const A* gram, const A* rhs, A* out, int k,
                                   double pivot_floor, double* workspace, int* idx, double* s_w, double* s_grad,
                                   double* s_trial, double* s_scalar, int* s_count) {
  const int rank = block.rank(), size = block.size();
  const int64_t kk = static_cast<int64_t>(k) * k;
  double* g = workspace;
  double* c = g + kk;
  double* factor = c + k;
  const bool bad_gram = load_as_double(block, gram, g, kk);
  const bool bad_rhs = load_as_double(block, rhs, c, k);
  if (block.any(bad_gram || bad_rhs)) {
    for (int e = rank; e < k; e += size) out[e] = static_cast<A>(NAN);
    return;
  }
  double local_scale = 0.0;
  for (int i = rank; i < k; i += size) {
    s_w[i] = 0.0;
    s_grad[i] = c[i];
    const double gii = g[i * k + i];
    if (gii > 0.0) local_scale = solvers::dmax(local_scale, solvers::dabs(c[i]) / sqrt(gii));
  }
  const double scale = block.max(local_scale);  // its barrier also publishes s_w and s_grad
  if (scale == 0.0) {
    for (int e = rank; e < k; e += size) out[e] = static_cast<A>(0.0);
    return;
  }
  const double tol = solvers::dual_tolerance(scale);
  const int max_sweeps = solvers::dual_max_sweeps(k);
  bool converged = false;
  for (int sweep = 0; sweep < max_sweeps && !converged; ++sweep) {
    double largest = 0.0;
    for (int i = 0; i < k; ++i) {
      const double gii = g[i * k + i];
      if (!(gii > 0.0)) continue;
      const double next = solvers::dual_coordinate_step(s_w[i], s_grad[i], gii);
      const double delta = next - s_w[i];
      if (delta != 0.0) {  // the same on every thread
        block.sync();      // everyone has read s_w[i] and s_grad[i]
        if (rank == 0) s_w[i] = next;
        for (int j = rank; j < k; j += size) s_grad[j] += delta * g[i * k + j];
        largest = solvers::dmax(largest, solvers::dabs(delta) * sqrt(gii));
        block.sync();
      }
    }
    converged = largest <= tol;  // the same on every thread
    if (!converged && sweep + 1 == solvers::dual_rank_check_sweep()) {
      // As in solvers::nonconflicting_dual: stop on a singular Gram.
      if (rank == 0) {
        int count = 0;
        for (int i = 0; i < k; ++i)
          if (g[i * k + i] > 0.0) idx[count++] = i;
        *s_count = count;
      }
      block.sync();
      const int count = *s_count;
      block.sync();
      const int dropped =
          cholesky_dropping(block, g, k, idx, count, 0.0, pivot_floor, factor, s_scalar);
      if (dropped > 0) break;
    }
  }
  // Polish on the active set, as in solvers::nonconflicting_dual.
  if (rank == 0) {
    int na = 0;
    for (int i = 0; i < k; ++i)
      if (s_w[i] > 0.0) idx[na++] = i;
    *s_count = na;
  }
  block.sync();
  const int na = *s_count;
  block.sync();
  bool keep_descent = na == 0;
  if (!keep_descent)
    keep_descent = cholesky_dropping(block, g, k, idx, na, 0.0, 1e-9, factor, s_scalar) > 0;
  if (!keep_descent) {
    for (int a = rank; a < na; a += size) s_trial[a] = -c[idx[a]];
    block.sync();
    cholesky_solve(block, factor, na, s_trial, 1);
    bool positive = true;
    for (int a = rank; a < na; a += size) positive = positive && s_trial[a] > 0.0;
    keep_descent = !block.all(positive);
  }
  if (!keep_descent) {
    bool violated = false;
    for (int i = rank; i < k; i += size) {
      if (s_w[i] > 0.0) continue;  // active: idx holds exactly the i with w_i > 0
      double gi = c[i];
      for (int a = 0; a < na; ++a) gi += g[i * k + idx[a]] * s_trial[a];
      violated = violated || gi < -1e-9 * scale * sqrt(solvers::dmax(g[i * k + i], 0.0));
    }
    keep_descent = block.any(violated);
  }
  if (!keep_descent) {
    for (int i = rank; i < k; i += size) s_w[i] = 0.0;
    block.sync();
    for (int a = rank; a < na; a += size) s_w[idx[a]] = s_trial[a];
    block.sync();
  } else if (!converged && na > 0) {
    // As in solvers::nonconflicting_dual: the exact active-set method, on one thread (it is the
    // rare case of dependent rows and a descent out of sweeps; its steps are sequential). s_w
    // holds the descent iterate, which it keeps if its own budget runs out on a worse one.
    // With no active row there is nothing to polish and the iterate stands (dual_polish's
    // `na == 0`), also when the descent did not converge (NaN from an overflowing Gram).
    if (rank == 0) solvers::dual_active_set(g, k, c, scale, pivot_floor, s_w, factor, idx);
    block.sync();
  }
  for (int e = rank; e < k; e += size) out[e] = static_cast<A>(s_w[e]);
}

}  // namespace block_solvers
}  // namespace mtunlearn

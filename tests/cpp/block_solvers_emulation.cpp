// Runs the block-cooperative solvers of include/mtunlearn/block_solvers.h (what the CUDA backend
// runs with one thread block per problem) on std::threads, one per CUDA thread, with a
// std::barrier for __syncthreads(), and compares them with the one-thread solvers of
// small_solvers.h (what the CPU backend runs, itself checked against references by the Python
// tests). This checks the algorithms' logic and their barriers without a GPU; what only a GPU
// shows (memory model, code generation) is left to benchmarks/gpu_check.py.
//
// Built and run by tests/test_block_solvers.py; exit status 0 when every case agrees.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "mtunlearn/block_solvers.h"

namespace {

using namespace mtunlearn;

struct SharedSlots {
  explicit SharedSlots(int n) : values(n), flags(n) {}
  std::vector<double> values;
  std::vector<char> flags;
};

// block_solvers.h's Block on threads: barriers through std::barrier, reductions through one slot
// per thread read after a barrier (and a second barrier before the slots are reused).
class ThreadBlock {
 public:
  ThreadBlock(int rank, int size, std::barrier<>& barrier, SharedSlots& slots)
      : rank_(rank), size_(size), barrier_(barrier), slots_(slots) {}
  int rank() const { return rank_; }
  int size() const { return size_; }
  void sync() { barrier_.arrive_and_wait(); }
  bool any(bool v) { return reduce_flag(v, false); }
  bool all(bool v) { return reduce_flag(v, true); }
  double max(double v) {
    slots_.values[rank_] = v;
    sync();
    double m = slots_.values[0];
    for (int i = 1; i < size_; ++i) m = solvers::dmax(m, slots_.values[i]);
    sync();
    return m;
  }

 private:
  bool reduce_flag(bool v, bool all) {
    slots_.flags[rank_] = v;
    sync();
    bool r = all;
    for (int i = 0; i < size_; ++i) r = all ? (r && slots_.flags[i]) : (r || slots_.flags[i]);
    sync();
    return r;
  }
  int rank_, size_;
  std::barrier<>& barrier_;
  SharedSlots& slots_;
};

template <class Body>
void run_block(int threads, Body body) {
  std::barrier<> barrier(threads);
  SharedSlots slots(threads);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      ThreadBlock block(t, threads, barrier, slots);
      body(block);
    });
  for (auto& th : pool) th.join();
}

int failures = 0;

void expect_close(const char* what, int k, int threads, const std::vector<double>& got,
                  const std::vector<double>& want, double rel) {
  double scale = 0.0, worst = 0.0;
  bool nan_mismatch = false;
  for (size_t e = 0; e < want.size(); ++e) {
    if (std::isnan(want[e]) || std::isnan(got[e])) {
      nan_mismatch = nan_mismatch || std::isnan(want[e]) != std::isnan(got[e]);
      continue;
    }
    scale = std::max(scale, std::fabs(want[e]));
    worst = std::max(worst, std::fabs(got[e] - want[e]));
  }
  const bool ok = !nan_mismatch && worst <= rel * std::max(scale, 1e-300);
  std::printf("%-34s k=%3d threads=%3d  max|block - one thread| = %.3g (scale %.3g)%s\n", what, k,
              threads, worst, scale, ok ? "" : "  <-- MISMATCH");
  failures += ok ? 0 : 1;
}

// G = R R^T for R of `rank` random rows of length `cols`, scaled so that its entries are O(1).
std::vector<double> gram_of_random_rows(int k, int cols, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> r(static_cast<size_t>(k) * cols), g(static_cast<size_t>(k) * k);
  for (auto& v : r) v = normal(rng);
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      double s = 0.0;
      for (int p = 0; p < cols; ++p) s += r[i * cols + p] * r[j * cols + p];
      g[i * k + j] = s / cols;
    }
  return g;
}

// More rows than dimensions (k > cols), all close to one common direction (a_i u + noise):
// singular and ill-conditioned, the case where the dual's descent runs out of sweeps, its polish
// meets dependent rows and the exact active-set fallback finishes (excluding rows that its
// Cholesky drops as dependent).
std::vector<double> gram_of_correlated_rows(int k, int cols, double noise, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> u(cols), r(static_cast<size_t>(k) * cols), g(static_cast<size_t>(k) * k);
  for (auto& v : u) v = normal(rng);
  for (int i = 0; i < k; ++i) {
    const double a = normal(rng);
    for (int p = 0; p < cols; ++p) r[i * cols + p] = a * u[p] + noise * normal(rng);
  }
  for (int i = 0; i < k; ++i)
    for (int j = 0; j < k; ++j) {
      double s = 0.0;
      for (int p = 0; p < cols; ++p) s += r[i * cols + p] * r[j * cols + p];
      g[i * k + j] = s;
    }
  return g;
}

void check_ridge(const char* what, int k, int m, int threads, const std::vector<double>& g,
                 double ridge, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::vector<double> rhs(static_cast<size_t>(k) * m), want(rhs.size()), got(rhs.size(), -7.0);
  for (auto& v : rhs) v = normal(rng);
  std::vector<double> scratch(static_cast<size_t>(k) * k);
  solvers::ridge_solve(g.data(), k, rhs.data(), m, ridge, 1e-12, want.data(), scratch.data());
  std::vector<double> workspace(2 * static_cast<size_t>(k) * k + static_cast<size_t>(k) * m, -7.0);
  double s_scalar = 0.0;
  run_block(threads, [&](ThreadBlock& block) {
    block_solvers::ridge_solve(block, g.data(), rhs.data(), got.data(), k, m, ridge, 1e-12,
                               workspace.data(), &s_scalar);
  });
  expect_close(what, k, threads, got, want, 1e-9);
}

void check_dual(const char* what, int k, int threads, const std::vector<double>& g,
                std::vector<double> c, double pivot_floor = 1e-14) {
  std::vector<double> want(k), got(k, -7.0), scratch(static_cast<size_t>(k) * k + 2 * k);
  std::vector<int> idx(k);
  solvers::nonconflicting_dual(g.data(), k, c.data(), pivot_floor, want.data(), scratch.data(),
                               idx.data());
  std::vector<double> workspace(2 * static_cast<size_t>(k) * k + 4 * k, -7.0);
  std::vector<double> s_w(k), s_grad(k), s_trial(k);
  std::vector<int> block_idx(k, -1);
  double s_scalar = 0.0;
  int s_count = 0;
  run_block(threads, [&](ThreadBlock& block) {
    block_solvers::nonconflicting_dual(block, g.data(), c.data(), got.data(), k, pivot_floor,
                                       workspace.data(), block_idx.data(), s_w.data(), s_grad.data(),
                                       s_trial.data(), &s_scalar, &s_count);
  });
  expect_close(what, k, threads, got, want, 1e-9);
}

}  // namespace

int main() {
  std::mt19937_64 rng(2026);
  std::normal_distribution<double> normal;
  struct Size { int k, threads; };
  // Thread counts below k exercise the strided loops; CUDA uses 32-256, the logic is the same.
  for (const Size size : {Size{32, 32}, Size{45, 8}, Size{100, 7}, Size{256, 4}}) {
    const int k = size.k, threads = size.threads;
    const std::vector<double> well = gram_of_random_rows(k, 2 * k, rng);
    check_ridge("ridge, well-conditioned", k, 3, threads, well, 1e-6, rng);
    check_ridge("ridge 0, one rhs", k, 1, threads, well, 0.0, rng);
    const std::vector<double> singular = gram_of_random_rows(k, 5, rng);  // rank 5: drops rows
    check_ridge("ridge 0, singular (dropped rows)", k, 2, threads, singular, 0.0, rng);
    std::vector<double> bad = well;
    bad[1] = NAN;
    check_ridge("ridge, NaN in the Gram", k, 2, threads, bad, 1e-6, rng);

    std::vector<double> c(k);
    for (auto& v : c) v = normal(rng) - 0.3;  // conflicts with some constraints, not all
    check_dual("dual, mixed active set", k, threads, well, c);
    check_dual("dual, singular Gram", k, threads, singular, c);
    check_dual("dual, nothing conflicts", k, threads, well, std::vector<double>(k, 1.0));
    check_dual("dual, zero rhs", k, threads, well, std::vector<double>(k, 0.0));
    check_dual("dual, NaN in the Gram", k, threads, bad, c);
    // k > n, rows near one direction: the active-set fallback, at both dtypes' floors.
    const std::vector<double> correlated = gram_of_correlated_rows(k, k / 2, 1e-3, rng);
    std::vector<double> c_corr(k);
    for (auto& v : c_corr) v = 3.0 * normal(rng);
    check_dual("dual, k > n correlated (active set)", k, threads, correlated, c_corr);
    check_dual("dual, the same at the fp32 floor", k, threads, correlated, c_corr, 1e-6);
    // Not positive semi-definite: the descent overflows (NaN) out of sweeps with no active row.
    // The one-thread solver returns that iterate (the polish has nothing to solve); the block
    // solver ran the exact active-set method instead and returned finite weights.
    std::vector<double> indefinite(static_cast<size_t>(k) * k, 0.0);
    for (int i = 0; i < k; ++i) indefinite[i * k + i] = 1.0;
    indefinite[1] = indefinite[k] = -2.0;
    check_dual("dual, indefinite (descent overflows)", k, threads, indefinite,
               std::vector<double>(k, -1.0));
  }
  std::printf("%s: %d mismatching case(s)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}

// Coefficient-space solvers shared by the CPU and CUDA backends: the tiny k x k problems that
// sit between a Gram pass and a combine pass. Plain C++ (no torch headers) so that nvcc compiles
// the same code for one-thread-per-problem device kernels. Everything is done in double: the
// problems are tiny and their conditioning is the user's (Gram matrices square it).
#pragma once

#include <cmath>
#include <cstdint>
#include <cfloat>

#if defined(__CUDACC__)
#define MTU_HD __host__ __device__ inline
#else
#define MTU_HD inline
#endif

namespace mtunlearn {
namespace solvers {

constexpr int kMaxSolverK = 256;

MTU_HD double dmax(double a, double b) { return a > b ? a : b; }
MTU_HD double dabs(double a) { return a < 0 ? -a : a; }
MTU_HD bool is_finite(double v) { return v - v == 0.0; }  // false for NaN and +-Inf

// lambda = ridge * trace(G) / k (+ the smallest normal double, so that an all-zero Gram still
// yields an invertible system). Must match mtunlearn_ext.ops._reference.ridge_lambda.
// The dual coordinate descent of nonconflicting_dual, shared with its block form
// (block_solvers.h) so that both run the same operations in the same order: the tolerance on
// the largest step of a sweep, the sweep budget, and one coordinate's projected Newton step
// (w_i >= 0).
MTU_HD double dual_tolerance(double scale) { return 1e-13 * scale; }
MTU_HD int dual_max_sweeps(int k) { return 200 + 40 * k; }
// A descent not converged after this many sweeps looks at its Gram once: on a singular one (a
// row that depends on the others to the Gram's rounding level: more tasks than dimensions,
// k > n, or duplicated tasks) it stops there for the exact active-set method, whose passive set
// never holds more rows than the rank and whose factor grows a row at a time (O(k r^2) in all
// for rank r, less than k of the descent's O(k^2) sweeps). The descent itself crawls on such a
// Gram and used to run its whole budget first: 12 s for one UPGrad of a [128, 40] matrix,
// 261 s at [256, 40] (drop-in review); a hand-over only at rank <= k / 2 still took 185 s at
// [256, 130].
MTU_HD int dual_rank_check_sweep() { return 50; }
MTU_HD double dual_coordinate_step(double w, double grad, double gii) {
  const double next = w - grad / gii;
  return next < 0.0 ? 0.0 : next;
}

MTU_HD double ridge_lambda(const double* gram, int k, double ridge) {
  double trace = 0.0;
  for (int i = 0; i < k; ++i) trace += gram[i * k + i];
  const double mean_diag = k > 0 ? trace / k : 0.0;
  return ridge * (mean_diag > 0.0 ? mean_diag : 0.0) + DBL_MIN;
}

// Cholesky of (A + lam I) restricted to the rows/cols listed in `idx` (size k_sub), reading A
// with leading dimension `lda` and writing L into `l` (k_sub x k_sub, row-major). A pivot at or
// below `relative_floor` times the row's own diagonal (A_jj + lam; the Gram's relative rounding
// level) means that row depends on the previous ones to rounding: its part outside their span is
// at most sqrt(relative_floor) of its own norm. It is dropped (its column of L is zero and its
// diagonal is the sentinel 0, so cholesky_solve gives it a zero coefficient). For dependent rows
// that is still the exact least-squares projection (they add nothing to the span), and unlike
// clamping the pivot it cannot amplify rounding noise. The floor is the row's own: a pivot's
// rounding scales with its row's norm, and a row that is merely small (a task gradient 1e4 times
// shorter than another) is as independent as a large one (a floor relative to the largest
// diagonal dropped such rows, leaving their directions unprojected). NaN pivots are kept so
// that non-finite inputs surface. Returns the number of dropped rows.
// `ldl` is L's leading dimension (k_sub when omitted).
MTU_HD int cholesky_dropping(const double* a, int lda, const int* idx, int k_sub, double lam,
                             double relative_floor, double* l, int ldl) {
  int dropped = 0;
  for (int j = 0; j < k_sub; ++j) {
    const int gj = idx ? idx[j] : j;
    const double own = a[gj * lda + gj] + lam;
    double d = own;
    for (int p = 0; p < j; ++p) d -= l[j * ldl + p] * l[j * ldl + p];
    for (int i = 0; i < j; ++i) l[i * ldl + j] = 0.0;
    if (!(d > relative_floor * own + DBL_MIN) && d == d) {
      ++dropped;
      for (int i = j; i < k_sub; ++i) l[i * ldl + j] = 0.0;
      continue;
    }
    const double ljj = sqrt(d);
    l[j * ldl + j] = ljj;
    for (int i = j + 1; i < k_sub; ++i) {
      const int gi = idx ? idx[i] : i;
      double s = a[gi * lda + gj];
      for (int p = 0; p < j; ++p) s -= l[i * ldl + p] * l[j * ldl + p];
      l[i * ldl + j] = s / ljj;
    }
  }
  return dropped;
}

MTU_HD int cholesky_dropping(const double* a, int lda, const int* idx, int k_sub, double lam,
                             double relative_floor, double* l) {
  return cholesky_dropping(a, lda, idx, k_sub, lam, relative_floor, l, k_sub);
}

// Extends the factor of cholesky_dropping(a, lda, idx, n, 0, relative_floor, l, ldl) by the row
// idx[n]: the values, in the same order of operations, that the whole factorization of n + 1
// rows would give (its first n rows do not depend on the new one), in O(n^2) instead of O(n^3).
// Returns whether the new row was dropped (its pivot at the floor; its row of L is then zero).
MTU_HD bool cholesky_append(const double* a, int lda, const int* idx, int n, double relative_floor,
                            double* l, int ldl) {
  const int gn = idx[n];
  double* row = l + n * ldl;
  for (int j = 0; j < n; ++j) {
    const double ljj = l[j * ldl + j];
    if (ljj == 0.0) {  // row j was dropped: its column is zero
      row[j] = 0.0;
      continue;
    }
    double s = a[gn * lda + idx[j]];
    for (int p = 0; p < j; ++p) s -= row[p] * l[j * ldl + p];
    row[j] = s / ljj;
  }
  const double own = a[gn * lda + gn];
  double d = own;
  for (int p = 0; p < n; ++p) d -= row[p] * row[p];
  if (!(d > relative_floor * own + DBL_MIN) && d == d) {
    for (int j = 0; j <= n; ++j) row[j] = 0.0;
    return true;
  }
  row[n] = sqrt(d);
  return false;
}

// Solve L L^T x = b in place (L: k x k with leading dimension ldl; b has stride `inc`); dropped
// rows (diagonal 0) get x = 0.
MTU_HD void cholesky_solve(const double* l, int ldl, int k, double* b, int64_t inc) {
  for (int i = 0; i < k; ++i) {
    const double lii = l[i * ldl + i];
    if (lii == 0.0) {
      b[i * inc] = 0.0;
      continue;
    }
    double s = b[i * inc];
    for (int p = 0; p < i; ++p) s -= l[i * ldl + p] * b[p * inc];
    b[i * inc] = s / lii;
  }
  for (int i = k - 1; i >= 0; --i) {
    const double lii = l[i * ldl + i];
    if (lii == 0.0) continue;
    double s = b[i * inc];
    for (int p = i + 1; p < k; ++p) s -= l[p * ldl + i] * b[p * inc];
    b[i * inc] = s / lii;
  }
}

MTU_HD void cholesky_solve(const double* l, int k, double* b, int64_t inc) {
  cholesky_solve(l, k, k, b, inc);
}

// (G + lam I) X = RHS for one problem. gram: k x k (double); rhs/out: k x m with row stride m.
// Rows whose pivot falls to pivot_floor times their own diagonal are dropped as dependent:
// `pivot_floor` is the relative rounding level of the Gram (1e-6 when it was accumulated in
// fp32, 1e-12 in fp64), so even ridge = 0 gives the finite least-squares projection on a
// singular Gram.
// scratch: k*k doubles.
MTU_HD void ridge_solve(const double* gram, int k, const double* rhs, int m, double ridge,
                        double pivot_floor, double* out, double* scratch) {
  bool finite = true;
  for (int i = 0; i < k * k; ++i) finite = finite && is_finite(gram[i]);
  for (int i = 0; i < k * m; ++i) finite = finite && is_finite(rhs[i]);
  if (!finite) {  // non-finite input must surface in the coefficients, not be dropped
    for (int i = 0; i < k * m; ++i) out[i] = NAN;
    return;
  }
  const double lam = ridge_lambda(gram, k, ridge);
  cholesky_dropping(gram, k, nullptr, k, lam, pivot_floor, scratch);
  for (int i = 0; i < k * m; ++i) out[i] = rhs[i];
  for (int c = 0; c < m; ++c) cholesky_solve(scratch, k, out + c, m);
}

// The dual objective 1/2 w^T G w + c^T w (= 1/2 |R^T w + g|^2 - 1/2 |g|^2): which of two
// feasible iterates is the better answer.
MTU_HD double dual_objective(const double* gram, int k, const double* c, const double* w) {
  double f = 0.0;
  for (int i = 0; i < k; ++i) {
    if (w[i] == 0.0) continue;
    double gw = 0.0;
    for (int j = 0; j < k; ++j) gw += gram[i * k + j] * w[j];
    f += w[i] * (0.5 * gw + c[i]);
  }
  return f;
}

// The exact dual by Lawson and Hanson's active-set method, the fallback of
// nonconflicting_dual when its coordinate descent ran out of sweeps (or stopped early on a
// singular Gram: dual_rank_check_sweep) and the polish below could not finish it (dependent
// constraint rows, e.g. more tasks than dimensions, make G singular and the descent slow). The
// Cholesky factor of the passive rows grows by a row as one joins (cholesky_append); when rows
// leave, its rows before the first of them stand and the rest grow back the same way (the same
// values as a factorization anew, which cost 60% of a [256, 130] UPGrad: 1.36x faster). It
// solves min_{w >= 0} 1/2 w^T G w + c^T w (the NNLS
// min |R^T w + g| in Gram form) from w = 0: a coordinate whose constraint is violated most
// (relative to |r_j|) joins the passive set P; the problem restricted to P is solved exactly,
// and if that leaves a coordinate <= 0, the iterate moves toward it until the first coordinate
// reaches 0, which leaves P. Each outer step lowers the objective.
//
// A row whose Cholesky pivot on joining P falls to `pivot_floor` times its own diagonal (the
// Gram's relative rounding level) lies in the span of P to that level: the solve gives it a zero coefficient and
// drops it again, and its violation is the rounding of its dependence (d is orthogonal to the
// passive rows; this needs c = R g, the projection's form: for c outside the span of G's
// columns a dependent row's violation can be real and the answer misses the optimum, see
// mtunlearn_ext.ops.nonconflicting_dual), so it is excluded from selection until a row leaves
// P, after which it may be independent again. (Re-adding it every step used to exhaust the
// budget and return the unconverged descent iterate.) Exclusions do not use the budget: at most
// k of them between two real steps. The floor must be the rounding level and no more: a row
// whose independent part is small but above it can still move the projection by O(|d|) (1e-9
// in fp64 left results 0.7 |g| off SciPy's NNLS, 1e-12 some 2e-3 |g|, at cond(R) 1e3-1e4).
//
// Returns true, with its answer in w_out, once the KKT conditions hold on the rows not
// excluded. If its budget runs out (a cycle from rounding) it returns false and leaves in w_out
// the better, by the dual objective, of its own iterate and what w_out held (the caller's
// descent iterate); both are feasible (w >= 0).
// scratch: 2k + k*k doubles; idx: k ints (the passive set from the front, the excluded rows
// from the back).
MTU_HD bool dual_active_set(const double* gram, int k, const double* c, double scale,
                            double pivot_floor, double* w_out, double* scratch, int* idx) {
  double* w = scratch;              // k
  double* z = scratch + k;          // k
  double* factor = scratch + 2 * k; // k*k
  // w marks each row's state, so that the scan below skips rows in O(1): a passive row's
  // w_j > 0 whenever a row is selected (the inner loop drops the rest), a free row's is 0, and
  // an excluded row's is kExcluded until the exclusions are lifted (then 0 again).
  constexpr double kExcluded = -1.0;
  for (int i = 0; i < k; ++i) w[i] = 0.0;
  int np = 0;  // passive rows: idx[0, np)
  int ne = 0;  // excluded rows (dependent on the passive ones): idx[k - ne, k)
  int factored = 0;  // factor (leading dimension k) holds the Cholesky of idx[0, factored)
  for (int outer = 0; outer < 3 * k + 10;) {
    int best = -1;
    double most = -1e-9 * scale;  // a violation below this is rounding
    for (int j = 0; j < k; ++j) {
      const double gjj = gram[j * k + j];
      if (!(gjj > 0.0)) continue;  // r_j = 0: its constraint always holds
      if (w[j] != 0.0) continue;   // passive or excluded
      double gj = c[j];
      for (int a = 0; a < np; ++a) gj += gram[j * k + idx[a]] * w[idx[a]];
      const double violation = gj / sqrt(gjj);  // <d, r_j> / |r_j|
      if (violation < most) {
        most = violation;
        best = j;
      }
    }
    if (best < 0) {
      for (int a = k - ne; a < k; ++a) w[idx[a]] = 0.0;
      for (int i = 0; i < k; ++i) w_out[i] = w[i];
      return true;
    }
    idx[np] = best;  // np + ne < k: best was neither passive nor excluded
    for (; factored < np; ++factored)
      cholesky_append(gram, k, idx, factored, pivot_floor, factor, k);
    ++np;
    factored = np;
    if (cholesky_append(gram, k, idx, np - 1, pivot_floor, factor, k)) {  // best depends on P
      factored = --np;
      idx[k - 1 - ne] = best;
      ++ne;
      w[best] = kExcluded;
      continue;
    }
    ++outer;
    for (int inner = 0; inner <= k && np > 0; ++inner) {
      for (; factored < np; ++factored)
        cholesky_append(gram, k, idx, factored, pivot_floor, factor, k);
      for (int a = 0; a < np; ++a) z[a] = -c[idx[a]];
      cholesky_solve(factor, k, np, z, 1);
      bool positive = true;
      for (int a = 0; a < np; ++a) positive = positive && z[a] > 0.0;
      if (positive) {
        for (int a = 0; a < np; ++a) w[idx[a]] = z[a];
        break;
      }
      double alpha = 1.0;
      int limit = -1;
      for (int a = 0; a < np; ++a) {
        if (z[a] > 0.0) continue;
        const double wa = w[idx[a]];
        const double ratio = wa > 0.0 ? wa / (wa - z[a]) : 0.0;
        if (limit < 0 || ratio < alpha) {
          alpha = ratio;
          limit = a;
        }
      }
      int kept = 0;
      int first_left = np;
      for (int a = 0; a < np; ++a) {
        const int i = idx[a];
        w[i] += alpha * (z[a] - w[i]);
        if (a == limit || !(w[i] > 0.0)) {
          w[i] = 0.0;
          if (first_left == np) first_left = a;
        } else {
          idx[kept++] = i;
        }
      }
      np = kept;
      // Rows left P. The factor's rows before the first of them stand (a row of L depends only
      // on the rows before it, and the passive rows keep their order); the rest is extended
      // again row by row (cholesky_append: the values a whole factorization would give, but
      // for a dropped row's off-diagonal entries, zero here, which no solve reads).
      factored = first_left;
      // A row left P: the rows excluded as dependent on P may not be any more.
      for (int a = k - ne; a < k; ++a) w[idx[a]] = 0.0;
      ne = 0;
    }
  }
  for (int a = k - ne; a < k; ++a) w[idx[a]] = 0.0;
  if (dual_objective(gram, k, c, w) < dual_objective(gram, k, c, w_out))
    for (int i = 0; i < k; ++i) w_out[i] = w[i];
  return false;
}

// Keeps w when the exact solve on its active set (G_AA w_A = -c_A) gives w_A > 0 and the
// inactive constraints a non-negative gradient (KKT): true then, with w exact to rounding.
// A singular active block (dependent r_j) has no unique solution: false.
MTU_HD bool dual_polish(const double* gram, int k, const double* c, double scale, double* w,
                        double* trial, double* factor, int* idx) {
  int na = 0;
  for (int i = 0; i < k; ++i)
    if (w[i] > 0.0) idx[na++] = i;
  if (na == 0) return true;
  if (cholesky_dropping(gram, k, idx, na, 0.0, 1e-9, factor) > 0) return false;
  for (int a = 0; a < na; ++a) trial[a] = -c[idx[a]];
  cholesky_solve(factor, na, trial, 1);
  for (int a = 0; a < na; ++a)
    if (!(trial[a] > 0.0)) return false;
  for (int i = 0; i < k; ++i) {
    bool active = false;
    for (int a = 0; a < na; ++a) active = active || idx[a] == i;
    if (active) continue;
    double gi = c[i];
    for (int a = 0; a < na; ++a) gi += gram[i * k + idx[a]] * trial[a];
    if (gi < -1e-9 * scale * sqrt(dmax(gram[i * k + i], 0.0))) return false;
  }
  for (int i = 0; i < k; ++i) w[i] = 0.0;
  for (int a = 0; a < na; ++a) w[idx[a]] = trial[a];
  return true;
}

// Whether a row of G with G_ii > 0 depends on the others (to `pivot_floor`, as in the
// active-set method). idx: k ints; factor: k*k doubles.
MTU_HD bool gram_singular(const double* gram, int k, double pivot_floor, double* factor, int* idx) {
  int count = 0;
  for (int i = 0; i < k; ++i)
    if (gram[i * k + i] > 0.0) idx[count++] = i;
  return cholesky_dropping(gram, k, idx, count, 0.0, pivot_floor, factor) > 0;
}

// min_{w >= 0} 1/2 w^T G w + c^T w, the dual of projecting g onto {d : <d, r_j> >= 0} with
// G = R R^T, c = R g (then d = g + w R). Projected coordinate descent (Gauss-Seidel, keeping
// grad = G w + c current) to a relative tolerance, then an exact solve on the active set that
// is kept when it satisfies the KKT conditions (dual_polish); when neither the descent
// converged nor the polish succeeded, the exact active-set method (dual_active_set, whose
// dependence floor is `pivot_floor` times a row's own diagonal: the Gram's relative rounding
// level, 1e-14 for a float64 Gram and 1e-6 for float32). Non-finite input gives an all-NaN w.
// scratch: k*k + 2k doubles + k ints (idx). `singular`, where given, caches the Gram's
// dependence test (gram_singular: O(k^3)) for the other right-hand sides of the same Gram:
// -1 until it is computed, then 0 or 1.
MTU_HD void nonconflicting_dual(const double* gram, int k, const double* c, double pivot_floor,
                                double* w, double* scratch, int* idx, int* singular = nullptr) {
  bool finite = true;
  for (int i = 0; i < k * k; ++i) finite = finite && is_finite(gram[i]);
  for (int i = 0; i < k; ++i) finite = finite && is_finite(c[i]);
  if (!finite) {
    for (int i = 0; i < k; ++i) w[i] = NAN;
    return;
  }
  double* grad = scratch;           // k
  double* trial = scratch + k;      // k
  double* factor = scratch + 2 * k; // k*k
  // Scale of the problem in d-space: the largest projection of g on a direction r_i.
  double scale = 0.0;
  for (int i = 0; i < k; ++i) {
    w[i] = 0.0;
    grad[i] = c[i];
    const double gii = gram[i * k + i];
    if (gii > 0.0) scale = dmax(scale, dabs(c[i]) / sqrt(gii));
  }
  if (scale == 0.0) return;  // g is orthogonal to every r_j (or every r_j is zero)
  const double tol = dual_tolerance(scale);
  const int max_sweeps = dual_max_sweeps(k);
  bool converged = false;
  for (int sweep = 0; sweep < max_sweeps && !converged; ++sweep) {
    double largest = 0.0;
    for (int i = 0; i < k; ++i) {
      const double gii = gram[i * k + i];
      if (!(gii > 0.0)) continue;  // r_i = 0: its constraint always holds
      const double next = dual_coordinate_step(w[i], grad[i], gii);
      const double delta = next - w[i];
      if (delta != 0.0) {
        w[i] = next;
        for (int j = 0; j < k; ++j) grad[j] += delta * gram[i * k + j];
        largest = dmax(largest, dabs(delta) * sqrt(gii));
      }
    }
    converged = largest <= tol;
    if (!converged && sweep + 1 == dual_rank_check_sweep()) {
      int dependent = singular ? *singular : -1;
      if (dependent < 0) {
        dependent = gram_singular(gram, k, pivot_floor, factor, idx) ? 1 : 0;
        if (singular) *singular = dependent;
      }
      if (dependent) break;
    }
  }
  if (dual_polish(gram, k, c, scale, w, trial, factor, idx) || converged) return;
  dual_active_set(gram, k, c, scale, pivot_floor, w, scratch, idx);
}

// splitmix64: the generator behind PCGrad's task orders; must match
// mtunlearn_ext.ops._reference.pcgrad_order.
MTU_HD uint64_t splitmix64_next(uint64_t* state) {
  *state += 0x9E3779B97F4A7C15ull;
  uint64_t z = *state;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// order: k-1 ints, the other tasks in the order task `task` is projected against them.
MTU_HD void pcgrad_order(int k, int task, int64_t seed, int* order) {
  int n = 0;
  for (int j = 0; j < k; ++j)
    if (j != task) order[n++] = j;
  if (seed < 0) return;
  uint64_t state = static_cast<uint64_t>(seed) ^ (0xD1B54A32D192ED03ull * static_cast<uint64_t>(task + 1));
  for (int t = n - 1; t > 0; --t) {
    const uint64_t r = splitmix64_next(&state);
    const int pick = static_cast<int>(r % static_cast<uint64_t>(t + 1));
    const int tmp = order[t];
    order[t] = order[pick];
    order[pick] = tmp;
  }
}

// PCGrad in coefficient space, one task: v starts at e_task and, for each j in the task's
// order, v -= min(<v, x_j>, 0) / |x_j|^2 e_j with <v, x_j> = v . G[:, j]. Tasks are independent
// (the CUDA backend runs one thread per task). order: k ints.
// A NaN or Inf in the task's row of G makes v all-NaN: every entry of G is in some task's row, so
// non-finite input always surfaces in the summed weights, as in ridge_solve and
// nonconflicting_dual (the steps alone can lose it: k = 1 reads no entry, a +Inf <v, x_j> is no
// conflict).
MTU_HD void pcgrad_task_weights(const double* gram, int k, int64_t seed, int task, double* v,
                                int* order) {
  bool finite = true;
  for (int l = 0; l < k; ++l) finite = finite && is_finite(gram[task * k + l]);
  for (int l = 0; l < k; ++l) v[l] = !finite ? NAN : l == task ? 1.0 : 0.0;
  if (!finite) return;
  pcgrad_order(k, task, seed, order);
  for (int t = 0; t < k - 1; ++t) {
    const int j = order[t];
    double dot = 0.0;
    for (int l = 0; l < k; ++l) dot += v[l] * gram[l * k + j];
    const double gjj = gram[j * k + j];
    if (dot < 0.0 && gjj > 0.0) v[j] -= dot / gjj;
    else if (dot != dot) v[j] = NAN;
  }
}

// PCGrad's weights: total[l] = sum_i v_i[l], summed over tasks i in index order (the CUDA
// backend sums in the same order, so both give the same bits up to FMA contraction).
// scratch: k doubles; order: k ints.
MTU_HD void pcgrad_weights(const double* gram, int k, int64_t seed, double* total,
                           double* scratch, int* order) {
  for (int l = 0; l < k; ++l) total[l] = 0.0;
  for (int i = 0; i < k; ++i) {
    pcgrad_task_weights(gram, k, seed, i, scratch, order);
    for (int l = 0; l < k; ++l) total[l] += scratch[l];
  }
}

}  // namespace solvers
}  // namespace mtunlearn

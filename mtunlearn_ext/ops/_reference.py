"""Pure-PyTorch reference implementations of every compiled op.

They are the test oracle (run in float64) and the fallback when the extension is missing.
They follow the compiled kernels' conventions exactly: Gram-type outputs in the accumulation
dtype (float64 for float64 inputs, float32 otherwise), combinations in the input dtype, the
same ridge scaling, the same PCGrad task orders, the same sign convention.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (and Gram output) dtype of an input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gram(x: torch.Tensor) -> torch.Tensor:
    xa = x.to(acc_dtype(x.dtype))
    return xa @ xa.transpose(-1, -2)


def gram_list(xs: list[torch.Tensor], per_tensor: bool = False) -> torch.Tensor:
    flats = [x.reshape(x.shape[0], -1).to(acc_dtype(x.dtype)) for x in xs]
    grams = [f @ f.T for f in flats]
    if per_tensor:
        return torch.stack(grams)
    total = grams[0]
    for g in grams[1:]:
        total = total + g
    return total


def inner_list(as_: list[torch.Tensor], bs: list[torch.Tensor],
               per_tensor: bool = False) -> torch.Tensor:
    terms = [inner(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)) for a, b in zip(as_, bs)]
    if per_tensor:
        return torch.stack(terms)
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def gram_list_stacked(xs: list[torch.Tensor], ys: list[torch.Tensor],
                      per_tensor: bool = False) -> torch.Tensor:
    stacked = [torch.cat([x.reshape(x.shape[0], math.prod(x.shape[1:])),
                          y.reshape(y.shape[0], math.prod(y.shape[1:]))]) for x, y in zip(xs, ys)]
    return gram_list(stacked, per_tensor)


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dt = acc_dtype(a.dtype)
    return a.to(dt) @ b.to(dt).transpose(-1, -2)


def combine(coeffs: torch.Tensor, x: torch.Tensor, base: torch.Tensor | None = None,
            beta: float = 0.0) -> torch.Tensor:
    dt = acc_dtype(x.dtype)
    result = coeffs.to(dt) @ x.to(dt)
    if base is not None and beta != 0.0:
        result = result + beta * base.to(dt)
    return result.to(x.dtype)


def ridge_lambda(gram_matrix: torch.Tensor, ridge: float) -> torch.Tensor:
    """``lambda = ridge * trace(G) / k`` per batch element (plus the smallest normal, so that an
    all-zero Gram still gives an invertible system)."""
    k = gram_matrix.shape[-1]
    mean_diag = torch.diagonal(gram_matrix, dim1=-2, dim2=-1).sum(-1) / max(k, 1)
    return ridge * mean_diag.clamp_min(0) + torch.finfo(torch.float64).tiny


def pivot_floor(dtype: torch.dtype) -> float:
    """The relative pivot below which the solvers drop a Gram row as dependent: the Gram's
    rounding level (1e-12 for float64, 1e-6 for one accumulated in float32)."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def ridge_solve(gram_matrix: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(G + lambda I) a = rhs`` as the compiled solver does it: a Cholesky factorisation that
    drops a row whose pivot falls to :func:`pivot_floor` times its own diagonal (coefficient
    0), so that a singular ``G`` (dependent rows, ``ridge=0``) gives the least-squares
    projection instead of a singular-matrix error; NaN/Inf inputs give NaN."""
    k, m = gram_matrix.shape[-1], rhs.shape[-1]
    count = math.prod(gram_matrix.shape[:-2])
    if k * m * count == 0:
        return torch.zeros(rhs.shape, dtype=gram_matrix.dtype, device=rhs.device)
    problems = gram_matrix.to(torch.float64).reshape(count, k, k)
    floor, tiny = pivot_floor(gram_matrix.dtype), torch.finfo(torch.float64).tiny
    lam = ridge_lambda(problems, ridge)
    factor = torch.zeros_like(problems)
    for j in range(k):
        own = problems[:, j, j] + lam
        pivot = own - (factor[:, j, :j] ** 2).sum(-1)
        kept = (pivot > floor * own + tiny) | torch.isnan(pivot)
        diagonal = torch.where(kept, pivot, torch.ones_like(pivot)).sqrt()
        factor[:, j, j] = torch.where(kept, diagonal, torch.zeros_like(diagonal))
        below = problems[:, j + 1:, j] - (factor[:, j + 1:, :j] * factor[:, j:j + 1, :j]).sum(-1)
        factor[:, j + 1:, j] = torch.where(kept[:, None], below / diagonal[:, None],
                                           torch.zeros_like(below))
    dropped = factor.diagonal(dim1=-2, dim2=-1) == 0
    safe = torch.where(dropped, torch.ones_like(factor[:, 0]), factor.diagonal(dim1=-2, dim2=-1))
    solution = rhs.to(torch.float64).reshape(count, k, m).clone()
    for i in range(k):  # L y = rhs; a dropped row's unknown is 0
        value = solution[:, i] - (factor[:, i, :i, None] * solution[:, :i]).sum(1)
        solution[:, i] = torch.where(dropped[:, i, None], 0.0, value / safe[:, i, None])
    for i in reversed(range(k)):  # L^T a = y
        value = solution[:, i] - (factor[:, i + 1:, i, None] * solution[:, i + 1:]).sum(1)
        solution[:, i] = torch.where(dropped[:, i, None], 0.0, value / safe[:, i, None])
    finite = (torch.isfinite(problems).flatten(1).all(1)
              & torch.isfinite(rhs.reshape(count, k * m)).all(1))
    solution = torch.where(finite[:, None, None], solution, torch.nan)
    return solution.reshape(rhs.shape).to(gram_matrix.dtype)


def nonconflicting_dual(gram_matrix: torch.Tensor, rhs: torch.Tensor, iterations: int = 20000,
                        tol: float = 1e-13) -> torch.Tensor:
    """Solve ``min_{w >= 0} 1/2 w^T G w + c^T w`` for each row ``c`` of ``rhs`` (``[..., m, k]``)
    by projected coordinate descent in float64; returns ``w`` with the shape of ``rhs``."""
    g = gram_matrix.to(torch.float64)
    c = rhs.to(torch.float64)
    w = torch.zeros_like(c)
    k = g.shape[-1]
    diag = torch.diagonal(g, dim1=-2, dim2=-1)
    for _ in range(iterations):
        largest = torch.zeros((), dtype=torch.float64)
        for i in range(k):
            grad_i = (w * g[..., i, :].unsqueeze(-2)).sum(-1) + c[..., i]
            d_ii = diag[..., i].unsqueeze(-1)
            safe = d_ii > 0
            new = torch.where(safe, (w[..., i] - grad_i / torch.where(safe, d_ii, 1.0)).clamp_min(0),
                              torch.zeros_like(grad_i))
            largest = torch.maximum(largest, (new - w[..., i]).abs().max() if new.numel() else largest)
            w[..., i] = new
        scale = w.abs().max() if w.numel() else torch.zeros((), dtype=torch.float64)
        if largest <= tol * (1.0 + scale):
            break
    return w.to(gram_matrix.dtype)  # the op returns the Gram's dtype (docs/api.md)


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def pcgrad_order(k: int, task: int, seed: int) -> list[int]:
    """The order in which PCGrad projects task ``task`` against the others: every other task in
    increasing order when ``seed < 0``, else a Fisher-Yates shuffle driven by splitmix64 (the
    same generator the compiled kernels use, so a seed gives one order everywhere)."""
    others = [j for j in range(k) if j != task]
    if seed < 0:
        return others
    state = ((seed & _MASK64) ^ ((0xD1B54A32D192ED03 * (task + 1)) & _MASK64)) & _MASK64
    for t in range(len(others) - 1, 0, -1):
        state, r = _splitmix64(state)
        pick = r % (t + 1)
        others[t], others[pick] = others[pick], others[t]
    return others


def pcgrad_weights(gram_matrix: torch.Tensor, seed: int) -> torch.Tensor:
    """Weights ``w`` such that PCGrad's summed update is ``w @ x`` (``[..., k]``)."""
    g = gram_matrix.to(torch.float64)
    k = g.shape[-1]
    batch = g.shape[:-2]
    total = torch.zeros(*batch, k, dtype=torch.float64, device=g.device)
    for i in range(k):
        w = torch.zeros(*batch, k, dtype=torch.float64, device=g.device)
        w[..., i] = 1.0
        for j in pcgrad_order(k, i, seed):
            dot = (w * g[..., :, j]).sum(-1)
            g_jj = g[..., j, j]
            step = torch.where((dot < 0) & (g_jj > 0), dot / torch.where(g_jj > 0, g_jj, 1.0),
                               torch.zeros_like(dot))
            w[..., j] = w[..., j] - step
        total = total + w
    # A non-finite Gram gives non-finite weights, as in the kernels (with k = 1 the loop above
    # never reads the Gram, and a NaN gradient would pass any check of the weights).
    finite = torch.isfinite(g).flatten(-2).all(-1)
    total = torch.where(finite[..., None], total, torch.full_like(total, float("nan")))
    return total.to(gram_matrix.dtype)


def pcgrad_textbook(x: torch.Tensor, seed: int) -> torch.Tensor:
    """PCGrad written the sequential way over the vectors themselves (``x``: ``[k, n]``)."""
    k = x.shape[0]
    rows = [x[i].clone() for i in range(k)]
    out = torch.zeros_like(x[0])
    for i in range(k):
        g = rows[i].clone()
        for j in pcgrad_order(k, i, seed):
            dot = torch.dot(g, x[j])
            norm2 = torch.dot(x[j], x[j])
            if dot < 0 and norm2 > 0:
                g = g - dot / norm2 * x[j]
        out = out + g
    return out


def project_out(g: torch.Tensor, basis: torch.Tensor, ridge: float) -> torch.Tensor:
    gm = gram(basis)
    rhs = inner(basis, g)  # [..., k, m]
    coeffs = ridge_solve(gm, rhs, ridge)  # [..., k, m]
    return combine(-coeffs.transpose(-1, -2), basis, base=g, beta=1.0)


def project_nonconflicting(g: torch.Tensor, r: torch.Tensor, sign: int) -> torch.Tensor:
    gm = gram(r)
    rhs = float(sign) * inner(g, r)  # [..., m, k]
    w = nonconflicting_dual(gm, rhs)
    return combine(float(sign) * w, r, base=g, beta=1.0)


def pcgrad(x: torch.Tensor, seed: int) -> torch.Tensor:
    w = pcgrad_weights(gram(x), seed)
    return combine(w.unsqueeze(-2), x).squeeze(-2)

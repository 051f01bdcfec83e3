"""The min-norm point of a convex hull, from the Gram matrix (MGDA's small QP), on device.

``min_{a in simplex} a^T G a``: with ``G = J J^T`` the minimiser ``a`` gives ``a @ J``, the
point of smallest norm in the convex hull of the rows of ``J`` (Desideri's MGDA direction).
There is no closed form beyond ``k = 2``, and a host-side QP solver would synchronise every
step, so it is solved here with a fixed budget of accelerated projected-gradient steps (FISTA
with adaptive restart) in float64 on the Gram's device, then polished by an exact solve of the
KKT system on the support found. Every branch inside that budget is a ``torch.where`` (no
``.item()``, no host synchronisation), batched over leading dimensions (one problem per
layer). On the CPU, where
an optimality test costs nothing, the problems are first handed to the compiled non-negative
QP (:func:`mtunlearn_ext.ops.nonconflicting_dual`, an equivalent problem: see
``_dual_answers``; where the hull holds the origin, a bounded variant of it), whose answer
is kept when it passes the KKT conditions; otherwise the steps above run,
and a problem whose answer still fails the KKT conditions after the budget (tasks whose
gradient norms differ by 1e3 or more) is finished by an exact active-set method; inside
``torch.compile`` (whose graph cannot branch on values) the CPU solve is one opaque custom op,
``mtunlearn_surgery::min_norm_simplex``. On a GPU the QPs run first and their answers are
checked as tensors; one synchronisation then asks whether every problem passed, and if so they
are the answer: the budget is a loop of ~3000 small launches (on this project's CPU, through
the same path, 18.5 ms against 1.5 ms without it). Where some problem fails, and wherever the
solve may not synchronise (inside ``torch.compile``, or while a CUDA graph is captured), the
budget runs and the QPs' answers replace its answer wherever they pass (badly scaled tasks
and a hull holding the origin included; the budget alone was 0.2 off in norm on both); a
problem failing them keeps the lower of the budget's answer and the QPs'. Both ways give the
same bits.
"""

from __future__ import annotations

import torch

from mtunlearn_ext import ops
from mtunlearn_ext.ops._checks import _has_no_values, check_int
from mtunlearn_ext.ops._fake_checks import sizes

#: Coordinates of the iterate above this are the support handed to the exact polish.
_SUPPORT_THRESHOLD = 1e-9


def _project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-based:
    ``theta`` is the largest shift keeping the sorted prefix positive; Held et al.)."""
    k = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    shifted_cumsum = u.cumsum(-1) - 1.0
    ranks = torch.arange(1, k + 1, dtype=v.dtype, device=v.device)
    # The condition holds exactly on a prefix of the sorted entries, and always for the first one
    # (the clamp changes nothing then; with NaN in ``v`` it keeps the index valid, so NaN comes
    # out as the weights, as everywhere else, instead of an indexing error).
    support_size = (u - shifted_cumsum / ranks > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = shifted_cumsum.gather(-1, support_size - 1) / support_size.to(v.dtype)
    return (v - theta).clamp_min(0.0)


def _objective(gram: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return (a * (a.unsqueeze(-2) @ gram).squeeze(-2)).sum(-1)


def _kkt_optimal(gram: torch.Tensor, a: torch.Tensor, tolerance: float = 1e-12,
                 roundoff: float = 0.0) -> torch.Tensor:
    """Whether ``a`` (on the simplex) minimises ``a^T G a`` there, per problem: the KKT
    conditions say every coordinate's gradient ``(G a)_i`` is at least ``a^T G a`` (with
    equality on the support, which holds for a polished ``a``). ``gram`` is scaled to a unit mean
    diagonal, so the tolerance is relative.

    ``roundoff``: the relative rounding level of the Gram's entries (``|dG_ij|`` up to
    ``roundoff * |r_i| |r_j|``), which moves ``(G a)_i`` by up to ``roundoff |r_i| S`` and
    ``a^T G a`` by up to ``roundoff S^2``, with ``S = sum_j a_j |r_j|``: row ``i`` may miss by
    that much more. Per row, so that a task 1e4 times shorter than another is held to its own
    rounding, not to the long one's (a tolerance relative to the mean diagonal passed answers
    3% of the short task's norm off the optimum)."""
    ga = (a.unsqueeze(-2) @ gram).squeeze(-2)
    value = (ga * a).sum(-1)
    if roundoff == 0.0:
        return (ga.amin(-1) >= value - tolerance) & torch.isfinite(value)
    norms = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0.0).sqrt()
    spread = (a * norms).sum(-1, keepdim=True)
    slack = tolerance + roundoff * spread * (norms + spread)
    return (ga - value.unsqueeze(-1) + slack >= 0).all(-1) & torch.isfinite(value)


def _polish(gram: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Exact minimiser on the face spanned by the support of ``a``, where it is feasible and no
    worse; ``a`` itself elsewhere.

    On the face ``S`` the KKT conditions are linear: ``G_SS a_S = mu 1``, ``1^T a_S = 1``. The
    system is embedded in a fixed ``(k+1) x (k+1)`` matrix (identity rows for coordinates off the
    support) so that its shape, and hence the absence of synchronisation, does not depend on
    ``S``. A singular face (dependent rows on the support) gives a failed or non-finite solve,
    which the acceptance test rejects.
    """
    k = gram.shape[-1]
    batch = gram.shape[:-2]
    support = (a > _SUPPORT_THRESHOLD).to(gram.dtype)
    # Built by concatenation, not written into zeros: torch.vmap cannot write samples into
    # a tensor made without the batch.
    face = gram * support.unsqueeze(-1) * support.unsqueeze(-2) + torch.diag_embed(1.0 - support)
    corner = support.new_zeros((*batch, 1))
    system = torch.cat([torch.cat([face, support.unsqueeze(-1)], dim=-1),
                        torch.cat([support, corner], dim=-1).unsqueeze(-2)], dim=-2)
    rhs = torch.cat([torch.zeros_like(support), corner + 1.0], dim=-1).unsqueeze(-1)
    solution, info = torch.linalg.solve_ex(system, rhs, check_errors=False)
    candidate = solution[..., :k, 0] * support
    feasible = (info == 0) & torch.isfinite(candidate).all(-1) & (candidate >= -1e-12).all(-1)
    candidate = torch.where(feasible.unsqueeze(-1), candidate, a).clamp_min(0.0)
    candidate = candidate / candidate.sum(-1, keepdim=True)
    # Relative slack: the polish may only win, up to rounding of the objective itself.
    no_worse = _objective(gram, candidate) <= _objective(gram, a) * (1 + 1e-12) + 1e-300
    return torch.where((feasible & no_worse).unsqueeze(-1), candidate, a)


def _active_set_min_norm(gram: torch.Tensor, start: torch.Tensor,
                         tolerance: float = 1e-12) -> torch.Tensor:
    """Exact ``min_a a^T G a`` on the simplex for one problem (``[k, k]`` float64 on the CPU,
    scaled to a unit mean diagonal), by a primal active-set method started from ``start``:
    solve the KKT system on the current face (least squares, so that a face of affinely
    dependent points still gives a point of it); if that point leaves the simplex, move toward
    it until a coordinate reaches zero and drop it; else add the coordinate whose gradient most
    violates optimality, until none does. Each step lowers the objective or shrinks the face,
    so it ends after finitely many steps (bounded here as a safeguard)."""
    k = gram.shape[-1]
    a = start.clamp_min(0.0)
    support = a > _SUPPORT_THRESHOLD
    if not bool(support.any()):
        support[int(torch.argmin(torch.diagonal(gram)))] = True
    a = torch.where(support, a, torch.zeros_like(a))
    a = a / a.sum() if float(a.sum()) > 0 else support.to(a.dtype) / float(support.sum())
    for _ in range(20 * k + 20):
        index = support.nonzero().flatten()
        m = index.numel()
        system = torch.zeros(m + 1, m + 1, dtype=gram.dtype)
        system[:m, :m] = gram[index][:, index]
        system[:m, m] = 1.0
        system[m, :m] = 1.0
        rhs = torch.zeros(m + 1, 1, dtype=gram.dtype)
        rhs[m, 0] = 1.0
        face = torch.linalg.lstsq(system, rhs, driver="gelsd").solution[:m, 0]
        if bool((face >= -tolerance).all()):
            a = torch.zeros_like(a)
            a[index] = face.clamp_min(0.0)
            a = a / a.sum()
            grad = gram @ a
            value = float(a @ grad)
            j = int(torch.argmin(grad))
            if float(grad[j]) >= value - tolerance or bool(support[j]):
                return a
            support[j] = True
            continue
        # Toward the face's point until the first coordinate reaches zero; drop it.
        current = a[index]
        direction = face - current
        shrinking = direction < 0
        ratios = torch.where(shrinking, current / (-direction).clamp_min(1e-300),
                             torch.full_like(current, float("inf")))
        step = float(ratios.min().clamp(max=1.0))
        moved = (current + step * direction).clamp_min(0.0)
        dropped = index[moved <= tolerance * max(1.0, float(moved.max()))]
        a = torch.zeros_like(a)
        a[index] = moved
        if dropped.numel() == 0:  # rounding: drop the coordinate that limited the step
            dropped = index[ratios.argmin()].reshape(1)
        a[dropped] = 0.0
        support[dropped] = False
        a = a / a.sum()
    return a


def _lower_of(gram: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per problem, ``b`` where it is on the simplex (finite, non-negative) with a strictly
    lower ``b^T G b`` than ``a``'s, else ``a``: of two answers neither of which passed the
    optimality test, the better one, decided without a synchronisation."""
    feasible = torch.isfinite(b).all(-1) & (b >= 0).all(-1)
    lower = feasible & (_objective(gram, torch.where(feasible.unsqueeze(-1), b, a))
                        < _objective(gram, a))
    return torch.where(lower.unsqueeze(-1), b, a)


def _simplex_weights_if_optimal(g: torch.Tensor, w: torch.Tensor, roundoff: float = 0.0
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = w / sum(w)`` and, per problem, whether it passes the simplex problem's KKT
    conditions on ``g`` (to 1e-12, and the Gram's ``roundoff``: :func:`_kkt_optimal`)."""
    a = w / w.sum(-1, keepdim=True)
    return a, torch.isfinite(a).all(-1) & (a >= 0).all(-1) & _kkt_optimal(g, a, 1e-12, roundoff)


def _gram_roundoff(dtype: torch.dtype) -> float:
    """The relative rounding level of a Gram computed in ``dtype``, for :func:`_kkt_optimal`:
    none in float64 (its answers are held to 1e-12 alone), ten units of float32 rounding
    (1.2e-6) otherwise. A half-precision Gram is held to float32's level too: at its own, the
    test passed answers 17% above the optimum of the matrix given."""
    return 0.0 if dtype == torch.float64 else 10 * torch.finfo(torch.float32).eps


def _dual_answers(g: torch.Tensor, roundoff: float = 0.0, *, lazy: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-norm weights from the compiled non-negative QP, and per problem whether they
    pass the simplex problem's KKT conditions.

    ``g`` is scaled to a unit mean diagonal. ``w = argmin_{w >= 0} 1/2 w^T G w - 1^T w``
    (:func:`mtunlearn_ext.ops.nonconflicting_dual` with ``c = -1``) scaled onto the simplex,
    ``a = w / sum(w)``, is the min-norm point's weights: the QP's KKT conditions
    ``(G w)_i >= 1``, with equality where ``w_i > 0``, become ``(G a)_i >= 1 / sum(w) = a^T G a``
    with equality on the support, which are the simplex problem's.

    When the hull holds the origin (more tasks than gradient entries, or tasks that cancel out)
    that QP is unbounded. The problems whose answer fails the simplex problem's KKT conditions
    then take the answer of ``min_{w >= 0} 1/2 w^T (G + 1 1^T) w - 1^T w``, bounded for every
    ``G``: with ``s = sum(w)`` and ``q = a^T G a`` its objective is ``1/2 s^2 (q + 1) - s``,
    smallest at ``s = 1 / (q + 1)`` with value ``-1 / (2 (q + 1))``, so its ``a`` minimises
    ``q`` too. It is the second choice only because the rank-one term slows the solver's
    descent where the first QP is bounded; ``lazy`` (the host) solves it only when some problem
    needs it, which costs a synchronisation. Its answer is checked allowing for ``roundoff``,
    the Gram's rounding level (:func:`_kkt_optimal`): a float32 Gram of more tasks than
    dimensions has eigenvalues of +-1e-7 where they should be 0, and no point meets the float64
    test on it. An all-zero Gram (every point optimal) is never passed: the iterative solver's
    uniform weights are documented."""
    a, ok = _unbounded_answers(g)
    if lazy and bool(ok.all()):
        return a, ok
    return _with_bounded_answers(g, roundoff, a, ok)


def _unbounded_answers(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first QP's weights of :func:`_dual_answers` and, per problem, whether they pass."""
    k = g.shape[-1]
    minus_ones = torch.full((*g.shape[:-2], 1, k), -1.0, dtype=g.dtype, device=g.device)
    return _simplex_weights_if_optimal(g, ops.nonconflicting_dual(g, minus_ones).squeeze(-2))


def _with_bounded_answers(g: torch.Tensor, roundoff: float, a: torch.Tensor, ok: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` where ``ok``, the bounded QP's weights elsewhere (:func:`_dual_answers`)."""
    k = g.shape[-1]
    minus_ones = torch.full((*g.shape[:-2], 1, k), -1.0, dtype=g.dtype, device=g.device)
    bounded, bounded_ok = _simplex_weights_if_optimal(
        g, ops.nonconflicting_dual(g + 1.0, minus_ones).squeeze(-2), roundoff)
    bounded_ok = bounded_ok & (torch.diagonal(g, dim1=-2, dim2=-1).amax(-1) > 0)
    return torch.where(ok.unsqueeze(-1), a, bounded), ok | bounded_ok


def _min_norm_by_dual(g: torch.Tensor, roundoff: float = 0.0) -> torch.Tensor | None:
    """:func:`_dual_answers` on the host: the weights, or ``None`` (a problem failing both
    QPs sends the whole batch to the iterative solver). Written out rather than called: the
    first QP passing everywhere, the usual case, is then read once, not twice."""
    a, ok = _unbounded_answers(g)
    if bool(ok.all()):
        return a
    a, ok = _with_bounded_answers(g, roundoff, a, ok)
    return a if bool(ok.all()) else None


def min_norm_simplex(gram: torch.Tensor, iterations: int = 200, *, polish: bool = True
                     ) -> torch.Tensor:
    """Weights of the min-norm point of the convex hull of ``k`` vectors, from their Gram matrix.

    Solves ``min_a a^T G a`` subject to ``a >= 0``, ``sum(a) = 1``.

    Args:
        gram: ``[..., k, k]`` symmetric PSD (e.g. from :func:`mtunlearn_ext.ops.gram_list`).
        iterations: budget of accelerated projected-gradient steps (on the CPU the loop stops
            as soon as a polished iterate is optimal). The problem is first
            scaled by its mean diagonal (the weights are scale-invariant) and the step is
            ``1 / L`` with ``L`` a Gershgorin bound on ``G``'s largest eigenvalue.
        polish: finish with the exact solve on the support found (recommended: it turns a
            correct support into an answer exact to rounding).

    Returns:
        ``a``: ``[..., k]`` on the simplex, in ``gram``'s dtype (computed in float64). An all-zero
        Gram returns the uniform weights.
    """
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"min_norm_simplex: `gram` must be [..., k, k], got {sizes(gram.shape)}")
    iterations = check_int("min_norm_simplex", "iterations", iterations, at_least=1)
    k = gram.shape[-1]
    if k == 0:  # no task, no weight (the step size's amax has nothing to reduce)
        return torch.zeros(gram.shape[:-1], dtype=gram.dtype, device=gram.device)
    # No autograd through the solve (the weightings document weights as constants): the compiled
    # QP has no backward formula, and the iterative path's graph would differ from it.
    g = gram.detach().to(torch.float64)
    roundoff = _gram_roundoff(gram.dtype)
    if _values_unreadable(g):
        # Meta and fake tensors hold no values, and torch.func's wrappers (vmap) cannot be
        # branched on per sample: the device path decides nothing on values (drop-in review:
        # vmap, meta and FakeTensorMode failed inside torch with the host path's `.item()`).
        return _solve(g, iterations, polish, roundoff, host=False, sync=False).to(gram.dtype)
    if g.device.type == "cpu" and torch.compiler.is_compiling():
        # The host solver decides on values (is the QP's answer optimal? which problems are
        # left?), which a traced graph cannot branch on: it is one opaque op there.
        return _host_min_norm(g, iterations, polish, roundoff).to(gram.dtype)
    return _solve(g, iterations, polish, roundoff).to(gram.dtype)


def _values_unreadable(g: torch.Tensor) -> bool:
    """Whether ``g``'s values cannot decide a path: a meta or fake tensor, or a tensor of a
    ``torch.func`` transform (vmap's batched tensors). Not while tracing for ``torch.compile``,
    which has its own op below."""
    return _has_no_values(g) or (not torch.compiler.is_compiling()
                                 and torch._C._functorch.is_functorch_wrapped_tensor(g))


@torch.library.custom_op("mtunlearn_surgery::min_norm_simplex", mutates_args=(),
                         device_types="cpu")
def _host_min_norm(g: torch.Tensor, iterations: int, polish: bool, roundoff: float
                   ) -> torch.Tensor:
    """:func:`min_norm_simplex` on the CPU as one op for ``torch.compile`` (float64 in, out)."""
    return _solve(g, iterations, polish, roundoff)


@_host_min_norm.register_fake
def _(g: torch.Tensor, iterations: int, polish: bool, roundoff: float) -> torch.Tensor:
    return g.new_empty(g.shape[:-1])


def _may_synchronise(device: torch.device) -> bool:
    """Whether a device solve may wait for one value: not in a traced graph, nor while a CUDA
    graph is being captured (a synchronisation is an error there)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _solve(g: torch.Tensor, iterations: int, polish: bool, roundoff: float,
           host: bool | None = None, sync: bool | None = None) -> torch.Tensor:
    """:func:`min_norm_simplex`'s solve of the float64 Gram ``g`` (``k >= 1``), in float64;
    ``roundoff``: :func:`_gram_roundoff` of the dtype it was computed in. ``host``: whether
    values may decide the path (a synchronisation each; default: on the CPU); the tests run
    the device path on the CPU with ``False``. ``sync``: whether the device path may
    synchronise once to skip the budget when every problem's QP answer passes (default:
    :func:`_may_synchronise`); the answer is the same either way."""
    k = g.shape[-1]
    g = 0.5 * (g + g.transpose(-1, -2))
    tiny = torch.finfo(torch.float64).tiny
    scale = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1).clamp_min(tiny)
    g = g / scale[..., None, None]
    host = g.device.type == "cpu" if host is None else host
    checked: tuple[torch.Tensor, torch.Tensor] | None = None
    if polish and not host and g.numel() > 0:
        # The QPs' answers, checked as tensors, replace the budget's answer below wherever they
        # pass (two solver launches beside the budget's ~3000); where every problem passes, the
        # budget's answer would be replaced everywhere, so one synchronisation skips it.
        checked = _dual_answers(g, roundoff, lazy=False)
        if (_may_synchronise(g.device) if sync is None else sync) and bool(checked[1].all()):
            return checked[0]
    if polish and host and g.numel() > 0:
        # On the host the compiled active-set QP answers in microseconds, and checking it is
        # free; the accelerated steps below cost a loop of small torch ops (1.06 ms against
        # TorchJD's 0.80 at k = 16), and remain for the problems it fails and for devices.
        exact = _min_norm_by_dual(g, roundoff)
        if exact is not None:
            return exact

    # Only the budget needs the step size: computed after the QPs' answers, which usually end
    # the solve, so that those solves do not pay for it.
    step = 1.0 / g.abs().sum(-1).amax(-1).clamp_min(tiny)
    x = torch.full((*g.shape[:-2], k), 1.0 / k, dtype=torch.float64, device=g.device)
    y = x
    t = torch.ones(g.shape[:-2], dtype=torch.float64, device=g.device)
    # On the host an optimality test costs nothing next to the ~15 small dispatches of each
    # iteration, so every few iterations the current support is polished and, if the result
    # satisfies the KKT conditions, returned; on a device the test would be a sync per check,
    # so the fixed budget runs.
    check_every = 4 if host else 0
    for iteration in range(iterations):
        grad = (y.unsqueeze(-2) @ g).squeeze(-2)
        x_next = _project_simplex(y - step.unsqueeze(-1) * grad)
        if polish and check_every and iteration % check_every == check_every - 1:
            candidate = _polish(g, x_next)
            if bool(_kkt_optimal(g, candidate).all()):
                return candidate
        # Adaptive restart (O'Donoghue & Candes): drop the momentum when it points uphill, which
        # keeps FISTA monotone enough to converge linearly on strongly convex faces.
        restart = ((y - x_next) * (x_next - x)).sum(-1) > 0
        t_next = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        momentum = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_next)
        t_next = torch.where(restart, torch.ones_like(t), t_next)
        y = x_next + momentum.unsqueeze(-1) * (x_next - x)
        x, t = x_next, t_next
    if polish:
        x = _polish(g, x)
        if checked is not None:
            x = torch.where(checked[1].unsqueeze(-1), checked[0], _lower_of(g, x, checked[0]))
        if host:
            # Badly scaled tasks (gradient norms apart by 1e3 or more) can leave the budget short
            # of the optimal support; on the host the optimality test is free, so the problems
            # that fail it are finished exactly.
            optimal = _kkt_optimal(g, x)
            if not bool(optimal.all()):
                flat_g, flat_x = g.reshape(-1, k, k), x.reshape(-1, k).clone()
                for i in (~optimal.reshape(-1)).nonzero().flatten().tolist():
                    if bool(torch.isfinite(flat_g[i]).all()):
                        flat_x[i] = _active_set_min_norm(flat_g[i], flat_x[i])
                x = flat_x.reshape(x.shape)
    return x

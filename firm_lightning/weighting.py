r"""In-client objective weighting for FIRM.

Each client optimises ``S`` objectives (rewards / losses) at once. Given the
per-objective gradients ``g_1 .. g_S`` it needs one update direction
``d = sum_s lambda_s g_s`` with ``lambda`` on the probability simplex
``Delta_S = {lambda >= 0, sum lambda = 1}``. Everything the weighting needs is
the ``S x S`` Gram matrix ``Q[s, r] = <g_s, g_r>``, so the (large) gradients
never have to be stacked here.

Regularised min-norm (the FIRM weighting) solves::

    lambda = argmin_{lambda in Delta_S}  1/2 lambda^T Q~ lambda + beta/2 ||lambda - p||^2,
    Q~ = Q / mean(diag Q).

* ``beta = 0`` is MGDA's min-norm point (the common descent direction of
  Desideri / Sener & Koltun). It is fragile: a small change in one gradient can
  flip all weight onto another objective, which makes client updates jumpy and
  lets clients drift apart.
* ``beta > 0`` pulls ``lambda`` toward the preference ``p`` and makes the
  problem strongly convex, so ``lambda`` is unique and Lipschitz in ``Q``;
  ``beta -> inf`` gives ``lambda -> p`` (plain linear scalarisation with ``p``).
* The normalisation by ``mean(diag Q)`` (the mean squared gradient norm) makes
  ``beta`` scale-free: it means the same at any learning-rate / loss scale and
  at any point of training. Scaling ``Q`` by any ``c > 0`` leaves ``lambda``
  unchanged. An all-zero Gram matrix is treated as ``Q~ = 0``.
* On the simplex ``||lambda - u||^2 = ||lambda||^2 - 1/S`` for the uniform
  ``u``, so regularising toward the uniform preference and penalising
  ``||lambda||^2`` give the same minimiser; only a non-uniform ``p`` moves it.

Solvers: the problem is ``S x S`` with ``S`` tiny, independent of the model size. ``S = 2``
has a closed form. For ``3 <= S <= 12`` the solver is exact and finite: on every face of the
simplex (every support set) it solves the KKT system of the problem restricted to that face's
affine hull, keeps the solutions that lie on the face and returns the one with the lowest
objective (the optimum lies in the relative interior of some face, where it minimises over the
face's affine hull). Each face's system is solved after symmetric diagonal scaling by the
gradient norms, so gradients whose norms differ by many orders of magnitude (which make ``Q~``
ill-conditioned, ~1e10 at norms 1e-3..1e3) lose no accuracy: the min-norm point is the same as
an interior-point reference (cvxpy/Clarabel) to ~1e-9 relative in ``||d||``
(``tests/test_weighting.py``). ``2^S - 1`` faces: ~0.2 ms at S = 3, a few ms at S = 8,
negligible next to the backward passes that produce ``Q``. Beyond ``S = 12`` (4095 faces) it
falls back to accelerated projected gradient (FISTA with adaptive restart, stopped on the
Frank-Wolfe duality gap, then an exact solve on the detected support), which warns when it stops
at ``max_iter`` without reaching ``tol``. The solve runs in float64 on the CPU; the result comes
back on ``Q``'s device and dtype and carries no autograd graph (``lambda`` is a constant for
the update).
"""

from __future__ import annotations

import abc
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

__all__ = [
    "Weighting",
    "RegularizedMinNorm",
    "LinearScalarization",
    "min_norm",
    "project_to_simplex",
    "validate_preference",
]

# A Gram matrix whose mean squared gradient norm is at or below this is "all zero":
# the gradients carry no direction, so Q~ = 0 and the regulariser alone decides.
_ZERO_SCALE = 1e-30
# Tolerance on the sum of a preference / weight vector.
_SUM_TOL = 1e-6
# Up to this many objectives the solver enumerates the 2^S - 1 faces of the simplex (exact).
EXACT_MAX_OBJECTIVES = 12
# Below this, the S = 2 closed form's denominator (||g1~ - g2~||^2 + 2 beta) is
# zero: identical gradients and beta = 0, every point of the simplex is optimal.
_FLAT_DENOM = 1e-12


# --------------------------------------------------------------------------- validation


def _fmt_list(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


def validate_preference(
    preference: Sequence[float] | torch.Tensor,
    num_objectives: int | None = None,
    *,
    name: str = "preference",
) -> torch.Tensor:
    """Check that ``preference`` is a point of the simplex and return it as float64.

    Raises ``ValueError`` naming the problem and the fix. The result is
    renormalised to sum to exactly 1 (it was already within ``1e-6``).
    """
    if isinstance(preference, torch.Tensor):
        values = preference.detach().to("cpu", torch.float64).reshape(-1).tolist()
        if preference.dim() != 1:
            raise ValueError(
                f"{name} must be a 1-D list of per-objective weights, got a tensor of shape "
                f"{tuple(preference.shape)}"
            )
    elif isinstance(preference, (str, bytes)) or not isinstance(preference, Sequence):
        raise ValueError(
            f"{name} must be a list of per-objective weights such as [0.5, 0.5], got {preference!r}"
        )
    else:
        try:
            values = [float(v) for v in preference]
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{name} must be a list of numbers such as [0.5, 0.5], got {preference!r}"
            ) from err
    n = len(values)
    if n == 0:
        raise ValueError(f"{name} is empty; pass one weight per objective, e.g. [0.5, 0.5]")
    if num_objectives is not None and n != num_objectives:
        raise ValueError(
            f"{name} has {n} entries but there are {num_objectives} objectives "
            f"(the Gram matrix is {num_objectives}x{num_objectives}); pass one weight per objective"
        )
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} contains non-finite values ({_fmt_list(values)}); pass finite weights")
    if any(v < 0 for v in values):
        raise ValueError(
            f"{name} must be nonnegative (got {_fmt_list(values)}); weights are a point on the simplex"
        )
    total = math.fsum(values)
    if abs(total - 1.0) > _SUM_TOL:
        example = _fmt_list([v / total for v in values]) if total > 0 else _fmt_list([1.0 / n] * n)
        raise ValueError(
            f"{name} must sum to 1 (got {_fmt_list(values)}, sum {total:.10g}); "
            f"pass normalised weights such as {example}"
        )
    out = torch.tensor(values, dtype=torch.float64)
    return out / out.sum()


def _validate_gram(gram: torch.Tensor) -> np.ndarray:
    """Check the Gram matrix and return it as a symmetric float64 numpy array."""
    if not isinstance(gram, torch.Tensor):
        raise ValueError(
            f"the Gram matrix must be a torch.Tensor of shape (S, S), got {type(gram).__name__}"
        )
    if gram.dim() != 2:
        raise ValueError(
            f"the Gram matrix must be 2-D of shape (S, S) with S the number of objectives, "
            f"got shape {tuple(gram.shape)}"
        )
    if gram.shape[0] != gram.shape[1]:
        raise ValueError(
            f"the Gram matrix must be square (S, S), got shape {tuple(gram.shape)}; "
            "it should hold <g_s, g_r> for every pair of objectives"
        )
    if gram.shape[0] == 0:
        raise ValueError("the Gram matrix is 0x0: there must be at least one objective")
    q = gram.detach().to("cpu", torch.float64).numpy()
    if np.isnan(q).any():
        raise ValueError(
            "the Gram matrix of the per-objective gradients contains NaN: "
            "a reward or loss produced non-finite values"
        )
    if not np.isfinite(q).all():
        raise ValueError(
            "the Gram matrix of the per-objective gradients contains inf: a gradient overflowed "
            "(a reward or loss produced non-finite or huge values)"
        )
    if (np.diag(q) < 0).any():
        raise ValueError(
            f"the Gram matrix has a negative diagonal ({_fmt_list(np.diag(q))}); its diagonal holds "
            "squared gradient norms, so this is not a Gram matrix"
        )
    return 0.5 * (q + q.T)


def _normalize_gram(q: np.ndarray) -> np.ndarray:
    """``Q / mean(diag Q)``, or zeros for an all-zero Gram matrix."""
    scale = float(np.mean(np.diag(q)))
    if scale <= _ZERO_SCALE:
        return np.zeros_like(q)
    return q / scale


# --------------------------------------------------------------------------- simplex projection


def _project_simplex_np(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of a 1-D float64 vector onto the simplex (Duchi et al. 2008).

    Plain Python on purpose: for S <= ~10 it is several times faster than the
    equivalent chain of tiny numpy calls, and it runs once per solver iteration.
    """
    values = v.tolist()
    css = 0.0
    theta = 0.0
    # The condition u_i > (sum_{j<=i} u_j - 1) / i holds exactly on a prefix of the sorted values.
    for i, ui in enumerate(sorted(values, reverse=True)):
        css += ui
        t = (css - 1.0) / (i + 1)
        if ui > t:
            theta = t
        else:
            break
    return np.array([max(x - theta, 0.0) for x in values])


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto the probability simplex along the last dimension.

    Sort-based algorithm of Duchi et al. (2008), O(S log S). Works on batches
    (``(..., S)``) and keeps ``v``'s dtype and device.
    """
    if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[-1] == 0:
        raise ValueError("project_to_simplex expects a tensor with a non-empty last dimension")
    if not torch.isfinite(v).all():
        raise ValueError("project_to_simplex got non-finite values")
    n = v.shape[-1]
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - 1
    ind = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    cond = (u - css / ind) > 0
    # rho = last index where cond holds (cond[0] always holds); count of Trues works since
    # cond is a prefix of Trues.
    rho = cond.sum(dim=-1, keepdim=True) - 1
    theta = torch.gather(css, -1, rho) / (rho + 1).to(v.dtype)
    return torch.clamp(v - theta, min=0)


# --------------------------------------------------------------------------- solvers


def _gradient(q: np.ndarray, beta: float, p: np.ndarray, lam: np.ndarray) -> np.ndarray:
    # Q~ lam + beta (lam - p), written so large beta does not cancel catastrophically.
    return q @ lam + beta * (lam - p)


def _fw_gap(g: np.ndarray, lam: np.ndarray) -> float:
    """Frank-Wolfe gap ``g^T (lam - e_argmin g)``; an upper bound on ``f(lam) - f*``."""
    return float(g @ lam - g.min())


def _gap_floor(q: np.ndarray, beta: float) -> float:
    """Round-off floor below which the float64 gap cannot be resolved."""
    return 64.0 * np.finfo(np.float64).eps * (float(np.abs(q).max(initial=0.0)) + beta + 1.0)


def _solve_closed_form(q: np.ndarray, beta: float, p: np.ndarray) -> np.ndarray:
    """Exact minimiser for S = 2 on the normalised Gram ``q``.

    With ``lambda = (a, 1 - a)`` and ``p2 = 1 - p1`` the objective is
    ``1/2 [a^2 q11 + 2a(1-a) q12 + (1-a)^2 q22] + beta (a - p1)^2``, whose
    derivative vanishes at
    ``a = (q22 - q12 + 2 beta p1) / (q11 - 2 q12 + q22 + 2 beta)``; being a 1-D
    convex problem the constrained optimum is that value clipped to [0, 1].
    """
    denom = q[0, 0] - 2.0 * q[0, 1] + q[1, 1] + 2.0 * beta
    if denom <= _FLAT_DENOM:
        # Identical gradients and beta = 0: the objective is constant on the simplex.
        return p.copy()
    a = (q[1, 1] - q[0, 1] + 2.0 * beta * p[0]) / denom
    a = min(max(float(a), 0.0), 1.0)
    return np.array([a, 1.0 - a])


def _polish(q: np.ndarray, beta: float, p: np.ndarray, lam: np.ndarray) -> np.ndarray | None:
    """Solve the KKT system exactly on the support of ``lam``; ``None`` if that fails.

    FISTA identifies the active set long before it has converged to full
    precision on it; on a fixed support the problem is an equality-constrained
    QP, i.e. one small linear system.
    """
    support = np.nonzero(lam > 0)[0]
    k = support.size
    a = q[np.ix_(support, support)] + beta * np.eye(k)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = a
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    rhs = np.concatenate([beta * p[support], [1.0]])
    try:
        sol = np.linalg.solve(kkt, rhs)
    except np.linalg.LinAlgError:
        # Singular on this support (beta = 0, rank-deficient Q~): any least-squares
        # solution of the KKT system is as good; the caller checks its gap.
        sol, *_ = np.linalg.lstsq(kkt, rhs, rcond=None)
    if not np.isfinite(sol).all() or (sol[:k] < 0).any():
        return None
    out = np.zeros_like(lam)
    out[support] = sol[:k]
    out /= out.sum()
    return out


def _solve_iterative(
    q: np.ndarray,
    beta: float,
    p: np.ndarray,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> np.ndarray:
    """Minimise ``1/2 l^T q l + beta/2 ||l - p||^2`` over the simplex to gap ``tol``.

    FISTA on the simplex with step ``1/L`` (``L`` = largest eigenvalue of
    ``q + beta I``) and gradient-based adaptive restart (O'Donoghue & Candes),
    stopped when the Frank-Wolfe gap, an upper bound on ``f(l) - f*``, drops
    below ``tol`` (or below float64 round-off). Warns and returns the best
    iterate if ``max_iter`` is reached first. ``q`` is the normalised Gram.
    """
    lipschitz = float(np.linalg.eigvalsh(q)[-1]) + beta
    if lipschitz <= _FLAT_DENOM:
        # Q~ = 0 and beta = 0: the objective is identically zero, every point is optimal.
        return p.copy()
    threshold = max(tol, _gap_floor(q, beta))
    step = 1.0 / lipschitz

    # The gradient is affine, so the gradient at the extrapolated point y is the same
    # combination of the gradients at the iterates: one matrix-vector product per step.
    x = p.copy()
    gx = _gradient(q, beta, p, x)
    y, gy = x, gx
    t = 1.0
    best, best_gap = x, math.inf
    for _ in range(max_iter):
        gap = _fw_gap(gx, x)
        if gap < best_gap:
            best, best_gap = x, gap
        if gap < threshold:
            break
        x_new = _project_simplex_np(y - step * gy)
        g_new = _gradient(q, beta, p, x_new)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        if float((y - x_new) @ (x_new - x)) > 0:
            # Momentum points uphill: restart the acceleration.
            t_new = 1.0
            y, gy = x_new, g_new
        else:
            m = (t - 1.0) / t_new
            y = x_new + m * (x_new - x)
            gy = g_new + m * (g_new - gx)
        x, gx, t = x_new, g_new, t_new
    else:
        gap = _fw_gap(gx, x)
        if gap < best_gap:
            best, best_gap = x, gap
        if best_gap >= threshold:
            warnings.warn(
                f"RegularizedMinNorm: the iterative solver reached max_iter={max_iter} with "
                f"Frank-Wolfe gap {best_gap:.3e} (tol {tol:.1e}); returning the best iterate. "
                "Increase max_iter or tol.",
                RuntimeWarning,
                stacklevel=4,
            )
    x, gap = best, best_gap

    polished = _polish(q, beta, p, x)
    if polished is not None:
        g_pol = _gradient(q, beta, p, polished)
        if _fw_gap(g_pol, polished) <= gap:
            x = polished
    return x


def _solve_exact(q: np.ndarray, beta: float, p: np.ndarray) -> np.ndarray:
    """The minimiser over the simplex: the best of the minimisers of every face (all at once).

    On face ``A``: ``min 1/2 l^T (Q~ + beta I) l - beta p^T l`` s.t. ``1^T l = 1``, ``l`` zero off
    ``A``. With ``D = diag(sqrt(diag(Q~) + beta))`` and ``m = D l``, the matrix
    ``D^-1 (Q~ + beta I) D^-1`` has a unit diagonal (cosines when beta = 0), so gradient norms of
    any spread cost no accuracy; the constraint row is normalised too. Each face's KKT system is
    solved by pseudo-inverse (a face where the restricted problem is flat gives one of its
    minimisers). Every candidate is clipped onto the simplex and scored by the true objective, so
    a poorly solved face can lose but never win: the optimum lies in the relative interior of some
    face, where it minimises over the face's affine hull.
    """
    n = p.size
    if not q.any() and beta == 0:  # Q~ = 0: the objective is zero everywhere
        return p.copy()
    scale = np.sqrt(np.diag(q) + beta)
    usable = scale > math.sqrt(_ZERO_SCALE)  # a zero gradient at beta = 0 is only its own vertex
    faces = np.array(list(itertools.product((False, True), repeat=n))[1:])  # (F, n), every support
    faces = faces[((faces & ~usable).sum(1) == 0) | (faces.sum(1) == 1)]
    safe = np.where(usable, scale, 1.0)
    reduced = (q + beta * np.eye(n)) / np.outer(safe, safe)
    pair = faces[:, :, None] & faces[:, None, :]
    kkt = np.zeros((len(faces), n + 1, n + 1))
    kkt[:, :n, :n] = np.where(pair, reduced, np.eye(n))
    c = np.where(faces, 1.0 / safe, 0.0)
    c_norm = np.linalg.norm(c, axis=1, keepdims=True)
    kkt[:, :n, n] = kkt[:, n, :n] = c / c_norm
    rhs = np.concatenate([np.where(faces, beta * p / safe, 0.0), 1.0 / c_norm], axis=1)
    m = (np.linalg.pinv(kkt, rcond=1e-13) @ rhs[:, :, None])[:, :n, 0]
    candidates = np.clip(np.where(faces, m / safe, 0.0), 0.0, None)
    totals = candidates.sum(1, keepdims=True)
    candidates = np.where(
        totals > 0, candidates / np.where(totals > 0, totals, 1.0), faces / faces.sum(1, keepdims=True)
    )
    values = 0.5 * np.einsum("fi,ij,fj->f", candidates, q, candidates)
    distance = ((candidates - p) ** 2).sum(1)
    values += 0.5 * beta * distance
    # Ties (beta = 0 with duplicate or flat gradients: a whole set is optimal): the one nearest p.
    tied = values <= values.min() + 1e-12 * max(abs(values.min()), _ZERO_SCALE)
    return candidates[int(np.argmin(np.where(tied, distance, np.inf)))]


def _solve(
    q: np.ndarray,
    beta: float,
    p: np.ndarray,
    tol: float = 1e-10,
    max_iter: int = 10_000,
) -> np.ndarray:
    """Normalised-Gram solve: closed form for S <= 2, exact enumeration up to 12 objectives, iterative beyond."""
    n = p.size
    if n == 1:
        return np.ones(1)
    if n == 2:
        return _solve_closed_form(q, beta, p)
    if n <= EXACT_MAX_OBJECTIVES:
        return _solve_exact(q, beta, p)
    return _solve_iterative(q, beta, p, tol=tol, max_iter=max_iter)


# --------------------------------------------------------------------------- weightings


def _output(lam: np.ndarray, gram: torch.Tensor) -> torch.Tensor:
    lam = np.clip(lam, 0.0, None)
    lam = lam / lam.sum()
    dtype = gram.dtype if gram.is_floating_point() else torch.get_default_dtype()
    return torch.as_tensor(lam, dtype=torch.float64).to(device=gram.device, dtype=dtype)


class Weighting(abc.ABC):
    """A map from the Gram matrix of the per-objective gradients to weights on the simplex."""

    @abc.abstractmethod
    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        """Return ``lambda`` of shape ``(S,)`` on the simplex, on ``gram``'s device and dtype."""

    def describe(self) -> str:
        """One line for logs."""
        return type(self).__name__ + "()"

    def preference_weights(self, num_objectives: int) -> Optional[torch.Tensor]:
        """The weights ``p`` it leans to whatever the gradients (float64), or None if it has none: what the
        weighting-effect measure compares ``λ`` with (``firm_lightning.gradients.weighting_effect``)."""
        return None

    def __repr__(self) -> str:
        return self.describe()


class RegularizedMinNorm(Weighting):
    """FIRM's weighting: MGDA min-norm regularised toward a preference ``p``.

    ``lambda = argmin_{Delta_S} 1/2 l^T Q~ l + beta/2 ||l - p||^2`` with
    ``Q~ = Q / mean(diag Q)``. ``beta = 0`` is MGDA; larger ``beta`` trades the
    conflict-avoiding direction for stability and adherence to ``p``
    (``beta -> inf`` is linear scalarisation with ``p``).

    Args:
        beta: β ≥ 0: strength of the pull toward the preference (0: MGDA's min-norm point; large: fixed weights p).
        preference: p on the simplex, one non-negative weight per objective summing to 1; null: uniform.
        tol: Duality-gap tolerance of the iterative solver, used only beyond 12 objectives (up to 12 it is exact).
        max_iter: Iteration limit of that iterative solver.
    """

    def __init__(
        self,
        beta: float = 1.0,
        preference: Optional[Sequence[float]] = None,
        tol: float = 1e-10,
        max_iter: int = 10_000,
    ) -> None:
        try:
            beta = float(beta)
        except (TypeError, ValueError) as err:
            raise ValueError(f"beta must be a nonnegative number, got {beta!r}") from err
        if not math.isfinite(beta) or beta < 0:
            raise ValueError(
                f"beta must be finite and >= 0 (got {beta}); use beta=0 for plain MGDA min-norm "
                "and a large beta to follow the preference"
            )
        tol = float(tol)
        if not math.isfinite(tol) or tol <= 0:
            raise ValueError(f"tol must be a positive finite number, got {tol}")
        if int(max_iter) != max_iter or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        self.beta: float = beta
        self.tol: float = tol
        self.max_iter: int = int(max_iter)
        if preference is None:
            self.preference: list[float] | None = None
            self._p: torch.Tensor | None = None
        else:
            self._p = validate_preference(preference)
            self.preference = [float(v) for v in preference]

    def _preference_for(self, num_objectives: int) -> np.ndarray:
        if self._p is None:
            return np.full(num_objectives, 1.0 / num_objectives)
        return validate_preference(self._p, num_objectives).numpy()

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        q = _validate_gram(gram)
        p = self._preference_for(q.shape[0])
        lam = _solve(_normalize_gram(q), self.beta, p, tol=self.tol, max_iter=self.max_iter)
        return _output(lam, gram)

    def preference_weights(self, num_objectives: int) -> torch.Tensor:
        return torch.from_numpy(self._preference_for(num_objectives))

    def describe(self) -> str:
        pref = "uniform" if self.preference is None else _fmt_list(self.preference)
        return f"RegularizedMinNorm(beta={self.beta:g}, preference={pref})"


def min_norm(gram: torch.Tensor) -> torch.Tensor:
    """MGDA's min-norm weights: ``RegularizedMinNorm(beta=0)(gram)``."""
    return RegularizedMinNorm(beta=0.0)(gram)


class LinearScalarization(Weighting):
    """Fixed weights, ignoring the gradients: ``d = sum_s w_s g_s``.

    The baseline FIRM is compared against, and the ``beta -> inf`` limit of
    [`RegularizedMinNorm`][firm_lightning.RegularizedMinNorm]. The Gram matrix is still checked so a
    mismatch between the configured weights and the objectives fails loudly.
    """

    def __init__(self, weights: Sequence[float]) -> None:
        self._w = validate_preference(weights, name="weights")
        self.weights: list[float] = [float(v) for v in weights]

    def __call__(self, gram: torch.Tensor) -> torch.Tensor:
        q = _validate_gram(gram)
        w = validate_preference(self._w, q.shape[0], name="weights").numpy()
        return _output(w, gram)

    def preference_weights(self, num_objectives: int) -> torch.Tensor:
        return validate_preference(self._w, num_objectives, name="weights")

    def describe(self) -> str:
        return f"LinearScalarization(weights={_fmt_list(self.weights)})"

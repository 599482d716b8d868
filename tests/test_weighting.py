"""Tests for firm_lightning.weighting.

Optimality is checked against independent criteria (KKT conditions, brute force
over a simplex grid, analytic solutions), never against values the solver produced.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from firm_lightning.weighting import (
    EXACT_MAX_OBJECTIVES,
    LinearScalarization,
    RegularizedMinNorm,
    Weighting,
    _normalize_gram,
    _solve_closed_form,
    _solve_iterative,
    _validate_gram,
    min_norm,
    project_to_simplex,
    validate_preference,
)

BETAS = [0.0, 0.1, 1.0, 10.0]


# --------------------------------------------------------------------------- helpers


def random_gram(S: int, P: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(S, P, generator=g, dtype=torch.float64)
    return G @ G.T


def random_preference(S: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.1, 1.0, size=S)
    return (w / w.sum()).tolist()


def normalized(Q: torch.Tensor) -> np.ndarray:
    """Independent re-implementation of Q / mean(diag Q)."""
    q = Q.to(torch.float64).numpy()
    return q / np.mean(np.diag(q))


def objective(qt: np.ndarray, beta: float, p: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Objective at one point (lam of shape (S,)) or many (shape (N, S))."""
    lam = np.atleast_2d(lam)
    quad = 0.5 * np.einsum("ns,sr,nr->n", lam, qt, lam)
    return quad + 0.5 * beta * np.sum((lam - p) ** 2, axis=1)


def assert_on_simplex(lam: torch.Tensor, atol: float = 1e-9) -> None:
    assert lam.dim() == 1
    assert torch.isfinite(lam).all(), lam
    assert (lam >= -atol).all(), lam
    assert abs(float(lam.sum()) - 1.0) <= atol * lam.numel() + 1e-12, lam


def assert_kkt(qt: np.ndarray, beta: float, p: np.ndarray, lam: np.ndarray, tol: float = 1e-6):
    """KKT for min over the simplex: h_s = nu on the support, h_s >= nu elsewhere."""
    h = qt @ lam + beta * (lam - p)
    support = lam > 1e-6
    assert support.any()
    nu = h[support].mean()
    scale = 1.0 + beta
    np.testing.assert_allclose(h[support], nu, atol=tol * scale, err_msg=f"lam={lam}, h={h}")
    assert (h[~support] >= nu - tol * scale).all(), f"lam={lam}, h={h}, nu={nu}"


def simplex_grid_3(step: float) -> np.ndarray:
    n = int(round(1 / step))
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    mask = i + j <= n
    a, b = i[mask] / n, j[mask] / n
    return np.stack([a, b, 1.0 - a - b], axis=1)


# --------------------------------------------------------------------------- optimality


@pytest.mark.parametrize("S", [2, 3, 4, 5])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("uniform", [True, False])
def test_kkt_on_random_gram(S, beta, uniform):
    for seed in range(4):
        for P in (2, S + 3):  # rank-deficient and full-rank Gram matrices
            Q = random_gram(S, P, seed=100 * S + 10 * seed + P)
            pref = None if uniform else random_preference(S, seed)
            lam = RegularizedMinNorm(beta=beta, preference=pref)(Q)
            assert_on_simplex(lam)
            p = np.full(S, 1.0 / S) if pref is None else np.array(pref)
            assert_kkt(normalized(Q), beta, p, lam.numpy())


def test_kkt_sees_inactive_objectives():
    """MGDA on conflicting low-rank gradients drops objectives; the KKT test must see that case."""
    zeros = 0
    for seed in range(10):
        Q = random_gram(4, 2, seed)
        lam = RegularizedMinNorm(beta=0.0)(Q).numpy()
        assert_kkt(normalized(Q), 0.0, np.full(4, 0.25), lam)
        zeros += int((lam <= 1e-6).sum())
    assert zeros > 0


@pytest.mark.parametrize("seed", range(6))
def test_beta0_matches_brute_force_s2(seed):
    Q = random_gram(2, 1 + seed % 3, seed)
    qt = normalized(Q)
    p = np.full(2, 0.5)
    a = np.linspace(0.0, 1.0, 10_001)  # step 1e-4
    grid = np.stack([a, 1.0 - a], axis=1)
    f_grid = objective(qt, 0.0, p, grid).min()
    lam = RegularizedMinNorm(beta=0.0)(Q).numpy()
    f = objective(qt, 0.0, p, lam)[0]
    assert f <= f_grid + 1e-12  # at least as good as every grid point
    assert f >= f_grid - 1e-7  # and the grid is fine enough to be close to the optimum


@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_s3(seed, beta):
    Q = random_gram(3, 1 + seed % 4, seed)
    qt = normalized(Q)
    p = np.array(random_preference(3, seed)) if beta > 0 else np.full(3, 1 / 3)
    grid = simplex_grid_3(1e-3)
    f_grid = objective(qt, beta, p, grid).min()
    pref = p.tolist() if beta > 0 else None
    lam = RegularizedMinNorm(beta=beta, preference=pref)(Q).numpy()
    f = objective(qt, beta, p, lam)[0]
    assert f <= f_grid + 1e-10
    assert f >= f_grid - 1e-5


@pytest.mark.parametrize("S", [2, 3, 5])
def test_large_beta_returns_preference(S):
    pref = random_preference(S, seed=S)
    for seed in range(3):
        lam = RegularizedMinNorm(beta=1e6, preference=pref)(random_gram(S, 4, seed))
        np.testing.assert_allclose(lam.numpy(), pref, atol=1e-5)


def test_beta_moves_lambda_from_mgda_toward_preference():
    Q = random_gram(3, 2, seed=7)
    pref = np.array([0.6, 0.3, 0.1])
    dist = [
        np.abs(RegularizedMinNorm(beta=b, preference=pref.tolist())(Q).numpy() - pref).sum()
        for b in (0.0, 0.1, 1.0, 10.0, 100.0)
    ]
    assert all(d1 >= d2 - 1e-9 for d1, d2 in zip(dist, dist[1:])), dist
    assert dist[-1] < dist[0]


@pytest.mark.parametrize("beta", BETAS + [100.0])
def test_closed_form_matches_iterative_s2(beta):
    for seed in range(8):
        Q = random_gram(2, 1 + seed % 4, seed)
        qt = _normalize_gram(_validate_gram(Q))
        p = np.array(random_preference(2, seed))
        closed = _solve_closed_form(qt, beta, p)
        iterative = _solve_iterative(qt, beta, p)
        np.testing.assert_allclose(closed, iterative, atol=1e-7)
        # The public object uses the closed form for S = 2.
        public = RegularizedMinNorm(beta=beta, preference=p.tolist())(Q).numpy()
        np.testing.assert_allclose(public, iterative, atol=1e-7)


def test_closed_form_clips_to_boundary():
    # g2 = 0.5 g1: the min-norm point of the segment is g2 itself, a = 0 after clipping.
    g1 = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    G = torch.stack([g1, 0.5 * g1])
    lam = RegularizedMinNorm(beta=0.0)(G @ G.T)
    np.testing.assert_allclose(lam.numpy(), [0.0, 1.0], atol=1e-12)
    qt = _normalize_gram(_validate_gram(G @ G.T))
    np.testing.assert_allclose(_solve_iterative(qt, 0.0, np.full(2, 0.5)), [0.0, 1.0], atol=1e-7)


@pytest.mark.parametrize("S", [2, 3, 5])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_scale_invariance(S, beta):
    pref = random_preference(S, seed=S + 1)
    weighting = RegularizedMinNorm(beta=beta, preference=pref)
    for seed in range(3):
        Q = random_gram(S, S + 1, seed)
        ref = weighting(Q).numpy()
        for c in (1e-6, 1.0, 1e6):
            np.testing.assert_allclose(weighting(c * Q).numpy(), ref, atol=1e-7)


def test_normalisation_makes_beta_scale_free():
    """Without normalisation a scaled Gram would behave like a different beta."""
    Q = random_gram(3, 4, seed=3)
    lam_small = RegularizedMinNorm(beta=1.0)(1e-3 * Q).numpy()
    lam_beta_1000 = RegularizedMinNorm(beta=1000.0)(Q).numpy()
    lam_beta_1 = RegularizedMinNorm(beta=1.0)(Q).numpy()
    np.testing.assert_allclose(lam_small, lam_beta_1, atol=1e-7)
    assert np.abs(lam_beta_1 - lam_beta_1000).max() > 1e-3


def test_uniform_preference_equals_norm_penalty():
    """On the simplex ||l - u||^2 = ||l||^2 - 1/S, so penalising ||l||^2 gives the same point."""
    for seed in range(4):
        Q = random_gram(4, 3, seed)
        qt = normalized(Q)
        beta = 0.7
        ref = _solve_iterative(qt + beta * np.eye(4), 0.0, np.full(4, 0.25))
        lam = RegularizedMinNorm(beta=beta)(Q).numpy()
        np.testing.assert_allclose(lam, ref, atol=1e-7)


# --------------------------------------------------------------------------- analytic cases


def test_orthogonal_gradients_s2_analytic():
    # Orthogonal gradients with norms 1 and 2: min-norm point has lambda_s ∝ 1/||g_s||^2.
    Q = torch.diag(torch.tensor([1.0, 4.0]))
    np.testing.assert_allclose(RegularizedMinNorm(beta=0.0)(Q).numpy(), [0.8, 0.2], atol=1e-6)
    np.testing.assert_allclose(min_norm(Q).numpy(), [0.8, 0.2], atol=1e-6)
    qt = _normalize_gram(_validate_gram(Q))
    np.testing.assert_allclose(_solve_iterative(qt, 0.0, np.full(2, 0.5)), [0.8, 0.2], atol=1e-8)


def test_orthogonal_gradients_s3_analytic():
    Q = torch.diag(torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64))
    expected = np.array([16.0, 4.0, 1.0]) / 21.0
    np.testing.assert_allclose(RegularizedMinNorm(beta=0.0)(Q).numpy(), expected, atol=1e-8)


def test_orthogonal_equal_norms_any_beta_is_uniform():
    Q = 3.0 * torch.eye(4, dtype=torch.float64)
    for beta in BETAS:
        np.testing.assert_allclose(RegularizedMinNorm(beta=beta)(Q).numpy(), 0.25, atol=1e-8)


# --------------------------------------------------------------------------- degenerate


def _degenerate_grams(S: int) -> dict[str, torch.Tensor]:
    v = torch.randn(S, generator=torch.Generator().manual_seed(S), dtype=torch.float64)
    return {
        "zeros": torch.zeros(S, S, dtype=torch.float64),
        "rank_one": torch.outer(v, v),
        "identical": torch.full((S, S), 2.5, dtype=torch.float64),
        "one_zero_gradient": torch.diag(torch.tensor([0.0] + [1.0] * (S - 1), dtype=torch.float64)),
    }


@pytest.mark.parametrize("S", [2, 4])
@pytest.mark.parametrize("beta", [0.0, 0.5])
@pytest.mark.parametrize("kind", ["zeros", "rank_one", "identical", "one_zero_gradient"])
def test_degenerate_gram_is_finite_and_on_simplex(S, beta, kind):
    Q = _degenerate_grams(S)[kind]
    pref = random_preference(S, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # degenerate input must not need max_iter either
        lam = RegularizedMinNorm(beta=beta, preference=pref)(Q)
    assert_on_simplex(lam)
    p = np.array(pref)
    if kind != "zeros":
        assert_kkt(normalized(Q), beta, p, lam.numpy())
    if beta > 0 and kind in ("zeros", "identical"):
        # The Gram term is constant on the simplex: only the regulariser is left.
        np.testing.assert_allclose(lam.numpy(), pref, atol=1e-8)
    if beta == 0 and kind == "one_zero_gradient":
        # A zero gradient is the min-norm point: all weight on it.
        np.testing.assert_allclose(lam.numpy()[0], 1.0, atol=1e-6)


def test_tiny_but_nonzero_gram_is_not_treated_as_zero():
    Q = 1e-20 * torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    np.testing.assert_allclose(RegularizedMinNorm(beta=0.0)(Q).numpy(), [0.8, 0.2], atol=1e-8)


# --------------------------------------------------------------------------- solver control


def test_max_iter_warns_and_returns_point_on_simplex():
    Q = random_gram(EXACT_MAX_OBJECTIVES + 1, 2, seed=1)  # beyond the exact solver: the iterative one
    with pytest.warns(RuntimeWarning, match=r"max_iter=1 .*gap"):
        lam = RegularizedMinNorm(beta=0.0, max_iter=1)(Q)
    assert_on_simplex(lam)


def test_no_warning_when_converged():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(5):
            RegularizedMinNorm(beta=0.0)(random_gram(6, 3, seed))
            RegularizedMinNorm(beta=0.0)(random_gram(EXACT_MAX_OBJECTIVES + 2, 3, seed))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("beta", [-0.1, float("nan"), float("inf")])
def test_invalid_beta(beta):
    with pytest.raises(ValueError, match=r"beta must be finite and >= 0"):
        RegularizedMinNorm(beta=beta)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tol": 0.0}, r"tol must be a positive"),
        ({"max_iter": 0}, r"max_iter must be a positive integer"),
    ],
)
def test_invalid_solver_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegularizedMinNorm(**kwargs)


@pytest.mark.parametrize(
    "preference, match",
    [
        (
            [0.6, 0.6],
            r"preference must sum to 1 \(got \[0\.6, 0\.6\], sum 1\.2\); "
            r"pass normalised weights such as \[0\.5, 0\.5\]",
        ),
        ([1.2, -0.2], r"preference must be nonnegative \(got \[1\.2, -0\.2\]\)"),
        ([], r"preference is empty"),
        ([0.5, float("nan")], r"preference contains non-finite"),
        ("ab", r"preference must be a list"),
    ],
)
def test_invalid_preference(preference, match):
    with pytest.raises(ValueError, match=match):
        RegularizedMinNorm(preference=preference)


def test_preference_length_checked_at_call_time():
    weighting = RegularizedMinNorm(preference=[0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"preference has 3 entries but there are 2 objectives"):
        weighting(torch.eye(2))


def test_validate_preference():
    p = validate_preference([0.25, 0.75 + 5e-7], num_objectives=2)
    assert p.dtype == torch.float64
    assert abs(float(p.sum()) - 1.0) < 1e-15
    with pytest.raises(ValueError, match=r"has 2 entries but there are 3 objectives"):
        validate_preference([0.5, 0.5], num_objectives=3)
    with pytest.raises(ValueError, match=r"must sum to 1 .*sum 1\.000002"):
        validate_preference([0.5, 0.500002])


@pytest.mark.parametrize(
    "gram, match",
    [
        (torch.ones(3), r"must be 2-D"),
        (torch.ones(2, 3), r"must be square"),
        (
            torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]),
            r"contains NaN: a reward or loss produced non-finite values",
        ),
        (torch.tensor([[float("inf"), 0.0], [0.0, 1.0]]), r"contains inf"),
        (torch.diag(torch.tensor([-1.0, 1.0])), r"negative diagonal"),
    ],
)
def test_invalid_gram(gram, match):
    with pytest.raises(ValueError, match=match):
        RegularizedMinNorm()(gram)
    with pytest.raises(ValueError, match=match):
        LinearScalarization([0.5, 0.5])(gram)


# --------------------------------------------------------------------------- linear scalarization


def test_linear_scalarization_ignores_gram():
    w = [0.7, 0.2, 0.1]
    ls = LinearScalarization(w)
    for Q in (random_gram(3, 5, 0), torch.zeros(3, 3, dtype=torch.float64), 1e8 * torch.eye(3)):
        np.testing.assert_allclose(ls(Q).numpy(), w, atol=1e-7)


def test_linear_scalarization_validation():
    with pytest.raises(ValueError, match=r"weights has 3 entries but there are 2 objectives"):
        LinearScalarization([0.2, 0.3, 0.5])(torch.eye(2))
    with pytest.raises(ValueError, match=r"weights must sum to 1 \(got \[0\.6, 0\.6\], sum 1\.2\)"):
        LinearScalarization([0.6, 0.6])
    with pytest.raises(ValueError, match=r"weights must be nonnegative"):
        LinearScalarization([1.5, -0.5])


# --------------------------------------------------------------------------- dtype / device / misc


@pytest.mark.parametrize(
    "weighting",
    [RegularizedMinNorm(beta=0.0), RegularizedMinNorm(beta=1.0), LinearScalarization([0.3, 0.3, 0.4])],
    ids=lambda w: w.describe(),
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_device_follow_gram(weighting, dtype):
    Q = random_gram(3, 4, seed=0).to(dtype)
    lam = weighting(Q)
    assert lam.dtype == dtype
    assert lam.device == Q.device
    assert lam.shape == (3,)
    assert_on_simplex(lam.double(), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gram_gives_cuda_lambda():
    Q = random_gram(3, 4, seed=0).float().cuda()
    lam = RegularizedMinNorm(beta=0.5)(Q)
    assert lam.device == Q.device and lam.dtype == torch.float32


def test_output_carries_no_graph():
    G = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    lam = RegularizedMinNorm(beta=0.1)(G @ G.T)
    assert not lam.requires_grad


def test_single_objective():
    np.testing.assert_allclose(RegularizedMinNorm(beta=0.0)(torch.tensor([[3.0]])).numpy(), [1.0])


def test_describe_and_attributes():
    w = RegularizedMinNorm(beta=1.0)
    assert w.describe() == "RegularizedMinNorm(beta=1, preference=uniform)"
    assert w.beta == 1.0 and w.preference is None
    w = RegularizedMinNorm(beta=0.5, preference=[0.7, 0.3])
    assert w.describe() == "RegularizedMinNorm(beta=0.5, preference=[0.7, 0.3])"
    assert w.preference == [0.7, 0.3] and isinstance(w.preference, list)
    ls = LinearScalarization([0.25, 0.75])
    assert ls.weights == [0.25, 0.75]
    assert ls.describe() == "LinearScalarization(weights=[0.25, 0.75])"
    assert isinstance(w, Weighting) and isinstance(ls, Weighting)


def test_constructible_with_jsonargparse():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--weighting", type=Weighting)
    cfg = parser.parse_string(
        "weighting:\n"
        "  class_path: firm_lightning.weighting.RegularizedMinNorm\n"
        "  init_args:\n"
        "    beta: 0.5\n"
        "    preference: [0.7, 0.3]\n"
    )
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    weighting = instantiate(cfg).weighting
    assert isinstance(weighting, RegularizedMinNorm)
    assert weighting.beta == 0.5 and weighting.preference == [0.7, 0.3]


# --------------------------------------------------------------------------- simplex projection


def test_project_to_simplex_optimality():
    g = torch.Generator().manual_seed(0)
    V = 3.0 * torch.randn(50, 5, generator=g, dtype=torch.float64)
    Y = project_to_simplex(V)
    assert Y.shape == V.shape and Y.dtype == V.dtype
    for v, y in zip(V, Y):
        assert_on_simplex(y)
        # Variational inequality (v - y)^T (z - y) <= 0 for all z in the simplex;
        # it is linear in z, so checking the vertices suffices.
        r = v - y
        assert (r - (r @ y) <= 1e-10).all()


def test_project_to_simplex_fixes_simplex_points_and_known_case():
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    np.testing.assert_allclose(project_to_simplex(p).numpy(), p.numpy(), atol=1e-15)
    y = project_to_simplex(torch.tensor([2.0, 0.0, 0.0]))
    assert y.dtype == torch.float32
    np.testing.assert_allclose(y.numpy(), [1.0, 0.0, 0.0], atol=1e-7)
    # Shift-invariant: only differences matter; equal entries share the mass.
    np.testing.assert_allclose(project_to_simplex(torch.tensor([5.0, 5.0])).numpy(), [0.5, 0.5])
    np.testing.assert_allclose(
        project_to_simplex(torch.tensor([0.5, -0.5, 1.5], dtype=torch.float64)).numpy(),
        [0.0, 0.0, 1.0],
    )


# --------------------------------------------------------------------------- against an interior-point reference


def _cvxpy_minimum(G: np.ndarray, beta: float, p: np.ndarray) -> tuple[np.ndarray, float]:
    """The reference: the same QP written on the gradients themselves, solved by cvxpy (Clarabel).

    Returns the weights and sqrt(mean diag Q) (Q~ = (G / that)(G / that)^T). At beta = 0 the minimiser does
    not depend on a common scale of G, so the solver gets G in units of its smallest non-zero gradient norm:
    in units of the mean, a 1e-3 gradient among 1e3 ones is below the solver's tolerances."""
    import cvxpy as cp

    norms = np.linalg.norm(G, axis=1)
    scale = np.sqrt(np.mean(norms**2))
    unit = norms[norms > 0].min() if beta == 0 and (norms > 0).any() else scale
    lam = cp.Variable(G.shape[0])
    problem = cp.Problem(
        cp.Minimize(0.5 * cp.sum_squares((G / unit).T @ lam) + beta / 2 * cp.sum_squares(lam - p)),
        [lam >= 0, cp.sum(lam) == 1],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "solution may be inaccurate" at these tolerances: it is compared, not trusted
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-14, tol_gap_rel=1e-14, tol_feas=1e-14)
    value = np.clip(lam.value, 0.0, None)
    return value / value.sum(), scale


def _gradients(kind: str, S: int, rng: np.random.Generator) -> np.ndarray:
    G = rng.normal(size=(S, 40))
    if kind == "spread":  # norms over 1e-3 .. 1e3: Q~ condition ~1e10
        G *= 10 ** rng.uniform(-3, 3, size=(S, 1))
    elif kind == "collinear":
        G = np.outer(rng.uniform(0.1, 10, size=S) * rng.choice([-1, 1], size=S), G[0])
    elif kind == "zero":
        G[rng.integers(S)] = 0.0
    elif kind == "duplicate":
        G[1] = G[0]
    return G


@pytest.mark.parametrize("kind", ["spread", "collinear", "zero", "duplicate", "plain"])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_the_min_norm_point_equals_an_interior_point_solver(kind, beta):
    """||d|| of the returned weights within 1e-6 relative of cvxpy's minimum (or below it), S = 2..8.

    Before the exact solver, FISTA on Q~ stopped at the wrong support for spread norms: up to 2.0x the
    minimum at S = 3 and 8.7x at S = 5."""
    worst = 0.0
    for S in range(2, 9):
        for seed in range(4):
            rng = np.random.default_rng(1000 * S + seed)
            G = _gradients(kind, S, rng)
            p = np.asarray(random_preference(S, seed)) if beta > 0 else np.full(S, 1.0 / S)
            ref, scale = _cvxpy_minimum(G, beta, p)
            ours = RegularizedMinNorm(beta=beta, preference=p.tolist())(torch.tensor(G @ G.T)).numpy()
            assert_on_simplex(torch.tensor(ours))
            if beta == 0 and kind == "zero":  # analytic: the zero gradient's vertex, d = 0 (cvxpy reaches ~1e-3)
                assert np.linalg.norm(G.T @ ours) == 0.0, (S, seed, ours)
            elif beta == 0:  # the quantity that matters: the norm of the common direction d
                d_ours, d_ref = np.linalg.norm(G.T @ ours), np.linalg.norm(G.T @ ref)
                floor = 1e-9 * np.abs(G).max()  # a zero direction (a zero or opposed gradients): both ~0
                assert d_ours <= d_ref * (1 + 1e-6) + floor, (kind, S, seed, ours, ref)
                worst = max(worst, abs(d_ours - d_ref) / max(d_ref, floor))
            else:
                qt = (G / scale) @ (G / scale).T
                f_ours, f_ref = objective(qt, beta, p, ours)[0], objective(qt, beta, p, ref)[0]
                assert f_ours <= f_ref * (1 + 1e-9) + 1e-15, (kind, S, seed, ours, ref)
                worst = max(worst, abs(f_ours - f_ref) / f_ref)
    assert worst < 1e-3  # and the reference is not far worse either: the two agree


def test_a_tiny_gradient_among_large_ones_gets_all_the_weight():
    """The min-norm point of {g1 tiny, g2, g3 large and opposed}: g1 alone (the issue's λ = [0.65, 0, 0.35])."""
    G = np.zeros((3, 3))
    G[0] = [1e-3, 1e-3, 0.0]
    G[1] = [1e3, 0.0, 1.0]
    G[2] = [-1e3, 5.0, 0.0]
    lam = RegularizedMinNorm(beta=0.0)(torch.tensor(G @ G.T)).numpy()
    ref, _ = _cvxpy_minimum(G, 0.0, np.full(3, 1 / 3))
    assert np.linalg.norm(G.T @ lam) <= np.linalg.norm(G.T @ ref) * (1 + 1e-6)
    np.testing.assert_allclose(lam, ref, atol=1e-6)

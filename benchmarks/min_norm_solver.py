"""The min-norm solver against an interior-point reference, and its cost; prints JSON.

    python benchmarks/min_norm_solver.py

For S = 3, 5, 8 objectives and 20 draws of gradients whose norms spread over 1e-3..1e3, the excess of
||d|| = ||sum_s lambda_s g_s|| over cvxpy/Clarabel's minimum (the same QP on the gradients, the best of
three units), for the exact solver (``RegularizedMinNorm``, beta = 0) and for the iterative FISTA solver it
replaced for S <= 12 (``_solve_iterative``); and the wall time per call of the exact solver.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firm_lightning.weighting import RegularizedMinNorm, _normalize_gram, _solve_iterative, _validate_gram  # noqa: E402


def reference(G: np.ndarray) -> np.ndarray:
    """cvxpy's best over three units of G (the smallest, geometric-mean and largest norm): at one unit the
    tiny gradients fall below its tolerances, at another the large ones overflow them."""
    import cvxpy as cp

    norms = np.linalg.norm(G, axis=1)
    found = []
    for unit in (norms.min(), np.exp(np.log(norms).mean()), norms.max()):
        lam = cp.Variable(G.shape[0])
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares((G / unit).T @ lam)), [lam >= 0, cp.sum(lam) == 1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                problem.solve(solver="CLARABEL", tol_gap_abs=1e-14, tol_gap_rel=1e-14, tol_feas=1e-14)
            except cp.error.SolverError:
                continue
        value = np.clip(lam.value, 0.0, None)
        found.append(value / value.sum())
    return min(found, key=lambda lam: np.linalg.norm(G.T @ lam))


def main() -> None:
    out = {"draws": 20, "norm_spread": "1e-3..1e3", "by_S": {}}
    for S in (3, 5, 8):
        excess = {"exact": [], "fista": []}
        for seed in range(20):
            rng = np.random.default_rng(seed)
            G = rng.normal(size=(S, 50)) * 10 ** rng.uniform(-3, 3, size=(S, 1))
            Q = torch.tensor(G @ G.T)
            best = np.linalg.norm(G.T @ reference(G))
            exact = RegularizedMinNorm(beta=0.0)(Q).numpy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fista = _solve_iterative(_normalize_gram(_validate_gram(Q)), 0.0, np.full(S, 1.0 / S))
            excess["exact"].append(np.linalg.norm(G.T @ exact) / best - 1)
            excess["fista"].append(np.linalg.norm(G.T @ fista) / best - 1)
        weighting, Q = RegularizedMinNorm(beta=0.0), torch.tensor(G @ G.T)
        tic, calls = time.perf_counter(), 50
        for _ in range(calls):
            weighting(Q)
        out["by_S"][S] = {
            "max_relative_excess_exact": float(max(excess["exact"])),
            "max_relative_excess_fista": float(max(excess["fista"])),
            "ms_per_call_exact": 1e3 * (time.perf_counter() - tic) / calls,
        }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

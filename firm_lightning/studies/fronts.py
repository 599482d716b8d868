"""The geometry of Pareto fronts: which points are non-dominated, and the hypervolume they dominate.

Pure numpy on any reward matrix (rows are points, columns objectives, higher is better), meant
to be called on users' own results too: ``firm_lightning.studies.fronts.hypervolume(points,
reference)``, also ``firm_lightning.hypervolume``.
"""

from __future__ import annotations

import numpy as np


def non_dominated(points) -> np.ndarray:
    """Boolean mask of the rows no other row dominates (≥ everywhere and > somewhere).

    Duplicated rows do not dominate each other, so all copies of a non-dominated point are kept.
    """
    p = np.asarray(points, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"points must be a 2-D array (rows = points, columns = objectives); got shape {p.shape}.")
    ge = (p[:, None, :] >= p[None, :, :]).all(-1)
    gt = (p[:, None, :] > p[None, :, :]).any(-1)
    dominated_by = ge & gt  # [j, i]: row j dominates row i
    return ~dominated_by.any(0)


def hypervolume(points, reference) -> float:
    """Volume of the region dominated by ``points`` and dominating ``reference`` (maximisation).

    Exact (slicing over the last objective, recursively); points that do not strictly dominate
    the reference add nothing. Cost grows as n^(S-1): fine for sweeps of tens of points.
    """
    p = np.asarray(points, dtype=float)
    ref = np.asarray(reference, dtype=float)
    if p.ndim != 2 or ref.shape != (p.shape[1],):
        raise ValueError(
            f"points must be (n, S) and reference (S,); got {p.shape} and {ref.shape}."
        )
    p = p[(p > ref).all(1)]
    return float(_slices(p[non_dominated(p)] if len(p) else p, ref))


def _slices(p: np.ndarray, ref: np.ndarray) -> float:
    if len(p) == 0:
        return 0.0
    if p.shape[1] == 1:
        return float(p[:, 0].max() - ref[0])
    order = np.argsort(-p[:, -1])
    volume = 0.0
    for k, i in enumerate(order):
        below = p[order[k + 1], -1] if k + 1 < len(order) else ref[-1]
        if p[i, -1] > below:
            volume += (p[i, -1] - below) * _slices(p[order[: k + 1], :-1], ref[:-1])
    return volume

"""The seeds a federation derives from ``federation.seed``: one stream per (round, client) fit.

A client fit seeded by (seed, round, client) draws the same samples whichever clients ran
before it, in-process or on another machine, in a first run or after a resume.
"""

from __future__ import annotations

import numpy as np


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    return int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0])


def sampling_rng(seed: int, round_idx: int) -> np.random.Generator:
    """Public client sampling (no differential privacy): the same clients for the same round on any rerun."""
    return np.random.default_rng([seed, round_idx])

"""Empirical privacy audit of ``federation.privacy``: a lower bound on ε from planted canaries.

    python benchmarks/dp_audit.py --trials 20000 --sigmas 0 0.5 1 2 4
    python benchmarks/dp_audit.py --trials 20000 --clients 100 --fraction 0.1 --rounds 10 --sigmas 1

Each run is a federation of ``--rounds`` rounds of the library's own server path: the engine's client
sampling (``engine.sample_clients``: Poisson from the secret generator under privacy), the uploads as
``fit_client`` encodes them (``ClientUpdate.for_upload``) and the engine decodes them (``applied_to``),
and the engine's aggregator (``engine.compose_aggregator``: FedAvg, clipping, noise σC over q·N, the
server step). ``--clients`` honest clients upload fixed random updates of norm 2C, orthogonal to the
canary's direction ``u``; one more client, the canary, uploads ``u`` at norm 2C (clipped to C) in every
round it is sampled — or, in a run without the canary, nothing (a zero update: the same mechanism with
that client removed, the normaliser q·N being a public constant). Half of the runs hold the canary,
chosen at random.

The membership test scores a run by ``⟨θ_T − θ_0, u⟩`` on the released adapter and guesses "canary
present" above a threshold. The threshold is chosen on one half of the runs (the one maximising the
estimate); on the other half, Clopper–Pearson upper bounds (97.5 % each, so 95 % jointly) on the false
positive rate α and the false negative rate β give the lower bound
``ε ≥ max(log((1 − δ − α)/β), log((1 − δ − β)/α))`` that every (ε, δ)-DP mechanism satisfies. It
prints JSON: per σ, the runs, canaries, rounds, the lower bound, the accounted ε and the wall time.
σ = 0 means privacy off (plain FedAvg, no clipping): the canary is then plainly visible.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Optional

import numpy as np
import torch
from scipy.stats import beta

from firm_lightning.adapters import ClientUpdate
from firm_lightning.engine import compose_aggregator, sample_clients
from firm_lightning.federation import FederationConfig
from firm_lightning.privacy import DifferentialPrivacy, SecretGenerator

# A small adapter: two LoRA factors of one layer (1,024 entries); the mechanism does not depend on the shapes.
SHAPES = {"layer.lora_A.weight": (8, 64), "layer.lora_B.weight": (64, 8)}
CONFIDENCE = 0.95


def audit(trials: int, sigma: float, clients: int = 10, fraction: float = 1.0, rounds: int = 1,
          clipping_norm: float = 1.0, delta: float = 1e-5, seed: int = 0) -> dict:
    """``trials`` runs (half with the canary, at random); the lower bound on ε and the accounted ε."""
    tic = time.perf_counter()
    privacy = DifferentialPrivacy(clipping_norm, sigma, delta) if sigma > 0 else None
    config = FederationConfig(num_rounds=rounds, num_clients=clients + 1, client_fraction=fraction,
                              min_clients=1, privacy=privacy)
    rng = torch.Generator().manual_seed(seed)
    canary = _direction(_random_adapter(rng), None)
    # The honest clients' updates: fixed, known to the auditor, orthogonal to the canary (its worst case).
    honest = [_scaled(_direction(_random_adapter(rng), canary), 2 * clipping_norm) for _ in range(clients)]
    present = np.random.default_rng(seed).permutation(np.arange(trials) % 2 == 0)
    scores = np.array([_run(config, canary, honest, bool(p), 2 * clipping_norm) for p in present])
    half = trials // 2
    threshold = _best_threshold(scores[:half], present[:half], delta)
    bound, fpr, fnr = epsilon_lower_bound(scores[half:], present[half:], threshold, delta)
    accounted = privacy.epsilon(fraction, rounds) if privacy is not None else math.inf
    return {
        "sigma": sigma, "clipping_norm": clipping_norm if privacy else None, "delta": delta,
        "clients": clients + 1, "client_fraction": fraction, "rounds_per_run": rounds,
        "runs": trials, "canaries": int(present.sum()), "evaluated_runs": trials - half,
        "epsilon_lower_bound": bound, "accounted_epsilon": accounted, "confidence": CONFIDENCE,
        "threshold": threshold, "false_positive_rate": fpr, "false_negative_rate": fnr,
        "wall_s": time.perf_counter() - tic,
    }


def _run(config: FederationConfig, canary: dict, honest: list[dict], with_canary: bool, norm: float) -> float:
    """One federation on the engine's server path; the score ⟨θ_T − θ_0, u⟩ of its released adapter."""
    secret = SecretGenerator() if config.privacy is not None else None
    aggregator = compose_aggregator(config, secret)
    start = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    theta = start
    for round_idx in range(1, config.num_rounds + 1):
        uploads = []
        for client in sample_clients(config, round_idx, secret):
            if client == config.num_clients - 1:  # the canary's slot
                delta = _scaled(canary, norm if with_canary else 0.0)
            else:
                delta = honest[client]
            trained = {k: theta[k] + delta[k] for k in theta}
            update = ClientUpdate(client, [trained], 1, {}).for_upload(theta, None)
            uploads.append(update.applied_to(theta))  # what the engine merges
        theta = aggregator.aggregate(theta, uploads).adapter
    return float(sum((theta[k] - start[k]).flatten() @ canary[k].flatten() for k in theta))


def epsilon_lower_bound(scores: np.ndarray, present: np.ndarray, threshold: float,
                        delta: float) -> tuple[float, float, float]:
    """The (ε, δ) lower bound of the test "present iff score > threshold" at 95 % confidence (Clopper–Pearson
    upper bounds at 97.5 % on its false positive and false negative rates); and those two bounds."""
    bounds, fpr, fnr = _bounds(scores, present, np.array([threshold]), delta)
    return float(bounds[0]), float(fpr[0]), float(fnr[0])


def _bounds(scores: np.ndarray, present: np.ndarray, thresholds: np.ndarray, delta: float):
    """``epsilon_lower_bound`` for every threshold at once."""
    absent_scores, present_scores = np.sort(scores[~present]), np.sort(scores[present])
    false_positives = len(absent_scores) - np.searchsorted(absent_scores, thresholds, side="right")
    false_negatives = np.searchsorted(present_scores, thresholds, side="right")
    fpr = clopper_pearson_upper(false_positives, len(absent_scores))
    fnr = clopper_pearson_upper(false_negatives, len(present_scores))
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.maximum.reduce([np.zeros_like(fpr), np.log((1 - delta - fpr) / fnr),
                                    np.log((1 - delta - fnr) / fpr)])
    return np.nan_to_num(bounds, nan=0.0), fpr, fnr


def clopper_pearson_upper(errors: np.ndarray, n: int) -> np.ndarray:
    """The one-sided 97.5 % Clopper–Pearson upper bound on a rate seen ``errors`` times in ``n``: the
    ``1 − (1 − 0.95)/2`` quantile of Beta(errors + 1, n − errors); 1 when every trial erred."""
    errors = np.asarray(errors)
    level = 1 - (1 - CONFIDENCE) / 2
    return np.where(errors >= n, 1.0, beta.ppf(level, errors + 1, np.maximum(n - errors, 1)))


def _best_threshold(scores: np.ndarray, present: np.ndarray, delta: float) -> float:
    """The threshold whose bound is largest on these (calibration) runs, among their scores."""
    candidates = np.unique(scores)
    return float(candidates[np.argmax(_bounds(scores, present, candidates, delta)[0])])


def _random_adapter(rng: torch.Generator) -> dict:
    return {k: torch.randn(shape, generator=rng) for k, shape in SHAPES.items()}


def _direction(adapter: dict, orthogonal_to: Optional[dict]) -> dict:
    """``adapter`` made orthogonal to the unit direction ``orthogonal_to`` (if given), then of unit norm."""
    if orthogonal_to is not None:
        dot = sum(float((adapter[k] * orthogonal_to[k]).sum()) for k in adapter)
        adapter = {k: adapter[k] - dot * orthogonal_to[k] for k in adapter}
    norm = math.sqrt(sum(float(v.pow(2).sum()) for v in adapter.values()))
    return {k: v / norm for k, v in adapter.items()}


def _scaled(direction: dict, norm: float) -> dict:
    return {k: norm * v for k, v in direction.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000, help="runs per σ (half with the canary)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--clients", type=int, default=10, help="honest clients (the canary is one more)")
    parser.add_argument("--fraction", type=float, default=1.0, help="client_fraction q")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [audit(args.trials, s, args.clients, args.fraction, args.rounds, args.clip, args.delta)
               for s in args.sigmas]
    print(json.dumps({"audits": results}, indent=1))


if __name__ == "__main__":
    main()

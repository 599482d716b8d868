"""The empirical privacy audit (benchmarks/dp_audit.py) on the library's own server path: it detects a
canary when the noise is missing or too small, and its lower bound stays below the accounted ε when the
mechanism is the one the ε is computed for. Small runs (a few hundred federations of one round on a
1,024-entry adapter); the full-size numbers are in docs/reliability.md."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from scipy.stats import binomtest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dp_audit import audit, clopper_pearson_upper  # noqa: E402

from firm_lightning.privacy import DifferentialPrivacy  # noqa: E402

NOISY = 4.0  # σ whose accounted ε (q = 1, one round, δ = 1e-5) is about 1.0


def test_the_audit_detects_the_canary_without_privacy_and_with_too_little_noise(monkeypatch):
    """Privacy off: the canary is plainly in the adapter, and the lower bound is far above the ε a noisy run
    accounts for. A mechanism that adds 1/100 of the noise it accounts for is caught the same way."""
    accounted = DifferentialPrivacy(1.0, NOISY).epsilon(1.0, 1)
    off = audit(trials=400, sigma=0.0, clients=4)
    assert off["epsilon_lower_bound"] > 3 * accounted
    original = DifferentialPrivacy.noise_std
    monkeypatch.setattr(DifferentialPrivacy, "noise_std", lambda self, m: original(self, m) / 100)
    broken = audit(trials=400, sigma=NOISY, clients=4)
    assert broken["accounted_epsilon"] == pytest.approx(accounted)
    assert broken["epsilon_lower_bound"] > 2 * accounted


@pytest.mark.parametrize("sigma", [1.0, NOISY])
def test_with_privacy_on_the_lower_bound_stays_at_or_below_the_accounted_epsilon(sigma):
    result = audit(trials=1000, sigma=sigma, clients=4)
    assert result["runs"] == 1000 and result["canaries"] == 500
    assert 0 <= result["epsilon_lower_bound"] <= result["accounted_epsilon"]


def test_the_bound_uses_clopper_pearson_as_scipy_computes_it():
    """The one-sided 97.5 % bounds are the upper ends of scipy's exact (Clopper–Pearson) 95 % intervals."""
    for errors, n in ((0, 100), (3, 100), (50, 100), (99, 100), (100, 100), (7, 2500)):
        exact = binomtest(errors, n).proportion_ci(confidence_level=0.95, method="exact").high
        assert float(clopper_pearson_upper(errors, n)) == pytest.approx(exact, rel=1e-9)

"""Client-level differential privacy for the in-process orchestrator (DP-FedAvg).

``DifferentialPrivacy`` takes the place of FedAvg (it refuses to wrap any other aggregator,
whose sensitivity to one client would differ), as a wrapper in the manner of Flower's DP
strategy wrappers; it keeps FedAvg's ``server_lr``:

1. each client's delta ``Δ_i = θ_i − θ`` is clipped to norm ``C`` (``dp_clip_norm``);
2. the clipped deltas are averaged with equal weights (example counts would raise the
   sensitivity and are themselves private);
3. Gaussian noise of std ``σ·C/m`` per coordinate is added to that mean, ``σ`` the
   ``dp_noise_multiplier`` and ``m`` the number of clients sampled in the round (the noise on
   their sum is ``σ·C``); the server then steps with ``server_lr``.

The privacy spent is computed by Opacus' RDP accountant, treating every round as one
subsampled Gaussian mechanism with sampling rate ``q = m / num_clients``. The orchestrator
samples a fixed number of clients without replacement rather than Poisson-sampling them;
using the Poisson analysis for it is the usual approximation of DP-FedAvg implementations.
Noise is drawn from torch's global generator, which the orchestrator seeds per round, so a
resumed run draws the same noise.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from firm_lightning.aggregation import AdapterState, AggregationResult, Aggregator, FedAvg
from firm_lightning.client import ClientUpdate


class DifferentialPrivacy(Aggregator):
    def __init__(self, inner: Aggregator, clip_norm: float, noise_multiplier: float, clients_per_round: int) -> None:
        super().__init__(inner.server_lr)
        if type(inner) is not FedAvg:
            raise ValueError(
                f"Differential privacy (federation.dp_clip_norm) needs FedAvg aggregation; got {type(inner).__name__}. "
                "Its noise is calibrated to a mean of clipped updates: use a single-adapter algorithm and aggregator 'fedavg'."
            )
        if not clip_norm > 0:
            raise ValueError(f"federation.dp_clip_norm must be > 0; got {clip_norm}.")
        if noise_multiplier < 0:
            raise ValueError(f"federation.dp_noise_multiplier must be >= 0; got {noise_multiplier}.")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.clients_per_round = clients_per_round

    @property
    def noise_std(self) -> float:
        """Std of the Gaussian noise added to each coordinate of the mean delta."""
        return self.noise_multiplier * self.clip_norm / self.clients_per_round

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        clipped = [clip_update(u, global_state, self.clip_norm) for u in updates]
        # Equal weights; the round's mean is over the clients sampled, so a client that failed
        # counts as a zero update and the noise keeps its calibration.
        total = {k: sum(c[k] - v.float() for c in clipped) for k, v in global_state.items()} if clipped else {}
        mean = {k: total.get(k, torch.zeros_like(v, dtype=torch.float32)) / self.clients_per_round for k, v in global_state.items()}
        noisy = {k: d + self.noise_std * torch.randn(d.shape, dtype=torch.float32) for k, d in mean.items()}
        return AggregationResult(self._step(global_state, noisy), clipped, extra={"dp_noise_std": self.noise_std})


def clip_update(update: ClientUpdate, global_state: AdapterState, clip_norm: float) -> AdapterState:
    """``θ + Δ·min(1, C/‖Δ‖)`` in float32 for a client's one adapter."""
    (state,) = update.adapters
    delta = {k: state[k].float() - v.float() for k, v in global_state.items()}
    norm = float(torch.sqrt(sum(d.pow(2).sum() for d in delta.values())))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.float() + scale * delta[k] for k, v in global_state.items()}


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """(ε, δ)-DP spent after ``rounds`` rounds, from Opacus' RDP accountant (inf without noise)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, rounds)]
    return float(accountant.get_epsilon(delta=delta))


def private(inner: Aggregator, clip_norm: Optional[float], noise_multiplier: float, clients_per_round: int) -> Aggregator:
    """``inner`` wrapped for differential privacy when ``clip_norm`` is set, else ``inner``."""
    if clip_norm is None:
        if noise_multiplier:
            raise ValueError("federation.dp_noise_multiplier needs federation.dp_clip_norm (the noise is σ·C).")
        return inner
    return DifferentialPrivacy(inner, clip_norm, noise_multiplier, clients_per_round)

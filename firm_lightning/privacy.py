"""Client-level differential privacy (DP-FedAvg), the same on every transport.

``federation.privacy: {clipping_norm: C, noise_multiplier: σ, delta: δ}`` turns it on:

1. each client's delta ``Δ_i = θ_i − θ`` is clipped to norm ``C`` (on the server; on the
   client under SecAgg+, where the server never sees one upload);
2. the clipped deltas are summed with equal weights (example counts would raise the
   sensitivity and are themselves private) and divided by ``m``, the number of clients
   *sampled* in the round (a client that failed counts as a zero delta, so the noise keeps its
   calibration);
3. Gaussian noise of std ``σ·C/m`` per coordinate is added to that mean (``σ·C`` on the sum);
   the server then steps with ``server_lr``.

``privacy/epsilon`` is the (ε, δ) spent so far, from Opacus' RDP accountant, treating every
round as one subsampled Gaussian mechanism with rate ``q = m / num_clients``. The engine
samples ``m`` clients without replacement rather than Poisson-sampling them; using the Poisson
analysis for it is the usual approximation of DP-FedAvg implementations.

Threat model: the server is trusted (central DP); the released adapters and metrics are
protected against the clients, their operators and anyone who reads the config. That holds
only if nobody can regenerate the noise or predict which clients were sampled, so both come
from a :class:`SecretGenerator` seeded from the operating system's entropy, never from
``federation.seed``. Its state is saved in the server's checkpoint (resume stays exact): keep
``<output_dir>/checkpoint`` as private as the server itself.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Sequence

import torch

from firm_lightning.adapters import AdapterState, ClientUpdate
from firm_lightning.aggregation import AggregationResult, Aggregator, FedAvg


@dataclass
class DifferentialPrivacy:
    """The ``federation.privacy`` section.

    Args:
        clipping_norm: C: every client's update ``θ_i − θ`` is clipped to this L2 norm.
        noise_multiplier: σ: Gaussian noise of std σ·C/m on the mean of the m sampled clients' clipped updates.
        delta: δ of the (ε, δ) reported as privacy/epsilon.
    """

    clipping_norm: float
    noise_multiplier: float
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.clipping_norm > 0:
            raise ValueError(f"federation.privacy.clipping_norm must be > 0; got {self.clipping_norm}.")
        if not self.noise_multiplier >= 0:
            raise ValueError(f"federation.privacy.noise_multiplier must be >= 0; got {self.noise_multiplier}.")
        if not 0 < self.delta < 1:
            raise ValueError(f"federation.privacy.delta must be in (0, 1); got {self.delta}.")

    def noise_std(self, clients_per_round: int) -> float:
        """Std of the Gaussian noise added to each coordinate of the mean delta."""
        return self.noise_multiplier * self.clipping_norm / clients_per_round

    def epsilon(self, sample_rate: float, rounds: int) -> float:
        """(ε, δ)-DP spent after ``rounds`` rounds, from Opacus' RDP accountant (inf without noise)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return float("inf")
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, sample_rate, rounds)]
        return float(accountant.get_epsilon(delta=self.delta))

    def wrap(self, inner: Aggregator, clients_per_round: int, generator: "SecretGenerator",
             clipped_on_client: bool = False) -> "PrivateMean":
        return PrivateMean(inner, self, clients_per_round, generator, clipped_on_client)


class SecretGenerator:
    """A torch generator seeded from the operating system's entropy, with a checkpointable state."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def state_dict(self) -> dict:
        return {"torch": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["torch"])

    def choice(self, n: int, size: int) -> list[int]:
        """``size`` of ``range(n)`` without replacement, sorted."""
        return sorted(int(i) for i in torch.randperm(n, generator=self.generator)[:size])


class PrivateMean(Aggregator):
    """DP-FedAvg in place of FedAvg: clip, equal-weight sum over ``m``, Gaussian noise, server step.

    With ``clipped_on_client`` (SecAgg+) the updates are trusted to be clipped already and each
    one counts ``num_examples`` times: a secure sum arrives as one update holding the mean of
    ``k`` clients' clipped states with ``num_examples = k``.
    """

    def __init__(self, inner: Aggregator, settings: DifferentialPrivacy, clients_per_round: int,
                 generator: SecretGenerator, clipped_on_client: bool = False) -> None:
        super().__init__(inner.server_lr)
        if type(inner) is not FedAvg:
            raise ValueError(
                f"federation.privacy needs FedAvg aggregation; got {type(inner).__name__}. Its noise is calibrated "
                "to a mean of clipped updates: use a single-adapter algorithm (FIRM, LocalMGDA, Linear) and "
                "federation.aggregator 'fedavg'."
            )
        self.settings = settings
        self.clients_per_round = clients_per_round
        self.generator = generator
        self.clipped_on_client = clipped_on_client

    @property
    def noise_std(self) -> float:
        return self.settings.noise_std(self.clients_per_round)

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        if self.clipped_on_client:
            deltas = [(u.num_examples, _delta(u.adapters[0], global_state)) for u in updates]
        else:
            deltas = [
                (1, clip_delta(_delta(u.adapters[0], global_state), self.settings.clipping_norm)) for u in updates
            ]
        mean = {
            k: sum((w * d[k] for w, d in deltas), torch.zeros_like(v, dtype=torch.float32)) / self.clients_per_round
            for k, v in global_state.items()
        }
        noisy = {
            k: d + self.noise_std * torch.randn(d.shape, dtype=torch.float32, generator=self.generator.generator)
            for k, d in mean.items()
        }
        clients = [{k: v.float() + d[k] for k, v in global_state.items()} for _, d in deltas]
        return AggregationResult(self._step(global_state, noisy), clients, extra={"dp_noise_std": self.noise_std})


def clip_delta(delta: AdapterState, clipping_norm: float) -> AdapterState:
    """``Δ·min(1, C/‖Δ‖)`` (float32)."""
    norm = float(torch.sqrt(sum(d.float().pow(2).sum() for d in delta.values())))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: scale * d.float() for k, d in delta.items()}


def clip_state(state: AdapterState, global_state: AdapterState, clipping_norm: float) -> AdapterState:
    """``θ + clip(θ_i − θ)``: what a client uploads under SecAgg+ with differential privacy."""
    clipped = clip_delta(_delta(state, global_state), clipping_norm)
    return {k: (v.float() + clipped[k]).to(v.dtype) for k, v in global_state.items()}


def _delta(state: AdapterState, global_state: AdapterState) -> AdapterState:
    return {k: state[k].float() - v.float() for k, v in global_state.items()}

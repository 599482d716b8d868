"""Client-level differential privacy (DP-FedAvg, McMahan et al. 2018), the same on every transport.

``federation.privacy: {clipping_norm: C, noise_multiplier: σ, delta: δ}`` turns it on:

1. each client takes part in a round independently with probability ``q = client_fraction``
   (Poisson sampling, drawn from a :class:`SecretGenerator`), so a round trains a random number
   of clients, ``q·N`` on average (``N = num_clients``);
2. each sampled client's delta ``Δ_i = θ_i − θ`` is clipped to norm ``C`` (on the server; on the
   client under SecAgg+, where the server never sees one upload);
3. the clipped deltas are summed with equal weights (example counts would raise the
   sensitivity and are themselves private), Gaussian noise of std ``σ·C`` per coordinate is
   added to the sum, and the result is divided by the *expected* count ``q·N``, a public
   constant (a sampled client that failed counts as a zero delta); the server then steps with
   ``server_lr``.

Neighbouring relation: add or remove one client (all its data); the sum's sensitivity is ``C``.
``privacy/epsilon`` is the ε at δ of the rounds so far, from dp-accounting's RDP accountant
composing one Poisson-subsampled Gaussian mechanism (rate ``q``, noise multiplier ``σ``) per
round. The bound covers the released global adapters and what is computed from them alone;
which outputs those are is the round engine's release policy (``engine.py``).
"""

from __future__ import annotations

import logging
import math
import secrets
from contextlib import contextmanager
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
        noise_multiplier: σ: Gaussian noise of std σ·C on the sum of the sampled clients' clipped updates, which is
            then divided by the expected number of sampled clients q·num_clients.
        delta: δ of the (ε, δ) reported as privacy/epsilon; must be below 1/num_clients.
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

    def check_clients(self, num_clients: int) -> None:
        """Refuse δ ≥ 1/N: a mechanism that publishes one whole client at random would meet such a δ."""
        if self.delta * num_clients >= 1:
            raise ValueError(
                f"federation.privacy.delta={self.delta:g} is not below 1/num_clients = {1 / num_clients:g}: at that δ "
                "releasing one client's data outright would satisfy the guarantee. Set a smaller delta (e.g. "
                f"{_suggested_delta(num_clients):g}, well below 1/{num_clients})."
            )

    def noise_std(self, expected_clients: float) -> float:
        """Std of the Gaussian noise on each coordinate of the mean delta (σ·C on the sum, over q·N)."""
        return self.noise_multiplier * self.clipping_norm / expected_clients

    def epsilon(self, sample_rate: float, rounds: int) -> float:
        """(ε, δ)-DP after ``rounds`` rounds of the Poisson-subsampled Gaussian mechanism at rate ``sample_rate``,
        add-or-remove-one-client relation, from dp-accounting's RDP accountant (inf without noise)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant

        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        round_event = dp_accounting.PoissonSampledDpEvent(sample_rate, gaussian)
        accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        with _fractional_orders_quiet():
            accountant.compose(dp_accounting.SelfComposedDpEvent(round_event, rounds))
            return float(accountant.get_epsilon(self.delta))

    def wrap(self, inner: Aggregator, expected_clients: float, generator: "SecretGenerator",
             clipped_on_client: bool = False) -> "PrivateMean":
        return PrivateMean(inner, self, expected_clients, generator, clipped_on_client)


def _suggested_delta(num_clients: int) -> float:
    return 10.0 ** math.floor(math.log10(0.01 / num_clients))


@contextmanager
def _fractional_orders_quiet():
    """dp-accounting warns on every call that its series for orders just above 1 did not converge (those orders are
    then left out of the bound, which stays valid); one warning per round would bury the run's own lines."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class SecretGenerator:
    """A torch generator seeded from the operating system's entropy, with a checkpointable state.

    It draws the noise and the client sample under privacy: a reader of the config (``federation.seed``)
    can regenerate neither. Its state is in the server's checkpoint, so a resumed run draws what the
    uninterrupted one would; keep ``<output_dir>/checkpoint`` as private as the server.
    """

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def state_dict(self) -> dict:
        return {"torch": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["torch"])

    def poisson(self, n: int, rate: float) -> list[int]:
        """Each of ``range(n)`` independently with probability ``rate`` (Poisson sampling), sorted; may be empty."""
        return [int(i) for i in torch.nonzero(torch.rand(n, generator=self.generator) < rate).flatten()]


class PrivateMean(Aggregator):
    """DP-FedAvg in place of FedAvg: clip, equal-weight sum over the expected count ``q·N``, Gaussian noise,
    server step.

    With ``clipped_on_client`` (SecAgg+) the updates are trusted to be clipped already and each
    one counts ``num_examples`` times: a secure sum arrives as one update holding the mean of
    ``k`` clients' clipped states with ``num_examples = k``.
    """

    def __init__(self, inner: Aggregator, settings: DifferentialPrivacy, expected_clients: float,
                 generator: SecretGenerator, clipped_on_client: bool = False) -> None:
        super().__init__(inner.server_lr)
        if type(inner) is not FedAvg:
            raise ValueError(
                f"federation.privacy needs FedAvg aggregation; got {type(inner).__name__}. Its noise is calibrated "
                "to a mean of clipped updates: use a single-adapter algorithm (FIRM, LocalMGDA, Linear) and "
                "federation.aggregator 'fedavg'."
            )
        self.settings = settings
        self.expected_clients = expected_clients
        self.generator = generator
        self.clipped_on_client = clipped_on_client

    @property
    def noise_std(self) -> float:
        return self.settings.noise_std(self.expected_clients)

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        if self.clipped_on_client:
            deltas = [(u.num_examples, _delta(u.adapters[0], global_state)) for u in updates]
        else:
            deltas = [
                (1, clip_delta(_delta(u.adapters[0], global_state), self.settings.clipping_norm)) for u in updates
            ]
        mean = {
            k: sum((w * d[k] for w, d in deltas), torch.zeros_like(v, dtype=torch.float32)) / self.expected_clients
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


# Weighted by each client's share of training prompts per group: a statistic of the clients' data.
_CLIENT_WEIGHTED_EVALUATION = ("eval/client_mean/", "eval/worst_client/")


def released_row(row: dict) -> dict:
    """What a round's row may publish under privacy: the round, the evaluation of the released adapter on the
    held-out prompts (not the per-client views, which weigh it by the clients' private group shares) and the
    privacy accounting. Everything else in the row is a statistic of the sampled clients' training."""
    return {
        k: v for k, v in row.items()
        if k == "round" or k.startswith("privacy/")
        or (k.startswith("eval/") and not k.startswith(_CLIENT_WEIGHTED_EVALUATION))
    }

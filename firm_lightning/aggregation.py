"""Server-side aggregation of client uploads.

``FedAvg`` averages one adapter per client (FIRM and its single-adapter baselines);
``MinNormOverObjectives`` is FMGDA's server: it averages the per-objective deltas over the
clients, solves min-norm over the ``S`` averaged deltas and steps along their combination.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from firm_lightning.adapters import check_adapter_state
from firm_lightning.client import ClientUpdate
from firm_lightning.weighting import RegularizedMinNorm, Weighting

AdapterState = dict[str, torch.Tensor]


@dataclass
class AggregationResult:
    adapter: AdapterState  # the new global adapter
    client_adapters: list[AdapterState]  # each client's effective θ_i (for the drift metric)
    server_lambdas: Optional[list[float]] = None  # weights chosen on the server (FMGDA)
    extra: dict = field(default_factory=dict)


class Aggregator(abc.ABC):
    def __init__(self, server_lr: float = 1.0) -> None:
        if server_lr < 0:
            raise ValueError(f"server_lr must be >= 0 (got {server_lr}); 1.0 is plain FedAvg.")
        self.server_lr = server_lr

    @abc.abstractmethod
    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult: ...

    def _step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        return {k: (v.float() + self.server_lr * delta[k]).to(v.dtype) for k, v in global_state.items()}


class FedAvg(Aggregator):
    """``θ ← θ + η_g Σ_i w_i (θ_i − θ)`` with ``w_i ∝ n_i``; ``server_lr = 1`` is plain FedAvg."""

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        states = [_single_adapter(u) for u in _checked(global_state, updates)]
        delta = weighted_delta(global_state, states, [u.num_examples for u in updates])
        return AggregationResult(self._step(global_state, delta), states)


class MinNormOverObjectives(Aggregator):
    """FMGDA's server step: ``Δ_s = Σ_i w_i (θ_{i,s} − θ)``, ``λ`` = min-norm of the ``Δ_s``,
    ``θ ← θ + η_g Σ_s λ_s Δ_s``."""

    def __init__(self, server_lr: float = 1.0, weighting: Optional[Weighting] = None) -> None:
        super().__init__(server_lr)
        self.weighting = weighting or RegularizedMinNorm(beta=0.0)

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        updates = _checked(global_state, updates)
        num_objectives = len(updates[0].adapters)
        if any(len(u.adapters) != num_objectives for u in updates):
            raise ValueError("FMGDA needs the same number of per-objective adapters from every client.")
        n = [u.num_examples for u in updates]
        deltas = [weighted_delta(global_state, [u.adapters[s] for u in updates], n) for s in range(num_objectives)]
        flat = torch.stack([_flatten(d) for d in deltas]).double()
        lambdas = self.weighting(flat @ flat.T).tolist()
        combined = {k: sum(lam * d[k] for lam, d in zip(lambdas, deltas)) for k in global_state}
        clients = [
            {k: v.float() + sum(lam * (u.adapters[s][k].float() - v.float()) for s, lam in enumerate(lambdas))
             for k, v in global_state.items()}
            for u in updates
        ]
        return AggregationResult(self._step(global_state, combined), clients, server_lambdas=lambdas)


def weighted_delta(global_state: AdapterState, states: Sequence[AdapterState], num_examples: Sequence[int]) -> AdapterState:
    """``Σ_i w_i (θ_i − θ)`` in float32, ``w_i ∝ n_i``."""
    weights = example_weights(num_examples)
    return {
        k: sum(w * (s[k].float() - v.float()) for w, s in zip(weights, states)) for k, v in global_state.items()
    }


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """Aggregation weights proportional to the clients' example counts."""
    total = sum(num_examples)
    if total <= 0 or any(n < 0 for n in num_examples):
        raise ValueError(f"Client example counts must be >= 0 with a positive total; got {list(num_examples)}.")
    return [n / total for n in num_examples]


def _flatten(state: AdapterState) -> torch.Tensor:
    return torch.cat([t.flatten() for t in state.values()])


def _single_adapter(update: ClientUpdate) -> AdapterState:
    if len(update.adapters) != 1:
        raise ValueError(
            f"Client {update.client_id} uploaded {len(update.adapters)} adapters; FedAvg expects one. "
            "Use MinNormOverObjectives (FMGDA) for per-objective uploads."
        )
    return update.adapters[0]


def _checked(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> Sequence[ClientUpdate]:
    if not updates:
        raise ValueError("No client updates to aggregate: every sampled client failed or none was sampled.")
    for u in updates:
        for state in u.adapters:
            check_adapter_state(state, global_state, f"Update from client {u.client_id}")
    return updates

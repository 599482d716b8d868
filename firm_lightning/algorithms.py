"""Algorithms as configuration: an in-client weighting, a client procedure and an aggregator.

The orchestrator never asks an algorithm's name; adding a fifth algorithm is one class here.

| algorithm   | in-client weighting          | client uploads         | server                         |
|-------------|------------------------------|------------------------|--------------------------------|
| FIRM        | regularised min-norm (β > 0) | one adapter            | FedAvg                         |
| LocalMGDA   | min-norm (β = 0)             | one adapter            | FedAvg                         |
| Linear      | fixed weights p              | one adapter            | FedAvg                         |
| FMGDA       | one objective at a time      | one adapter/objective  | min-norm over averaged deltas  |
"""

from __future__ import annotations

from typing import Optional

from firm_lightning.aggregation import Aggregator, FedAvg, MinNormOverObjectives
from firm_lightning.client import AdapterPerObjective, ClientProcedure, SingleAdapter
from firm_lightning.weighting import LinearScalarization, RegularizedMinNorm, Weighting


class Algorithm:
    """The default: the model's configured weighting, one adapter per client, FedAvg."""

    def __init__(self, name: str = "configured") -> None:
        self.name = name

    def weighting(self, num_objectives: int) -> Optional[Weighting]:
        """The in-client weighting, or None to keep the model's configured one."""
        return None

    def procedure(self) -> ClientProcedure:
        return SingleAdapter()

    def aggregator(self, server_lr: float) -> Aggregator:
        return FedAvg(server_lr)


class FIRM(Algorithm):
    """In-client regularised min-norm weighting; one adapter per client per round."""

    def __init__(self, beta: float = 1.0, preference: Optional[list[float]] = None, name: Optional[str] = None) -> None:
        super().__init__(name or f"firm_beta{beta:g}")
        self.beta = beta
        self.preference = preference

    def weighting(self, num_objectives: int) -> Weighting:
        return RegularizedMinNorm(beta=self.beta, preference=self.preference)


class LocalMGDA(FIRM):
    """FIRM without the regulariser (β = 0): plain MGDA inside each client."""

    def __init__(self, name: str = "local_mgda") -> None:
        super().__init__(beta=0.0, name=name)


class Linear(Algorithm):
    """FedAvg with fixed weights ``λ ≡ p`` (linear scalarisation, MORLHF-style)."""

    def __init__(self, preference: Optional[list[float]] = None, name: str = "linear") -> None:
        super().__init__(name)
        self.preference = preference

    def weighting(self, num_objectives: int) -> Weighting:
        return LinearScalarization(self.preference or [1.0 / num_objectives] * num_objectives)


class FMGDA(Algorithm):
    """Federated MGDA: per-objective local training and uploads; min-norm on the server."""

    def __init__(self, name: str = "fmgda") -> None:
        super().__init__(name)

    def procedure(self) -> ClientProcedure:
        return AdapterPerObjective()

    def aggregator(self, server_lr: float) -> Aggregator:
        return MinNormOverObjectives(server_lr)

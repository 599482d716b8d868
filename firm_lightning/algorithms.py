"""Algorithms as configuration: an in-client weighting, a client procedure and an aggregator.

The orchestrator never asks an algorithm's name, and the model card, ``compare`` and ``pareto``
never test its kind: each algorithm describes itself (``describe``), re-prefers itself
(``with_preference``) and says where it sits on FIRM's β axis (``beta_axis``). Adding a fifth
algorithm is one class here.

| algorithm   | in-client weighting          | client uploads         | server                         | β axis |
|-------------|------------------------------|------------------------|--------------------------------|--------|
| FIRM        | regularised min-norm (β > 0) | one adapter            | FedAvg                         | β      |
| LocalMGDA   | min-norm (β = 0)             | one adapter            | FedAvg                         | 0      |
| Linear      | fixed weights p              | one adapter            | FedAvg                         | ∞      |
| FMGDA       | one objective at a time      | one adapter/objective  | min-norm over averaged deltas  | none   |
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

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

    def describe(self) -> Optional[str]:
        """What the algorithm weights and how, in one line for the model card; None: the model's configured
        weighting (which the card reads from the saved config)."""
        return None

    def with_preference(self, preference: Sequence[float]) -> "Algorithm":
        """A new algorithm, this one with preference ``p`` (same class, name and other settings); this one is
        left as it is. Raises ValueError for an algorithm that takes no preference."""
        raise ValueError(self._no_preference("it keeps the model's configured weighting"))

    @property
    def beta_axis(self) -> Optional[float]:
        """Its place between MGDA (0) and linear scalarisation (∞) on FIRM's β axis; None: not on it."""
        return None

    def settings(self) -> dict:
        """Everything but the name: two algorithms of one class with equal settings train alike."""
        return {k: v for k, v in vars(self).items() if k != "name"}

    def _no_preference(self, why: str) -> str:
        return (f"Algorithm {self.name!r} ({type(self).__name__}) takes no preference: {why}; sweep one whose "
                "in-client weighting takes one (FIRM, LocalMGDA, Linear).")


def _preferred(algorithm: Algorithm, preference: Sequence[float]) -> Algorithm:
    """A copy of ``algorithm`` with another preference (a copy keeps the class and every other setting)."""
    changed = copy.copy(algorithm)
    changed.preference = [float(x) for x in preference]
    return changed


def _preference_words(preference: Optional[Sequence[float]]) -> str:
    return f"p = {list(preference)}" if preference is not None else "p uniform"


class FIRM(Algorithm):
    """In-client regularised min-norm weighting; one adapter per client per round."""

    def __init__(self, beta: float = 1.0, preference: Optional[list[float]] = None, name: Optional[str] = None) -> None:
        super().__init__(name or f"firm_beta{beta:g}")
        self.beta = beta
        self.preference = preference

    def weighting(self, num_objectives: int) -> Weighting:
        return RegularizedMinNorm(beta=self.beta, preference=self.preference)

    def describe(self) -> str:
        return f"FIRM regularised min-norm, β = {self.beta:g}, preference {_preference_words(self.preference)}"

    def with_preference(self, preference: Sequence[float]) -> "FIRM":
        return _preferred(self, preference)

    @property
    def beta_axis(self) -> float:
        return self.beta


class LocalMGDA(FIRM):
    """FIRM without the regulariser (β = 0): plain MGDA inside each client."""

    def __init__(self, name: str = "local_mgda") -> None:
        super().__init__(beta=0.0, name=name)

    def describe(self) -> str:
        return "MGDA min-norm (β = 0)"


class Linear(Algorithm):
    """FedAvg with fixed weights ``λ ≡ p`` (linear scalarisation, MORLHF-style)."""

    def __init__(self, preference: Optional[list[float]] = None, name: str = "linear") -> None:
        super().__init__(name)
        self.preference = preference

    def weighting(self, num_objectives: int) -> Weighting:
        return LinearScalarization(self.preference or [1.0 / num_objectives] * num_objectives)

    def describe(self) -> str:
        return f"linear scalarisation, fixed λ = p, {_preference_words(self.preference)}"

    def with_preference(self, preference: Sequence[float]) -> "Linear":
        return _preferred(self, preference)

    @property
    def beta_axis(self) -> float:
        return math.inf


class FMGDA(Algorithm):
    """Federated MGDA: per-objective local training and uploads; min-norm on the server."""

    def __init__(self, name: str = "fmgda") -> None:
        super().__init__(name)

    def procedure(self) -> ClientProcedure:
        return AdapterPerObjective()

    def aggregator(self, server_lr: float) -> Aggregator:
        return MinNormOverObjectives(server_lr)

    def describe(self) -> str:
        return "none in the clients (one adapter per objective); min-norm over the averaged deltas on the server"

    def with_preference(self, preference: Sequence[float]) -> Algorithm:
        raise ValueError(self._no_preference("it trains one adapter per objective and weights them on the server"))

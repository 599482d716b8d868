"""What a federation carries from one round to the next, and the error that ends one.

Read by the round engine, the hooks, the run writer and the checkpoint; knows nothing of how
the clients are reached (in-process or Flower).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class FederationState:
    """Everything that changes across rounds (what a checkpoint of the federation needs)."""

    round: int  # rounds completed; 0 = only the initial evaluation
    global_adapter: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)  # one row per round, as released
    client_history: list[dict[str, float]] = field(default_factory=list)  # one row per client per round, as released
    # Under differential privacy the released rows hold only what the guarantee covers; the full round
    # rows and the client rows are kept here, for the server-private record only (empty without privacy).
    private_history: list[dict[str, float]] = field(default_factory=list)
    private_client_history: list[dict[str, float]] = field(default_factory=list)
    # The statistics evaluation normalises with (NormalizedReward), calibrated when the run started;
    # each client's own statistics are in client_states["<client>/objectives"].
    objective_state: dict[str, dict] = field(default_factory=dict)
    rng_state: dict[str, Any] = field(default_factory=dict)  # global RNGs when the round ended
    # The server's secret generator (differential privacy): its state, so that resume stays exact.
    # Never derived from federation.seed; keep the checkpoint as private as the server itself.
    secret_rng_state: dict[str, Any] = field(default_factory=dict)
    # What clients keep between their rounds: "<client>/objectives" their objectives' statistics;
    # "<client>" or "<client>_<objective>" their optimiser state with federation.client_optimizer_state=persist.
    client_states: dict[str, dict] = field(default_factory=dict)
    # One entry per client fit that failed: {"round", "client", "error", "traceback"} (the file of its traceback).
    client_failures: list[dict] = field(default_factory=list)
    # Seconds the run has spent up to ``round``, summed over the processes that resumed it (the summary's time);
    # None: a checkpoint written before this was recorded, whose earlier time is unknown.
    wall_s: Optional[float] = None


@dataclass
class ClientFailure:
    """A sampled client that delivered no update: which, in which round, why, and where its traceback is."""

    client_id: int
    round: int
    error: str  # "<exception type>: <message>", or the transport's reason
    traceback: str = ""  # the file holding the full traceback, if any

    def __str__(self) -> str:
        return f"client {self.client_id} failed: {self.error}"

    def record(self) -> dict:
        return {"round": self.round, "client": self.client_id, "error": self.error, "traceback": self.traceback}


class FederationError(RuntimeError):
    """A round that cannot be completed (too few healthy clients); the state before it is saved."""

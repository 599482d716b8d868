"""One client's round: load the global adapter, fit locally, return the upload.

Kept apart from the orchestrator so the same function can run in-process (simulation) or
inside a Flower ``ClientApp`` on another machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader

from firm_lightning.module import FIRMClientModule


@dataclass
class ClientUpdate:
    """What a client uploads after a round, plus its local training summary (for logs only)."""

    client_id: int
    adapter: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


def train_client(
    module: FIRMClientModule,
    global_adapter: dict[str, torch.Tensor],
    dataloader: DataLoader,
    trainer: L.Trainer,
    client_id: int,
    num_examples: int,
) -> ClientUpdate:
    """Fit ``module`` from ``global_adapter`` with a fresh ``trainer`` (fresh optimiser) and collect the upload."""
    module.load_adapter_state(global_adapter)
    trainer.fit(module, train_dataloaders=dataloader)
    return ClientUpdate(client_id, module.adapter_state(), num_examples, module.client_summary())

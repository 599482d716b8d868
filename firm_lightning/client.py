"""One client's round: load the global adapter, fit locally, return what it uploads.

Kept apart from the orchestrator so the same code can run in-process (simulation) or inside a
Flower ``ClientApp`` on another machine. A *client procedure* is what differs between
algorithms on the client side: FIRM trains once and uploads one adapter; FMGDA trains once
per objective and uploads one adapter per objective.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from firm_lightning.module import FIRMClientModule
from firm_lightning.weighting import LinearScalarization


@dataclass
class ClientUpdate:
    """What a client uploads after a round, plus its local training summary (for logs only)."""

    client_id: int
    adapters: list[dict[str, torch.Tensor]]  # one adapter (FIRM), or one per objective (FMGDA)
    num_examples: int
    metrics: dict[str, float]

    def cast(self, dtype: Optional[torch.dtype]) -> "ClientUpdate":
        """The upload with its floating-point tensors in ``dtype`` (e.g. bf16: half the bytes).

        The server casts back to the global adapter's dtype when it aggregates; ``None`` keeps
        the tensors as trained.
        """
        if dtype is None:
            return self
        adapters = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in a.items()} for a in self.adapters]
        return dataclasses.replace(self, adapters=adapters)


def train_client(
    module: FIRMClientModule,
    global_adapter: dict[str, torch.Tensor],
    dataloader: DataLoader,
    trainer: L.Trainer,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Fit ``module`` from ``global_adapter`` with a fresh ``trainer`` (hence a fresh optimiser)."""
    module.load_adapter_state(global_adapter)
    trainer.fit(module, train_dataloaders=dataloader)
    return module.adapter_state(), module.client_summary()


class ClientProcedure(abc.ABC):
    """How a client turns the global adapter into its upload."""

    @abc.abstractmethod
    def run(
        self,
        module: FIRMClientModule,
        global_adapter: dict[str, torch.Tensor],
        dataloader: Callable[[], DataLoader],
        trainer: Callable[[str], L.Trainer],  # called with a tag naming the fit's log directory
        client_id: int,
        num_examples: int,
    ) -> ClientUpdate: ...


class SingleAdapter(ClientProcedure):
    """``K`` local steps with the module's weighting; one adapter uploaded (FIRM, MGDA, linear)."""

    def run(self, module, global_adapter, dataloader, trainer, client_id, num_examples) -> ClientUpdate:
        adapter, metrics = train_client(module, global_adapter, dataloader(), trainer(""))
        return ClientUpdate(client_id, [adapter], num_examples, metrics)


class AdapterPerObjective(ClientProcedure):
    """``K`` local steps once per objective from the same start; ``S`` adapters uploaded (FMGDA).

    Each fit optimises one objective alone (one-hot weights, same batches, same sampling seed),
    so the server receives one update per objective.
    """

    def run(self, module, global_adapter, dataloader, trainer, client_id, num_examples) -> ClientUpdate:
        names = module.objective_names
        configured, seed = module.weighting, torch.initial_seed()
        adapters, summaries = [], []
        try:
            for s, name in enumerate(names):
                torch.manual_seed(seed)
                module.weighting = LinearScalarization([float(i == s) for i in range(len(names))])
                adapter, metrics = train_client(module, global_adapter, dataloader(), trainer(f"_{name}"))
                adapters.append(adapter)
                summaries.append(metrics)
        finally:
            module.weighting = configured
        metrics = {k: sum(m[k] for m in summaries) / len(summaries) for k in summaries[0]}
        # Client-side λ are one-hot by construction; the weighting happens on the server.
        metrics.update({f"lambda/{n}": math.nan for n in names})
        return ClientUpdate(client_id, adapters, num_examples, metrics)

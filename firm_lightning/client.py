"""One client's round: load the global adapter, fit locally, return what it uploads.

``fit_client`` is the one client fit of every transport: the in-process orchestrator calls it
for each sampled client, a Flower ``ClientApp`` calls it on its own node. It seeds the fit by
(seed, round, client), applies the algorithm's in-client weighting for the fit only, releases
the fit's memory even when it raises, and encodes the upload (``federation.upload_dtype``).
A *client procedure* is what differs between algorithms on the client side: FIRM trains once
and uploads one adapter; FMGDA trains once per objective and uploads one adapter per objective.
"""

from __future__ import annotations

import abc
import math
from contextlib import contextmanager
from typing import Callable, MutableMapping, Optional, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader

from firm_lightning.adapters import ClientUpdate
from firm_lightning.client_optimizer import PersistOptimizerState
from firm_lightning.datamodule import ClientData
from firm_lightning.memory import release_client_memory
from firm_lightning.module import FIRMClientModule
from firm_lightning.rewards import load_objective_states, objective_states, stateful
from firm_lightning.seeds import client_seed
from firm_lightning.trainer_factory import TrainerFactory
from firm_lightning.weighting import LinearScalarization, Weighting

__all__ = ["ClientUpdate", "fit_client", "ClientProcedure", "SingleAdapter", "AdapterPerObjective"]


class ClientAlgorithm(Protocol):
    """The client's side of an algorithm (``firm_lightning.algorithms.Algorithm``)."""

    def weighting(self, num_objectives: int) -> Optional[Weighting]: ...

    def procedure(self) -> "ClientProcedure": ...


def fit_client(
    module: FIRMClientModule,
    algorithm: ClientAlgorithm,
    global_adapter: dict[str, torch.Tensor],
    data: ClientData,
    round_idx: int,
    trainers: TrainerFactory,
    seed: int,
    client_states: Optional[MutableMapping[str, dict]] = None,
    persist_optimizer: bool = False,
    upload_dtype: Optional[torch.dtype] = None,
) -> ClientUpdate:
    """Client ``data.client_id``'s fit in round ``round_idx`` from ``global_adapter``; its upload.

    ``client_states``: where this client keeps what it carries between its rounds: its
    objectives' statistics (``NormalizedReward``; restored before the fit, saved after it, so no
    client's statistics depend on which clients trained before it) and, with
    ``persist_optimizer`` (``federation.client_optimizer_state=persist``), its optimiser state.
    """
    if data.num_examples == 0:
        raise ValueError(f"client {data.client_id} has no prompts (an empty shard); use fewer clients or another partition.")
    # Each client fit draws its samples from a seed of its own (seed, round, client): the result
    # does not depend on which clients ran before it, so a resumed run or a client on another
    # machine reproduces it.
    torch.manual_seed(client_seed(seed, round_idx, data.client_id))
    objectives_key = f"{data.client_id}/objectives"
    load_objective_states(module.objectives, client_states.get(objectives_key) if client_states is not None else None)

    def trainer(tag: str) -> L.Trainer:
        persist = []
        if persist_optimizer and client_states is not None:
            persist = [PersistOptimizerState(client_states, f"{data.client_id}{tag}")]
        return trainers.client_trainer(data.client_id, round_idx, tag, persist)

    try:
        with algorithm_weighting(module, algorithm):
            update = algorithm.procedure().run(
                module, global_adapter, dataloader=lambda: data.loader(round_idx), trainer=trainer,
                client_id=data.client_id, num_examples=data.num_examples,
            )
    finally:  # a client that raised must not leave its memory behind either
        release_client_memory()
    if client_states is not None and stateful(module.objectives):
        client_states[objectives_key] = objective_states(module.objectives)
    return update.for_upload(global_adapter, upload_dtype)


@contextmanager
def algorithm_weighting(module: FIRMClientModule, algorithm: ClientAlgorithm):
    """The algorithm's in-client weighting for one fit; the module's configured one afterwards."""
    configured = module.weighting
    weighting = algorithm.weighting(len(module.objective_names))
    module.weighting = weighting if weighting is not None else configured
    try:
        yield
    finally:
        module.weighting = configured


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

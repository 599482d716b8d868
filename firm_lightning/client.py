"""One client's round: load the global adapter, fit locally, return what it uploads.

``fit_client`` is the one client fit of every transport: the in-process orchestrator calls it
for each sampled client, a Flower ``ClientApp`` calls it on its own node. It seeds the fit by
(seed, round, client), hands the algorithm's in-client weighting to each fit's own Trainer
(``FitArguments``: the module's configuration is never changed), releases the fit's memory even
when it raises, and encodes the upload (``federation.upload_dtype``).
A *client procedure* is what differs between algorithms on the client side: FIRM trains once
and uploads one adapter; FMGDA trains once per objective and uploads one adapter per objective.
"""

from __future__ import annotations

import abc
import math
from typing import Callable, MutableMapping, Optional, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader

from firm_lightning.adapters import ClientUpdate
from firm_lightning.client_optimizer import PersistOptimizerState
from firm_lightning.datamodule import ClientData
from firm_lightning.memory import release_client_memory
from firm_lightning.gradients import WEIGHTING_EFFECT
from firm_lightning.module import FitArguments, FIRMClientModule
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
        raise ValueError(
            f"client {data.client_id} has no prompts (an empty shard); use fewer clients or another partition."
        )
    # Each client fit draws its samples from a seed of its own (seed, round, client): the result
    # does not depend on which clients ran before it, so a resumed run or a client on another
    # machine reproduces it.
    torch.manual_seed(client_seed(seed, round_idx, data.client_id))
    objectives_key = f"{data.client_id}/objectives"
    load_objective_states(module.objectives, client_states.get(objectives_key) if client_states is not None else None)

    algorithm_weighting = algorithm.weighting(len(module.objective_names))  # None: the module's configured one

    def trainer(tag: str, weighting: Optional[Weighting] = None) -> L.Trainer:
        callbacks = [FitArguments(weighting if weighting is not None else algorithm_weighting)]
        if persist_optimizer and client_states is not None:
            callbacks.append(PersistOptimizerState(client_states, f"{data.client_id}{tag}"))
        return trainers.client_trainer(data.client_id, round_idx, tag, callbacks)

    try:
        update = algorithm.procedure().run(
            module, global_adapter, dataloader=lambda: data.loader(round_idx), trainer=trainer,
            client_id=data.client_id, num_examples=data.num_examples,
        )
    finally:  # a client that raised must not leave its memory behind either
        release_client_memory()
    if client_states is not None and stateful(module.objectives):
        client_states[objectives_key] = objective_states(module.objectives)
    return update.for_upload(global_adapter, upload_dtype)


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
        trainer: Callable[..., L.Trainer],
        client_id: int,
        num_examples: int,
    ) -> ClientUpdate:
        """One client's local work in one round: from the global adapter to its upload.

        Receives:

        - ``module``: the client module every client shares, holding whatever adapter the last
          fit left: load ``global_adapter`` before each fit (``train_client`` does);
        - ``global_adapter``: the round's global LoRA weights (CPU tensors), to read, not modify;
        - ``dataloader()``: a fresh loader over this client's prompts for this round, per call;
        - ``trainer(tag, weighting=None)``: a fresh Trainer for one fit, per call. ``tag`` ends the
          fit's log directory (distinct per fit of one client round; the persisted optimiser state
          is kept per tag too); ``weighting`` replaces the algorithm's in-client weighting for that
          fit only (``FitArguments``);
        - ``client_id``, ``num_examples``: the client and its prompt count (its FedAvg weight).

        Returns a ``ClientUpdate`` of this ``client_id`` and ``num_examples`` with full adapter
        states ``θ_i`` as trained (``fit_client`` turns them into the upload): one, or one per
        objective, as the algorithm's aggregator expects; and the client's training metrics (the
        ``client_summary`` names, means over its local steps).

        Guarantees to keep: randomness only from torch's global generator, which ``fit_client``
        seeded by (seed, round, client), and the same calls in the same order whatever ran before:
        under DDP every rank runs the procedure in lockstep, and a resumed run repeats it exactly.
        The module's configuration (weighting, sampling, loss) is left as it was. An exception leaves
        the client out of its round (the round engine logs it); ``fit_client`` releases the memory.
        """


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
        names, seed = module.objective_names, torch.initial_seed()
        adapters, summaries = [], []
        for s, name in enumerate(names):
            torch.manual_seed(seed)
            one_hot = LinearScalarization([float(i == s) for i in range(len(names))])
            adapter, metrics = train_client(module, global_adapter, dataloader(), trainer(f"_{name}", one_hot))
            adapters.append(adapter)
            summaries.append(metrics)
        metrics = {k: sum(m[k] for m in summaries) / len(summaries) for k in summaries[0]}
        # Client-side λ are one-hot by construction (λ = p: no weighting effect); the weighting happens on the server.
        metrics.update({f"lambda/{n}": math.nan for n in names})
        metrics.update({key: math.nan for key in WEIGHTING_EFFECT})
        return ClientUpdate(client_id, adapters, num_examples, metrics)

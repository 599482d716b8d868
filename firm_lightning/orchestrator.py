"""``FederatedOrchestrator``: a federation in one process (the in-process transport).

Each round the round engine (``engine.py``) samples the clients; for each, a fresh Lightning
``Trainer`` fits the one shared ``FIRMClientModule`` from the global adapter (``fit_client``:
adapter state dicts are swapped in and out, the base model exists once); the engine merges the
uploads, evaluates, records and checkpoints. A client that raises is left out of its round; the
round goes on if at least ``min_clients`` uploads remain.
"""

from __future__ import annotations

import dataclasses
import logging
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from firm_lightning.adapters import ClientUpdate
from firm_lightning.algorithms import Algorithm
from firm_lightning.client import fit_client
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.distributed import announce_client_fit, serve_client_fits
from firm_lightning.engine import RoundEngine
from firm_lightning.federation import FederationConfig
from firm_lightning.memory import steady_memory
from firm_lightning.module import FIRMClientModule
from firm_lightning.report import RunWriter
from firm_lightning.state import FederationError, FederationState
from firm_lightning.trainer_factory import TrainerFactory, quiet_lightning, stays_on_device

__all__ = ["FederatedOrchestrator", "FederationConfig", "FederationState", "FederationError", "run_federation"]

_log = logging.getLogger(__name__)


class FederatedOrchestrator:
    """Runs a whole federation in this process; ``algorithm`` (if given) replaces ``config.algorithm``."""

    def __init__(
        self,
        module: FIRMClientModule,
        datamodule: PromptDataModule,
        config: FederationConfig,
        trainer_factory: TrainerFactory,
        algorithm: Optional[Algorithm] = None,
        writer: Optional[RunWriter] = None,
        echo: Callable[[str], None] = print,
    ) -> None:
        if algorithm is not None:
            config = dataclasses.replace(config, algorithm=algorithm)
        self.module = module
        self.datamodule = datamodule
        self.config = config
        self.trainers = trainer_factory
        self.echo = echo
        self.engine = RoundEngine(module, datamodule, config, trainer_factory, writer=writer, echo=echo)

    def run(self) -> FederationState:
        """The whole federation, in this process; returns its final state.

        Starts or resumes (``federation.resume``), then per round: the engine samples the clients, each
        fits in turn on the one shared module (a client that raises is reported and left out of the
        round), the engine concludes the round (merge, evaluate, record, checkpoint, hooks). Stops after
        ``num_rounds`` or when a callback asks; the run folder is then finished (final adapter, plots,
        summary). Raises ``FederationError`` when a round has fewer than ``min_clients`` usable uploads
        (the state after the previous round stays saved for a resume). The module ends on the device it
        started on, holding the last adapter the engine loaded into it.
        """
        engine = self.engine
        with quiet_lightning(self.config.quiet), stays_on_device(self.module), steady_memory():
            state = engine.start()
            for round_idx in engine.remaining_rounds(state):
                clients = engine.begin_round(state, round_idx)
                client_states = dict(state.client_states)  # each client's statistics (and optimiser, persisted)
                updates, failures = self.train_clients(state.global_adapter, clients, round_idx, client_states)
                state = engine.conclude(state, round_idx, updates, failures, client_states=client_states)
                if engine.stop_reason:
                    break
            return engine.finish(state)

    def train_clients(
        self, global_adapter: dict, clients: list[int], round_idx: int, client_states: Optional[dict] = None
    ) -> tuple[list[ClientUpdate], list[str]]:
        """Fit each client; one that raises is reported and left out.

        One client's fault must not end the federation."""
        updates, failures = [], []
        for client_id in clients:
            try:
                updates.append(self.train_one(global_adapter, client_id, round_idx, client_states))
            except Exception as error:
                reason = f"client {client_id} failed: {type(error).__name__}: {error}"
                failures.append(reason)
                self.echo(f"round {round_idx} | {reason} (left out of this round)")
                _log.error(
                    "round %d, client %d raised:\n%s", round_idx, client_id, "".join(traceback.format_exception(error))
                )
        return updates, failures

    def train_one(
        self, global_adapter: dict, client_id: int, round_idx: int, client_states: Optional[dict] = None
    ) -> ClientUpdate:
        """One client's fit and upload, with the client hooks around it."""
        self.engine.client_started(round_idx, client_id)
        # trainer.strategy=ddp: the other ranks run this same fit with rank 0 (firm_lightning/distributed.py).
        announce_client_fit(global_adapter, client_id, round_idx, client_states)
        update = self.fit(global_adapter, client_id, round_idx, client_states)
        self.engine.client_finished(round_idx, update)
        return update

    def fit(
        self, global_adapter: dict, client_id: int, round_idx: int, client_states: Optional[dict] = None
    ) -> ClientUpdate:
        """The client fit itself: what every rank runs for a client under DDP (``serve_client_fits``)."""
        return fit_client(
            self.module,
            self.engine.algorithm,
            global_adapter,
            self.datamodule.client_data(client_id),
            round_idx,
            self.trainers,
            self.config.seed,
            client_states=client_states,
            persist_optimizer=self.config.client_optimizer_state == "persist",
            upload_dtype=self.config.upload_torch_dtype,
        )

    def serve(self) -> int:
        """A rank > 0 under DDP: run the client fits rank 0 announces until it releases this rank; how many ran."""
        self.datamodule.setup("fit")
        with quiet_lightning(True), stays_on_device(self.module), steady_memory():
            return serve_client_fits(self.fit)


def run_federation(
    module: FIRMClientModule,
    datamodule: PromptDataModule,
    federation: FederationConfig,
    trainer_config: dict,
    algorithm: Algorithm,
    start_adapter: dict[str, torch.Tensor],
    run_dir: Path,
    echo: Callable[[str], None] = print,
    **changes,
) -> FederationState:
    """One federation of ``algorithm`` from ``start_adapter`` in its own ``run_dir``.

    What sweeps and comparisons repeat: every run starts from the same adapter, with the
    federation settings but ``changes`` (e.g. ``seed``).
    """
    module.load_adapter_state(start_adapter)
    config = dataclasses.replace(federation, output_dir=str(run_dir), algorithm=algorithm, **changes)
    factory = TrainerFactory(trainer_config, run_dir)
    return FederatedOrchestrator(module, datamodule, config, factory, echo=echo).run()

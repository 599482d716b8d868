"""``FederatedOrchestrator``: a federation in one process (the in-process transport).

Each round the round engine (``engine.py``) samples the clients; for each, a fresh Lightning
``Trainer`` fits the one shared ``FIRMClientModule`` from the global adapter (``fit_client``:
adapter state dicts are swapped in and out, the base model exists once); the engine merges the
uploads, evaluates, records and checkpoints. A client that raises is left out of its round (one
line, its traceback in the run folder); the round goes on if at least ``min_clients`` uploads
remain, and the run stops when a client fails the same way in ``max_failed_rounds`` rounds in a row.
"""

from __future__ import annotations

import dataclasses
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
from firm_lightning.run_folder import RunFolder
from firm_lightning.state import ClientFailure, FederationError, FederationState
from firm_lightning.trainer_factory import TrainerFactory, keyboard_interrupts, quiet_lightning, stays_on_device

__all__ = ["FederatedOrchestrator", "FederationConfig", "FederationState", "FederationError", "run_federation"]


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

    def run(self, accepted: Callable[[], None] = lambda: None) -> FederationState:
        """The whole federation, in this process; returns its final state.

        Starts or resumes (``federation.resume``; nothing is written until every check has passed and
        round 0 is evaluated, then ``accepted`` is called: the CLI saves ``config.yaml`` there), then per
        round: the engine samples the clients, each fits in turn on the one shared module (a client that
        raises is reported and left out of the round), the engine concludes the round (merge, evaluate,
        record, checkpoint, hooks). Stops after
        ``num_rounds`` or when a callback asks; the run folder is then finished (final adapter, plots,
        summary). Raises ``FederationError`` when a round has fewer than ``min_clients`` usable uploads
        or a client fails the same way round after round (the state after the previous round stays saved
        for a resume), and ``KeyboardInterrupt`` on Ctrl-C wherever it lands. The module ends on the
        device it started on, holding the last adapter the engine loaded into it.
        """
        engine = self.engine
        with keyboard_interrupts(), quiet_lightning(self.config.quiet), stays_on_device(self.module), steady_memory():
            state = engine.start(accepted)
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
    ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        """Fit each client; one that raises is reported (one line, its traceback in the run folder) and left out.

        One client's fault must not end the federation (the engine ends it when the fault repeats)."""
        updates, failures = [], []
        for client_id in clients:
            try:
                updates.append(self.train_one(global_adapter, client_id, round_idx, client_states))
            except Exception as error:
                failures.append(self.engine.client_failed(
                    round_idx, client_id, f"{type(error).__name__}: {error}", "".join(traceback.format_exception(error))
                ))
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
    """One federation of ``algorithm`` from ``start_adapter`` in its own ``run_dir``, a run of a sweep.

    What sweeps and comparisons repeat: every run starts from the same adapter, with the
    federation settings but ``changes`` (e.g. ``seed``). The run holds its folder's lock; a run the
    sweep asks for again (it was not finished as asked: the caller reuses finished ones) resumes
    with ``federation.resume`` when it saved a checkpoint, and otherwise starts over, its earlier
    files removed first: a sweep's runs are its own, never mixed.
    """
    folder = RunFolder(run_dir)
    resume = federation.resume and folder.has_checkpoint()
    module.load_adapter_state(start_adapter)
    config = dataclasses.replace(federation, output_dir=str(run_dir), algorithm=algorithm, resume=resume,
                                 resume_from="latest", overwrite=not resume, **changes)
    factory = TrainerFactory(trainer_config, run_dir)
    with folder.lock("a run of a sweep"):
        return FederatedOrchestrator(module, datamodule, config, factory, echo=echo).run()

"""``FederatedOrchestrator``: the server loop of a simulated federation.

Each round: sample clients → for each, a fresh ``Trainer`` fits the one shared
``FIRMClientModule`` from the global adapter (adapter state dicts are swapped in and out;
the base model exists once) → aggregate the uploads → evaluate the new global adapter on the
held-out prompts with a fixed sampling seed → record metrics and save the adapter.

All that changes from round to round lives in one ``FederationState``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch

from firm_lightning.algorithms import Algorithm
from firm_lightning.client import ClientUpdate
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.federation_metrics import lambda_dispersion, payload_bytes, update_dispersion
from firm_lightning.memory import release_client_memory, steady_memory
from firm_lightning.module import FIRMClientModule
from firm_lightning.report import RunWriter
from firm_lightning.trainer_factory import TrainerFactory


@dataclass
class FederationConfig:
    """The ``federation:`` section of the config (``--federation.*`` on the command line)."""

    num_rounds: int = 5
    num_clients: int = 4
    client_fraction: float = 1.0  # fraction q of the clients sampled per round
    min_clients: int = 1  # ... but at least this many
    server_lr: float = 1.0  # η_g; 1.0 is plain FedAvg of the adapters
    seed: int = 0
    output_dir: str = "runs/firm"
    save_adapters: bool = True  # the global adapter after every round (False: only the final one)
    upload_dtype: Optional[Literal["bfloat16", "float16"]] = None  # 16-bit uploads: half the uplink bytes
    quiet: bool = True  # hide Lightning's per-trainer start-up messages

    def __post_init__(self) -> None:
        if self.num_rounds < 1 or self.num_clients < 1:
            raise ValueError("federation.num_rounds and federation.num_clients must be >= 1.")
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"federation.client_fraction must be in (0, 1]; got {self.client_fraction}.")
        if not 1 <= self.min_clients <= self.num_clients:
            raise ValueError(
                f"federation.min_clients must be between 1 and num_clients={self.num_clients}; got {self.min_clients}."
            )


@dataclass
class FederationState:
    """Everything that changes across rounds (what a checkpoint of the federation needs)."""

    round: int  # rounds completed; 0 = only the initial evaluation
    global_adapter: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)  # one row per round
    client_history: list[dict[str, float]] = field(default_factory=list)  # one row per client per round


class FederatedOrchestrator:
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
        if datamodule.num_clients != config.num_clients:
            raise ValueError(
                f"data.num_clients={datamodule.num_clients} but federation.num_clients={config.num_clients}; "
                "set them equal (the CLI links them)."
            )
        self.module = module
        self.datamodule = datamodule
        self.config = config
        self.trainers = trainer_factory
        self.algorithm = algorithm or Algorithm()
        self.procedure = self.algorithm.procedure()
        self.aggregator = self.algorithm.aggregator(config.server_lr)
        self.writer = writer or RunWriter(
            config.output_dir, module.objective_names, module.policy.peft_config["default"], echo,
            save_every_round=config.save_adapters,
        )
        self.echo = echo

    # ---- the loop ----

    def run(self) -> FederationState:
        start = time.perf_counter()
        with (
            quiet_lightning(self.config.quiet),
            self._algorithm_weighting(),
            stays_on_device(self.module),
            steady_memory(),
        ):
            self.datamodule.setup("fit")
            state = self.initial_state()
            for round_idx in range(state.round + 1, self.config.num_rounds + 1):
                state = self.run_round(state, round_idx)
        self.writer.finish(state, time.perf_counter() - start, self.config)
        return state

    @contextmanager
    def _algorithm_weighting(self):
        """The algorithm's in-client weighting for this run; the module's own one afterwards."""
        configured = self.module.weighting
        weighting = self.algorithm.weighting(len(self.module.objective_names))
        self.module.weighting = weighting if weighting is not None else configured
        try:
            yield
        finally:
            self.module.weighting = configured

    def initial_state(self) -> FederationState:
        adapter = self.module.adapter_state()
        row = {"round": 0, **self.evaluate(adapter)}
        state = FederationState(round=0, global_adapter=adapter, history=[row])
        self.writer.record_round(state, row, [])
        self.echo(f"round 0/{self.config.num_rounds} (initial adapter) | {_format_eval(row)}")
        return state

    def run_round(self, state: FederationState, round_idx: int) -> FederationState:
        tic = time.perf_counter()
        clients = self.sample_clients(round_idx)
        self.echo(f"round {round_idx}/{self.config.num_rounds} | training clients {clients} ...")
        updates = [self.train_one(state.global_adapter, c, round_idx) for c in clients]
        result = self.aggregator.aggregate(state.global_adapter, updates)
        client_rows = [self._client_row(u, round_idx, state.global_adapter) for u in updates]
        row = {
            "round": round_idx,
            **self.evaluate(result.adapter),
            **self._round_metrics(updates, result, state.global_adapter, client_rows),
            "time/round_s": time.perf_counter() - tic,
        }
        state = FederationState(
            round=round_idx,
            global_adapter=result.adapter,
            history=[*state.history, row],
            client_history=[*state.client_history, *client_rows],
        )
        self.writer.record_round(state, row, client_rows)
        self.echo(
            f"round {round_idx}/{self.config.num_rounds} | {_format_eval(row)} | "
            f"λ-dispersion {row['lambda_dispersion']:.4f} | update dispersion {row['update_dispersion']:.3f} | "
            f"{row['time/round_s']:.1f}s"
        )
        return state

    def sample_clients(self, round_idx: int) -> list[int]:
        """Seeded by (seed, round): the same clients for the same round on any rerun."""
        n = self.config.num_clients
        m = min(n, max(self.config.min_clients, math.ceil(self.config.client_fraction * n)))
        rng = np.random.default_rng([self.config.seed, round_idx])
        return sorted(int(c) for c in rng.choice(n, size=m, replace=False))

    def train_one(self, global_adapter: dict, client_id: int, round_idx: int) -> ClientUpdate:
        # Each client fit draws its samples from a seed of its own (seed, round, client): the
        # result does not depend on which clients ran before it, so a resumed run or a client
        # on another machine reproduces it.
        torch.manual_seed(client_seed(self.config.seed, round_idx, client_id))
        update = self.procedure.run(
            self.module,
            global_adapter,
            dataloader=lambda: self.datamodule.client_dataloader(client_id, round_idx=round_idx),
            trainer=lambda tag: self.trainers.client_trainer(client_id, round_idx, tag),
            client_id=client_id,
            num_examples=self.datamodule.num_examples(client_id),
        )
        release_client_memory()
        upload_dtype = getattr(torch, self.config.upload_dtype) if self.config.upload_dtype else None
        return update.cast(upload_dtype)

    def evaluate(self, adapter: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean reward per objective of ``adapter`` on the held-out prompts (fixed sampling seed)."""
        self.module.load_adapter_state(adapter)
        trainer = self.trainers.eval_trainer()
        results = trainer.validate(self.module, dataloaders=self.datamodule.val_dataloader(), verbose=False)
        return {k: float(v) for k, v in results[0].items()}

    # ---- metrics ----

    def _client_row(self, update: ClientUpdate, round_idx: int, global_adapter: dict) -> dict:
        return {
            "round": round_idx,
            "client": update.client_id,
            "num_examples": update.num_examples,
            "comm/bytes_up": sum(payload_bytes(a) for a in update.adapters),
            "comm/bytes_down": payload_bytes(global_adapter),
            **update.metrics,
        }

    def _round_metrics(self, updates: list[ClientUpdate], result, global_adapter: dict, client_rows: list[dict]) -> dict:
        names = self.module.objective_names
        lambdas = [[u.metrics[f"lambda/{n}"] for n in names] for u in updates]
        metrics = {
            "lambda_dispersion": lambda_dispersion(lambdas),
            "update_dispersion": update_dispersion(result.client_adapters, global_adapter),
            "comm/bytes_up": sum(r["comm/bytes_up"] for r in client_rows),
            "comm/bytes_down": sum(r["comm/bytes_down"] for r in client_rows),
            "comm/bytes_up_per_client": client_rows[0]["comm/bytes_up"],
            "clients": len(updates),
        }
        for key in [f"train/reward/{n}" for n in names] + [f"lambda/{n}" for n in names] + ["train/kl"]:
            metrics[key] = float(np.mean([u.metrics[key] for u in updates]))
        if result.server_lambdas is not None:
            metrics.update({f"server_lambda/{n}": lam for n, lam in zip(names, result.server_lambdas)})
        return metrics


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
    config = dataclasses.replace(federation, output_dir=str(run_dir), **changes)
    factory = TrainerFactory(trainer_config, run_dir)
    return FederatedOrchestrator(module, datamodule, config, factory, algorithm, echo=echo).run()


@contextmanager
def stays_on_device(module: torch.nn.Module):
    """Keep the module (base model included) on the accelerator between the per-client fits.

    Lightning's strategy teardown calls ``module.cpu()`` after every ``fit`` and ``validate``:
    with one Trainer per client per round that would copy the base model host↔device
    (clients + 1) times per round. The next Trainer puts it on its own device anyway.
    """
    module.cpu = lambda: module  # the instance attribute shadows nn.Module.cpu for the run
    try:
        yield
    finally:
        del module.cpu


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    return int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0])


def _format_eval(row: dict) -> str:
    return "eval " + " ".join(f"{k.removeprefix('eval/reward/')}={v:.3f}" for k, v in row.items() if k.startswith("eval/reward/"))


@contextmanager
def quiet_lightning(enabled: bool):
    """Hide the start-up chatter that one Trainer per client per round would repeat hundreds of times."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        for pattern in (
            ".*does not have many workers.*",
            ".*smaller than the logging interval.*",
            ".*have no `val_dataloader`.*",
            ".*treespec.*",
        ):
            warnings.filterwarnings("ignore", message=pattern)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)

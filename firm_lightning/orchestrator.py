"""``FederatedOrchestrator``: the server loop of a simulated federation.

Each round: sample clients → for each, a fresh ``Trainer`` fits the one shared
``FIRMClientModule`` from the global adapter (adapter state dicts are swapped in and out;
the base model exists once) → aggregate the uploads → evaluate the new global adapter on the
held-out prompts with a fixed sampling seed → record metrics and save the adapter.

All that changes from round to round lives in one ``FederationState``, saved atomically after
every round (``checkpoint.py``) so that ``resume`` continues from the last finished round.
A client that raises, or whose upload fails validation, is left out of its round; the round
goes on if at least ``min_clients`` uploads remain.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch

from firm_lightning import checkpoint
from firm_lightning.aggregation import screen_update, with_rule
from firm_lightning.algorithms import Algorithm
from firm_lightning.callbacks import CallbackList, FederationCallback
from firm_lightning.client import ClientUpdate
from firm_lightning.client_optimizer import PersistOptimizerState
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.federation_metrics import lambda_dispersion, payload_bytes, update_dispersion
from firm_lightning.memory import release_client_memory, steady_memory
from firm_lightning.module import FIRMClientModule
from firm_lightning.privacy import epsilon, private
from firm_lightning.progress import ProgressMode, progress_callback
from firm_lightning.report import RunWriter
from firm_lightning.round_logging import RoundLogger
from firm_lightning.trainer_factory import TrainerFactory

_log = logging.getLogger(__name__)


@dataclass
class FederationConfig:
    """The ``federation:`` section of the config (``--federation.*`` on the command line).

    Args:
        num_rounds: Number of federated rounds N (server aggregations).
        num_clients: Number of clients; the prompts are partitioned over them (linked to data.num_clients).
        client_fraction: Fraction q of the clients sampled per round.
        min_clients: At least this many clients per round, whatever client_fraction gives.
        server_lr: Server learning rate η_g: θ ← θ + η_g Σ_i w_i (θ_i − θ); 1.0 is plain FedAvg of the adapters.
        seed: Seeds the LoRA initialisation, the data split, client sampling and every client fit (linked to data.seed).
        output_dir: Folder for metrics, adapters, plots, logs and the resolved config.
        save_adapters: Save the global adapter after every round (False: only the final one).
        upload_dtype: Cast client uploads to bfloat16 or float16 (half the uplink bytes); null keeps float32.
        quiet: Hide Lightning's start-up messages, which one Trainer per client per round would repeat.
        progress: Round progress: a bar in a terminal and plain lines otherwise (auto), always a bar, always lines, or off.
        client_optimizer_state: reset: a fresh client optimiser every round (stateless clients);
            persist: each client keeps its optimiser (and lr scheduler) state between its rounds (cross-silo).
        resume: Continue from <output_dir>/checkpoint (the last finished round); more num_rounds extends the run.
        aggregator: fedavg, or a robust rule in place of FedAvg: median (coordinate-wise) or trimmed_mean.
        trim_fraction: Share of clients cut from each end per coordinate (trimmed_mean).
        max_update_norm: Reject an upload whose ‖θ_i − θ‖ exceeds this (null: no bound).
        dp_clip_norm: C: clip every client's delta to this norm; enables DP-FedAvg (null: off).
        dp_noise_multiplier: σ: Gaussian noise of std σ·C/m on the mean of m clipped deltas.
        dp_delta: δ of the (ε, δ) reported as privacy/epsilon.
        callbacks: Federation callbacks (firm_lightning.callbacks.FederationCallback subclasses, by class_path),
            e.g. EarlyStopping or SaveBestAdapter; Lightning callbacks go under trainer.callbacks.
    """

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
    resume: bool = False  # continue from <output_dir>/checkpoint (the last finished round)
    aggregator: Literal["fedavg", "median", "trimmed_mean"] = "fedavg"  # robust rules replace FedAvg
    trim_fraction: float = 0.1  # share of clients cut from each end per coordinate (trimmed_mean)
    max_update_norm: Optional[float] = None  # reject an upload whose ‖θ_i − θ‖ exceeds this
    dp_clip_norm: Optional[float] = None  # C: clip every client's delta to this norm (enables DP)
    dp_noise_multiplier: float = 0.0  # σ: Gaussian noise of std σ·C/m on the mean of m clipped deltas
    dp_delta: float = 1e-5  # δ of the (ε, δ) reported as privacy/epsilon
    progress: ProgressMode = "auto"
    client_optimizer_state: Literal["reset", "persist"] = "reset"
    callbacks: list[FederationCallback] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_rounds < 1 or self.num_clients < 1:
            raise ValueError("federation.num_rounds and federation.num_clients must be >= 1.")
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"federation.client_fraction must be in (0, 1]; got {self.client_fraction}.")
        if not 1 <= self.min_clients <= self.num_clients:
            raise ValueError(
                f"federation.min_clients must be between 1 and num_clients={self.num_clients}; got {self.min_clients}."
            )
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"federation.max_update_norm must be > 0 (or null for no bound); got {self.max_update_norm}.")
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"federation.dp_delta must be in (0, 1); got {self.dp_delta}.")
        if self.client_optimizer_state not in ("reset", "persist"):
            raise ValueError(f"federation.client_optimizer_state must be 'reset' or 'persist'; got {self.client_optimizer_state!r}.")


# Settings that may change when a run is resumed: they do not affect what a round computes.
RESUMABLE_SETTINGS = ("num_rounds", "output_dir", "save_adapters", "quiet", "resume", "progress", "callbacks")
_COSMETIC_TRAINER_KEYS = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir")


@dataclass
class FederationState:
    """Everything that changes across rounds (what a checkpoint of the federation needs)."""

    round: int  # rounds completed; 0 = only the initial evaluation
    global_adapter: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)  # one row per round
    client_history: list[dict[str, float]] = field(default_factory=list)  # one row per client per round
    objective_state: dict[str, dict] = field(default_factory=dict)  # e.g. NormalizedReward statistics
    rng_state: dict[str, Any] = field(default_factory=dict)  # global RNGs when the round ended
    # federation.client_optimizer_state=persist: optimiser/scheduler state_dicts (CPU tensors) per client
    client_optimizer_states: dict[str, dict] = field(default_factory=dict)


class FederationError(RuntimeError):
    """A round that cannot be completed (too few healthy clients); the state before it is saved."""


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
        self.aggregator = private(
            with_rule(self.algorithm.aggregator(config.server_lr), config.aggregator, config.server_lr, config.trim_fraction),
            config.dp_clip_norm, config.dp_noise_multiplier, self.clients_per_round,
        )
        self.writer = writer or RunWriter(
            config.output_dir, module.objective_names, module.policy.peft_config["default"], echo,
            save_every_round=config.save_adapters,
        )
        self.echo = echo
        self.checkpoint_dir = Path(config.output_dir) / "checkpoint"
        self._fingerprint: Optional[dict] = None
        self.round_logger = RoundLogger(trainer_factory.federation_loggers)  # the configured Lightning loggers
        self.callbacks = CallbackList([progress_callback(config.progress, echo), self.round_logger, *config.callbacks])
        self.stop_reason: Optional[str] = None

    def request_stop(self, reason: str) -> None:
        """Called by a callback: finish this round, then end the federation (``reason`` is printed)."""
        self.stop_reason = reason

    # ---- the loop ----

    def run(self) -> FederationState:
        start = time.perf_counter()
        self.stop_reason = None
        with (
            quiet_lightning(self.config.quiet),
            self._algorithm_weighting(),
            stays_on_device(self.module),
            steady_memory(),
        ):
            self.datamodule.setup("fit")
            state = self.resumed_state() if self.config.resume else None
            state = state or self.initial_state()
            self.callbacks.on_federation_start(self, state)
            for round_idx in range(state.round + 1, self.config.num_rounds + 1):
                state = self.run_round(state, round_idx)
                if self.stop_reason:
                    self.echo(f"stopped after round {round_idx}/{self.config.num_rounds}: {self.stop_reason}")
                    break
            self.callbacks.on_federation_end(self, state)
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
        return self.save_checkpoint(state)

    def run_round(self, state: FederationState, round_idx: int) -> FederationState:
        tic = time.perf_counter()
        clients = self.sample_clients(round_idx)
        self.callbacks.on_round_start(self, state, round_idx, clients)
        optimizer_states = dict(state.client_optimizer_states)  # filled by persisting clients
        updates, failed = self.train_clients(state.global_adapter, clients, round_idx, optimizer_states)
        updates, rejected = self.screen(updates, state.global_adapter, round_idx)
        if len(updates) < self.config.min_clients:
            # The checkpoint saved when round state.round finished stays as it is: re-saving now
            # would record reward statistics and RNG states disturbed by this failed round.
            raise FederationError(
                f"Round {round_idx}: only {len(updates)} of {len(clients)} clients returned a usable update, "
                f"fewer than federation.min_clients={self.config.min_clients} ({'; '.join([*failed, *rejected])}). "
                f"The state after round {state.round} is saved in {self.checkpoint_dir}: fix the cause, then "
                "continue with `--federation.resume true`."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(server_seed(self.config.seed, round_idx))  # server-side noise (DP), per round
            result = self.aggregator.aggregate(state.global_adapter, updates)
        client_rows = [self._client_row(u, round_idx, state.global_adapter) for u in updates]
        row = {
            "round": round_idx,
            **self.evaluate(result.adapter),
            **self._round_metrics(updates, result, state.global_adapter, client_rows),
            "failed_clients": len(failed),
            "rejected_clients": len(rejected),
            **self._privacy_metrics(round_idx),
            "time/round_s": time.perf_counter() - tic,
        }
        state = dataclasses.replace(  # replace, not rebuild: keeps every other field of the state
            state,
            round=round_idx,
            global_adapter=result.adapter,
            history=[*state.history, row],
            client_history=[*state.client_history, *client_rows],
            client_optimizer_states=optimizer_states,
        )
        self.writer.record_round(state, row, client_rows)
        state = self.save_checkpoint(state)
        self.callbacks.on_round_end(self, state, row)
        return state

    @property
    def clients_per_round(self) -> int:
        n = self.config.num_clients
        return min(n, max(self.config.min_clients, math.ceil(self.config.client_fraction * n)))

    def sample_clients(self, round_idx: int) -> list[int]:
        """Seeded by (seed, round): the same clients for the same round on any rerun or resume
        (the sampling has no state besides the seed, which the checkpoint's fingerprint pins)."""
        rng = np.random.default_rng([self.config.seed, round_idx])
        return sorted(int(c) for c in rng.choice(self.config.num_clients, size=self.clients_per_round, replace=False))

    # ---- client faults ----

    def train_clients(
        self, global_adapter: dict, clients: list[int], round_idx: int, optimizer_states: Optional[dict] = None
    ) -> tuple[list[ClientUpdate], list[str]]:
        """Every sampled client's update; a client that raises is logged and left out."""
        updates, failed = [], []
        for client_id in clients:
            try:
                updates.append(self.train_one(global_adapter, client_id, round_idx, optimizer_states))
            except Exception as error:  # one client's fault must not end the federation
                reason = f"client {client_id} failed: {type(error).__name__}: {error}"
                failed.append(reason)
                self.echo(f"round {round_idx} | {reason} (left out of this round)")
                _log.error("round %d, client %d raised:\n%s", round_idx, client_id,
                           "".join(traceback.format_exception(error)))
        return updates, failed

    def screen(self, updates: list[ClientUpdate], global_adapter: dict, round_idx: int) -> tuple[list[ClientUpdate], list[str]]:
        """Updates fit to merge; the others are logged and dropped (never aggregated)."""
        accepted, rejected = [], []
        for update in updates:
            reason = screen_update(update, global_adapter, self.config.max_update_norm, self._upload_dtype)
            if reason is None:
                accepted.append(update)
            else:
                rejected.append(f"client {update.client_id} rejected: {reason}")
                self.echo(f"round {round_idx} | {rejected[-1]} (not merged)")
                _log.warning("round %d: %s", round_idx, rejected[-1])
        return accepted, rejected

    # ---- checkpoints and resume ----

    def save_checkpoint(self, state: FederationState) -> FederationState:
        """Save ``state`` with the reward statistics and RNG states of this moment; return what was saved."""
        objective_state = {o.name: o.state_dict() for o in self.module.objectives if callable(getattr(o, "state_dict", None))}
        state = dataclasses.replace(state, objective_state=objective_state, rng_state=checkpoint.capture_rng())
        checkpoint.save_state(self.checkpoint_dir, state, {"fingerprint": self.fingerprint()})
        return state

    def resumed_state(self) -> Optional[FederationState]:
        """The state saved by an earlier run in this output_dir, checked against this config; None if none."""
        if not checkpoint.exists(self.checkpoint_dir):
            self.echo(f"resume: no checkpoint in {self.checkpoint_dir}; starting from round 0")
            return None
        state, extra = checkpoint.load_state(self.checkpoint_dir, FederationState)
        changed = checkpoint.differences(extra.get("fingerprint", {}), self.fingerprint())
        if changed:
            raise checkpoint.CheckpointError(
                f"Cannot resume from {self.checkpoint_dir}: this config differs from the saved run in "
                + "; ".join(changed)
                + ". Resume with the original settings, or start a new run in another federation.output_dir."
            )
        if state.round > self.config.num_rounds:
            raise checkpoint.CheckpointError(
                f"Cannot resume: {self.checkpoint_dir} holds {state.round} finished rounds but federation.num_rounds="
                f"{self.config.num_rounds}; ask for at least {state.round} rounds."
            )
        for objective in self.module.objectives:
            if objective.name in state.objective_state:
                objective.load_state_dict(state.objective_state[objective.name])
        checkpoint.restore_rng(state.rng_state)
        self.module.load_adapter_state(state.global_adapter)
        self.echo(f"resume: round {state.round} of {self.config.num_rounds} finished in {self.checkpoint_dir}; continuing")
        return state

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption, section by section (computed once per run)."""
        if self._fingerprint is None:
            self._fingerprint = self._describe_run()
        return self._fingerprint

    def _describe_run(self) -> dict:
        module, describe = self.module, checkpoint.describe
        base = module.policy.get_base_model()
        peft = module.policy.peft_config["default"]
        return {
            "objectives": [describe(o) for o in module.objectives],
            "model": {
                "config": {k: describe(v) for k, v in base.config.to_dict().items() if k != "transformers_version"},
                "weights": _weights_signature(base),
            },
            "lora": {
                "r": peft.r, "alpha": peft.lora_alpha, "target_modules": describe(peft.target_modules),
                "tensors": {k: describe(v) for k, v in module.adapter_state().items()},
            },
            "training": {
                "weighting": describe(module.weighting), "sampling": describe(module.sampling),
                "loss": describe(module.loss_settings), "learning_rate": module.learning_rate,
                "weight_decay": module.weight_decay,
                "trainer": describe({k: v for k, v in self.trainers.kwargs.items() if k not in _COSMETIC_TRAINER_KEYS}),
            },
            "algorithm": describe(self.algorithm),
            "federation": {k: v for k, v in dataclasses.asdict(self.config).items() if k not in RESUMABLE_SETTINGS},
            "data": describe(dict(self.datamodule.hparams)),
        }

    def train_one(
        self, global_adapter: dict, client_id: int, round_idx: int, optimizer_states: Optional[dict] = None
    ) -> ClientUpdate:
        self.callbacks.on_client_start(self, round_idx, client_id)
        # Each client fit draws its samples from a seed of its own (seed, round, client): the
        # result does not depend on which clients ran before it, so a resumed run or a client
        # on another machine reproduces it.
        torch.manual_seed(client_seed(self.config.seed, round_idx, client_id))
        num_examples = self.datamodule.num_examples(client_id)
        if num_examples == 0:
            raise ValueError(f"client {client_id} has no prompts (an empty shard); use fewer clients or another partition.")
        try:
            update = self.procedure.run(
                self.module,
                global_adapter,
                dataloader=lambda: self.datamodule.client_dataloader(client_id, round_idx=round_idx),
                trainer=lambda tag: self.trainers.client_trainer(
                    client_id, round_idx, tag, self._optimizer_persistence(optimizer_states, client_id, tag)
                ),
                client_id=client_id,
                num_examples=num_examples,
            )
        finally:  # a client that raised must not leave its memory behind either
            release_client_memory()
        update = update.cast(self._upload_dtype)
        self.callbacks.on_client_end(self, round_idx, update)
        return update

    def _optimizer_persistence(self, optimizer_states: Optional[dict], client_id: int, tag: str) -> list:
        if self.config.client_optimizer_state == "reset" or optimizer_states is None:
            return []
        return [PersistOptimizerState(optimizer_states, f"{client_id}{tag}")]

    @property
    def _upload_dtype(self) -> Optional[torch.dtype]:
        return getattr(torch, self.config.upload_dtype) if self.config.upload_dtype else None

    def evaluate(self, adapter: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean reward per objective of ``adapter`` on the held-out prompts (fixed sampling seed)."""
        self.module.load_adapter_state(adapter)
        trainer = self.trainers.eval_trainer()
        results = trainer.validate(self.module, dataloaders=self.datamodule.val_dataloader(), verbose=False)
        metrics = {k: float(v) for k, v in results[0].items()}
        return {**metrics, **self.client_evaluation(metrics)}

    def client_evaluation(self, eval_metrics: dict[str, float]) -> dict[str, float]:
        """The global adapter's eval reward on each client's own prompt distribution: mean and worst client.

        A client's reward is the mean of the held-out per-group rewards (``eval/group/<g>/<objective>``)
        weighted by the client's share of training prompts in each group; no extra generation.
        ``eval/worst_client/mean`` is the lowest client reward averaged over the objectives.
        """
        shares = self._client_group_shares()
        if not shares:
            return {}
        names = self.module.objective_names
        present = {g for g in (k.split("/")[2] for k in eval_metrics if k.startswith("eval/group/"))}
        per_client = []
        for share in shares:
            weights = {g: w for g, w in share.items() if g in present}
            total = sum(weights.values())
            if total == 0:  # none of this client's groups is in the eval set
                continue
            per_client.append([
                sum(w * eval_metrics[f"eval/group/{g}/{n}"] for g, w in weights.items()) / total for n in names
            ])
        if not per_client:
            return {}
        rewards = np.array(per_client)
        out = {f"eval/client_mean/{n}": float(rewards[:, s].mean()) for s, n in enumerate(names)}
        out.update({f"eval/worst_client/{n}": float(rewards[:, s].min()) for s, n in enumerate(names)})
        out["eval/worst_client/mean"] = float(rewards.mean(axis=1).min())
        return out

    def _client_group_shares(self) -> list[dict[str, float]]:
        """Per client, the fraction of its training prompts in each group ([] without a group column)."""
        groups = self.datamodule.train_groups
        if groups is None:
            return []
        shares = []
        for indices in self.datamodule.client_indices:
            client_groups = [groups[i] for i in indices]
            shares.append({g: client_groups.count(g) / len(client_groups) for g in set(client_groups)})
        return shares

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

    def _privacy_metrics(self, round_idx: int) -> dict:
        if self.config.dp_clip_norm is None:
            return {}
        q = self.clients_per_round / self.config.num_clients
        return {
            "privacy/epsilon": epsilon(self.config.dp_noise_multiplier, q, round_idx, self.config.dp_delta),
            "privacy/noise_std": self.aggregator.noise_std,
        }

    def _round_metrics(self, updates: list[ClientUpdate], result, global_adapter: dict, client_rows: list[dict]) -> dict:
        names = self.module.objective_names
        lambdas = [[u.metrics[f"lambda/{n}"] for n in names] for u in updates]
        metrics = {
            "lambda_dispersion": lambda_dispersion(lambdas),
            "update_dispersion": update_dispersion(result.client_adapters, global_adapter),
            "update_dispersion_weighted": update_dispersion(
                result.client_adapters, global_adapter, [u.num_examples for u in updates]
            ),
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


def _weights_signature(model: torch.nn.Module) -> str:
    """A cheap content check of the base weights: a hash of the first values of every tensor."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if "lora_" in name:  # the adapter is trained state, not the model
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().flatten()[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    return int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0])


def server_seed(seed: int, round_idx: int) -> int:
    """A stream apart from every client's (another spawn key), for the server's own randomness."""
    return int(np.random.SeedSequence([seed, round_idx], spawn_key=(1,)).generate_state(1)[0])


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

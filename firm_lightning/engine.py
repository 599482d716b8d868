"""``RoundEngine``: the server's side of a federation, whatever carries the messages.

One engine runs every federation: the in-process loop (``FederatedOrchestrator``) and the
Flower strategy (``flower/strategy.py``) drive the same object, so every ``federation:`` key
means the same on both. A transport asks the engine, in order:

1. ``start()``: the initial evaluation (round 0), or a resume from ``<output_dir>/checkpoint``
   checked against this config's fingerprint (objective and RNG state included);
2. per round, ``begin_round(state, r)``: which clients train (public and seeded by
   (seed, round), or drawn from the secret generator when differential privacy is on);
3. ``conclude(state, r, ...)`` with the uploads and the failures: screening, ``min_clients``,
   aggregation (the algorithm's aggregator → the robust rule → differential privacy),
   evaluation, metric rows, checkpoint, hooks; returns the next state;
4. ``finish(state)``: final adapter, plots and summary.

A callback may ``request_stop(reason)``; ``stop_reason`` tells the transport to stop after
the current round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Callable, Optional, Sequence

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException

from firm_lightning import checkpoint
from firm_lightning.adapters import ClientUpdate
from firm_lightning.aggregation import Aggregator, screen_update, with_rule
from firm_lightning.callbacks import CallbackList
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.federation import RESUMABLE_SETTINGS, FederationConfig, refuse_for_hidden_uploads
from firm_lightning.federation_metrics import client_evaluation, client_row, round_metrics
from firm_lightning.module import CALIBRATION_SEED_OFFSET, EARLIER_BEHAVIOUR, FIRMClientModule, FitArguments
from firm_lightning.privacy import SecretGenerator
from firm_lightning.rewards import load_objective_states, objective_states, stateful, statistics_frozen
from firm_lightning.progress import progress_callback
from firm_lightning.report import RunWriter
from firm_lightning.round_logging import RoundLogger
from firm_lightning.run_folder import RunFolder
from firm_lightning.seeds import sampling_rng
from firm_lightning.state import FederationError, FederationState
from firm_lightning.trainer_factory import TrainerFactory

_log = logging.getLogger(__name__)
_COSMETIC_TRAINER_KEYS = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps", "default_root_dir")


class RoundEngine:
    """The federation's rules, state and records; transports only carry adapters to clients and back.

    ``uploads_visible=False`` (SecAgg+) means the server only ever sees the clients' secure
    mean: settings that need one upload at a time (``max_update_norm``, robust aggregators) are
    refused, and differential privacy trusts the clients to clip.
    """

    def __init__(
        self,
        module: FIRMClientModule,
        datamodule: PromptDataModule,
        config: FederationConfig,
        trainers: TrainerFactory,
        writer: Optional[RunWriter] = None,
        echo: Callable[[str], None] = print,
        uploads_visible: bool = True,
    ) -> None:
        if datamodule.num_clients != config.num_clients:
            raise ValueError(
                f"data.num_clients={datamodule.num_clients} but federation.num_clients={config.num_clients}; "
                "set them equal (the CLI links them)."
            )
        self.module = module
        self.datamodule = datamodule
        self.config = config
        self.algorithm = config.resolved_algorithm
        self.trainers = trainers
        self.echo = echo
        self.uploads_visible = uploads_visible
        if not uploads_visible:
            refuse_for_hidden_uploads(config)
        self.secret = SecretGenerator() if config.privacy is not None else None
        self.aggregator = self._compose_aggregator()
        self.writer = writer or RunWriter(
            config.output_dir, module.objective_names, module.policy.peft_config["default"], echo,
            save_every_round=config.save_adapters,
        )
        self.checkpoint_dir = RunFolder(config.output_dir).checkpoint
        self.round_logger = RoundLogger(trainers.federation_loggers)  # the configured Lightning loggers
        self.callbacks = CallbackList([progress_callback(config.progress, echo), self.round_logger, *config.callbacks])
        self.stop_reason: Optional[str] = None
        self.eval_objective_state: dict[str, dict] = {}  # calibrated when the federation starts
        self._fingerprint: Optional[dict] = None
        self._started = self._round_tic = time.perf_counter()

    @property
    def objective_names(self) -> list[str]:
        return self.module.objective_names

    @property
    def clients_per_round(self) -> int:
        return self.config.clients_per_round

    def request_stop(self, reason: str) -> None:
        """Called by a callback: finish this round, then end the federation (``reason`` is printed)."""
        self.stop_reason = reason

    # ---- the round protocol ----

    def start(self) -> FederationState:
        """The state to continue from: resumed from the checkpoint, or round 0 evaluated now."""
        self._started = time.perf_counter()
        self.stop_reason = None
        self.check_settings()
        self.datamodule.setup("fit")
        load_objective_states(self.module.objectives, None)  # every run starts from the configured objectives
        state = self.resumed_state() if self.config.resume else None
        state = state or self._initial_state()
        self.callbacks.on_federation_start(self, state)
        return state

    def check_settings(self) -> None:
        """Fail now, once, on what would otherwise fail inside every client of round 1: the client
        optimiser (e.g. a negative learning rate) and the per-client Trainer's arguments."""
        try:
            self.module.configure_optimizers()
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"The client optimiser cannot be built from this config: {error}. Check model.learning_rate, "
                "model.weight_decay and the optimizer:/lr_scheduler: groups."
            ) from error
        try:
            self.trainers.dry_trainer()
        except (ValueError, TypeError, MisconfigurationException) as error:
            raise ValueError(f"The per-client Trainer cannot be built from trainer: {error}") from error

    def remaining_rounds(self, state: FederationState) -> range:
        return range(state.round + 1, self.config.num_rounds + 1)

    def begin_round(self, state: FederationState, round_idx: int) -> list[int]:
        """The clients that train in ``round_idx`` (drawn once per round)."""
        self._round_tic = time.perf_counter()
        clients = self.sample_clients(round_idx)
        self.callbacks.on_round_start(self, state, round_idx, clients)
        return clients

    def sample_clients(self, round_idx: int) -> list[int]:
        """Without privacy: seeded by (seed, round), the same clients on any rerun or resume. With
        privacy: from the secret generator (a reader of the config must not know who was sampled)."""
        n, m = self.config.num_clients, self.clients_per_round
        if self.secret is not None:
            return self.secret.choice(n, m)
        return sorted(int(c) for c in sampling_rng(self.config.seed, round_idx).choice(n, size=m, replace=False))

    def client_started(self, round_idx: int, client_id: int) -> None:
        self.callbacks.on_client_start(self, round_idx, client_id)

    def client_finished(self, round_idx: int, update: ClientUpdate) -> None:
        self.callbacks.on_client_end(self, round_idx, update)

    def conclude(
        self,
        state: FederationState,
        round_idx: int,
        updates: Sequence[ClientUpdate],
        failures: Sequence[str] = (),
        client_states: Optional[dict] = None,
        secure_mean: Optional[ClientUpdate] = None,
        client_extras: Optional[dict[int, dict]] = None,
        round_extras: Optional[dict] = None,
    ) -> FederationState:
        """Merge a round's uploads into the next state, record and checkpoint it, fire the hooks.

        ``updates`` are the uploads as sent (any order); ``failures`` one line per client that did
        not deliver. ``secure_mean`` (SecAgg+): the only upload the server sees, the clients' mean;
        ``updates`` then carry only their metrics. ``client_states``: the stateful clients' states
        after this round (in-process). ``client_extras``/``round_extras``: transport metrics
        (e.g. Flower's message bytes) added to the client rows and the round row.
        """
        global_adapter = state.global_adapter
        updates = sorted(updates, key=lambda u: u.client_id)  # client order: float sums agree across transports
        accepted, rejected = self._screen(updates, global_adapter, round_idx) if secure_mean is None else (updates, [])
        if len(accepted) < self.config.min_clients:
            # The checkpoint saved when round state.round finished stays as it is: re-saving now
            # would record reward statistics and RNG states disturbed by this failed round.
            raise FederationError(
                f"Round {round_idx}: only {len(accepted)} of {len(updates) + len(failures)} clients returned a usable "
                f"update, fewer than federation.min_clients={self.config.min_clients} "
                f"({'; '.join([*failures, *rejected])}). The state after round {state.round} is saved in "
                f"{self.checkpoint_dir}: fix the cause, then continue with `--federation.resume true`."
            )
        merged = [secure_mean] if secure_mean is not None else [u.applied_to(global_adapter) for u in accepted]
        result = self.aggregator.aggregate(global_adapter, merged)
        extras = client_extras or {}
        client_rows = [{**client_row(u, round_idx, global_adapter), **extras.get(u.client_id, {})} for u in accepted]
        row = {
            "round": round_idx,
            **self.evaluate(result.adapter),
            **round_metrics(accepted, result, global_adapter, client_rows, self.objective_names,
                            uploads_visible=secure_mean is None),
            "failed_clients": len(failures),
            "rejected_clients": len(rejected),
            **self._privacy_metrics(round_idx),
            **(round_extras or {}),
            "time/round_s": time.perf_counter() - self._round_tic,
        }
        state = dataclasses.replace(  # replace, not rebuild: keeps every other field of the state
            state,
            round=round_idx,
            global_adapter=result.adapter,
            history=[*state.history, row],
            client_history=[*state.client_history, *client_rows],
            client_states=state.client_states if client_states is None else client_states,
        )
        self.writer.record_round(state, row, client_rows)
        state = self.save_checkpoint(state)
        self.callbacks.on_round_end(self, state, row)
        return state

    def finish(self, state: FederationState) -> FederationState:
        self.callbacks.on_federation_end(self, state)
        if self.stop_reason:
            self.echo(f"stopped after round {state.round}/{self.config.num_rounds}: {self.stop_reason}")
        self.writer.finish(state, time.perf_counter() - self._started, self.config)
        return state

    # ---- aggregation ----

    def _compose_aggregator(self) -> Aggregator:
        """The algorithm's aggregator → the robust rule in place of its FedAvg → differential privacy."""
        config = self.config
        aggregator = with_rule(self.algorithm.aggregator(config.server_lr), config.aggregator, config.server_lr,
                               config.trim_fraction)
        if config.privacy is not None:
            aggregator = config.privacy.wrap(aggregator, self.clients_per_round, self.secret,
                                             clipped_on_client=not self.uploads_visible)
        return aggregator

    def _screen(self, updates: Sequence[ClientUpdate], global_adapter: dict, round_idx: int) -> tuple[list, list[str]]:
        """Uploads fit to merge; the others are logged and dropped (never aggregated)."""
        accepted, rejected = [], []
        for update in updates:
            reason = screen_update(update, global_adapter, self.config.max_update_norm, self.config.upload_torch_dtype)
            if reason is None:
                accepted.append(update)
            else:
                rejected.append(f"client {update.client_id} rejected: {reason}")
                self.echo(f"round {round_idx} | {rejected[-1]} (not merged)")
                _log.warning("round %d: %s", round_idx, rejected[-1])
        return accepted, rejected

    def _privacy_metrics(self, round_idx: int) -> dict:
        privacy = self.config.privacy
        if privacy is None:
            return {}
        rate = self.clients_per_round / self.config.num_clients
        return {
            "privacy/epsilon": privacy.epsilon(rate, round_idx),
            "privacy/noise_std": privacy.noise_std(self.clients_per_round),
        }

    # ---- evaluation ----

    def evaluate(self, adapter: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean reward per objective of ``adapter`` on the held-out prompts (fixed sampling seed), with the
        evaluation statistics calibrated when the federation started, never updated by evaluating."""
        self.module.load_adapter_state(adapter)
        load_objective_states(self.module.objectives, self.eval_objective_state)
        with statistics_frozen(self.module.objectives):
            results = self.trainers.eval_trainer().validate(self.module, dataloaders=self.datamodule.val_dataloader(),
                                                             verbose=False)
        metrics = {k: float(v) for k, v in results[0].items()}
        return {**metrics, **self.client_evaluation(metrics)}

    def calibrate_evaluation(self, adapter: dict[str, torch.Tensor]) -> dict[str, dict]:
        """The statistics evaluation normalises with (``calibrated_statistics``), also written to
        ``<output_dir>/adapters/objective_state.json`` for ``validate`` and ``generate``."""
        self.module.load_adapter_state(adapter)
        state = calibrated_statistics(self.module, self.trainers, self.datamodule)
        if state:
            path = RunFolder(self.config.output_dir).objective_state
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write(path, json.dumps(state, indent=1).encode())
        return state

    def client_evaluation(self, eval_metrics: dict[str, float]) -> dict[str, float]:
        """The global adapter's eval reward on each client's own prompt distribution (mean and worst)."""
        return client_evaluation(eval_metrics, self._client_group_shares(), self.objective_names)

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

    # ---- checkpoints and resume ----

    def _initial_state(self) -> FederationState:
        adapter = self.module.adapter_state()
        self.eval_objective_state = self.calibrate_evaluation(adapter)
        row = {"round": 0, **self.evaluate(adapter)}
        state = FederationState(round=0, global_adapter=adapter, history=[row])
        self.writer.record_round(state, row, [])
        return self.save_checkpoint(state)

    def save_checkpoint(self, state: FederationState) -> FederationState:
        """Save ``state`` with the reward statistics and RNG states of this moment; return what was saved."""
        state = dataclasses.replace(
            state, objective_state=self.eval_objective_state, rng_state=checkpoint.capture_rng(),
            secret_rng_state=self.secret.state_dict() if self.secret is not None else {},
        )
        checkpoint.save_state(self.checkpoint_dir, state, {"fingerprint": self.fingerprint()})
        return state

    def resumed_state(self) -> Optional[FederationState]:
        """The state saved by an earlier run in this output_dir, checked against this config; None if none."""
        if not checkpoint.exists(self.checkpoint_dir):
            self.echo(f"resume: no checkpoint in {self.checkpoint_dir}; starting from round 0")
            return None
        state, extra = checkpoint.load_state(self.checkpoint_dir, FederationState)
        saved = extra.get("fingerprint", {})
        earlier = self._continue_as_saved(saved)
        current = self.fingerprint()
        if earlier:  # what the saved run did not record is not compared
            current = {**current, "training": {**current["training"], "sampling": {
                k: v for k, v in current["training"]["sampling"].items() if k not in earlier}}}
        changed = checkpoint.differences(saved, current)
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
        self.eval_objective_state = state.objective_state  # the clients' own statistics are in client_states
        checkpoint.restore_rng(state.rng_state)
        if self.secret is not None and state.secret_rng_state:
            self.secret.load_state_dict(state.secret_rng_state)
        self.module.load_adapter_state(state.global_adapter)
        self.echo(
            f"resume: round {state.round} of {self.config.num_rounds} finished in {self.checkpoint_dir}; continuing"
        )
        return state

    def _continue_as_saved(self, saved: dict) -> dict:
        """Settings the saved run predates (``module.EARLIER_BEHAVIOUR``) take the behaviour it ran with,
        so it continues as the code that wrote it would have; returns them (name: value)."""
        recorded = saved.get("training", {}).get("sampling")
        if not isinstance(recorded, dict):
            return {}
        earlier = {k: v for k, v in EARLIER_BEHAVIOUR["sampling"].items() if k not in recorded}
        if earlier:
            self.module.sampling = dataclasses.replace(self.module.sampling, **earlier)
            self._fingerprint = None
            self.echo("resume: the saved run predates " + ", ".join(f"sampling.{k}" for k in earlier)
                      + f"; it continues as it ran ({', '.join(f'{k}={v}' for k, v in earlier.items())})")
        return earlier

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption, section by section (computed once per run)."""
        if self._fingerprint is None:
            self._fingerprint = self._describe_run()
        return self._fingerprint

    def _describe_run(self) -> dict:
        module, describe = self.module, checkpoint.describe
        base = module.policy.get_base_model()
        peft = module.policy.peft_config["default"]
        federation = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)}
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
            "federation": {k: describe(v) for k, v in federation.items() if k not in RESUMABLE_SETTINGS},
            "data": describe(dict(self.datamodule.hparams)),
        }


def calibrated_statistics(
    module: FIRMClientModule, trainers: TrainerFactory, datamodule: PromptDataModule
) -> dict[str, dict]:
    """The configured objectives' statistics after scoring the module's current adapter on the first
    held-out batch, sampled with a seed apart from every evaluation's (round 0 is then not zero by
    construction); {} when no objective has statistics."""
    if not stateful(module.objectives):
        return {}
    load_objective_states(module.objectives, None)
    calibration = FitArguments(eval_seed_offset=CALIBRATION_SEED_OFFSET)
    trainer = trainers.eval_trainer(limit_val_batches=1, extra_callbacks=[calibration])
    trainer.validate(module, dataloaders=datamodule.val_dataloader(), verbose=False)
    return objective_states(module.objectives)


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


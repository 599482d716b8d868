"""``RoundEngine``: the server's side of a federation, whatever carries the messages.

One engine runs every federation: the in-process loop (``FederatedOrchestrator``) and the
Flower strategy (``flower/strategy.py``) drive the same object, so every ``federation:`` key
means the same on both. A transport asks the engine, in order:

1. ``start()``: the checks that can refuse the run (``check``: settings, a clean run folder, data and
   prompts, resume compatibility), then the initial evaluation (round 0) or a resume from
   ``<output_dir>/checkpoint`` checked against this config's fingerprint (objective and RNG state
   included); nothing is written before all of it has passed;
2. per round, ``begin_round(state, r)``: which clients train (public and seeded by
   (seed, round), or Poisson-sampled from the secret generator when differential privacy is on);
3. ``client_failed(...)`` for each client that delivered nothing (its traceback into the run folder,
   one line to the user); ``conclude(state, r, ...)`` with the uploads and the failures: a client
   failing the same way round after round (``max_failed_rounds``), screening, ``min_clients``,
   aggregation (the algorithm's aggregator → the robust rule → differential privacy),
   evaluation, metric rows, checkpoint, hooks; returns the next state;
4. ``finish(state)``: final adapter, plots and summary.

A callback may ``request_stop(reason)``; ``stop_reason`` tells the transport to stop after
the current round.

Release policy under ``federation.privacy``: the released rows (``state.history``: ``metrics.csv``,
the summary, plots, model card, Lightning loggers, progress lines and every callback's ``row``) hold
only what the guarantee covers (``privacy.released_row``); no client rows are released, the hooks are
not told which clients were sampled, and the full rows go to the server-private record
(``state.private_history``, ``<output_dir>/server_private/``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Callable, Optional, Sequence

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from firm_lightning import checkpoint
from firm_lightning.adapters import ClientUpdate
from firm_lightning.aggregation import Aggregator, screen_update, with_rule
from firm_lightning.callbacks import CallbackList
from firm_lightning.datamodule import ADDED_SETTINGS, PromptDataModule
from firm_lightning.federation import RESUMABLE_SETTINGS, FederationConfig, refuse_for_hidden_uploads
from firm_lightning.federation_metrics import client_evaluation, client_row, round_metrics
from firm_lightning.module import CALIBRATION_SEED_OFFSET, EARLIER_BEHAVIOUR, FIRMClientModule, FitArguments
from firm_lightning.privacy import SecretGenerator, released_row
from firm_lightning.rewards import load_objective_states, objective_states, stateful, statistics_frozen
from firm_lightning.progress import progress_callback
from firm_lightning.report import RunWriter
from firm_lightning.round_logging import RoundLogger
from firm_lightning.run_folder import RunFolder
from firm_lightning.seeds import sampling_rng
from firm_lightning.state import ClientFailure, FederationError, FederationState
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
        self.private = config.privacy is not None
        self.secret = SecretGenerator() if self.private else None
        if self.private:
            trainers.log_clients_privately()  # the client fits' own logs are per-client statistics
        self.aggregator = self._compose_aggregator()
        self.writer = writer or RunWriter(
            config.output_dir, module.objective_names, module.policy.peft_config["default"], echo,
            save_every_round=config.save_adapters,
        )
        self.folder = RunFolder(config.output_dir)
        self.checkpoint_dir = self.folder.checkpoint
        self.round_logger = RoundLogger(trainers.federation_loggers)  # the configured Lightning loggers
        self.callbacks = CallbackList([progress_callback(config.progress, echo), self.round_logger, *config.callbacks])
        self.stop_reason: Optional[str] = None
        self.eval_objective_state: dict[str, dict] = {}  # calibrated when the federation starts
        self._fingerprint: Optional[dict] = None
        self._started = self._round_tic = time.perf_counter()
        self._wall_before: Optional[float] = 0.0  # the time of the segments before this one (a resume's)

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

    def start(self, accepted: Callable[[], None] = lambda: None) -> FederationState:
        """The state to continue from: resumed from the checkpoint, or round 0 evaluated now.

        Writes nothing until the run is accepted: every check (``check``) has passed and round 0 is
        evaluated. Then the folder is readied (``overwrite`` clears it; a resume drops what rounds after
        its state left), ``accepted`` is called (the CLI saves ``config.yaml`` there) and round 0 is
        recorded.
        """
        self._started = time.perf_counter()
        self.stop_reason = None
        saved = self.check()
        self._wall_before = saved.wall_s if saved is not None else 0.0
        state = self._continue(saved) if saved is not None else self._initial_state()
        if self.config.overwrite:
            self.folder.clear()
        if saved is not None:
            self._drop_later_rounds(state)
        accepted()
        if saved is None:
            state = self._record_initial(state)
        self.callbacks.on_federation_start(self, state)
        return state

    def check(self) -> Optional[FederationState]:
        """Every check that can refuse this run before round 1, writing nothing: the client optimiser and
        Trainer, a run folder free of another run's files, the data and its prompts (measured against the
        policy's context), resume compatibility. Returns the saved state a resume continues from."""
        self.check_settings()
        self.folder.check_clean_start(self.config.resume, self.config.overwrite)
        self.datamodule.limit_prompts(self.module.prompt_limit())
        self.datamodule.setup("fit")
        for note in self.datamodule.load_notes:
            self.echo(note)
        load_objective_states(self.module.objectives, None)  # every run starts from the configured objectives
        return self.saved_state() if self.config.resume else None

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
        self.callbacks.on_round_start(self, state, round_idx, [] if self.private else clients)
        return clients

    def sample_clients(self, round_idx: int) -> list[int]:
        return sample_clients(self.config, round_idx, self.secret)

    def client_started(self, round_idx: int, client_id: int) -> None:
        if not self.private:  # under privacy the hooks are not told who was sampled
            self.callbacks.on_client_start(self, round_idx, client_id)

    def client_finished(self, round_idx: int, update: ClientUpdate) -> None:
        if not self.private:
            self.callbacks.on_client_end(self, round_idx, update)

    def client_failed(self, round_idx: int, client_id: int, error: str, traceback_text: str = "") -> ClientFailure:
        """A sampled client that delivered nothing: its traceback goes into the run folder, one line to the user."""
        path = ""
        if traceback_text:
            file = self.folder.client_traceback(client_id, round_idx, private=self.private)
            file.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write(file, traceback_text.encode())
            path = str(file)
        failure = ClientFailure(client_id, round_idx, error, path)
        self.echo(f"round {round_idx} | {failure}" + (f" (traceback: {path})" if path else "")
                  + "; left out of this round")
        _log.debug("round %d: %s\n%s", round_idx, failure, traceback_text)
        return failure

    def conclude(
        self,
        state: FederationState,
        round_idx: int,
        updates: Sequence[ClientUpdate],
        failures: Sequence[ClientFailure | str] = (),
        client_states: Optional[dict] = None,
        secure_mean: Optional[ClientUpdate] = None,
        client_extras: Optional[dict[int, dict]] = None,
        round_extras: Optional[dict] = None,
    ) -> FederationState:
        """Merge a round's uploads into the next state, record and checkpoint it, fire the hooks.

        ``updates`` are the uploads as sent (any order); ``failures`` the clients that did not deliver
        (``client_failed``'s records; a plain line is counted but not followed from round to round).
        ``secure_mean`` (SecAgg+): the only upload the server sees, the clients' mean; ``updates`` then
        carry only their metrics. ``client_states``: the stateful clients' states
        after this round (in-process). ``client_extras``/``round_extras``: transport metrics
        (e.g. Flower's message bytes) added to the client rows and the round row.
        """
        global_adapter = state.global_adapter
        self._stop_on_repeated_failures(state, failures)
        updates = sorted(updates, key=lambda u: u.client_id)  # client order: float sums agree across transports
        accepted, rejected = self._screen(updates, global_adapter, round_idx) if secure_mean is None else (updates, [])
        if len(accepted) < self._usable_uploads_needed(len(updates) + len(failures)):
            # The checkpoint saved when round state.round finished stays as it is: re-saving now
            # would record reward statistics and RNG states disturbed by this failed round.
            raise FederationError(
                f"Round {round_idx}: only {len(accepted)} of {len(updates) + len(failures)} clients returned a usable "
                f"update, fewer than federation.min_clients={self.config.min_clients} "
                f"({'; '.join([*map(str, failures), *rejected])}). The state after round {state.round} is saved in "
                f"{self.checkpoint_dir}: fix the cause, then continue with `--federation.resume true`."
            )
        merged = [secure_mean] if secure_mean is not None else [u.applied_to(global_adapter) for u in accepted]
        result = self.aggregator.aggregate(global_adapter, merged)
        extras = client_extras or {}
        client_rows = [{**client_row(u, round_idx, global_adapter), **extras.get(u.client_id, {})} for u in accepted]
        training = round_metrics(accepted, result, global_adapter, client_rows, self.objective_names,
                                 uploads_visible=secure_mean is None) if accepted else {"clients": 0}
        row = {
            "round": round_idx,
            **self.evaluate(result.adapter),
            **training,
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
            client_states=state.client_states if client_states is None else client_states,
            **self._recorded(state, row, client_rows),
            client_failures=[*state.client_failures, *(f.record() for f in failures if isinstance(f, ClientFailure))],
        )
        released = state.history[-1]
        self.writer.record_round(state, released, [] if self.private else client_rows)
        state = self.save_checkpoint(state)
        self.callbacks.on_round_end(self, state, released)
        return state

    def _recorded(self, state: FederationState, row: dict, client_rows: list[dict]) -> dict:
        """The state's record fields with this round's rows: all released without privacy; under privacy
        only ``released_row(row)``, the full rows kept in the server-private record."""
        if not self.private:
            return {"history": [*state.history, row], "client_history": [*state.client_history, *client_rows]}
        return {
            "history": [*state.history, released_row(row)],
            "private_history": [*state.private_history, row],
            "private_client_history": [*state.private_client_history, *client_rows],
        }

    def _usable_uploads_needed(self, sampled: int) -> int:
        """``min_clients``; under privacy at most the clients a (Poisson) round sampled: an empty round is a
        noise-only step of the mechanism the ε accounts for."""
        return min(self.config.min_clients, sampled) if self.private else self.config.min_clients

    def finish(self, state: FederationState) -> FederationState:
        self.callbacks.on_federation_end(self, state)
        if self.stop_reason:
            self.echo(f"stopped after round {state.round}/{self.config.num_rounds}: {self.stop_reason}")
        # The time up to the last round saved, over every segment: a resume that trains nothing keeps it.
        self.writer.finish(state, state.wall_s, self.config)
        return state

    def _stop_on_repeated_failures(self, state: FederationState, failures: Sequence[ClientFailure | str]) -> None:
        """A client failing with the same error round after round has a bug to fix, not a fault to tolerate."""
        limit = self.config.max_failed_rounds
        for failure in (f for f in failures if isinstance(f, ClientFailure)):
            rounds = repeated_failure_rounds(state, failure)
            if limit is not None and len(rounds) >= limit:
                where = f"; its traceback: {failure.traceback}" if failure.traceback else ""
                raise FederationError(
                    f"Client {failure.client_id} failed with the same error in {len(rounds)} of its rounds in a row "
                    f"(rounds {', '.join(map(str, rounds))}): {failure.error}{where}. A fault that repeats is a bug "
                    f"to fix, not one to tolerate: fix it, then continue with `--federation.resume true` (the state "
                    f"after round {state.round} is saved in {self.checkpoint_dir}); federation.max_failed_rounds="
                    f"{limit} sets how many such rounds stop a run."
                )

    # ---- aggregation ----

    def _compose_aggregator(self) -> Aggregator:
        return compose_aggregator(self.config, self.secret, self.uploads_visible)

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
        return {
            "privacy/epsilon": privacy.epsilon(self.config.client_fraction, round_idx),
            "privacy/delta": privacy.delta,
            "privacy/noise_std": privacy.noise_std(self.config.expected_clients),
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
        """The statistics evaluation normalises with (``calibrated_statistics``); ``_record_initial`` writes
        them to ``<output_dir>/adapters/objective_state.json`` for ``validate`` and ``generate``."""
        self.module.load_adapter_state(adapter)
        return calibrated_statistics(self.module, self.trainers, self.datamodule)

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
        """Round 0 evaluated, in memory: a run refused by its evaluation (e.g. a NaN reward) writes nothing."""
        adapter = self.module.adapter_state()
        self.eval_objective_state = self.calibrate_evaluation(adapter)
        row = {"round": 0, **self.evaluate(adapter)}
        return FederationState(round=0, global_adapter=adapter, **self._recorded(FederationState(0, adapter), row, []))

    def _record_initial(self, state: FederationState) -> FederationState:
        if self.eval_objective_state:
            path = self.folder.objective_state
            path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write(path, json.dumps(self.eval_objective_state, indent=1).encode())
        self.writer.record_round(state, state.history[-1], [])
        return self.save_checkpoint(state)

    def save_checkpoint(self, state: FederationState) -> FederationState:
        """Save ``state`` with the reward statistics and RNG states of this moment; return what was saved."""
        state = dataclasses.replace(
            state, objective_state=self.eval_objective_state, rng_state=checkpoint.capture_rng(),
            secret_rng_state=self.secret.state_dict() if self.secret is not None else {},
            wall_s=self._wall_s(),
        )
        checkpoint.save_state(self.checkpoint_dir, state, {"fingerprint": self.fingerprint(),
                                                           "fingerprint_version": checkpoint.FINGERPRINT_VERSION})
        return state

    def _wall_s(self) -> Optional[float]:
        """The run's time so far: the earlier segments' (None when a checkpoint did not record it) plus this one's."""
        return None if self._wall_before is None else self._wall_before + time.perf_counter() - self._started

    def saved_state(self) -> Optional[FederationState]:
        """The state saved by an earlier run in this output_dir (``resume_from``: the latest, or the one kept
        before it), checked against this config; None if none. Changes nothing."""
        if not self.folder.has_checkpoint():
            self.echo(f"resume: no checkpoint in {self.checkpoint_dir}; starting from round 0")
            return None
        state, extra = self._load_checkpoint()
        version = extra.get("fingerprint_version", 1)  # none saved: written before versions were recorded
        saved = extra.get("fingerprint", {})
        earlier = self._continue_as_saved(saved)
        current = self.fingerprint()
        if earlier:  # the behaviour the saved run had is restored above, so these are not compared
            current = {**current, "training": {**current["training"], "sampling": {
                k: v for k, v in current["training"]["sampling"].items() if k not in earlier}}}
        unrecorded: Optional[list[str]] = [] if version < checkpoint.FINGERPRINT_VERSION else None
        changed = checkpoint.differences(saved, current, unrecorded=unrecorded)
        if changed:
            raise checkpoint.CheckpointError(
                f"Cannot resume from {self.checkpoint_dir}: this config differs from the saved run in "
                + "; ".join(changed)
                + ". Resume with the original settings, or start a new run in another federation.output_dir."
            )
        if unrecorded:
            shown = ", ".join(unrecorded[:8]) + (f" and {len(unrecorded) - 8} more" if len(unrecorded) > 8 else "")
            self.echo(f"resume: the saved run's fingerprint (version {version}) does not record {shown}; "
                      "not compared")
        if state.round > self.config.num_rounds:
            raise checkpoint.CheckpointError(
                f"Cannot resume: {self.checkpoint_dir} holds {state.round} finished rounds but federation.num_rounds="
                f"{self.config.num_rounds}; ask for at least {state.round} rounds."
            )
        return state

    def _load_checkpoint(self) -> tuple[FederationState, dict]:
        """The saved state ``resume_from`` names; a damaged latest state is reported with the round the
        previous one holds, which resume continues from only when asked (``resume_from: previous``)."""
        which = self.config.resume_from
        try:
            return checkpoint.load_state(self.checkpoint_dir, FederationState, which)
        except checkpoint.CheckpointError as error:
            previous = checkpoint.previous_round(self.checkpoint_dir) if which == "latest" else None
            adapters = f"the global adapter of every saved round stays in {self.folder.adapters}/round_<r>.safetensors"
            if previous is None:
                raise checkpoint.CheckpointError(f"{error} No earlier state is kept beside it; {adapters}.") from error
            raise checkpoint.CheckpointError(
                f"{error} The state after round {previous} is intact beside it: continue from there with "
                f"`--federation.resume true --federation.resume_from previous` (the rounds after it are trained "
                f"again); {adapters}."
            ) from error

    def _drop_later_rounds(self, state: FederationState) -> None:
        """A resume continues from ``state``: what later rounds left goes (a round cut short, a damaged state)."""
        if self.config.resume_from == "previous":
            checkpoint.promote_previous(self.checkpoint_dir)
        self.folder.discard_after(state.round)

    def _continue(self, state: FederationState) -> FederationState:
        """Continue from a saved state: its statistics, RNG states and adapter; nothing is written."""
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
            "data": describe({k: v for k, v in self.datamodule.hparams.items()
                              if k not in ADDED_SETTINGS or v != ADDED_SETTINGS[k]}),
        }


def sample_clients(config: FederationConfig, round_idx: int, secret: Optional[SecretGenerator]) -> list[int]:
    """The clients that train in ``round_idx``. Without privacy: ``clients_per_round`` of them, seeded by
    (seed, round), the same clients on any rerun or resume. With privacy: each client with probability
    ``client_fraction`` (Poisson sampling, the sampling the ε is computed for), from the secret generator: a
    reader of the config must not know who was sampled."""
    n = config.num_clients
    if config.privacy is not None:
        return secret.poisson(n, config.client_fraction)
    m = config.clients_per_round
    return sorted(int(c) for c in sampling_rng(config.seed, round_idx).choice(n, size=m, replace=False))


def compose_aggregator(config: FederationConfig, secret: Optional[SecretGenerator],
                       uploads_visible: bool = True) -> Aggregator:
    """The algorithm's aggregator → the robust rule in place of its FedAvg → differential privacy (whose noise
    ``secret`` draws; clipping on the clients when the uploads are hidden, SecAgg+)."""
    aggregator = with_rule(config.resolved_algorithm.aggregator(config.server_lr), config.aggregator,
                           config.server_lr, config.trim_fraction)
    if config.privacy is not None:
        aggregator = config.privacy.wrap(aggregator, config.expected_clients, secret,
                                         clipped_on_client=not uploads_visible)
    return aggregator


def repeated_failure_rounds(state: FederationState, failure: ClientFailure) -> list[int]:
    """The rounds of ``failure``'s client, ending with its round, that failed in a row with its error (a round
    the client trained in breaks the run; rounds it was not sampled in do not)."""
    rows = [*state.client_history, *state.private_client_history]  # under privacy the rows are private
    trained = {int(r["round"]) for r in rows if int(r["client"]) == failure.client_id}
    rounds = [failure.round]
    for earlier in reversed(state.client_failures):
        if earlier["client"] != failure.client_id:
            continue
        if earlier["error"] != failure.error or any(earlier["round"] < r < rounds[0] for r in trained):
            break
        rounds.insert(0, earlier["round"])
    return rounds


def calibrated_statistics(
    module: FIRMClientModule, trainers: TrainerFactory, datamodule: PromptDataModule
) -> dict[str, dict]:
    """The configured objectives' statistics after scoring the module's current adapter on the held-out
    batches, sampled with seeds apart from every evaluation's (round 0 is then not zero by construction);
    {} when no objective has statistics.

    Batch after batch until no objective is still calibrating (``NormalizedReward.calibrating``: its
    rewards have not spread yet), usually after the first. Statistics of rewards that never spread on the
    whole held-out set would normalise every evaluation reward of the run to 0: refused, naming the
    objectives and the fixes."""
    if not stateful(module.objectives):
        return {}
    load_objective_states(module.objectives, None)
    for index, batch in enumerate(datamodule.val_dataloader()):
        # Batch i sampled as it would be at index i of one pass over the held-out set (validation_step's seed).
        calibration = FitArguments(eval_seed_offset=CALIBRATION_SEED_OFFSET + index)
        trainer = trainers.eval_trainer(limit_val_batches=1, extra_callbacks=[calibration])
        trainer.validate(module, dataloaders=DataLoader([batch], batch_size=None, collate_fn=_as_is), verbose=False)
        if not _calibrating(module.objectives):
            return objective_states(module.objectives)
    stuck = _calibrating(module.objectives)
    raise ValueError(
        f"Evaluation cannot calibrate the statistics of {', '.join(repr(o.name) for o in stuck)}: the initial "
        "adapter's raw rewards are alike on every held-out prompt, so evaluation would normalise them all to 0 for "
        "the whole run. Give fixed statistics (NormalizedReward mode: fixed with mean and std) or held-out prompts "
        "on which the reward varies."
    )


def _calibrating(objectives) -> list:
    """The objectives whose calibration has not found spread rewards yet."""
    return [o for o in stateful(objectives) if getattr(o, "calibrating", False)]


def _as_is(batch):
    """A DataLoader's collate function for a batch that is already collated."""
    return batch


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


"""Fresh Lightning ``Trainer`` objects, one per client per round.

A ``Trainer`` built twice from one LightningCLI config would share its callback and logger
objects (their state leaks from one client to the next), so the factory keeps the *config*
and instantiates callbacks and loggers anew for every trainer: ``{class_path, init_args}``
specs are instantiated, ready-made objects are deep-copied. Each client round logs into a run
of its own: the directory ``<output_dir>/clients/client_<id>/round_<r>`` for file-based loggers
(CSV, TensorBoard), the run name ``client_<id>/round_<r>`` for MLflow (nested under the
federation's run) and W&B. The same logger specs, built once more by
:meth:`TrainerFactory.federation_loggers`, receive the round metrics (``round_logging``). Under
differential privacy (:meth:`TrainerFactory.log_clients_privately`) a client fit's logs are per-client
statistics: they go to a CSV log in the server-private record only.
"""

from __future__ import annotations

import copy
import inspect
import logging
import signal
import threading
import warnings
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, WandbLogger
from lightning.pytorch.trainer.connectors import callback_connector

from firm_lightning import distributed
from firm_lightning.run_folder import RunFolder

# Per-client fits neither validate nor checkpoint: the orchestrator evaluates and saves the
# global adapter itself.
CLIENT_DEFAULTS = dict(
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    limit_val_batches=0,
    max_epochs=-1,
    log_every_n_steps=1,  # local fits are a handful of steps
)


class TrainerFactory:
    def __init__(self, trainer_config: Optional[dict[str, Any]] = None, output_dir: str | Path = "runs/firm") -> None:
        config = dict(trainer_config or {})
        self.callbacks = config.pop("callbacks", None) or []
        self.logger = config.pop("logger", True)
        self.kwargs = {k: v for k, v in config.items() if v is not None}
        self.output_dir = Path(output_dir)
        self.private_client_logs = False
        self._parent_runs: dict[str, str] = {}
        max_steps = self.kwargs.get("max_steps")
        if max_steps is None or max_steps <= 0:  # 0 would run a federation with no local training
            raise ValueError(
                "trainer.max_steps sets the number of local steps K per client per round and must be > 0 "
                f"(got {max_steps}), e.g. `--trainer.max_steps 8`."
            )
        distributed.check_strategy(
            self.kwargs
        )  # auto or ddp (several devices per client): firm_lightning/distributed.py

    def client_trainer(
        self, client_id: int, round_idx: int, tag: str = "", extra_callbacks: Sequence[Callback] = ()
    ) -> L.Trainer:
        """A fresh Trainer for one client fit; ``extra_callbacks``: the fit's own (``FitArguments``, optimiser-state
        persistence)."""
        folder = RunFolder(self.output_dir)
        log_dir = folder.private_clients if self.private_client_logs else folder.clients
        client, fit = folder.client_name(client_id), folder.round_name(round_idx) + tag
        kwargs = {**CLIENT_DEFAULTS, **_built(self.kwargs, filename=f"{client}_{fit}")}
        kwargs = distributed.client_trainer_kwargs(kwargs)  # ddp: FIRM's DDP strategy, the whole batch on every rank
        kwargs.update(
            default_root_dir=str(log_dir),
            callbacks=[*(_fresh(c) for c in _as_list(self.callbacks)), *extra_callbacks, FinishWandbRuns()],
            logger=self._client_loggers(log_dir, client, fit),
        )
        with _entry_points_scanned_once():
            return L.Trainer(**kwargs)

    def dry_trainer(self) -> L.Trainer:
        """A client Trainer with every configured argument but no logger or callbacks: builds nothing on
        disk, and fails as a client's would on a bad argument."""
        kwargs = {**CLIENT_DEFAULTS, **_built(self.kwargs), "logger": False, "callbacks": [],
                  "default_root_dir": str(self.output_dir)}
        kwargs = distributed.client_trainer_kwargs(kwargs)
        with _entry_points_scanned_once():
            return L.Trainer(**kwargs)

    def federation_loggers(self) -> list[Logger]:
        """The configured loggers once more, as one run for the federation's round metrics."""
        self._parent_runs = {}
        loggers = self._fresh_loggers(self.output_dir, RunFolder(self.output_dir).federation_logs.name, "")
        mlflow_runs = [lg.run_id for lg in _as_list(loggers) if isinstance(lg, MLFlowLogger)]
        self._parent_runs = {"mlflow.parentRunId": mlflow_runs[-1]} if mlflow_runs else {}
        return [] if loggers is False else _as_list(loggers)

    def eval_trainer(self, extra_callbacks: Sequence[Callback] = (), **overrides) -> L.Trainer:
        """A Trainer for one evaluation on the configured devices; ``extra_callbacks``: the caller's own
        (e.g. ``FitArguments`` of a calibration pass); ``overrides``: Trainer arguments."""
        kwargs = {**_built({k: v for k, v in self.kwargs.items() if k in _DEVICE_KEYS}), **overrides}
        kwargs = distributed.single_device_kwargs(kwargs)  # under DDP rank 0 evaluates alone (distributed.py)
        with _entry_points_scanned_once():
            return L.Trainer(
                **kwargs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(self.output_dir), callbacks=list(extra_callbacks),
            )

    def log_clients_privately(self) -> None:
        """Client fits log to ``<output_dir>/server_private/clients`` with a CSV logger, whatever ``trainer.logger``
        names: a configured tracking service (MLflow, W&B) or log folder would publish per-client statistics."""
        self.private_client_logs = True

    def _client_loggers(self, log_dir: Path, client: str, fit: str):
        if self.private_client_logs and self.logger is not False:
            return CSVLogger(save_dir=str(log_dir), name=client, version=fit)
        return self._fresh_loggers(log_dir, client, fit)

    def _fresh_loggers(self, save_dir: Path, name: str, version: str):
        if self.logger is False:
            return False
        if self.logger is True or self.logger is None:  # None: the Trainer's default logger
            return CSVLogger(save_dir=str(save_dir), name=name, version=version)
        return [_fresh(spec, **self._run_identity(spec, save_dir, name, version)) for spec in _as_list(self.logger)]

    def _run_identity(self, spec, save_dir: Path, name: str, version: str) -> dict:
        """Where a fit's logs go: a folder per run for file loggers, a run name for tracking services."""
        label = f"{name}/{version}" if version else name
        cls = _class_of(spec)
        if cls is not None and issubclass(cls, MLFlowLogger):
            # client runs nest under the federation's run in the MLflow UI
            tags = {**((spec.get("init_args") or {}).get("tags") or {}), **self._parent_runs}
            return {"run_name": label, "tags": tags or None}
        if cls is not None and issubclass(cls, WandbLogger):
            # `version` is W&B's run id (unique per project), so only the display name is set; every fit
            # is a new run (not the process's current one), grouped under the federation's output folder.
            return {"name": label, "group": self.output_dir.name, "reinit": "create_new"}
        return {"save_dir": str(save_dir), "name": name, "version": version}


class FinishWandbRuns(Callback):
    """Lightning leaves a W&B run open after ``fit``; one per client fit would pile up in the process."""

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        finish_wandb_runs(trainer.loggers)


def finish_wandb_runs(loggers) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


_EXTERNAL_CALLBACKS_GROUP = "lightning.pytorch.callbacks_factory"
_external_factories: list | None = None


@contextmanager
def _entry_points_scanned_once():
    """Build a Trainer with Lightning's external-callback factories looked up once per process.

    ``Trainer.__init__`` asks ``importlib.metadata.entry_points`` for them, which rescans every
    installed distribution (about 55 ms here): with one Trainer per client per round that was
    the largest orchestration cost on small models. The factories are still called for every
    Trainer, so each one gets fresh callbacks, exactly as Lightning would build them.
    """
    global _external_factories
    original = getattr(callback_connector, "_load_external_callbacks", None)
    if original is None:  # another Lightning version: leave it alone
        yield
        return
    if _external_factories is None:
        _external_factories = list(entry_points(group=_EXTERNAL_CALLBACKS_GROUP))

    def load(group: str) -> list:
        if group != _EXTERNAL_CALLBACKS_GROUP:
            return original(group)
        callbacks = []
        for factory in _external_factories:
            made = factory.load()()
            callbacks.extend(made if isinstance(made, list) else [made] if made else [])
        return callbacks

    callback_connector._load_external_callbacks = load
    try:
        yield
    finally:
        callback_connector._load_external_callbacks = original


_DEVICE_KEYS = ("accelerator", "devices", "precision", "strategy", "num_nodes", "limit_val_batches")


def _built(kwargs: dict, **overrides) -> dict:
    """Trainer arguments given as ``{class_path, init_args}`` (a profiler, plugins, a strategy) built anew
    for this Trainer, as callbacks and loggers are; ``overrides`` (e.g. a profiler's per-fit ``filename``)
    go to the classes that accept them and were not set by the user."""
    def build(value):
        if isinstance(value, dict) and "class_path" in value:
            given = value.get("init_args") or {}
            return _fresh(value, **{k: v for k, v in overrides.items() if given.get(k) is None})
        if isinstance(value, (list, tuple)):
            return [build(v) for v in value]
        return value

    return {k: build(v) for k, v in kwargs.items()}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _class_of(spec) -> Optional[type]:
    if isinstance(spec, dict) and "class_path" in spec:
        module_name, class_name = spec["class_path"].rsplit(".", 1)
        return getattr(__import__(module_name, fromlist=[class_name]), class_name)
    return None


def _fresh(spec, **overrides):
    """A new instance from a ``{class_path, init_args}`` spec (plus the overrides it accepts), or a deep copy."""
    if isinstance(spec, dict) and "class_path" in spec:
        init_args = dict(spec.get("init_args") or {})
        cls = _class_of(spec)
        accepted = inspect.signature(cls.__init__).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())  # e.g. WandbLogger
        init_args.update({k: v for k, v in overrides.items() if takes_any or k in accepted})
        return instantiate_class((), {"class_path": spec["class_path"], "init_args": init_args})
    return copy.deepcopy(spec)


# ---------------------------------------------------------------- reusing one module across many Trainers


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


@contextmanager
def keyboard_interrupts():
    """Ctrl-C as a ``KeyboardInterrupt``, even inside a Trainer's ``fit`` or ``validate``.

    Lightning catches a ``KeyboardInterrupt`` there, tears the Trainer down, ignores SIGINT from then
    on and calls ``sys.exit(1)`` (``lightning.pytorch.trainer.call._call_and_handle_interrupt``): the
    caller would end silently with exit code 1. That exit, raised while handling the interrupt, is
    turned back into the interrupt, and Ctrl-C is restored.
    """
    try:
        yield
    except SystemExit as stop:
        interrupt = stop.__context__
        if not isinstance(interrupt, KeyboardInterrupt):
            raise
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)
        raise interrupt from None


@contextmanager
def quiet_lightning(enabled: bool):
    """Hide the start-up chatter that one Trainer per client per round would repeat hundreds of times."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    profilers = logging.getLogger("lightning.pytorch.profilers")  # a configured profiler's table is asked for
    levels = [lg.level for lg in (*loggers, profilers)]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    profilers.setLevel(logging.INFO)
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
            for lg, level in zip((*loggers, profilers), levels):
                lg.setLevel(level)

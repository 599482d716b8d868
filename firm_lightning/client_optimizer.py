"""The client's local optimiser: chosen by configuration, fresh or persisted per client.

``optimizer:`` and ``lr_scheduler:`` are LightningCLI's usual groups (``--optimizer SGD
--optimizer.lr 0.5``). LightningCLI's own wiring would build *one* optimiser when the CLI
starts and hand it to every fit, so all clients would share one Adam state; here every client
fit builds its own from the spec, over the adapter weights only: ``use_client_optimizer`` sets
the module's ``optimizer_factory`` once, when the config is built. Without ``optimizer:`` the
module's own default (AdamW with ``model.learning_rate``) stays.

``federation.client_optimizer_state``:

- ``reset`` (default): every client fit starts from a fresh optimiser (stateless clients, as in
  cross-device FL);
- ``persist``: each client keeps its optimiser and scheduler state from one round to its next
  (cross-silo). The state lives per client in ``FederationState.client_states``
  (CPU tensors and plain values), so a checkpoint of the federation state covers it.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.cli import instantiate_class


def use_client_optimizer(module: L.LightningModule, optimizer: dict, lr_scheduler: Optional[dict] = None) -> None:
    """Make the module's ``configure_optimizers`` build a fresh optimiser (+ scheduler) from these specs at
    every fit (``FIRMClientModule.optimizer_factory``).

    ``optimizer``/``lr_scheduler`` are ``{"class_path": ..., "init_args": {...}}`` without the
    ``params``/``optimizer`` argument.
    """
    if lr_scheduler and "ReduceLROnPlateau" in lr_scheduler.get("class_path", ""):
        raise ValueError(
            "lr_scheduler: ReduceLROnPlateau needs a monitored metric, which local client fits do not have; "
            "use a step-based scheduler (StepLR, CosineAnnealingLR, LinearLR, ...)."
        )
    module.optimizer_factory = OptimizerFromSpecs(optimizer, lr_scheduler)


class OptimizerFromSpecs:
    """``params`` -> an optimiser (and its scheduler) built from the ``optimizer:``/``lr_scheduler:`` specs."""

    def __init__(self, optimizer: dict, lr_scheduler: Optional[dict] = None) -> None:
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler

    def __call__(self, params: list[torch.nn.Parameter]):
        opt = instantiate_class(params, self.optimizer)
        if not self.lr_scheduler:
            return opt
        return [opt], [instantiate_class(opt, self.lr_scheduler)]


class PersistOptimizerState(L.Callback):
    """Loads a client's saved optimiser/scheduler state when its fit starts; saves it when the fit ends.

    ``store`` is the federation state's ``client_states`` dict; ``key`` names the
    client (and, for per-objective fits, the objective).
    """

    def __init__(self, store: dict[str, dict[str, Any]], key: str) -> None:
        self.store = store
        self.key = key

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved = self.store.get(self.key)
        if saved is None:
            return
        trainer.optimizers[0].load_state_dict(saved["optimizer"])  # moves tensors to the parameters' device
        for config, state in zip(trainer.lr_scheduler_configs, saved.get("lr_schedulers", [])):
            config.scheduler.load_state_dict(state)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.store[self.key] = {
            "optimizer": _to_cpu(trainer.optimizers[0].state_dict()),
            "lr_schedulers": [_to_cpu(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
        }


def _to_cpu(value):
    """Detached CPU copies: the state of many clients must not pile up on the accelerator."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value

"""Round metrics into the configured Lightning loggers, with the round as the step.

The loggers are the ones ``trainer.logger`` names (CSV by default; TensorBoard, MLflow, W&B
...), built once more for the federation itself: one federation is one logger run
(``<output_dir>/federation`` for file-based loggers, run name ``federation`` for MLflow/W&B),
and every client fit logs its local steps to a run of its own (see ``trainer_factory``).
Everything numeric in a round's row is logged: ``eval/reward/*``, λ and update dispersion,
bytes, train rewards, and whatever later features add to the row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from lightning.pytorch.loggers import Logger

from firm_lightning.callbacks import FederationCallback
from firm_lightning.trainer_factory import finish_wandb_runs


class RoundLogger(FederationCallback):
    """Round metrics into the run's loggers, which ``make_loggers`` builds when the federation starts.

    E.g. ``TrainerFactory.federation_loggers``."""

    def __init__(self, make_loggers: Callable[[], list[Logger]]) -> None:
        self.make_loggers = make_loggers
        self.loggers: list[Logger] = []

    def on_federation_start(self, federation, state) -> None:
        self.loggers = list(self.make_loggers())
        config = {f.name: getattr(federation.config, f.name) for f in dataclasses.fields(federation.config)}
        params = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        params.update(algorithm=federation.algorithm.name, objectives=",".join(federation.objective_names))
        for logger in self.loggers:
            logger.log_hyperparams(params)
        for row in state.history:  # round 0, or every round a resumed run already has
            self._log(row)

    def on_round_end(self, federation, state, row) -> None:
        self._log(row)

    def on_federation_end(self, federation, state) -> None:
        for logger in self.loggers:
            logger.save()
            logger.finalize("success")
        finish_wandb_runs(self.loggers)

    def _log(self, row: dict) -> None:
        metrics = {k: float(v) for k, v in row.items() if k != "round" and _is_number(v)}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=int(row["round"]))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

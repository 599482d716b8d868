"""Federation callbacks: hooks around the server loop, as Lightning callbacks are around a fit.

A ``FederationCallback`` overrides any of these hooks. Each gets the federation first (a
:class:`Federation`: its ``config``, ``algorithm``, ``objective_names`` and ``request_stop``),
on every transport: the in-process loop and the Flower server drive the same round engine.

=====================  ==================================================================
hook                   when
=====================  ==================================================================
on_federation_start    once, after the initial global adapter was evaluated (round 0)
on_round_start         a round's clients are sampled, before any of them trains
on_client_start        before one client's local fit (on Flower: when its training message is sent)
on_client_end          after it, with the client's upload (on Flower: when its reply arrives)
on_round_end           the round was aggregated, evaluated and recorded (its metrics row)
on_federation_end      after the last round (or an early stop)
=====================  ==================================================================

Configure them by ``class_path`` under ``federation.callbacks``, e.g.::

    federation:
      callbacks:
        - class_path: firm_lightning.callbacks.EarlyStopping
          init_args: {monitor: eval/reward/a_to_m, patience: 2}

A callback stops the federation with ``federation.request_stop(reason)``; the federation
finishes the current round, prints the reason and ends as after the last round.

Under ``federation.privacy`` the hooks see only what the run releases: ``on_round_start`` gets an
empty client list, ``on_client_start``/``on_client_end`` are not called, and every ``row`` (and
``state.history``) is the released row, without training statistics.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Literal, Protocol

from safetensors.torch import load_file

from firm_lightning.run_folder import RunFolder, atomic_write, save_tensors

if TYPE_CHECKING:
    from firm_lightning.adapters import ClientUpdate
    from firm_lightning.state import FederationState


class Federation(Protocol):
    """What a hook may read and do (the round engine, whichever transport drives it).

    ``config`` is the ``FederationConfig`` and ``algorithm`` the ``Algorithm`` (typed loosely:
    the config holds the callbacks, so naming its class here would close an import cycle).
    """

    config: Any
    algorithm: Any
    objective_names: list[str]

    def request_stop(self, reason: str) -> None: ...


class FederationCallback:
    """Base class: every hook does nothing. Subclass and override the hooks you need."""

    def on_federation_start(self, federation: "Federation", state: "FederationState") -> None: ...

    def on_round_start(
        self, federation: "Federation", state: "FederationState", round_idx: int, clients: list[int]
    ) -> None: ...

    def on_client_start(self, federation: "Federation", round_idx: int, client_id: int) -> None: ...

    def on_client_end(self, federation: "Federation", round_idx: int, update: "ClientUpdate") -> None: ...

    def on_round_end(self, federation: "Federation", state: "FederationState", row: dict) -> None: ...

    def on_federation_end(self, federation: "Federation", state: "FederationState") -> None: ...


HOOKS = (
    "on_federation_start",
    "on_round_start",
    "on_client_start",
    "on_client_end",
    "on_round_end",
    "on_federation_end",
)


class CallbackList:
    """Calls a hook on every callback, in order (``callbacks.on_round_end(federation, state, row)``)."""

    def __init__(self, callbacks: list[FederationCallback]) -> None:
        for cb in callbacks:
            if not isinstance(cb, FederationCallback):
                raise TypeError(
                    f"federation.callbacks takes FederationCallback objects; got {type(cb).__name__}. "
                    "Lightning callbacks (LearningRateMonitor, Timer, ...) belong under trainer.callbacks."
                )
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str):
        if hook not in HOOKS:
            raise AttributeError(hook)

        def call(*args, **kwargs) -> None:
            for cb in self.callbacks:
                getattr(cb, hook)(*args, **kwargs)

        return call


class _MonitorsMetric(FederationCallback):
    """Shared by the built-ins: reads ``monitor`` from each round's row and tracks the best value."""

    def __init__(self, monitor: str, mode: Literal["max", "min"]) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min'; got {mode!r}.")
        self.monitor = monitor
        self.mode = mode
        self.best = None
        self.best_round = None

    def _value(self, row: dict) -> float:
        if self.monitor not in row:
            metrics = ", ".join(k for k in row if k != "round")
            raise KeyError(
                f"{type(self).__name__} monitors {self.monitor!r}, which no round records; recorded: {metrics}."
            )
        return float(row[self.monitor])

    def _improves(self, value: float, min_delta: float = 0.0) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value > self.best + min_delta if self.mode == "max" else value < self.best - min_delta

    def on_federation_start(self, federation, state) -> None:
        self.best, self.best_round = None, None  # the same object may serve several runs (compare, pareto)


class EarlyStopping(_MonitorsMetric):
    """Stop the federation when ``monitor`` has not improved for ``patience`` rounds.

    Args:
        monitor: A metric of the round rows (``metrics.csv``), e.g. ``eval/reward/a_to_m``.
        mode: ``max`` (a reward) or ``min`` (e.g. ``update_dispersion``).
        patience: Rounds without an improvement larger than ``min_delta`` before stopping.
        min_delta: The smallest change that counts as an improvement.
    """

    def __init__(
        self, monitor: str, mode: Literal["max", "min"] = "max", patience: int = 3, min_delta: float = 0.0
    ) -> None:
        super().__init__(monitor, mode)
        if patience < 1:
            raise ValueError(f"EarlyStopping.patience must be >= 1 round; got {patience}.")
        self.patience = patience
        self.min_delta = min_delta
        self.wait = 0

    def on_federation_start(self, federation, state) -> None:
        super().on_federation_start(federation, state)
        self.wait = 0
        for row in state.history:  # round 0 (or the rounds a resumed run already has)
            self._update(row)

    def on_round_end(self, federation, state, row) -> None:
        self._update(row)
        if self.wait >= self.patience:
            federation.request_stop(
                f"EarlyStopping: {self.monitor} did not improve by more than {self.min_delta} for {self.wait} rounds "
                f"(best {self.best:.4f} at round {self.best_round}, now {self._value(row):.4f})"
            )

    def _update(self, row: dict) -> None:
        value = self._value(row)
        if self._improves(value, self.min_delta):
            self.best, self.best_round, self.wait = value, int(row["round"]), 0
        else:
            self.wait += 1


class SaveBestAdapter(_MonitorsMetric):
    """Keep the global adapter of the best round by ``monitor`` in ``<output_dir>/adapters/<filename>.safetensors``.

    A ``<filename>.json`` beside it names the round and the value.

    Args:
        monitor: A metric of the round rows, e.g. ``eval/reward/a_to_m``.
        mode: ``max`` or ``min``.
        filename: File name (without suffix) under ``<output_dir>/adapters/``.
    """

    def __init__(self, monitor: str, mode: Literal["max", "min"] = "max", filename: str = "best") -> None:
        super().__init__(monitor, mode)
        self.filename = filename

    def on_federation_start(self, federation, state) -> None:
        """Round 0, or every round a resumed run already has: the best so far is the best of them all."""
        super().on_federation_start(federation, state)
        for row in state.history:
            value = self._value(row)
            if self._improves(value):
                self.best, self.best_round = value, int(row["round"])
        folder = RunFolder(federation.config.output_dir)
        path = folder.best_adapter(self.filename)
        if self.best_round == state.round:
            self._save(folder, state.global_adapter, state.round)
        elif not self._saved_round(folder) == self.best_round:  # the earlier run's file is gone: rebuild it
            earlier = folder.round_adapter(self.best_round)
            if not earlier.is_file():
                raise FileNotFoundError(
                    f"SaveBestAdapter: the best round so far is {self.best_round}, but neither {path} nor {earlier} "
                    "holds its adapter; resume in the output_dir of the original run."
                )
            self._save(folder, load_file(str(earlier)), self.best_round)

    def on_round_end(self, federation, state, row) -> None:
        value = self._value(row)
        if not self._improves(value):
            return
        self.best, self.best_round = value, int(row["round"])
        self._save(RunFolder(federation.config.output_dir), state.global_adapter, state.round)

    def _saved_round(self, folder: RunFolder):
        try:
            if not folder.best_adapter(self.filename).is_file():
                return None
            return json.loads(folder.best_record(self.filename).read_text())["round"]
        except (OSError, ValueError, KeyError):
            return None

    def _save(self, folder: RunFolder, adapter: dict, round_idx: int) -> None:
        save_tensors(folder.best_adapter(self.filename), adapter, metadata={"round": str(round_idx)})
        record = {"round": round_idx, "monitor": self.monitor, "value": self.best}
        atomic_write(folder.best_record(self.filename), json.dumps(record).encode())

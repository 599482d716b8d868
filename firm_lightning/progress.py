"""Round-level progress: one tqdm bar in a terminal, one plain line per round otherwise.

``federation.progress`` picks it: ``auto`` (a bar when stdout is a terminal, lines when it is
not — a log file or CI gets no carriage returns), ``bar``, ``lines`` or ``off``. The bar shows
round i/N, the client now training, the ETA, the latest eval rewards and how much the clients'
weighting changed their steps (``format_weighting_effect``: 0 when λ is inert); it is redrawn in
place, never once per client step. Under differential privacy both show only what is released:
no client identity (the engine does not tell the hooks) and no training statistic (not in the row).
"""

from __future__ import annotations

import sys
from typing import Callable, Literal, Optional, TextIO

from tqdm import tqdm

from firm_lightning.callbacks import FederationCallback
from firm_lightning.gradients import WEIGHTING_EFFECT

ProgressMode = Literal["auto", "bar", "lines", "off"]


def progress_callback(
    mode: ProgressMode, echo: Callable[[str], None] = print, stream: Optional[TextIO] = None
) -> FederationCallback:
    stream = stream or sys.stdout
    if mode == "auto":
        mode = "bar" if _is_terminal(stream) else "lines"
    if mode == "bar":
        return ProgressBar(stream)
    if mode == "lines":
        return PlainLines(echo)
    if mode == "off":
        return FederationCallback()
    raise ValueError(f"federation.progress must be one of auto, bar, lines, off; got {mode!r}.")


def format_eval(row: dict) -> str:
    return "eval " + " ".join(
        f"{k.removeprefix('eval/reward/')}={v:.3f}" for k, v in row.items() if k.startswith("eval/reward/")
    )


def format_weighting_effect(row: dict) -> str:
    """How much λ changed the clients' steps against the preference: after the optimiser (on d before it)."""
    step, direction = (row.get(k, float("nan")) for k in WEIGHTING_EFFECT)
    return f"λ effect {step:.3f} (on d {direction:.3f})"


class PlainLines(FederationCallback):
    """Two lines per round: which clients train, then the round's results."""

    def __init__(self, echo: Callable[[str], None] = print) -> None:
        self.echo = echo

    def on_federation_start(self, federation, state) -> None:
        row = state.history[-1]
        what = "initial adapter" if state.round == 0 else "resumed"
        self.echo(f"round {state.round}/{federation.config.num_rounds} ({what}) | {format_eval(row)}")

    def on_round_start(self, federation, state, round_idx, clients) -> None:
        who = "the sampled clients" if federation.config.privacy is not None else f"clients {clients}"
        self.echo(f"round {round_idx}/{federation.config.num_rounds} | training {who} ...")

    def on_round_end(self, federation, state, row) -> None:
        head = f"round {row['round']}/{federation.config.num_rounds} | {format_eval(row)}"
        if "privacy/epsilon" in row:  # under privacy the row holds no training statistic
            self.echo(f"{head} | ε = {row['privacy/epsilon']:.3f} (δ = {row['privacy/delta']:g})")
            return
        self.echo(
            f"{head} | λ-dispersion {row.get('lambda_dispersion', float('nan')):.4f} | "
            f"update dispersion {row.get('update_dispersion', float('nan')):.3f} | {format_weighting_effect(row)} | "
            f"{row.get('time/round_s', 0.0):.1f}s"
        )


class ProgressBar(FederationCallback):
    """One tqdm bar over the rounds; its postfix names the current client and the latest eval."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream
        self.bar = None
        self.latest = ""

    def on_federation_start(self, federation, state) -> None:
        self.latest = format_eval(state.history[-1])
        self.bar = tqdm(
            total=federation.config.num_rounds, initial=state.round, desc="federation", unit="round",
            file=self.stream or sys.stdout, dynamic_ncols=True, leave=True,
        )
        self.bar.set_postfix_str(self.latest)

    def on_client_start(self, federation, round_idx, client_id) -> None:
        self.bar.set_postfix_str(f"round {round_idx}: client {client_id} | {self.latest}")

    def on_round_end(self, federation, state, row) -> None:
        self.latest = f"{format_eval(row)} | {format_weighting_effect(row)}"
        self.bar.set_postfix_str(self.latest, refresh=False)
        self.bar.update(1)

    def on_federation_end(self, federation, state) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())

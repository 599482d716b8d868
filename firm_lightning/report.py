"""What a federation run leaves on disk and prints: adapters, CSVs, plots, a summary table.

The file names and the layout of ``output_dir`` are ``RunFolder``'s.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from safetensors.torch import load_file

from firm_lightning.callbacks import SaveBestAdapter
from firm_lightning.model_card import ModelCard
from firm_lightning.run_folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunFolder, atomic_write, save_tensors

if TYPE_CHECKING:
    from firm_lightning.federation import FederationConfig
    from firm_lightning.state import FederationState


class RunWriter:
    """Writes a run's records into its ``RunFolder`` as the round engine reports them.

    The engine calls ``record_round`` after every recorded round (round 0 included, and each round of a
    resumed run) and ``finish`` once, after the last round or an early stop; nothing else calls them.
    A replacement (``RoundEngine(writer=...)``) must keep the guarantees below, which readers rely on.

    Args:
        output_dir: The run folder (``federation.output_dir``); created by the first record if missing.
        objective_names: The objectives, in the order of the metric columns.
        adapter_config: The policy's peft config, saved beside the adapters so each folder loads with peft;
            None writes the tensors only.
        echo: Where the summary table and the closing line are printed.
        save_every_round: Keep ``adapters/round_<r>.safetensors`` for every round (``federation.save_adapters``).

    Guarantees: ``metrics.csv`` and ``client_metrics.csv`` hold every released row after each
    ``record_round`` (under differential privacy: ``state.history`` as the engine released it, no client
    rows; the full rows go to ``server_private/``, which nothing else here reads) ; every file is replaced
    atomically (a reader sees the old file or the new one); the
    summary is written last by ``finish``, so its presence means the run finished
    (``RunFolder.is_finished``, which lets ``compare`` and ``pareto`` reuse runs). The writer does
    not write ``config.yaml`` (the CLI), ``checkpoint/`` and ``objective_state.json`` (the engine) or
    SaveBestAdapter's file (the callback); it packages that file into a peft folder at the end.
    """

    def __init__(
        self, output_dir: str | Path, objective_names: list[str], adapter_config=None, echo=print,
        save_every_round: bool = True,
    ) -> None:
        self.folder = RunFolder(output_dir)  # created by the first record: nothing is written before the run starts
        self.save_every_round = save_every_round
        self.names = objective_names
        self.adapter_config = adapter_config
        self.echo = echo

    def record_round(self, state: "FederationState", row: dict, client_rows: list[dict]) -> None:
        """Record ``state`` after a round: its history (``row`` is its last entry) and, if kept, its adapter."""
        self.folder.create()
        write_csv(self.folder.metrics, state.history)
        if state.client_history:
            write_csv(self.folder.client_metrics, state.client_history)
        if state.private_history:
            self._record_private(state)
        if self.save_every_round:
            self.save_adapter(state.global_adapter, self.folder.round_adapter(state.round), state.round)

    def _record_private(self, state: "FederationState") -> None:
        """The server-private record: every training statistic that the privacy guarantee does not cover."""
        folder = self.folder
        folder.server_private.mkdir(parents=True, exist_ok=True)
        if not folder.private_readme.is_file():
            folder.private_readme.write_text(PRIVATE_RECORD_NOTE)
        write_csv(folder.private_metrics, state.private_history)
        if state.private_client_history:
            write_csv(folder.private_client_metrics, state.private_client_history)

    def save_adapter(self, adapter: dict[str, torch.Tensor], path: Path, round_idx: int) -> None:
        save_tensors(path, adapter, metadata={"round": str(round_idx)})
        if self.adapter_config is not None and not (path.parent / ADAPTER_CONFIG).exists():
            with tempfile.TemporaryDirectory(prefix=".", dir=path.parent) as tmp:  # peft writes it; we rename it
                self.adapter_config.save_pretrained(tmp)
                os.replace(Path(tmp) / ADAPTER_CONFIG, path.parent / ADAPTER_CONFIG)

    def finish(self, state: "FederationState", wall_s: Optional[float], config: "FederationConfig") -> None:
        """The final adapter and the best ones as peft folders with model cards, the plots, then the summary
        (``wall_s``: the run's time, None when unknown)."""
        folder = self.folder.create()
        self.save_adapter(state.global_adapter, folder.final / ADAPTER_WEIGHTS, state.round)
        card = ModelCard(folder.path, self.names, self.adapter_config, config, state)
        card.write(folder.final, state.round, f"the global adapter after round {state.round}")
        self._package_best_adapters(card, config, state)
        plot_eval_rewards(state.history, self.names, folder.reward_plot)
        if state.client_history:
            plot_lambdas(state.client_history, self.names, folder.lambda_plot)
        private = config.privacy is not None
        # Under privacy the run's length in time depends on how many clients were sampled: not released.
        text = summary_table(state, self.names, None if private else wall_s, failures=not private)
        if private:
            text += "\n\n" + privacy_summary(state, config)
        atomic_write(folder.summary, (text + "\n").encode())  # last: the finished marker
        self.echo(text)
        records = f"{folder.server_private.name}/ (outside the guarantee)" if private else folder.client_metrics.name
        self.echo(f"outputs in {folder.path}/ ({folder.metrics.name}, {records}, "
                  f"{folder.adapters.name}/, {folder.plots.name}/, {folder.summary.name})")

    def _package_best_adapters(self, card: "ModelCard", config: "FederationConfig", state: "FederationState") -> None:
        """SaveBestAdapter keeps ``adapters/<filename>.safetensors``; beside it, a peft folder with its card."""
        for callback in config.callbacks:
            if not isinstance(callback, SaveBestAdapter):
                continue
            file = self.folder.best_adapter(callback.filename)
            if not file.is_file():
                continue
            info = json.loads(self.folder.best_record(callback.filename).read_text())
            folder = self.folder.best_folder(callback.filename)
            self.save_adapter(load_file(str(file)), folder / ADAPTER_WEIGHTS, info["round"])
            card.write(folder, info["round"], f"the best global adapter by {info['monitor']} "
                       f"({info['monitor']} = {info['value']:.4f} in round {info['round']}; SaveBestAdapter)")


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` atomically: a reader (a resumed run, another process of the same
    comparison) sees the old file or the new one, never a half-written one."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(path), text.getvalue().encode())


def summary_table(
    state: "FederationState", names: list[str], wall_s: Optional[float] = None, failures: bool = True
) -> str:
    """The table printed at the end; ``failures``: list the clients that failed (not under privacy: it names
    who was sampled)."""
    first, last = state.history[0], state.history[-1]
    lines = [f"FIRM federation: {state.round} rounds" + (f" in {wall_s:.1f}s" if wall_s is not None else "")]
    lines.append(f"{'objective':<16}{'eval round 0':>14}{f'eval round {state.round}':>16}{'change':>10}")
    for n in names:
        a, b = first[f"eval/reward/{n}"], last[f"eval/reward/{n}"]
        lines.append(f"{n:<16}{a:>14.4f}{b:>16.4f}{b - a:>+10.4f}")
    if state.client_history:
        lines.append("")
        lam_cols = "".join(f"{'λ ' + n:>16}" for n in names)
        lines.append(f"{'client':<8}{'rounds':>7}{lam_cols}{'up B/round':>13}{'down B/round':>14}")
        for client in sorted({int(r["client"]) for r in state.client_history}):
            rows = [r for r in state.client_history if int(r["client"]) == client]
            lams = "".join(f"{sum(r[f'lambda/{n}'] for r in rows) / len(rows):>16.3f}" for n in names)
            up = sum(r["comm/bytes_up"] for r in rows) / len(rows)
            down = sum(r["comm/bytes_down"] for r in rows) / len(rows)
            lines.append(f"{client:<8}{len(rows):>7}{lams}{up:>13,.0f}{down:>14,.0f}")
        lines.append(
            "(λ: mean over the client's local steps and rounds; bytes: adapter tensors sent, numel × element size)"
        )
    return "\n".join(lines + (failure_lines(state.client_failures) if failures else []))


def failure_lines(failures: list[dict]) -> list[str]:
    """The clients that failed, how often, and their last error with its traceback file; none: no lines."""
    if not failures:
        return []
    lines = ["", "clients that failed (left out of those rounds):"]
    for client in sorted({int(f["client"]) for f in failures}):
        mine = [f for f in failures if int(f["client"]) == client]
        last = mine[-1]
        rounds = ", ".join(str(f["round"]) for f in mine)
        where = f" (traceback: {last['traceback']})" if last.get("traceback") else ""
        lines.append(f"client {client}: {len(mine)} round(s) ({rounds}); last error: {last['error']}{where}")
    return lines


def save_figure(fig, path: Path) -> None:
    """A figure as a PNG file, written atomically like every file of a run folder."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue())


def privacy_summary(state: "FederationState", config: "FederationConfig") -> str:
    """The guarantee the released outputs carry, for the summary."""
    privacy, last = config.privacy, state.history[-1]
    epsilon = last.get("privacy/epsilon", 0.0)
    return (
        f"differential privacy: (ε = {epsilon:.3f}, δ = {privacy.delta:g}) after {state.round} rounds; client-level, "
        f"add or remove one client; Poisson sampling q = {config.client_fraction:g} of {config.num_clients} clients, "
        f"noise σ = {privacy.noise_multiplier:g}, clipping C = {privacy.clipping_norm:g}.\n"
        "Released: the global adapters, their held-out evaluation and the accounting. Training statistics, the "
        "sampled clients and their logs are in server_private/, outside the guarantee: never publish it."
    )


PRIVATE_RECORD_NOTE = """\
Server-private record of a run with federation.privacy (differential privacy).

Everything here is OUTSIDE the privacy guarantee: per-client and per-round training statistics
(rewards, λ, KL, update norms and dispersions, example counts, bytes, timings), which clients were
sampled in each round, and the client fits' own logs. None of it is noised or accounted. Keep it as
private as the server itself (like checkpoint/); never publish it. The run's released outputs
(metrics.csv, summary.txt, plots/, adapters/ and their model cards, the Lightning round logs) never
read this folder.
"""


def new_figure(*args, figsize, **kwargs):
    """A figure and its axes without pyplot: saving plots never switches a notebook's or an app's backend."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def integer_rounds(ax) -> None:
    """Rounds are whole numbers: no 0.5 ticks on a short run's x axis."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_eval_rewards(history: list[dict], names: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = new_figure(figsize=(6, 4))
    rounds = [r["round"] for r in history]
    for n in names:
        ax.plot(rounds, [r[f"eval/reward/{n}"] for r in history], marker="o", label=n)
    ax.set(xlabel="round", ylabel="eval reward (global adapter)", title="Eval reward per objective")
    integer_rounds(ax)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def plot_lambdas(client_history: list[dict], names: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = new_figure(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    clients = sorted({int(r["client"]) for r in client_history})
    for ax, n in zip(axes[0], names):
        for c in clients:
            rows = [r for r in client_history if int(r["client"]) == c]
            ax.plot([r["round"] for r in rows], [r[f"lambda/{n}"] for r in rows], marker=".", label=f"client {c}")
        ax.set(xlabel="round", ylabel=f"λ {n}", title=f"λ {n} per client", ylim=(-0.02, 1.02))
        integer_rounds(ax)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)

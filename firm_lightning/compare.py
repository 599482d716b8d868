"""``compare``: the same federation under several algorithms, seeds and heterogeneity levels.

Every algorithm sees the same initial adapter, data split, client sampling, sampling seeds
and number of rounds and local steps (FMGDA's clients do ``S×`` the local steps: one pass
per objective, as the method prescribes). Results land in one ``metrics.csv`` (one row per
algorithm × α × seed × round), a ``summary.md`` table and comparison plots.
"""

from __future__ import annotations

import inspect
import math
import statistics
from pathlib import Path
from typing import Callable, Optional

from firm_lightning.algorithms import FIRM, FMGDA, Algorithm, Linear, LocalMGDA
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.module import FIRMClientModule
from firm_lightning.orchestrator import FederationConfig, run_federation
from firm_lightning.report import new_figure, write_csv


class CompareSettings:
    """The ``compare:`` section: which algorithms, over which seeds and Dirichlet α."""

    def __init__(
        self,
        algorithms: Optional[list[Algorithm]] = None,
        seeds: Optional[list[int]] = None,
        dirichlet_alphas: Optional[list[float]] = None,
    ) -> None:
        self.algorithms = algorithms or [FIRM(beta=1.0), LocalMGDA(), Linear(), FMGDA()]
        self.seeds = seeds or [0]
        self.dirichlet_alphas = dirichlet_alphas  # None: data.dirichlet_alpha
        names = [a.name for a in self.algorithms]
        if len(set(names)) != len(names):
            raise ValueError(f"Algorithm names must be unique (they label the results); got {names}. Pass name=...")


def run_comparison(
    module: FIRMClientModule,
    datamodule: PromptDataModule,
    federation: FederationConfig,
    trainer_config: dict,
    settings: CompareSettings,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Run every (α, seed, algorithm) federation; return all round rows, labelled."""
    out = Path(federation.output_dir)
    initial = module.adapter_state()
    alphas = settings.dirichlet_alphas or [datamodule.hparams["dirichlet_alpha"]]
    rows = []
    for alpha in alphas:
        for seed in settings.seeds:
            data = _rebuilt(datamodule, dirichlet_alpha=alpha, seed=seed)
            for algorithm in settings.algorithms:
                label = f"{algorithm.name} α={alpha:g} seed={seed}"
                run_dir = out / "runs" / f"alpha{alpha:g}_seed{seed}" / algorithm.name
                state = run_federation(
                    module, data, federation, trainer_config, algorithm, initial, run_dir,
                    echo=lambda m, label=label: echo(f"[{label}] {m}"), seed=seed,
                )
                rows += [{"algorithm": algorithm.name, "alpha": alpha, "seed": seed, **r} for r in state.history]
                write_csv(out / "metrics.csv", rows)
    return rows


def _rebuilt(datamodule: PromptDataModule, **changes) -> PromptDataModule:
    """The same kind of data module with the same settings but ``changes``."""
    accepted = inspect.signature(type(datamodule).__init__).parameters
    kwargs = {k: v for k, v in datamodule.hparams.items() if k in accepted}
    return type(datamodule)(**{**kwargs, **changes})


def summarize(rows: list[dict], objectives: list[str]) -> list[dict]:
    """One row per (algorithm, α): final rewards (mean ± std over seeds) and mean round metrics."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["algorithm"], r["alpha"]), []).append(r)
    table = []
    for (algorithm, alpha), group in groups.items():
        runs = {}
        for r in group:
            runs.setdefault(r["seed"], []).append(r)
        runs = [sorted(rs, key=lambda r: r["round"]) for rs in runs.values()]
        entry = {"algorithm": algorithm, "alpha": alpha, "seeds": len(runs)}
        for n in objectives:
            finals = [rs[-1][f"eval/reward/{n}"] for rs in runs]
            entry[f"final {n}"] = _mean_std(finals)
        entry["λ dispersion"] = _mean_std([_mean(rs[1:], "lambda_dispersion") for rs in runs])
        entry["update dispersion"] = _mean_std([_mean(rs[1:], "update_dispersion") for rs in runs])
        entry["smoothness"] = _mean_std([smoothness(rs, objectives) for rs in runs])
        entry["MB up/client"] = statistics.mean(_per_client_total(rs, "comm/bytes_up") for rs in runs) / 1e6
        entry["MB down/client"] = statistics.mean(_per_client_total(rs, "comm/bytes_down") for rs in runs) / 1e6
        table.append(entry)
    return table


def smoothness(run: list[dict], objectives: list[str]) -> float:
    """Mean absolute round-to-round change of the eval rewards (lower is smoother)."""
    steps = [
        abs(b[f"eval/reward/{n}"] - a[f"eval/reward/{n}"]) for a, b in zip(run, run[1:]) for n in objectives
    ]
    return statistics.mean(steps) if steps else math.nan


def markdown_table(table: list[dict]) -> str:
    columns = list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in table:
        lines.append("| " + " | ".join(_fmt(entry[c]) for c in columns) + " |")
    return "\n".join(lines)


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return statistics.mean(values) if values else math.nan


def _mean_std(values: list[float]) -> tuple[float, float]:
    if any(math.isnan(v) for v in values):
        return (math.nan, math.nan)
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def _per_client_total(run: list[dict], key: str) -> float:
    return sum(r[key] / r["clients"] for r in run[1:])


def _fmt(value) -> str:
    if isinstance(value, tuple):
        mean, std = value
        return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def plot_comparison(rows: list[dict], objectives: list[str], plot_dir: Path) -> list[Path]:
    """Eval reward vs round, dispersions vs round, eval reward vs cumulative uplink bytes."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    curves = _mean_curves(rows, objectives + ["lambda_dispersion", "update_dispersion", "uplink"])
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(plot_dir / name, dpi=100)
        paths.append(plot_dir / name)

    fig, axes = new_figure(1, len(objectives), figsize=(5 * len(objectives), 3.8), squeeze=False)
    for ax, n in zip(axes[0], objectives):
        for label, c in curves.items():
            ax.plot(c["round"], c[n], marker="o", label=label)
        ax.set(xlabel="round", ylabel=f"eval reward {n}", title=f"Eval reward: {n}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    save(fig, "eval_rewards.png")

    fig, axes = new_figure(1, 2, figsize=(10, 3.8))
    for ax, key, title in zip(axes, ["lambda_dispersion", "update_dispersion"], ["λ dispersion", "update dispersion"]):
        for label, c in curves.items():
            ax.plot(c["round"][1:], c[key][1:], marker="o", label=label)
        ax.set(xlabel="round", ylabel=title, title=f"{title} (client disagreement)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    save(fig, "dispersion.png")

    fig, axes = new_figure(1, len(objectives), figsize=(5 * len(objectives), 3.8), squeeze=False)
    for ax, n in zip(axes[0], objectives):
        for label, c in curves.items():
            ax.plot([b / 1e6 for b in c["uplink"]], c[n], marker="o", label=label)
        ax.set(xlabel="cumulative uplink per client (MB)", ylabel=f"eval reward {n}", title=f"{n} vs communication")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    save(fig, "reward_vs_uplink.png")
    return paths


def _mean_curves(rows: list[dict], keys: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per (algorithm, α): each key's mean over seeds at every round; 'uplink' is cumulative bytes per client."""
    alphas = {r["alpha"] for r in rows}
    by_label: dict[str, dict[int, list[dict]]] = {}
    uplink: dict[tuple, float] = {}
    for r in sorted(rows, key=lambda r: (r["algorithm"], r["alpha"], r["seed"], r["round"])):
        label = r["algorithm"] + (f" α={r['alpha']:g}" if len(alphas) > 1 else "")
        run = (label, r["seed"])
        uplink[run] = uplink.get(run, 0.0) + (r["comm/bytes_up"] / r["clients"] if r["round"] > 0 else 0.0)
        by_label.setdefault(label, {}).setdefault(r["round"], []).append({**r, "uplink": uplink[run]})
    curves = {}
    for label, by_round in by_label.items():
        rounds = sorted(by_round)
        curve = {"round": rounds}
        for key in keys:
            name = key if key in ("lambda_dispersion", "update_dispersion", "uplink") else f"eval/reward/{key}"
            curve[key] = [statistics.mean(r.get(name, math.nan) for r in by_round[t]) for t in rounds]
        curves[label] = curve
    return curves

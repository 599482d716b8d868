"""Preference sweeps and Pareto fronts: the ``pareto`` command.

``run_sweep`` trains one federation per (algorithm, preference), evaluates each final global
adapter on the same held-out prompts and skips runs already finished in the output folder.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from firm_lightning.algorithms import FIRM, Algorithm, Linear
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.module import FIRMClientModule
from firm_lightning.orchestrator import FederationConfig, run_federation
from firm_lightning.report import new_figure, save_figure
from firm_lightning.run_folder import RunFolder, atomic_write
from firm_lightning.studies.fronts import hypervolume, non_dominated
from firm_lightning.weighting import validate_preference


class ParetoSettings:
    """The ``pareto:`` section: preferences to sweep, algorithms to sweep them with, the reference point.

    Args:
        preferences: The preferences p to train one federation each for (every one on the simplex, one weight
            per objective); default [[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]].
        algorithms: The algorithms that sweep them, each taking a preference (FIRM, LocalMGDA, Linear, by
            class_path); default FIRM β = 1 and Linear.
        reference: The hypervolume's reference point, one reward per objective; null: the initial adapter's
            eval rewards.
    """

    def __init__(
        self,
        preferences: Optional[list[list[float]]] = None,
        algorithms: Optional[list[Algorithm]] = None,
        reference: Optional[list[float]] = None,
    ) -> None:
        self.preferences = preferences or [[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]]
        self.algorithms = algorithms or [FIRM(beta=1.0), Linear()]
        self.reference = reference  # None: the initial adapter's eval rewards
        for algorithm in self.algorithms:
            algorithm.with_preference(self.preferences[0])  # one that takes no preference refuses here


def run_sweep(
    module: FIRMClientModule,
    datamodule: PromptDataModule,
    federation: FederationConfig,
    trainer_config: dict,
    settings: ParetoSettings,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Final eval rewards of one federation per (algorithm, preference); finished runs are reused."""
    out = Path(federation.output_dir)
    names = module.objective_names
    preferences = [validate_preference(p, len(names)).tolist() for p in settings.preferences]
    initial = module.adapter_state()
    rows, total = [], len(preferences) * len(settings.algorithms)
    for template in settings.algorithms:
        for p in preferences:
            algorithm = template.with_preference(p)
            tag = "p_" + "_".join(f"{x:.3f}" for x in p)
            run_dir = RunFolder(out).runs / template.name / tag
            label = f"{len(rows) + 1}/{total} {template.name} p={preference_label(p)}"
            final = _finished(run_dir)
            if final is None:
                echo(f"[{label}] training ...")
                run_federation(
                    module, datamodule, federation, trainer_config, algorithm, initial, run_dir,
                    echo=lambda m, label=label: echo(f"[{label}] {m}"),
                )
                final = _finished(run_dir)
            else:
                echo(f"[{label}] already finished in {run_dir}, skipped")
            rows.append({"algorithm": template.name, "preference": p, **final})
    return rows


def _finished(run_dir: Path) -> Optional[dict]:
    """The first and last eval rows of a run finished in ``run_dir`` (early stops included), else None."""
    folder = RunFolder(run_dir)
    if not folder.is_finished():
        return None
    rows = folder.history()
    evals = lambda row: {k: v for k, v in row.items() if k.startswith("eval/reward/")}
    return {"initial": evals(rows[0]), **evals(rows[-1])}


def front_report(rows: list[dict], names: list[str], reference: Optional[Sequence[float]]) -> dict:
    """Hypervolume and non-dominated points per algorithm, against one stated reference point."""
    source = "given"
    if reference is None:
        reference = [rows[0]["initial"][f"eval/reward/{n}"] for n in names]
        source = "eval rewards of the initial adapter (round 0)"
    report = {"reference": list(reference), "reference_source": source, "algorithms": {}}
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        mine = [r for r in rows if r["algorithm"] == algorithm]
        points = np.array([[r[f"eval/reward/{n}"] for n in names] for r in mine])
        mask = non_dominated(points)
        report["algorithms"][algorithm] = {
            "hypervolume": hypervolume(points, reference),
            "non_dominated": [{"preference": r["preference"], "rewards": pt.tolist()}
                              for r, pt, keep in zip(mine, points, mask) if keep],
        }
    return report


def write_outputs(rows: list[dict], names: list[str], report: dict, out: Path) -> None:
    folder = RunFolder(out)
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["algorithm", "preference"] + [f"eval/reward/{n}" for n in names])
    for r in rows:
        writer.writerow([r["algorithm"], json.dumps(r["preference"])] + [r[f"eval/reward/{n}"] for n in names])
    atomic_write(folder.pareto_table, text.getvalue().encode())
    atomic_write(folder.hypervolume, (json.dumps(report, indent=2) + "\n").encode())
    plot_fronts(rows, names, folder.pareto_plot, report["reference"])


def plot_fronts(rows: list[dict], names: list[str], path: Path, reference: Sequence[float]) -> None:
    """One panel per pair of objectives; one series per algorithm, connected in preference order."""
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    fig, axes = new_figure(1, len(pairs), figsize=(5.5 * len(pairs), 4.5), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
            mine = sorted((r for r in rows if r["algorithm"] == algorithm), key=lambda r: r["preference"][0])
            xs = [r[f"eval/reward/{names[i]}"] for r in mine]
            ys = [r[f"eval/reward/{names[j]}"] for r in mine]
            ax.plot(xs, ys, marker="o", label=algorithm)
            for r, x, y in zip(mine, xs, ys):
                ax.annotate(
                    preference_label(r["preference"]), (x, y), fontsize=7, textcoords="offset points", xytext=(4, 4)
                )
        ax.scatter([reference[i]], [reference[j]], marker="x", color="black", label="reference")
        ax.set(xlabel=f"eval reward {names[i]}", ylabel=f"eval reward {names[j]}", title="Pareto front")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)


def preference_label(p: Sequence[float]) -> str:
    return "[" + ", ".join(f"{x:g}" for x in p) + "]"

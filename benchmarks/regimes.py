"""Where FIRM's regulariser matters: the paper's claims tested per regime (local steps × client optimiser × α).

    python benchmarks/regimes.py run OUT [--workers 2] [--cells NAME ...] [--seeds 0 1 ...]
    python benchmarks/regimes.py plan OUT --seeds-options 4 6 8     # MDE of the primary rows from a pilot
    python benchmarks/regimes.py report OUT [--figure docs/regimes.png] [--results docs/results/regimes.json]

A *regime* is a number of local steps K (``trainer.max_steps``) and a client optimiser: SGD, AdamW fresh
every fit (``federation.client_optimizer_state: reset``) or AdamW persisted across a client's rounds
(``persist``). A *cell* is a regime at one Dirichlet α with its algorithms. ``run`` runs each (cell, α,
seed) as one ``compare`` process on ``configs/regimes.yaml`` with the regime's overrides, ``--workers`` at a
time, cells in the order of ``CELLS`` (so a study stopped early is missing whole cells, never seeds of a
cell); ``compare`` reuses finished runs, so an interrupted study continues where it stopped, and a cell's
algorithms can be added later. Every job's wall time lands in ``OUT/jobs.jsonl``.

``report`` reads the finished runs of every cell, builds the claims table of each regime with the claims
declared below (``CLAIMS``: one primary metric per claim, fixed before the study ran) and Holm-adjusts the
primary rows of all regimes together (``claims.adjust_family``), and writes ``regimes.json`` (with the
commit measured), ``regimes.png`` and ``regimes.md``. ``plan`` reads a pilot's runs the same way and prints,
per primary row, the seed-to-seed sd of the paired difference and the MDE it gives for each seed count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firm_lightning.studies import claims as stats  # noqa: E402
from firm_lightning.studies.claims import Claim  # noqa: E402
from firm_lightning.studies.compare import finished_history, run_directory  # noqa: E402

CONFIG = "configs/regimes.yaml"
OBJECTIVES = ["obj1", "obj2"]
NUM_ROUNDS = 4  # configs/regimes.yaml federation.num_rounds
REFERENCE = "firm_beta1"
SGD_LR = 5.0  # SGD's global step about AdamW's (lr 0.01) on this testbed: docs/lightning.md measured lr 10 at ~2x

ALGORITHMS = {  # name -> the compare.algorithms entry
    "firm_beta1": {"class_path": "firm_lightning.algorithms.FIRM", "init_args": {"beta": 1.0}},
    "local_mgda": {"class_path": "firm_lightning.algorithms.LocalMGDA"},
    "linear": {"class_path": "firm_lightning.algorithms.Linear"},
    "firm_beta0.1": {"class_path": "firm_lightning.algorithms.FIRM", "init_args": {"beta": 0.1}},
    "firm_beta10": {"class_path": "firm_lightning.algorithms.FIRM", "init_args": {"beta": 10.0}},
}
CORE = ("firm_beta1", "local_mgda", "linear")
ABLATION = CORE + ("firm_beta0.1", "firm_beta10")

#: The study's claims, declared before it ran: one primary metric per claim, against local MGDA (β = 0: what
#: differs is the regulariser alone), Holm-adjusted over the whole study; the rows against linear scalarisation
#: (β = ∞), the weighting effect, λ dispersion and the worst client are exploratory.
CLAIMS = [
    Claim("drift", "update_dispersion_weighted", "lower", ("local_mgda",), primary=True),
    Claim("drift", "update_dispersion_weighted", "lower", ("linear",)),
    Claim("drift", "lambda_dispersion", "lower", ("local_mgda",)),
    Claim("weighting effect", "weighting_effect", "lower", ("local_mgda",)),
    Claim("weighting effect", "weighting_effect_direction", "lower", ("local_mgda",)),
    Claim("trade-offs", "final/mean", "higher", ("local_mgda",), primary=True),
    Claim("trade-offs", "final/mean", "higher", ("linear",)),
    Claim("trade-offs", "worst_client", "higher", ("local_mgda", "linear")),
    Claim("smoothness", "eval_roughness", "lower", ("local_mgda",), primary=True),
]
#: The per-run numbers the map shows per algorithm (mean over seeds).
LEVELS = ["weighting_effect", "weighting_effect_direction", "lambda_dispersion", "update_dispersion_weighted",
          "final/mean", "worst_client", "eval_roughness"]


@dataclass(frozen=True)
class Regime:
    local_steps: int
    optimizer: str  # "adamw" (fresh each fit), "adamw_persist" or "sgd"

    @property
    def name(self) -> str:
        return f"k{self.local_steps}_{self.optimizer}"

    def args(self) -> list[str]:
        args = [f"--trainer.max_steps={self.local_steps}"]
        if self.optimizer == "sgd":
            args += ["--optimizer=SGD", f"--optimizer.lr={SGD_LR:g}"]
        if self.optimizer == "adamw_persist":  # the module's own AdamW (lr 0.01), kept across the client's rounds
            args += ["--federation.client_optimizer_state=persist"]
        return args


@dataclass(frozen=True)
class Cell:
    regime: Regime
    alpha: float
    algorithms: tuple[str, ...] = CORE

    @property
    def name(self) -> str:
        return f"{self.regime.name}_a{self.alpha:g}"


def _cells() -> list[Cell]:
    """The study, in the order it runs (most informative first)."""
    k1, k4, k16 = (Regime(k, "adamw") for k in (1, 4, 16))
    return [
        Cell(k1, 0.1),  # the claims table's regime until now
        Cell(k4, 0.1), Cell(Regime(4, "sgd"), 0.1),  # several local steps: AdamW fresh (the spec's), SGD
        Cell(k1, 100.0), Cell(Regime(1, "adamw_persist"), 0.1), Cell(Regime(1, "sgd"), 0.1),
        Cell(Regime(4, "adamw_persist"), 0.1),
        # beyond the two-hour budget measured on the shared 2-core machine (docs/regimes.md):
        Cell(k16, 0.1), Cell(Regime(16, "sgd"), 0.1), Cell(Regime(16, "adamw_persist"), 0.1),
        Cell(k4, 100.0), Cell(Regime(4, "sgd"), 100.0),
    ]


CELLS = {cell.name: cell for cell in _cells()}
PILOT = ["k4_adamw_a0.1", "k4_sgd_a0.1"]
BUDGETED = list(CELLS)[:7]  # what two hours buy at the pilot's measured throughput


# --------------------------------------------------------------------------- run


def run(out: Path, cells: list[Cell], seeds: list[int], workers: int) -> None:
    """Every (cell, seed) as one compare process, ``workers`` at a time, cell after cell."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "commits.txt", "a") as f:  # the code the runs were trained with
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} run {' '.join(c.name for c in cells)}: {_commit()}\n")
    lock = threading.Lock()
    jobs = [(cell, seed) for cell in cells for seed in seeds]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}

    def job(cell: Cell, seed: int) -> None:
        todo = [a for a in cell.algorithms if finished_history(_run_dir(out, cell, a, seed), NUM_ROUNDS) is None]
        if not todo:
            return
        specs = json.dumps([ALGORITHMS[a] for a in cell.algorithms])
        command = [sys.executable, "-m", "firm_lightning", "compare", "--config", CONFIG, *cell.regime.args(),
                   f"--federation.output_dir={out / cell.regime.name}", "--federation.progress=off",
                   f"--compare.seeds=[{seed}]", f"--compare.dirichlet_alphas=[{cell.alpha}]",
                   f"--compare.algorithms={specs}", f"--compare.reference={REFERENCE}"]
        log = out / "logs" / f"{cell.name}_seed{seed}.log"
        log.parent.mkdir(exist_ok=True)
        tic = time.time()
        with open(log, "w") as f:
            code = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        record = {"cell": cell.name, "seed": seed, "runs": len(todo), "wall_s": round(time.time() - tic, 1),
                  "exit": code, "load": os.getloadavg()[0], "finished_at": time.strftime("%H:%M:%S")}
        with lock:
            with open(out / "jobs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(job, cell, seed) for cell, seed in jobs]:
            future.result()


def _run_dir(out: Path, cell: Cell, algorithm: str, seed: int) -> Path:
    return run_directory(out / cell.regime.name, algorithm, cell.alpha, seed)


# --------------------------------------------------------------------------- read back


def per_run(out: Path, cell: Cell) -> dict[tuple, dict]:
    """``{(algorithm, alpha, seed): run_metrics}`` of the cell's finished runs (seeds finished for every algorithm)."""
    rows, seeds = [], _finished_seeds(out, cell)
    for seed in seeds:
        for algorithm in cell.algorithms:
            history = finished_history(_run_dir(out, cell, algorithm, seed), NUM_ROUNDS)
            rows += [{"algorithm": algorithm, "alpha": cell.alpha, "seed": seed, "preference": "default", **r}
                     for r in history]
    return stats.per_run_table(rows, OBJECTIVES) if rows else {}


def _finished_seeds(out: Path, cell: Cell) -> list[int]:
    folder = out / cell.regime.name / "runs"
    found = folder.glob(f"alpha{cell.alpha:g}_seed*") if folder.exists() else []
    seeds = sorted(int(p.name.split("_seed")[1]) for p in found)
    return [s for s in seeds if all(finished_history(_run_dir(out, cell, a, s), NUM_ROUNDS) is not None
                                    for a in cell.algorithms)]


def study_table(out: Path, cells: list[Cell], family_error_rate: float = 0.05) -> tuple[list[dict], dict]:
    """The claims rows of every cell, Holm-adjusted together; and the per-algorithm levels per cell."""
    table, levels = [], {}
    for cell in cells:
        runs = per_run(out, cell)
        if not runs:
            continue
        for row in stats.claims_table(runs, REFERENCE, CLAIMS, family_error_rate):
            table.append({"cell": cell.name, "regime": cell.regime.name, **row})
        levels[cell.name] = {
            a: {m: _mean([v[m] for (name, _, _), v in runs.items() if name == a]) for m in LEVELS}
            for a in cell.algorithms
        }
    return stats.adjust_family(table, family_error_rate), levels


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.mean(values) if values else math.nan


# --------------------------------------------------------------------------- plan


def plan(out: Path, cells: list[Cell], seed_options: list[int], family_size: int, error_rate: float = 0.05) -> dict:
    """Per primary row of the pilot: the sd of the paired difference and the MDE at each seed count."""
    table, _ = study_table(out, cells, error_rate)
    level = error_rate / family_size
    rows = []
    for r in table:
        if r["role"] != stats.PRIMARY:
            continue
        sd = r["interval"].sd
        rows.append({"cell": r["cell"], "metric": r["metric"], "baseline": r["baseline"],
                     "pilot_seeds": r["interval"].n, "sd": sd,
                     "mde": {n: stats.minimum_detectable_effect(sd, n, level) for n in seed_options}})
    return {"family_size": family_size, "level": level, "rows": rows}


# --------------------------------------------------------------------------- report


def report(out: Path, to: Path, cells: list[Cell], family_error_rate: float = 0.05,
           results: Optional[Path] = None) -> dict:
    table, levels = study_table(out, cells, family_error_rate)
    result = {
        "commit": _commit(), "trained_with": _trained_with(out), "config": CONFIG, "reference": REFERENCE,
        "sgd_lr": SGD_LR, "rounds": NUM_ROUNDS,
        "claims": [vars(c) | {"baselines": list(c.baselines)} for c in CLAIMS],
        "cells": {c.name: {"regime": c.regime.name, "local_steps": c.regime.local_steps,
                           "optimizer": c.regime.optimizer, "alpha": c.alpha, "algorithms": list(c.algorithms),
                           "seeds": _finished_seeds(out, c)} for c in cells},
        "family_size": sum(1 for r in table if not math.isnan(r["p_holm"])),
        "rows": [_row_json(r) for r in table],
        "levels": levels,
        "wall": _wall(out),
    }
    to.parent.mkdir(parents=True, exist_ok=True)
    to.with_suffix(".json").write_text(json.dumps(result, indent=1, default=_json_number) + "\n")
    to.with_suffix(".md").write_text(regime_map(table, levels, cells) + "\n")
    plot(table, levels, cells, to.with_suffix(".png"))
    if results is not None:
        command = "python benchmarks/regimes.py report OUT --cells " + " ".join(c.name for c in cells)
        results.write_text(json.dumps(results_file(result, table, levels, cells, command), indent=1) + "\n")
    return result


def _row_json(r: dict) -> dict:
    i = r["interval"]
    keep = ("cell", "regime", "alpha", "claim", "metric", "better", "baseline", "role", "p", "p_holm", "mde",
            "verdict", "note")
    return {**{k: r[k] for k in keep}, "mean": i.mean, "low": i.low, "high": i.high, "n": i.n, "sd": i.sd}


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _commit() -> str:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "firm_lightning", CONFIG], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+uncommitted changes" if dirty else "")


def _trained_with(out: Path) -> list[str]:
    path = out / "commits.txt"
    return sorted({line.rsplit(": ", 1)[1] for line in path.read_text().splitlines()}) if path.exists() else []


def _wall(out: Path) -> dict:
    path = out / "jobs.jsonl"
    jobs = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    per_cell: dict[str, float] = {}
    for j in jobs:
        per_cell[j["cell"]] = per_cell.get(j["cell"], 0.0) + j["wall_s"]
    return {"job_seconds": round(sum(j["wall_s"] for j in jobs), 1), "per_cell_job_seconds": per_cell,
            "jobs": len(jobs)}


MAP_COLUMNS = [  # (label, metric, baseline)
    ("drift vs MGDA", "update_dispersion_weighted", "local_mgda"),
    ("λ dispersion vs MGDA", "lambda_dispersion", "local_mgda"),
    ("weighting effect vs MGDA", "weighting_effect", "local_mgda"),
    ("final reward vs MGDA", "final/mean", "local_mgda"),
    ("final reward vs linear", "final/mean", "linear"),
    ("worst client vs MGDA", "worst_client", "local_mgda"),
    ("eval roughness vs MGDA", "eval_roughness", "local_mgda"),
]
MARKS = {stats.SUPPORTED: " supported", stats.CONTRADICTED: " contradicted", stats.INCONCLUSIVE: " inconclusive",
         stats.EXPLORATORY: ""}


def regime_map(table: list[dict], levels: dict, cells: list[Cell]) -> str:
    """The map as a markdown table (``map_rows``)."""
    columns, rows = map_rows(table, levels, cells)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def map_rows(table: list[dict], levels: dict, cells: list[Cell]) -> tuple[list[str], list[list]]:
    """One row per cell: FIRM (β = 1) − baseline, 95 % interval and verdict; the weighting effect's levels."""
    by_key = {(r["cell"], r["metric"], r["baseline"]): r for r in table}
    columns = ["regime", "α", "seeds", "weighting effect MGDA → FIRM (after / before the optimiser)"]
    columns += [label for label, _, _ in MAP_COLUMNS]
    rows = []
    for cell in cells:
        if cell.name not in levels:
            continue
        level = levels[cell.name]
        effect = (f"{level['local_mgda']['weighting_effect']:.3f} → {level[REFERENCE]['weighting_effect']:.3f} / "
                  f"{level['local_mgda']['weighting_effect_direction']:.3f} → "
                  f"{level[REFERENCE]['weighting_effect_direction']:.3f}")
        cells_text = []
        for _, metric, baseline in MAP_COLUMNS:
            r = by_key.get((cell.name, metric, baseline))
            if r is None:
                cells_text.append("—")
                continue
            i = r["interval"]
            text = f"{_num(i.mean)} [{_num(i.low)}, {_num(i.high)}]{MARKS[r['verdict']]}"
            if r["role"] == stats.PRIMARY and not math.isnan(r["mde"]):
                text += f" (MDE {r['mde']:.3f})"
            cells_text.append(text)
        seeds = next((r["interval"].n for r in table if r["cell"] == cell.name), 0)
        rows.append([cell.regime.name, f"{cell.alpha:g}", str(seeds), effect, *cells_text])
    return columns, rows


def results_file(result: dict, table: list[dict], levels: dict, cells: list[Cell], command: str) -> dict:
    """The study in the docs' results format (``docs/hooks/results.py``): the map as a table, the levels and
    intervals as values, what ran where as ``about``."""
    columns, rows = map_rows(table, levels, cells)
    jobs = result["wall"]
    values = {
        "levels": {_key(cell): {alg: {_key(k): round(v, 4) for k, v in numbers.items()}
                               for alg, numbers in by_alg.items()} for cell, by_alg in levels.items()},
        "rows": _nested_rows(table),
        "confidence_percent": 95, "job_hours": round(jobs["job_seconds"] / 3600, 2), "jobs": jobs["jobs"],
        "family_size": result["family_size"],
    }
    about = {"title": "Regime study: FIRM (β = 1) against local MGDA and linear scalarisation per regime",
             "command": command, "date": time.strftime("%Y-%m-%d"),
             "machine": "2 shared CPU cores, one torch thread per process",
             "load": "load average 3-9 while other work ran (per job in jobs.jsonl)",
             "provenance": "written by benchmarks/regimes.py report from the runs it names; trained with "
                           + ", ".join(c[:7] for c in result["trained_with"])}
    return {"about": about, "values": json.loads(json.dumps(values, default=_json_number)),
            "tables": {"map": {"columns": columns, "rows": rows}}}


def _nested_rows(table: list[dict]) -> dict:
    """``rows[cell][metric][baseline]``: each row's interval, Holm-adjusted p, MDE and verdict."""
    rows: dict = {}
    for r in table:
        i = r["interval"]
        rows.setdefault(_key(r["cell"]), {}).setdefault(_key(r["metric"]), {})[r["baseline"]] = {
            "mean": i.mean, "low": i.low, "high": i.high, "p_holm": r["p_holm"], "mde": r["mde"],
            "verdict": r["verdict"]}
    return rows


def _key(name: str) -> str:
    """A name as one part of a dotted results path: ``k1_adamw_a0.1`` → ``k1_adamw_a0_1``."""
    return name.replace(".", "_").replace("/", "_")


def _num(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


def plot(table: list[dict], levels: dict, cells: list[Cell], path: Path) -> None:
    """Per cell: the weighting effect's levels, and FIRM − MGDA with its 95 % interval for drift, reward, roughness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in cells if c.name in levels]
    labels = [f"{c.regime.name}\nα={c.alpha:g}" for c in shown]
    x = range(len(shown))
    by_key = {(r["cell"], r["metric"], r["baseline"]): r for r in table}
    panels = [("update_dispersion_weighted", "drift (update dispersion)"), ("final/mean", "final mean eval reward"),
              ("eval_roughness", "eval roughness")]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 * (1 + len(panels)), 4.2))
    ax = axes[0]
    for algorithm, color in (("local_mgda", "C0"), (REFERENCE, "C1")):
        for key, style in (("weighting_effect", "-o"), ("weighting_effect_direction", ":s")):
            ys = [levels[c.name].get(algorithm, {}).get(key, math.nan) for c in shown]
            where = "after the optimiser" if key == "weighting_effect" else "on d"
            ax.plot(x, ys, style, color=color, label=f"{algorithm} ({where})")
    ax.set_ylim(bottom=0)
    ax.set_title("weighting effect ‖Δθ(λ)−Δθ(p)‖ / ‖Δθ(p)‖\n(mean over steps, clients, rounds, seeds)",
                 fontsize="small")
    ax.legend(fontsize="x-small")
    for ax, (metric, title) in zip(axes[1:], panels):
        for baseline, offset in (("local_mgda", -0.1), ("linear", 0.1)):
            rows = [by_key.get((c.name, metric, baseline)) for c in shown]
            means = [r["interval"].mean if r else math.nan for r in rows]
            err = [[(r["interval"].mean - r["interval"].low) if r and r["interval"].n > 1 else 0 for r in rows],
                   [(r["interval"].high - r["interval"].mean) if r and r["interval"].n > 1 else 0 for r in rows]]
            ax.errorbar([i + offset for i in x], means, yerr=err, fmt="o", capsize=3, label=f"− {baseline}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"{title}\nFIRM (β = 1) − baseline, 95 % t-interval", fontsize="small")
        ax.legend(fontsize="x-small")
    for ax in axes:
        ax.set_xticks(list(x), labels, rotation=60, fontsize="x-small")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "plan", "report"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cells", nargs="+", default=BUDGETED,
                        help=f"a subset of {list(CELLS)} (default: the first 7); 'pilot': {PILOT}")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds-options", type=int, nargs="+", default=[4, 6, 8, 12])
    parser.add_argument("--family-size", type=int, default=None, help="plan: primary rows of the whole study")
    parser.add_argument("--with-ablation", nargs="*", default=[], help="cells that also run FIRM β = 0.1 and 10")
    parser.add_argument("--to", type=Path, default=None, help="report: path stem of the JSON, markdown map and figure "
                        "(default OUT/regimes)")
    parser.add_argument("--figure", type=Path, default=None, help="report: also the figure here (docs/regimes.png)")
    parser.add_argument("--results", type=Path, default=None,
                        help="report: also the docs' results file (docs/results/regimes.json)")
    args = parser.parse_args()
    names = PILOT if args.cells == ["pilot"] else args.cells
    unknown = [n for n in names if n not in CELLS]
    if unknown:
        parser.error(f"unknown cells {unknown}; choose from {list(CELLS)}")
    cells = [Cell(CELLS[n].regime, CELLS[n].alpha, ABLATION if n in args.with_ablation else CORE) for n in names]
    if args.command == "run":
        tic = time.time()
        run(args.out, cells, args.seeds, args.workers)
        print(json.dumps({"cells": names, "seeds": args.seeds, "wall_s": round(time.time() - tic, 1)}))
    elif args.command == "plan":
        primaries = sum(len(c.baselines) for c in CLAIMS if c.primary)
        family = args.family_size or primaries * len(BUDGETED)
        print(json.dumps(plan(args.out, cells, args.seeds_options, family), indent=1, default=_json_number))
    else:
        result = report(args.out, args.to or args.out / "regimes", cells, results=args.results)
        if args.figure is not None:
            shutil.copyfile((args.to or args.out / "regimes").with_suffix(".png"), args.figure)
        print(json.dumps({k: result[k] for k in ("commit", "family_size", "wall")}, indent=1))


if __name__ == "__main__":
    main()

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
from firm_lightning.report import new_figure, save_figure, write_csv
from firm_lightning.run_folder import RunFolder, load_adapter_file
from firm_lightning.studies import claims as stats  # CompareSettings has an argument called claims
from firm_lightning.studies.claims import Claim


class CompareSettings:
    """The ``compare:`` section: which algorithms, over which seeds and Dirichlet α, and what the claims test.

    ``reference`` names the FIRM run whose paired differences against every baseline are the
    claims table. ``sweep_preferences`` (extra preferences besides each algorithm's own) are
    trained for the ``sweep_algorithms`` at the ``sweep_alphas``, for every seed: the hypervolume
    of those fronts is the preference-sweep trade-off claim.

    The claims statistics (``firm_lightning/studies/claims.py``): ``claims`` lists the table's rows, each
    with its claim, metric, predicted side, baselines and whether it is the claim's one
    ``primary`` metric or fixed ``by_construction`` (default: :func:`claims.default_claims`);
    ``family_error_rate`` is the family-wise error rate of the verdicts on the primary rows
    (Holm); ``min_seeds`` the fewest seeds a tested verdict rests on; ``aa_control`` names an
    algorithm that is an identical copy of the reference under another name, run on the same
    data split with its own sampling noise (``AA_SEED_OFFSET``): an A/A row whose verdict must be
    inconclusive but for the family's error rate.

    ``share_folder``: several ``compare`` processes share this output folder on purpose (e.g. one per
    half of the seeds, then a last pass that writes the report): each holds the folder's lock shared
    instead of alone, and each run of the comparison is locked by the process training it.
    """

    def __init__(
        self,
        algorithms: Optional[list[Algorithm]] = None,
        seeds: Optional[list[int]] = None,
        dirichlet_alphas: Optional[list[float]] = None,
        reference: Optional[str] = None,
        sweep_preferences: Optional[list[list[float]]] = None,
        sweep_algorithms: Optional[list[str]] = None,
        sweep_alphas: Optional[list[float]] = None,
        claims: Optional[list[Claim]] = None,
        family_error_rate: float = 0.05,
        min_seeds: int = 3,
        aa_control: Optional[str] = None,
        share_folder: bool = False,
    ) -> None:
        self.algorithms = algorithms or [FIRM(beta=1.0), LocalMGDA(), Linear(), FMGDA()]
        self.seeds = seeds or [0]
        self.dirichlet_alphas = dirichlet_alphas  # None: data.dirichlet_alpha
        names = [a.name for a in self.algorithms]
        if len(set(names)) != len(names):
            raise ValueError(f"Algorithm names must be unique (they label the results); got {names}. Pass name=...")
        self.reference = reference or names[0]
        if self.reference not in names:
            raise ValueError(f"compare.reference={self.reference!r} is not one of the algorithms {names}.")
        self.sweep_preferences = sweep_preferences or []
        self.sweep_algorithms = sweep_algorithms or []
        self.sweep_alphas = sweep_alphas or []
        by_name = dict(zip(names, self.algorithms))
        self.sweeps = _sweeps(by_name, self.sweep_algorithms, self.sweep_preferences)
        if not 0 < family_error_rate < 1:
            raise ValueError(f"compare.family_error_rate={family_error_rate!r} must be in (0, 1), e.g. 0.05.")
        if min_seeds < 2:
            raise ValueError(f"compare.min_seeds={min_seeds!r}: a t-interval needs at least 2 seeds; use 3 or more.")
        self.family_error_rate, self.min_seeds = family_error_rate, min_seeds
        self.aa_control = aa_control
        self.share_folder = share_folder
        if aa_control is not None:
            _check_identical_copy(by_name, self.reference, aa_control)
        self.claims = [_as_claim(c) for c in claims] if claims is not None else None
        if self.claims is not None:
            stats.check_claims(self.claims, names, self.reference)

    def claims_for(self, objectives: list[str]) -> list[Claim]:
        """The configured claims, or the default ones for the baselines present (and the A/A control).

        A configured ``final/<objective>`` metric must name one of ``objectives`` (or ``mean``): a typo
        would otherwise leave its row out of the table without a word.
        """
        if self.claims is not None:
            allowed = ["mean", *objectives]
            for i, c in enumerate(self.claims):
                if c.metric.startswith("final/") and c.metric.split("/", 1)[1] not in allowed:
                    raise ValueError(
                        f"compare.claims[{i}] ({c.claim!r}): metric {c.metric!r} names no objective of this run; "
                        f"use one of {['final/' + n for n in allowed]}."
                    )
            return self.claims
        names = [a.name for a in self.algorithms]
        baselines = tuple(n for n in ("local_mgda", "linear", "fmgda") if n in names and n != self.reference)
        return stats.default_claims(objectives, baselines, self.aa_control)


def _as_claim(entry) -> Claim:
    if isinstance(entry, Claim):
        return entry
    if isinstance(entry, dict):
        try:
            return Claim(**{**entry, "baselines": tuple(entry.get("baselines", ()))})
        except TypeError as error:
            raise ValueError(
                f"compare.claims entry {entry}: {error}; keys are claim, metric, better, baselines, primary, "
                "by_construction."
            ) from error
    raise ValueError(
        f"compare.claims entry {entry!r} is not a claim; write a mapping with claim, metric, better, baselines."
    )


def _check_identical_copy(by_name: dict, reference: str, copy_name: str) -> None:
    """compare.aa_control must name an algorithm with the reference's class and settings under another name."""
    if copy_name not in by_name or copy_name == reference:
        raise ValueError(
            f"compare.aa_control={copy_name!r} is not an algorithm here other than the reference {reference!r}; add "
            f"a copy of it under another name (e.g. FIRM with init_args name: {reference}_copy) to compare.algorithms."
        )
    a, b = by_name[reference], by_name[copy_name]
    settings_a, settings_b = a.settings(), b.settings()
    if type(a) is not type(b) or settings_a != settings_b:
        raise ValueError(
            f"compare.aa_control={copy_name!r} is not an identical copy of the reference {reference!r} "
            f"({type(b).__name__} {settings_b} vs {type(a).__name__} {settings_a}); give it the reference's class "
            "and init_args, changing only name."
        )


def _sweeps(by_name: dict, sweep_algorithms: list[str], preferences: list[list[float]]) -> list[tuple[Algorithm, str]]:
    """The preference-sweep runs, in the order of the algorithms: each a new algorithm from ``with_preference``,
    with its preference label."""
    unknown = [name for name in sweep_algorithms if name not in by_name]
    if unknown:
        raise ValueError(f"compare.sweep_algorithms: {unknown} are not among the algorithms {list(by_name)}.")
    sweeps = []
    for algorithm in (a for name, a in by_name.items() if name in sweep_algorithms):
        for p in preferences:
            try:
                sweeps.append((algorithm.with_preference(p), "_".join(f"{x:g}" for x in p)))
            except ValueError as error:
                raise ValueError(f"compare.sweep_algorithms: {error}") from error
    return sweeps


#: The A/A copy runs with federation seed ``seed + AA_SEED_OFFSET``: the reference's data split and
#: initial adapter, its own client sample and sampling noise. So its row is a real replicate of the
#: reference, whose differences are the run-to-run noise the intervals must cover, and not a
#: bit-identical copy (a difference of exactly 0 says nothing about the statistics).
AA_SEED_OFFSET = 1_000_003


def run_comparison(
    module: FIRMClientModule,
    datamodule: PromptDataModule,
    federation: FederationConfig,
    trainer_config: dict,
    settings: CompareSettings,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Run every (α, seed, algorithm) federation, and the preference sweeps; return all round rows, labelled.

    Main runs have ``preference == "default"``; sweep runs the preference they were trained with.
    """
    out = Path(federation.output_dir)
    if federation.privacy is not None:
        raise ValueError(
            "compare tests its claims on training statistics (λ and update dispersion, uplink per client) that a "
            "run with federation.privacy does not release. Compare without privacy, or run `fit` per algorithm "
            "(each releases its eval rewards and ε) or `pareto` (eval rewards only)."
        )
    settings.claims_for(module.objective_names)  # a bad claim fails before anything trains
    initial = module.adapter_state()
    alphas = settings.dirichlet_alphas or [datamodule.hparams["dirichlet_alpha"]]
    rows = []
    for alpha in alphas:
        for seed in settings.seeds:
            data = _rebuilt(datamodule, dirichlet_alpha=alpha, seed=seed)
            for algorithm, preference in _runs_of(settings, alpha):
                label = (
                    f"{algorithm.name}{'' if preference == 'default' else ' p=' + preference} α={alpha:g} seed={seed}"
                )
                run_dir = run_directory(out, algorithm.name, alpha, seed, preference)
                history = finished_history(run_dir, federation.num_rounds)
                if history is None:
                    history = run_federation(
                        module, data, federation, trainer_config, algorithm, initial, run_dir,
                        echo=lambda m, label=label: echo(f"[{label}] {m}"),
                        seed=seed + (AA_SEED_OFFSET if algorithm.name == settings.aa_control else 0),
                    ).history
                else:
                    echo(f"[{label}] already finished in {run_dir}, reused")
                rows += [
                    {"algorithm": algorithm.name, "alpha": alpha, "seed": seed, "preference": preference, **r}
                    for r in history
                ]
                write_csv(RunFolder(out).metrics, rows)
    return rows


def finished_history(run_dir: Path, num_rounds: int) -> Optional[list[dict]]:
    """The metric rows of a run finished in ``run_dir`` with ``num_rounds`` rounds, else None.

    Lets an interrupted comparison continue, or several processes share the runs of one
    comparison (e.g. one per α, with ``compare.share_folder``) and a last pass write the report.
    """
    folder = RunFolder(run_dir)
    return folder.history() if folder.is_finished(num_rounds) else None


def _runs_of(settings: CompareSettings, alpha: float) -> list[tuple[Algorithm, str]]:
    runs = [(a, "default") for a in settings.algorithms]
    return runs + settings.sweeps if alpha in settings.sweep_alphas else runs


def run_directory(out: Path, algorithm: str, alpha: float, seed: int, preference: str = "default") -> Path:
    run_dir = RunFolder(out).runs / f"alpha{alpha:g}_seed{seed}" / algorithm
    return run_dir if preference == "default" else run_dir / f"p_{preference}"


def _rebuilt(datamodule: PromptDataModule, **changes) -> PromptDataModule:
    """The same kind of data module with the same settings but ``changes``."""
    accepted = inspect.signature(type(datamodule).__init__).parameters
    kwargs = {k: v for k, v in datamodule.hparams.items() if k in accepted}
    return type(datamodule)(**{**kwargs, **changes})


def summarize(rows: list[dict], objectives: list[str]) -> list[dict]:
    """One row per (algorithm, α): final rewards (mean ± std over seeds), mean round metrics and eval roughness."""
    groups: dict[tuple, list[dict]] = {}
    for r in (r for r in rows if r.get("preference", "default") == "default"):
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
        entry["λ dispersion"] = _mean_std([stats.mean_of(rs[1:], "lambda_dispersion") for rs in runs])
        entry["update dispersion"] = _mean_std([stats.mean_of(rs[1:], "update_dispersion") for rs in runs])
        if "eval/worst_client/mean" in runs[0][-1]:
            entry["worst client"] = _mean_std([rs[-1]["eval/worst_client/mean"] for rs in runs])
        entry["eval roughness"] = _mean_std([stats.eval_roughness(rs, objectives) for rs in runs])
        entry["MB up/client"] = statistics.mean(_per_client_total(rs, "comm/bytes_up") for rs in runs) / 1e6
        entry["MB down/client"] = statistics.mean(_per_client_total(rs, "comm/bytes_down") for rs in runs) / 1e6
        table.append(entry)
    return table


def markdown_table(table: list[dict]) -> str:
    columns = list(table[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in table:
        lines.append("| " + " | ".join(_fmt(entry[c]) for c in columns) + " |")
    return "\n".join(lines)


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
        save_figure(fig, plot_dir / name)
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
    rows = [r for r in rows if r.get("preference", "default") == "default"]
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


# --------------------------------------------------------------------------- the claims


def claims_report(
    rows: list[dict], objectives: list[str], out: Path, settings: CompareSettings
) -> tuple[list[dict], str]:
    """Paired FIRM − baseline t-intervals, Holm-adjusted verdicts on the primary rows and their MDE; the markdown text.

    The claims are ``settings.claims_for(objectives)`` (by default :func:`claims.default_claims`);
    the text starts with a paragraph saying how the verdicts were reached (family size included).
    """
    per_run = stats.per_run_table(
        rows, objectives, lambda a, alpha, seed: _round_adapters(run_directory(out, a, alpha, seed))
    )
    table = stats.claims_table(
        per_run, settings.reference, settings.claims_for(objectives), settings.family_error_rate, settings.min_seeds
    )
    text = stats.method_text(table, settings.family_error_rate, settings.min_seeds) + "\n\n" + stats.markdown(
        table, settings.reference
    )
    plot_beta_ablation(per_run, settings.algorithms, RunFolder(out).plots / "beta_ablation.png")
    return table, text


def _round_adapters(run_dir: Path) -> Optional[list[dict]]:
    """The global adapter after every round (round 0 first), if the run saved them."""
    paths = RunFolder(run_dir).round_adapters()
    return [load_adapter_file(p) for p in paths] if len(paths) >= 3 else None


def plot_beta_ablation(per_run: dict, algorithms: list[Algorithm], path: Path) -> Optional[Path]:
    """Drift and final reward against β, from 0 (local MGDA) to ∞ (linear): mean over seeds ± 95 % t-interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ladder = sorted(((b, a.name) for a in algorithms if (b := a.beta_axis) is not None), key=lambda t: t[0])
    if len(ladder) < 2:
        return None
    labels = ["linear (∞)" if math.isinf(b) else f"{b:g}" + (" (MGDA)" if b == 0 else "") for b, _ in ladder]
    panels = [("lambda_dispersion", "λ dispersion"), ("update_dispersion_weighted", "update dispersion (n_i-weighted)"),
              ("final/mean", "final eval reward (mean over objectives)"), ("worst_client", "worst-client reward")]
    alphas = sorted({k[1] for k in per_run})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8))
    for ax, (metric, title) in zip(axes, panels):
        for alpha in alphas:
            means, lows, highs = [], [], []
            for _, name in ladder:
                values = [m[metric] for (a, al, _), m in per_run.items() if a == name and al == alpha and metric in m]
                i = stats.t_interval(values) if values else None
                ok = i is not None and i.n > 1 and math.isfinite(i.low)
                means.append(i.mean if i else math.nan)
                lows.append(i.mean - i.low if ok else 0.0)
                highs.append(i.high - i.mean if ok else 0.0)
            ax.errorbar(range(len(ladder)), means, yerr=[lows, highs], marker="o", capsize=3, label=f"α={alpha:g}")
        ax.set_xticks(range(len(ladder)), labels, rotation=20)
        ax.set(xlabel="β (in-client regularisation)", title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path

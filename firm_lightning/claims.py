"""The paper's claims as statistics: paired differences over seeds, bootstrap intervals, verdicts.

Every algorithm of a comparison runs on the same seeds (same data split, client sampling and
sampling seeds), so FIRM and a baseline are compared *paired on the seed*: one difference
``FIRM − baseline`` per seed, a 95 % percentile-bootstrap interval for their mean
(``scipy.stats.bootstrap``), and a verdict read off the interval:

- **supported**: the whole interval is on the side the paper predicts;
- **contradicted**: the whole interval is on the other side;
- **inconclusive**: the interval contains 0 (or there are fewer than 3 seeds, or the whole
  interval is within ± the stated noise floor).

With 5 seeds the percentile bootstrap is narrower than a t-interval would be (it ignores the
uncertainty in the spread), so a verdict near the edge deserves more seeds.

The claims and the per-run numbers they rest on (:func:`run_metrics`):

1. communication — uplink bytes per client over the run (lower is better);
2. drift — λ dispersion and the update dispersion weighted by ``n_i`` (lower is better);
3. smoothness — mean |round-to-round change| of the global eval reward (lower is better) and the
   cosine between consecutive global updates (higher is better);
4. trade-offs — final eval rewards, the worst client's reward, the reward at an equal uplink
   budget and the hypervolume of a preference sweep (higher is better).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
from scipy.stats import bootstrap

from firm_lightning.pareto import hypervolume

Better = Literal["lower", "higher"]
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


@dataclass(frozen=True)
class Interval:
    """Mean of the paired differences and its bootstrap confidence interval."""

    mean: float
    low: float
    high: float
    n: int


def bootstrap_interval(
    differences: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> Interval:
    """Percentile-bootstrap interval of the mean of ``differences`` (one per seed).

    Identical differences (e.g. uplink bytes, fixed by construction) give a zero-width interval;
    a single difference gives an unbounded one (nothing can be concluded from one seed).
    """
    d = np.asarray([x for x in differences if not math.isnan(x)], dtype=float)
    if len(d) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if len(d) == 1:
        return Interval(float(d[0]), -math.inf, math.inf, 1)
    if np.ptp(d) == 0:
        return Interval(float(d[0]), float(d[0]), float(d[0]), len(d))
    result = bootstrap(
        (d,), np.mean, confidence_level=confidence, n_resamples=resamples, method="percentile",
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(float(d.mean()), float(ci.low), float(ci.high), len(d))


def verdict(interval: Interval, better: Better, noise_floor: float = 0.0, min_seeds: int = 3) -> str:
    """supported / contradicted / inconclusive for ``FIRM − baseline`` when ``better`` is FIRM's predicted side.

    A bootstrap over fewer than ``min_seeds`` differences is no evidence (over 2 seeds its
    interval is just their range), unless the difference is the same on every seed (fixed by
    construction, like uplink bytes).
    """
    fixed = interval.n >= 2 and interval.low == interval.high
    if math.isnan(interval.mean) or (interval.n < min_seeds and not fixed):
        return INCONCLUSIVE
    gain_low, gain_high = (-interval.high, -interval.low) if better == "lower" else (interval.low, interval.high)
    if max(abs(gain_low), abs(gain_high)) <= noise_floor:
        return INCONCLUSIVE
    if gain_low > 0:
        return SUPPORTED
    if gain_high < 0:
        return CONTRADICTED
    return INCONCLUSIVE


@dataclass(frozen=True)
class Claim:
    """One tested statement: ``metric`` of FIRM is ``better`` than of each of ``baselines``."""

    claim: str  # the paper's claim it belongs to
    metric: str  # key of run_metrics()
    better: Better
    baselines: tuple[str, ...]
    noise_floor: float = 0.0


def default_claims(objectives: Sequence[str], baselines=("local_mgda", "linear", "fmgda")) -> list[Claim]:
    mgda = tuple(b for b in baselines if b == "local_mgda")
    fmgda = tuple(b for b in baselines if b == "fmgda")
    rewards = [f"final/{n}" for n in objectives] + ["final/mean", "worst_client"]
    return [
        Claim("communication", "uplink_bytes", "lower", fmgda),
        Claim("drift", "lambda_dispersion", "lower", mgda),
        Claim("drift", "update_dispersion_weighted", "lower", tuple(baselines)),
        Claim("smoothness", "eval_change", "lower", tuple(baselines)),
        Claim("smoothness", "update_cosine", "higher", tuple(baselines)),
        *[Claim("trade-offs (equal rounds)", m, "higher", tuple(baselines)) for m in rewards],
        Claim("trade-offs (equal uplink)", "equal_uplink/mean", "higher", fmgda),
        Claim("trade-offs (equal uplink)", "equal_uplink/worst_client", "higher", fmgda),
        Claim("trade-offs (preference sweep)", "hypervolume", "higher", tuple(b for b in baselines if b == "linear")),
    ]


# --------------------------------------------------------------------------- per-run numbers


def run_metrics(rows: Sequence[dict], objectives: Sequence[str], adapters: Optional[Sequence] = None) -> dict:
    """The claims' numbers for one run (its metrics rows, round 0 first; ``adapters``: global adapter per round)."""
    rows = sorted(rows, key=lambda r: r["round"])
    trained = rows[1:]
    last = rows[-1]
    out = {
        "uplink_bytes": sum(r["comm/bytes_up"] / r["clients"] for r in trained),
        "lambda_dispersion": _mean(trained, "lambda_dispersion"),
        "update_dispersion_weighted": _mean(trained, "update_dispersion_weighted"),
        "eval_change": eval_change(rows, objectives),
        "update_cosine": consecutive_update_cosine(adapters) if adapters else math.nan,
        "worst_client": float(last.get("eval/worst_client/mean", math.nan)),
        "final/mean": statistics.mean(last[f"eval/reward/{n}"] for n in objectives),
    }
    out.update({f"final/{n}": last[f"eval/reward/{n}"] for n in objectives})
    return out


def eval_change(rows: Sequence[dict], objectives: Sequence[str]) -> float:
    """Mean |round-to-round change| of the global eval reward, over rounds and objectives."""
    steps = [abs(b[f"eval/reward/{n}"] - a[f"eval/reward/{n}"]) for a, b in zip(rows, rows[1:]) for n in objectives]
    return statistics.mean(steps) if steps else math.nan


def consecutive_update_cosine(adapters: Sequence[dict]) -> float:
    """Mean cosine between consecutive global updates ``θ^{t+1} − θ^t`` (1 = a straight path)."""
    flat = [np.concatenate([a[k].float().numpy().ravel() for k in sorted(a)]) for a in adapters]
    updates = [b - a for a, b in zip(flat, flat[1:])]
    cosines = [
        float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
        for u, v in zip(updates, updates[1:])
        if np.linalg.norm(u) > 0 and np.linalg.norm(v) > 0
    ]
    return statistics.mean(cosines) if cosines else math.nan


def reward_at_uplink(rows: Sequence[dict], budget: float, objectives: Sequence[str]) -> dict:
    """Eval rewards at the last round whose cumulative uplink per client is within ``budget``."""
    rows = sorted(rows, key=lambda r: r["round"])
    spent, chosen = 0.0, rows[0]
    for r in rows[1:]:
        spent += r["comm/bytes_up"] / r["clients"]
        if spent > budget * (1 + 1e-9):
            break
        chosen = r
    return {
        "equal_uplink/mean": statistics.mean(chosen[f"eval/reward/{n}"] for n in objectives),
        "equal_uplink/worst_client": float(chosen.get("eval/worst_client/mean", math.nan)),
        "equal_uplink/round": chosen["round"],
    }


def _mean(rows: Sequence[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and r[key] is not None and not math.isnan(r[key])]
    return statistics.mean(values) if values else math.nan


# --------------------------------------------------------------------------- the table


def per_run_table(rows: Sequence[dict], objectives: Sequence[str], adapters_of=None) -> dict[tuple, dict]:
    """``{(algorithm, alpha, seed): run_metrics}`` for the main runs, with equal-uplink rewards and hypervolumes.

    ``rows`` are compare's rows (``algorithm``, ``alpha``, ``seed``, ``preference`` and the round
    metrics); ``adapters_of(algorithm, alpha, seed)`` returns the run's global adapters per round.
    """
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        runs.setdefault((r["algorithm"], r["alpha"], r["seed"], r.get("preference", "default")), []).append(r)
    main = {k[:3]: v for k, v in runs.items() if k[3] == "default"}
    table = {
        key: run_metrics(v, objectives, adapters_of(*key) if adapters_of else None) for key, v in main.items()
    }
    for (alpha, seed) in {(k[1], k[2]) for k in main}:
        keys = [k for k in main if k[1:] == (alpha, seed)]
        budget = min(table[k]["uplink_bytes"] for k in keys)
        for k in keys:
            table[k].update(reward_at_uplink(main[k], budget, objectives))
    for key in main:
        sweep = [v for k, v in runs.items() if k[:3] == key]
        if len(sweep) > 1:
            finals = [[sorted(v, key=lambda r: r["round"])[-1][f"eval/reward/{n}"] for n in objectives] for v in sweep]
            reference = [main[key][0][f"eval/reward/{n}"] for n in objectives]  # round 0: the shared initial adapter
            table[key]["hypervolume"] = hypervolume(finals, reference)
    return table


def claims_table(
    per_run: dict[tuple, dict], reference: str, claims: Sequence[Claim], confidence: float = 0.95
) -> list[dict]:
    """One row per (α, claim metric, baseline): paired ``reference − baseline`` interval and verdict."""
    alphas = sorted({k[1] for k in per_run})
    table = []
    for alpha in alphas:
        for claim in claims:
            for baseline in claim.baselines:
                seeds = sorted(
                    s for (a, al, s) in per_run if a == reference and al == alpha and (baseline, alpha, s) in per_run
                )
                diffs = [
                    per_run[(reference, alpha, s)].get(claim.metric, math.nan)
                    - per_run[(baseline, alpha, s)].get(claim.metric, math.nan)
                    for s in seeds
                ]
                if not seeds or all(math.isnan(d) for d in diffs):
                    continue
                interval = bootstrap_interval(diffs, confidence)
                table.append({
                    "alpha": alpha, "claim": claim.claim, "metric": claim.metric, "better": claim.better,
                    "baseline": baseline, "interval": interval,
                    "verdict": verdict(interval, claim.better, claim.noise_floor),
                })
    return table


def verdict_sentence(row: dict, reference: str) -> str:
    i = row["interval"]
    return (
        f"α={row['alpha']:g} {row['claim']}: {row['metric']} {reference} − {row['baseline']} = "
        f"{_num(i.mean)} [{_num(i.low)}, {_num(i.high)}] over {i.n} seeds ({row['better']} is better) → {row['verdict']}"
    )


def markdown(table: Sequence[dict], reference: str) -> str:
    lines = [
        f"| α | claim | metric ({reference} − baseline) | better | baseline | mean diff | 95% CI | seeds | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        i = r["interval"]
        lines.append(
            f"| {r['alpha']:g} | {r['claim']} | {r['metric']} | {r['better']} | {r['baseline']} | {_num(i.mean)} | "
            f"[{_num(i.low)}, {_num(i.high)}] | {i.n} | **{r['verdict']}** |"
        )
    return "\n".join(lines)


def _num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4f}"

"""The paper's claims as statistics: paired t-intervals over seeds, Holm-adjusted verdicts, detectable effects.

Every algorithm of a comparison runs on the same seeds (same data split, client sampling and
sampling seeds), so FIRM and a baseline are compared *paired on the seed*: one difference
``d_s = FIRM − baseline`` per seed ``s``.

**Intervals.** A two-sided Student-t interval for the mean difference,
``mean(d) ± t_{1−a/2, n−1} · sd(d) / √n`` (``sd`` with ``ddof = 1``). Under normal
differences it has exactly its nominal coverage at any ``n ≥ 2`` (``tests/studies/test_claims.py``
measures ≥ 0.93 at n = 3, 5, 10; ``benchmarks/claims_error_rates.py`` measures the error rates).

**One primary metric per claim, declared up front.** Each ``Claim`` row names one metric
and its baselines and says whether it is the claim's ``primary`` metric. Only primary rows get
a verdict; every other row is *exploratory* (interval and unadjusted p-value, no verdict).

**Family-wise error control.** The primary rows of the whole table (every claim, baseline and
Dirichlet α) are one family. Each is a two-sided paired t-test of ``mean(d) = 0``; Holm's
step-down procedure adjusts their p-values, and a primary row is

- **supported** when its Holm-adjusted p ≤ ``family_error_rate`` (0.05) and the mean difference
  is on the side the paper predicts;
- **contradicted** when it is significant on the other side;
- **inconclusive** otherwise, and always when it rests on fewer than ``min_seeds`` (3) seeds or
  when the differences have no spread at all (``sd = 0``: one cannot estimate their error, so
  e.g. two runs that are bit-identical are inconclusive, not "supported").

So the chance that a study in which nothing differs reports *any* primary verdict is at most
``family_error_rate`` (measured by simulation in the tests).

**Fixed by construction.** A metric whose difference is set by the algorithms' definitions
(uplink bytes: FMGDA uploads S adapters, FIRM one) is marked ``by_construction=True`` on its
claim, never inferred from the data. Such a row is not a statistical test: its "interval" is
the exact range of the differences and its verdict their sign, which must be the same on every
seed (else the row says so and is inconclusive); it does not enter the Holm family. Any other
metric that happens to be equal on every seed is treated as zero-variance data (inconclusive).

**Minimum detectable effect.** Beside each primary verdict: the smallest true mean difference
that a two-sided paired t-test at level ``family_error_rate / m`` (``m`` = number of tested
primary rows, Holm's strictest step, so an effect found at that level is found by Holm too)
detects with 80 % power over the row's ``n`` seeds, taking the measured ``sd(d)`` as the true
spread (a plug-in estimate: with few seeds it is itself uncertain). Computed exactly from the
noncentral t distribution. An inconclusive row with MDE 0.04 says: "an effect of 0.04 or
more would probably have been seen", not "there is no effect".

The claims and the per-run numbers they rest on (``run_metrics``; ``default_claims``
marks the primary ones):

1. communication — uplink bytes per client over the run (lower is better; by construction);
2. drift — update dispersion weighted by ``n_i`` (primary, vs local MGDA) and λ dispersion
   (lower is better);
3. smoothness — ``eval_roughness``, the oscillation of the global eval reward around its
   trend (primary, vs local MGDA; lower is better), and the cosine between consecutive global
   updates (higher is better);
4. trade-offs — final eval rewards, the worst client's reward, the reward at an equal uplink
   budget and the hypervolume of a preference sweep (higher is better);
5. an A/A control (optional) — FIRM against an identical copy under another name, run on the
   same data splits with its own sampling noise, which must come out inconclusive but for the
   family's error rate;
6. the weighting effect (no claim of its own) — how much λ changed the clients' steps against the
   preference, after the optimiser and on ``d`` (``firm_lightning.gradients.weighting_effect``),
   a manipulation check: 0 says the weighting cannot have caused any difference.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal, Optional, Sequence

import numpy as np
from scipy import integrate, optimize, special, stats

from firm_lightning.studies.fronts import hypervolume

Better = Literal["lower", "higher"]
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
EXPLORATORY = "exploratory"
PRIMARY, BY_CONSTRUCTION = "primary", "by construction"

#: Per-run metric names ``run_metrics`` and ``per_run_table`` produce; ``final/<objective>`` too.
KNOWN_METRICS = (
    "uplink_bytes", "lambda_dispersion", "update_dispersion_weighted", "eval_roughness", "update_cosine",
    "worst_client", "final/mean", "equal_uplink/mean", "equal_uplink/worst_client", "hypervolume",
    "weighting_effect", "weighting_effect_direction",
)


# --------------------------------------------------------------------------- intervals and tests


@dataclass(frozen=True)
class Interval:
    """Mean of the paired differences, its confidence interval, the number of differences and their sd."""

    mean: float
    low: float
    high: float
    n: int
    sd: float = 0.0
    confidence: float = 0.95


@lru_cache(maxsize=None)
def _t_quantile(q: float, df: int) -> float:
    return float(stats.t.ppf(q, df))


def t_interval(differences: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student-t interval ``mean ± t_{(1+confidence)/2, n−1} · sd / √n`` of the mean of ``differences``.

    NaNs are left out. One difference gives an unbounded interval (no spread to estimate);
    differences with no spread give a zero-width one (``sd = 0``), which ``verdict`` does not
    read as evidence unless the metric is marked by construction.
    """
    d = [float(x) for x in differences if not math.isnan(x)]
    n = len(d)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, math.nan, confidence)
    mean = math.fsum(d) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, math.nan, confidence)
    if max(d) - min(d) <= 1e-12 * max(abs(x) for x in d):  # equal up to rounding in the mean: no spread at all
        return Interval(mean, mean, mean, n, 0.0, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    half = _t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd, confidence)


def paired_t_pvalue(interval: Interval) -> float:
    """Two-sided p-value of the paired t-test of ``mean = 0``; NaN when it cannot be computed (n < 2 or sd = 0)."""
    if interval.n < 2 or not interval.sd > 0:
        return math.nan
    t = interval.mean / (interval.sd / math.sqrt(interval.n))
    return float(2 * special.stdtr(interval.n - 1, -abs(t)))  # = 2 · P(T_{n−1} ≤ −|t|)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and are not counted in ``m``).

    With the ``m`` p-values sorted, ``p̃_(k) = max_{j ≤ k} min(1, (m − j + 1) p_(j))``; rejecting
    every hypothesis with ``p̃ ≤ α`` controls the family-wise error rate at ``α`` under any
    dependence between the tests.
    """
    tested = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(tested)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for k, i in enumerate(sorted(tested, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def minimum_detectable_effect(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t-test at level ``alpha`` detects with ``power``.

    Over ``n`` paired differences with standard deviation ``sd``: the ``δ`` with
    ``P(|T| > t_{1−α/2, n−1}) = power`` for ``T ~ noncentral t(n − 1, δ√n / sd)``. ``inf`` when
    ``n < 2`` or ``sd`` is unknown; ``0`` when ``sd = 0``.
    """
    if n < 2 or math.isnan(sd):
        return math.inf
    if sd == 0:
        return 0.0
    return _noncentrality_for_power(n - 1, alpha, power) * sd / math.sqrt(n)


def t_test_power(noncentrality: float, df: int, alpha: float) -> float:
    """Power ``P(|T| > t_{1−α/2, df})`` of a two-sided t-test when ``T ~ noncentral t(df, noncentrality)``.

    From ``scipy.stats.nct`` (the lower tail as ``P(T' > c)`` for ``T' ~ nct(df, −δ)``, which stays
    finite where ``nct.cdf(−c)`` underflows to NaN); should that still fail, integrated over the
    spread instead: ``T = (Z + δ) / (X / √df)`` with ``X ~ χ_df``, so the power is
    ``∫ [Φ(δ − c x/√df) + Φ(−δ − c x/√df)] f_χ(x) dx``.
    """
    critical = _t_quantile(1 - alpha / 2, df)
    power = float(stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality))
    if math.isfinite(power):
        return power
    scale = critical / math.sqrt(df)

    def integrand(x: float) -> float:
        return (stats.norm.cdf(noncentrality - scale * x) + stats.norm.cdf(-noncentrality - scale * x)) * stats.chi.pdf(
            x, df
        )

    value, _ = integrate.quad(integrand, 0.0, np.inf, epsabs=1e-12, epsrel=1e-10, limit=200)
    return float(value)


@lru_cache(maxsize=None)
def _noncentrality_for_power(df: int, alpha: float, power: float) -> float:
    high = _t_quantile(1 - alpha / 2, df) + 4.0
    while t_test_power(high, df, alpha) < power:
        high *= 2
    return float(optimize.brentq(lambda ncp: t_test_power(ncp, df, alpha) - power, 0.0, high, xtol=1e-10))


def verdict(
    interval: Interval, better: Better, p_adjusted: float = math.nan, level: float = 0.05,
    by_construction: bool = False, min_seeds: int = 3,
) -> str:
    """supported / contradicted / inconclusive for ``FIRM − baseline`` when ``better`` is FIRM's predicted side.

    A tested row needs at least ``min_seeds`` differences with some spread and a (Holm-)adjusted
    p-value ``≤ level``; the sign of the mean difference then says which way. Without
    ``p_adjusted`` the row is one comparison on its own: its paired t-test's p-value is used. A
    row marked ``by_construction`` needs one difference, the same on every seed, and its sign is
    the verdict.
    """
    if math.isnan(interval.mean):
        return INCONCLUSIVE
    if math.isnan(p_adjusted):
        p_adjusted = paired_t_pvalue(interval)
    gain = -interval.mean if better == "lower" else interval.mean
    if by_construction:
        if interval.low != interval.high or gain == 0:
            return INCONCLUSIVE
        return SUPPORTED if gain > 0 else CONTRADICTED
    if interval.n < min_seeds or not interval.sd > 0 or math.isnan(p_adjusted) or p_adjusted > level:
        return INCONCLUSIVE
    return SUPPORTED if gain > 0 else CONTRADICTED


# --------------------------------------------------------------------------- the claims


@dataclass(frozen=True)
class Claim:
    """One row group of the claims table: ``metric`` of FIRM is ``better`` than of each of ``baselines``.

    ``claim`` names the paper's claim it belongs to; exactly one metric per claim is its
    ``primary`` one (the only rows that get a verdict); the others are exploratory.
    ``by_construction`` marks a difference fixed by the algorithms' definitions (uplink bytes),
    reported without a statistical test.
    """

    claim: str
    metric: str
    better: Better
    baselines: tuple[str, ...]
    primary: bool = False
    by_construction: bool = False


def check_claims(
    claims: Sequence[Claim], algorithms: Optional[Sequence[str]] = None, reference: str = "",
    metrics: Optional[Sequence[str]] = KNOWN_METRICS, key: str = "compare.claims", one_primary: bool = True,
) -> None:
    """Raise ``ValueError`` naming the setting and the fix unless every claim has exactly one primary metric, etc.

    Also checks the baselines against ``algorithms`` (minus the ``reference``) and the metric
    names against ``metrics`` (``final/<objective>`` always allowed), each unless None;
    ``one_primary=False`` skips the one-primary-per-claim rule (for ad-hoc tables of exploratory rows).
    """
    primaries: dict[str, set[str]] = {}
    for i, c in enumerate(claims):
        where = f"{key}[{i}] ({c.claim!r}, metric {c.metric!r})"
        if c.better not in ("lower", "higher"):
            raise ValueError(f"{where}: better={c.better!r}; use 'lower' or 'higher'.")
        if metrics is not None and c.metric not in metrics and not c.metric.startswith("final/"):
            raise ValueError(
                f"{where}: unknown metric; use one of {list(metrics)} or 'final/<objective name>'."
            )
        if not c.baselines:
            raise ValueError(f"{where}: baselines is empty; list the algorithm names FIRM is compared with.")
        if algorithms is not None:
            unknown = [b for b in c.baselines if b not in algorithms or b == reference]
            if unknown:
                raise ValueError(
                    f"{where}: baselines {unknown} are not algorithms of this comparison other than the "
                    f"reference {reference!r}; choose from {[a for a in algorithms if a != reference]}."
                )
        primaries.setdefault(c.claim, set())
        if c.primary:
            primaries[c.claim].add(c.metric)
        if c.by_construction and not c.primary:
            raise ValueError(f"{where}: by_construction=True on an exploratory row; mark it primary or drop the flag.")
    for name, primary in primaries.items():
        if one_primary and len(primary) != 1:
            raise ValueError(
                f"{key}: claim {name!r} has {len(primary)} primary metrics ({sorted(primary)}); declare exactly "
                "one with primary: true, the others stay exploratory."
            )


def default_claims(
    objectives: Sequence[str], baselines=("local_mgda", "linear", "fmgda"), aa_control: Optional[str] = None
) -> list[Claim]:
    """The claims table of ``compare``, with the primary metric of each claim, for the ``baselines`` present.

    Rows whose baselines are all absent are left out; a claim may then keep exploratory rows
    without its primary one (no verdict for that claim).

    Primary metrics, and why:

    - communication: ``uplink_bytes`` vs FMGDA, fixed by construction (S adapters vs one);
    - drift: ``update_dispersion_weighted`` vs local MGDA — the drift the server averages over;
      the λ dispersion is the mechanism (β pulls every client's λ towards ``p``, so it falls as
      β grows almost by definition) and stays exploratory, a manipulation check;
    - smoothness: ``eval_roughness`` vs local MGDA (β = 0, the discontinuous weighting FIRM
      regularises);
    - trade-offs (equal rounds): ``final/mean`` vs every baseline;
    - trade-offs (equal uplink): ``equal_uplink/mean`` vs FMGDA;
    - trade-offs (preference sweep): ``hypervolume`` vs linear scalarisation;
    - A/A control: ``final/mean`` vs ``aa_control``, an identical copy of the reference.
    """
    present = tuple(baselines)
    mgda, linear, fmgda, every = ("local_mgda",), ("linear",), ("fmgda",), ("local_mgda", "linear", "fmgda")
    claims = [
        Claim("communication", "uplink_bytes", "lower", fmgda, primary=True, by_construction=True),
        Claim("drift", "update_dispersion_weighted", "lower", mgda, primary=True),
        Claim("drift", "lambda_dispersion", "lower", mgda),
        Claim("drift", "update_dispersion_weighted", "lower", linear + fmgda),
        Claim("smoothness", "eval_roughness", "lower", mgda, primary=True),
        Claim("smoothness", "eval_roughness", "lower", linear + fmgda),
        Claim("smoothness", "update_cosine", "higher", every),
        Claim("trade-offs (equal rounds)", "final/mean", "higher", every, primary=True),
        *[Claim("trade-offs (equal rounds)", f"final/{n}", "higher", every) for n in objectives],
        Claim("trade-offs (equal rounds)", "worst_client", "higher", every),
        Claim("trade-offs (equal uplink)", "equal_uplink/mean", "higher", fmgda, primary=True),
        Claim("trade-offs (equal uplink)", "equal_uplink/worst_client", "higher", fmgda),
        Claim("trade-offs (preference sweep)", "hypervolume", "higher", linear, primary=True),
    ]
    if aa_control:
        copy = (aa_control,)
        claims += [
            Claim("A/A control", "final/mean", "higher", copy, primary=True),
            Claim("A/A control", "update_dispersion_weighted", "lower", copy),
            Claim("A/A control", "eval_roughness", "lower", copy),
        ]
    check_claims(claims, metrics=None)  # the declaration: one primary metric per claim
    present += (aa_control,) if aa_control else ()
    kept = [replace(c, baselines=tuple(b for b in c.baselines if b in present)) for c in claims]
    return [
        c for c in kept if c.baselines
    ]  # rows without a baseline here are left out (their claim may lose its primary)


# --------------------------------------------------------------------------- per-run numbers


def run_metrics(rows: Sequence[dict], objectives: Sequence[str], adapters: Optional[Sequence] = None) -> dict:
    """The claims' numbers for one run (its metrics rows, round 0 first; ``adapters``: global adapter per round)."""
    rows = sorted(rows, key=lambda r: r["round"])
    trained = rows[1:]
    last = rows[-1]
    out = {
        "uplink_bytes": sum(r["comm/bytes_up"] / r["clients"] for r in trained),
        "lambda_dispersion": mean_of(trained, "lambda_dispersion"),
        "update_dispersion_weighted": mean_of(trained, "update_dispersion_weighted"),
        "eval_roughness": eval_roughness(rows, objectives),
        "update_cosine": consecutive_update_cosine(adapters) if adapters else math.nan,
        "worst_client": float(last.get("eval/worst_client/mean", math.nan)),
        "final/mean": statistics.mean(last[f"eval/reward/{n}"] for n in objectives),
        # how much λ changed the clients' steps against p (gradients.weighting_effect); NaN where not measured
        "weighting_effect": mean_of(trained, "train/weighting_effect"),
        "weighting_effect_direction": mean_of(trained, "train/weighting_effect_direction"),
    }
    out.update({f"final/{n}": last[f"eval/reward/{n}"] for n in objectives})
    return out


def eval_roughness(rows: Sequence[dict], objectives: Sequence[str]) -> float:
    """Oscillation of the global eval reward around its trend (0 = smooth; lower is better).

    The mean, over interior rounds ``t`` and objectives, of ``|r_t − (r_{t−1} + r_{t+1}) / 2|``:
    how far each round's reward lies from the straight line through its two neighbours (half the
    absolute second difference). A steady trend, rising or falling, scores 0; a reward that
    alternates ``±a`` around any trend scores ``2a``. A saturating learning curve scores its
    (small) curvature, the same for every algorithm that learns at a similar pace. Needs at
    least 3 evaluated rounds (round 0 counts); NaN otherwise. ``rows`` in round order.
    """
    wiggles = [
        abs(b[f"eval/reward/{n}"] - (a[f"eval/reward/{n}"] + c[f"eval/reward/{n}"]) / 2)
        for a, b, c in zip(rows, rows[1:], rows[2:]) for n in objectives
    ]
    return statistics.mean(wiggles) if wiggles else math.nan


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


def mean_of(rows: Sequence[dict], key: str) -> float:
    """Mean of ``key`` over the rows that have a number for it (missing, None and NaN left out); NaN if none do."""
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
    per_run: dict[tuple, dict], reference: str, claims: Sequence[Claim], family_error_rate: float = 0.05,
    min_seeds: int = 3, confidence: float = 0.95, power: float = 0.8,
) -> list[dict]:
    """One row per (α, claim metric, baseline): the paired ``reference − baseline`` interval, p-values and verdict.

    Row keys: ``alpha, claim, metric, better, baseline, role`` (primary / exploratory / by
    construction), ``interval`` (``Interval``, per-row ``confidence``), ``p`` (two-sided
    paired t, unadjusted), ``p_holm`` (Holm-adjusted over the tested primary rows of the whole
    table; NaN for others), ``mde`` (tested primary rows: ``minimum_detectable_effect`` at
    ``family_error_rate / m`` and ``power``; NaN where no test was made), ``mde_level`` (that
    level), ``verdict`` and ``note`` (why a primary row could not be tested).
    """
    check_claims(claims, metrics=None, one_primary=False)  # CompareSettings and default_claims hold that rule
    reference_seeds: dict = {}
    for (a, al, s) in per_run:
        if a == reference:
            reference_seeds.setdefault(al, []).append(s)
    table = []
    for alpha in sorted({k[1] for k in per_run}):
        for claim in claims:
            for baseline in claim.baselines:
                seeds = sorted(s for s in reference_seeds.get(alpha, ()) if (baseline, alpha, s) in per_run)
                diffs = [
                    per_run[(reference, alpha, s)].get(claim.metric, math.nan)
                    - per_run[(baseline, alpha, s)].get(claim.metric, math.nan)
                    for s in seeds
                ]
                if not seeds or all(math.isnan(d) for d in diffs):
                    continue
                if claim.by_construction:  # no test: the exact range of the differences
                    d = [x for x in diffs if not math.isnan(x)]
                    interval = Interval(
                        statistics.mean(d), min(d), max(d), len(d), 0.0 if min(d) == max(d) else math.nan
                    )
                else:
                    interval = t_interval(diffs, confidence)
                role = BY_CONSTRUCTION if claim.by_construction else PRIMARY if claim.primary else EXPLORATORY
                table.append({
                    "alpha": alpha, "claim": claim.claim, "metric": claim.metric, "better": claim.better,
                    "baseline": baseline, "role": role, "interval": interval, "p": paired_t_pvalue(interval),
                    "p_holm": math.nan, "mde": math.nan, "mde_level": math.nan, "verdict": EXPLORATORY, "note": "",
                })
    return adjust_family(table, family_error_rate, min_seeds, power)


def adjust_family(
    table: list[dict], family_error_rate: float = 0.05, min_seeds: int = 3, power: float = 0.8
) -> list[dict]:
    """Holm across the tested primary rows of ``table`` (one family), then every row's verdict, note and MDE.

    ``claims_table`` calls it on its own rows; a study of several tables (one per regime) calls it again on
    all their rows together, so its family is the whole study's table.
    """
    tested = [
        r for r in table if r["role"] == PRIMARY and r["interval"].n >= min_seeds and not math.isnan(r["p"])
    ]
    for r, p in zip(tested, holm([r["p"] for r in tested])):
        r["p_holm"] = p
    level = family_error_rate / max(len(tested), 1)
    for r in table:
        i = r["interval"]
        if r["role"] == BY_CONSTRUCTION:
            r["verdict"] = verdict(i, r["better"], by_construction=True)
            if i.low != i.high:
                r["note"] = "marked by construction but differs across seeds"
        elif r["role"] == PRIMARY:
            r["verdict"] = verdict(i, r["better"], r["p_holm"], family_error_rate, min_seeds=min_seeds)
            if i.n < min_seeds:
                r["note"] = f"fewer than {min_seeds} seeds"
            elif not i.sd > 0:
                r["note"] = "no seed-to-seed spread: untestable"
            else:  # an MDE only where a test was made (from a zero sd it would read "any effect is seen")
                r["mde"] = minimum_detectable_effect(i.sd, i.n, level, power)
                r["mde_level"] = level
    return table


def verdict_sentence(row: dict, reference: str) -> str:
    i = row["interval"]
    text = (
        f"α={row['alpha']:g} {row['claim']}: {row['metric']} {reference} − {row['baseline']} = "
        f"{_num(i.mean)} [{_num(i.low)}, {_num(i.high)}] over {i.n} seeds ({row['better']} is better) → "
    )
    if row["role"] == EXPLORATORY:
        return text + f"exploratory (unadjusted p = {_p(row['p'])}, no verdict)"
    if row["role"] == BY_CONSTRUCTION:
        return text + f"{row['verdict']} (by construction{'; ' + row['note'] if row['note'] else ''})"
    if row["note"]:
        return text + f"{row['verdict']} ({row['note']})"
    return text + (
        f"{row['verdict']} (Holm p = {_p(row['p_holm'])}; detectable with 80 % power: |effect| ≥ {_num(row['mde'])})"
    )


def method_text(table: Sequence[dict], family_error_rate: float = 0.05, min_seeds: int = 3) -> str:
    """A short paragraph that says how the verdicts below were reached, with this table's ``m``."""
    tested = [r for r in table if r["role"] == PRIMARY and not math.isnan(r["p_holm"])]
    level = family_error_rate / max(len(tested), 1)
    return (
        f"Paired differences over seeds, 95 % Student-t intervals per row. Only each claim's primary metric gets a "
        f"verdict: a two-sided paired t-test, Holm-adjusted over the {len(tested)} tested primary rows of this table "
        f"(family-wise error ≤ {family_error_rate:g}), with at least {min_seeds} seeds and non-zero spread. "
        f"'by construction' rows (fixed by the algorithms' definitions) are reported without a test; exploratory rows "
        f"show an unadjusted p-value and no verdict. MDE: the smallest mean difference a paired t-test at level "
        f"{family_error_rate:g}/{max(len(tested), 1)} = {level:.4f} detects with 80 % power, from the row's measured "
        f"seed-to-seed sd."
    )


def markdown(table: Sequence[dict], reference: str) -> str:
    lines = [
        f"| α | claim | role | metric ({reference} − baseline) | better | baseline | mean diff | 95% CI (t) | seeds "
        "| sd | p | Holm p | MDE (80%) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        i = r["interval"]
        shown = f"**{r['verdict']}**" if r["role"] != EXPLORATORY else "exploratory"
        if r["note"]:
            shown += f" ({r['note']})"
        lines.append(
            f"| {r['alpha']:g} | {r['claim']} | {r['role']} | {r['metric']} | {r['better']} | {r['baseline']} | "
            f"{_num(i.mean)} | [{_num(i.low)}, {_num(i.high)}] | {i.n} | {_num(i.sd)} | {_p(r['p'])} | "
            f"{_p(r['p_holm'])} | {_num(r['mde']) if r['role'] == PRIMARY else '—'} | {shown} |"
        )
    return "\n".join(lines)


def _p(p: float) -> str:
    if math.isnan(p):
        return "—"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _num(x: float) -> str:
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:,.0f}" if abs(x) >= 1e4 else f"{x:.4f}"

"""Claims as statistics: t-intervals, Holm verdicts on primary metrics, MDE, smoothness; per-client and greedy
evaluation.

The error-rate tests simulate with a fixed numpy seed and state their Monte-Carlo error: a
rate ``p`` estimated over ``R`` replications has standard error ``√(p(1 − p)/R)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import make_datamodule, make_module
from firm_lightning.studies.claims import (
    BY_CONSTRUCTION, CONTRADICTED, EXPLORATORY, INCONCLUSIVE, PRIMARY, SUPPORTED, Claim, Interval, adjust_family,
    check_claims, claims_table, consecutive_update_cosine, default_claims, eval_roughness, holm, markdown,
    minimum_detectable_effect, paired_t_pvalue, reward_at_uplink, run_metrics, t_interval, verdict, verdict_sentence,
)
from firm_lightning.module import SamplingSettings

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OBJECTIVES = ("obj1", "obj2")
ALGORITHMS = ("firm_beta1", "local_mgda", "linear", "fmgda")


# --------------------------------------------------------------------------- intervals


def test_t_interval_is_the_textbook_student_interval():
    i = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd √2.5, t_{0.975, 4} = 2.776445 (printed tables): half width 2.776445 · 1.581139 / √5 = 1.963243
    assert (i.mean, i.n) == (3.0, 5)
    assert i.sd == pytest.approx(math.sqrt(2.5))
    assert i.low == pytest.approx(3.0 - 1.963243, abs=1e-6) and i.high == pytest.approx(3.0 + 1.963243, abs=1e-6)
    # 90 %: t_{0.95, 4} = 2.131847
    assert t_interval([1.0, 2.0, 3.0, 4.0, 5.0], 0.90).high == pytest.approx(
        3.0 + 2.131847 * math.sqrt(2.5 / 5), abs=1e-6
    )


def test_t_interval_edge_cases():
    one = t_interval([0.5])
    assert (one.low, one.high, one.n) == (-math.inf, math.inf, 1)  # one seed: no spread to estimate
    assert t_interval([math.nan, 1.0, 3.0]).n == 2  # undefined values are left out
    assert math.isnan(t_interval([]).mean)
    flat = t_interval([0.1, 0.1, 0.1])  # equal (the mean of three 0.1 is not exactly 0.1 in floats)
    assert (flat.low, flat.high, flat.sd) == (flat.mean, flat.mean, 0.0)
    assert math.isnan(paired_t_pvalue(flat))  # no spread: no test


@pytest.mark.parametrize("n", [3, 5, 10])
def test_interval_in_the_claims_table_has_its_nominal_coverage_under_a_normal_null(n):
    # 20 000 replications per n, each a row of one claims_table call (one Dirichlet α per replication):
    # Monte-Carlo standard error √(0.95 · 0.05 / 20 000) = 0.0015, so 0.93 is 13 SE below the nominal 0.95.
    # The percentile bootstrap used before covered ≈ 0.75 / 0.84 / 0.90 at n = 3 / 5 / 10.
    replications = 20_000
    rng = np.random.default_rng(18)
    diffs = rng.normal(0.0, 1.0, size=(replications, n))
    per_run = {}
    for r in range(replications):
        for s in range(n):
            per_run[("firm", r, s)] = {"m": diffs[r, s]}
            per_run[("base", r, s)] = {"m": 0.0}
    rows = claims_table(per_run, "firm", [Claim("c", "m", "higher", ("base",), primary=False)])
    assert len(rows) == replications and all(r["interval"].n == n for r in rows)
    covered = np.mean([r["interval"].low <= 0.0 <= r["interval"].high for r in rows])
    assert 0.93 <= covered <= 0.97, covered


# --------------------------------------------------------------------------- multiplicity


def test_holm_adjusted_p_values_follow_the_step_down_definition():
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, max(0.06, 0.04·1) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.2, math.nan, 0.6])  # untested rows do not count in m
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.6)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def _null_per_run(rng, alphas=(0.1, 1.0, 100.0), seeds=range(5), sweep_alphas=(0.1,)):
    """A compare study in which no algorithm differs from another (except uplink bytes, fixed by construction).

    Per (α, seed) a seed effect shared by every algorithm (what pairing removes), plus per-run noise
    of each metric's own scale; final/mean and worst_client derive from the per-objective rewards.
    """
    per_run = {}
    for alpha in alphas:
        for s in seeds:
            shared = {"obj1": rng.normal(0.7, 0.08), "obj2": rng.normal(0.5, 0.05), "disp": rng.normal(2.8, 0.1),
                      "lam": rng.normal(0.1, 0.05), "rough": rng.normal(0.03, 0.01), "cos": rng.normal(0.9, 0.02)}
            for a in ALGORITHMS:
                o1, o2 = shared["obj1"] + rng.normal(0, 0.03), shared["obj2"] + rng.normal(0, 0.02)
                m = {
                    "final/obj1": o1, "final/obj2": o2, "final/mean": (o1 + o2) / 2,
                    "worst_client": min(o1, o2) + rng.normal(0, 0.01),
                    "update_dispersion_weighted": shared["disp"] + rng.normal(0, 0.05),
                    "lambda_dispersion": shared["lam"] + rng.normal(0, 0.02),
                    "eval_roughness": shared["rough"] + rng.normal(0, 0.004),
                    "update_cosine": shared["cos"] + rng.normal(0, 0.01),
                    "equal_uplink/mean": (o1 + o2) / 2 + rng.normal(0, 0.02),
                    "equal_uplink/worst_client": min(o1, o2) + rng.normal(0, 0.02),
                    "uplink_bytes": 283_008.0 * (2 if a == "fmgda" else 1),
                }
                if alpha in sweep_alphas:
                    m["hypervolume"] = 0.05 + rng.normal(0, 0.002)
                per_run[(a, alpha, s)] = m
    return per_run


def test_a_null_study_reports_no_primary_verdict_in_at_least_95_percent_of_replications():
    # 2 000 simulated studies shaped like the claims table (FIRM, local MGDA, linear, FMGDA × 3 α × 5 seeds,
    # the default claims: 19 tested primary rows, 3 by-construction rows, 45 exploratory ones), nothing differing.
    # Holm guarantees a family-wise rate ≤ 0.05; with nearly independent rows it is ≈ 0.049, so an estimate
    # from R studies scatters around 0.05 with standard error √(0.05 · 0.95 / R) = 0.0049: the test accepts
    # the rate unless it exceeds 0.05 by more than 2.33 SE (a 1 % one-sided Monte-Carlo tolerance, 0.0614).
    # Reading each primary row at its own 95 % (no adjustment, as before) gives a verdict in ≈ 60 % of the
    # same studies (and the bootstrap tables of before in 20 of 20), which the bound rules out by far.
    replications = 2_000
    rng = np.random.default_rng(2024)
    claims = default_claims(OBJECTIVES, ("local_mgda", "linear", "fmgda"))
    with_verdict = unadjusted = 0
    for _ in range(replications):
        table = claims_table(_null_per_run(rng), "firm_beta1", claims)
        primary = [r for r in table if r["role"] == PRIMARY]
        assert len(primary) == 19 and sum(r["role"] == BY_CONSTRUCTION for r in table) == 3
        assert all(r["verdict"] == EXPLORATORY for r in table if r["role"] == EXPLORATORY)
        with_verdict += any(r["verdict"] != INCONCLUSIVE for r in primary)
        unadjusted += any(r["p"] <= 0.05 for r in primary)
    rate, standard_error = with_verdict / replications, math.sqrt(0.05 * 0.95 / replications)
    assert 1 - rate >= 0.95 - 2.33 * standard_error, rate
    assert unadjusted / replications > 0.4  # the same tables without the adjustment: the test can tell


def test_single_null_comparison_false_verdict_rate_is_at_most_the_level():
    # One primary row per study (m = 1): its false-verdict rate is the t-test's size, 0.05
    # (was 0.158 with the percentile bootstrap at 5 seeds). 20 000 studies: SE 0.0015.
    rng = np.random.default_rng(5)
    replications, n = 20_000, 5
    per_run = {}
    for r in range(replications):
        for s in range(n):
            per_run[("firm", r, s)] = {"m": rng.normal()}
            per_run[("base", r, s)] = {"m": rng.normal()}
    rows = claims_table(per_run, "firm", [Claim("c", "m", "higher", ("base",))])
    # One table would hold all 20 000 rows as one Holm family; read each as a study of its own (m = 1):
    false = np.mean([verdict(r["interval"], "higher", r["p"], 0.05) != INCONCLUSIVE for r in rows])
    assert false <= 0.055, false


# --------------------------------------------------------------------------- by construction, seeds, spread


def _two_algorithms(firm: list[float], base: list[float], metric: str = "m") -> dict:
    per_run = {}
    for s, (f, b) in enumerate(zip(firm, base)):
        per_run[("firm", 0.1, s)] = {metric: f}
        per_run[("base", 0.1, s)] = {metric: b}
    return per_run


def test_by_construction_is_declared_on_the_claim_not_inferred_from_equal_differences():
    uplink = Claim("communication", "m", "lower", ("base",), primary=True, by_construction=True)
    chance = Claim("trade-off", "m", "higher", ("base",), primary=True)
    # Two seeds whose reward differences happen to be equal (0.0625 both times): before, "supported".
    equal_by_chance = _two_algorithms([0.5625, 0.6875], [0.5, 0.625])
    [row] = claims_table(equal_by_chance, "firm", [chance])
    assert row["interval"].mean == 0.0625 and row["interval"].sd == 0.0
    assert row["verdict"] == INCONCLUSIVE
    # The same on five seeds, with a value that is not exact in binary: still no spread, still no verdict.
    [row] = claims_table(_two_algorithms([0.3 + 0.1] * 5, [0.3] * 5), "firm", [chance])
    assert row["verdict"] == INCONCLUSIVE and "spread" in row["note"]
    assert math.isnan(row["mde"]) and "detectable" not in verdict_sentence(row, "firm")  # no test, no MDE
    # Uplink bytes marked by construction: a verdict from the sign, whatever the number of seeds, outside Holm.
    [row] = claims_table(_two_algorithms([100.0, 100.0], [200.0, 200.0]), "firm", [uplink])
    assert (row["role"], row["verdict"], row["interval"]) == (
        BY_CONSTRUCTION,
        SUPPORTED,
        Interval(-100.0, -100.0, -100.0, 2),
    )
    assert math.isnan(row["p_holm"])
    # Marked by construction but not constant: no verdict, and the table says why.
    [row] = claims_table(_two_algorithms([100.0, 150.0, 100.0], [200.0] * 3), "firm", [uplink])
    assert row["verdict"] == INCONCLUSIVE and "differs across seeds" in row["note"]


def test_a_tested_verdict_needs_the_minimum_number_of_seeds():
    claim = Claim("trade-off", "m", "higher", ("base",), primary=True)
    strong = [1.0, 1.1, 0.9, 1.05, 0.95]  # a difference of ≈ 1 with sd 0.08: t ≈ 28
    [two] = claims_table(_two_algorithms(strong[:2], [0.0] * 2), "firm", [claim])
    assert two["verdict"] == INCONCLUSIVE and "fewer than 3 seeds" in two["note"]
    [three] = claims_table(_two_algorithms(strong[:3], [0.0] * 3), "firm", [claim])
    assert three["verdict"] == SUPPORTED
    [opposite] = claims_table(_two_algorithms([0.0] * 3, strong[:3]), "firm", [claim])
    assert opposite["verdict"] == CONTRADICTED
    [five] = claims_table(_two_algorithms(strong, [0.0] * 5), "firm", [claim], min_seeds=6)
    assert five["verdict"] == INCONCLUSIVE


def test_verdict_reads_the_adjusted_p_value_and_the_predicted_side():
    i = Interval(-0.2, -0.3, -0.1, 5, 0.08)
    assert verdict(i, "lower", p_adjusted=0.01) == SUPPORTED
    assert verdict(i, "higher", p_adjusted=0.01) == CONTRADICTED
    assert verdict(i, "lower", p_adjusted=0.2) == INCONCLUSIVE  # significant alone, not after adjustment
    assert verdict(Interval(-0.2, -0.2, -0.2, 5, 0.0), "lower", p_adjusted=0.0) == INCONCLUSIVE  # zero spread
    # Alone (no adjusted p given), a row is one comparison: its own paired t-test at 0.05.
    assert verdict(t_interval([1.0, 1.1, 0.9]), "higher") == SUPPORTED
    assert verdict(t_interval([0.1, -0.1, 0.05]), "higher") == INCONCLUSIVE
    assert verdict(Interval(0.0625, 0.0625, 0.0625, 2), "higher") == INCONCLUSIVE  # equal by chance, 2 seeds


def test_holm_decides_primary_rows_across_the_whole_table_and_exploratory_rows_get_none():
    # Three primary rows, each with the same borderline effect (p ≈ 0.02 alone): Holm over m = 3 rejects none;
    # alone (m = 1) each is supported. An exploratory row with the same data gets no verdict.
    firm = [0.30, 0.10, 0.25, 0.05, 0.20]
    per_run = {}
    for alpha in (0.1, 1.0, 100.0):
        for s, f in enumerate(firm):
            per_run[("firm", alpha, s)] = {"m": f, "x": f}
            per_run[("base", alpha, s)] = {"m": 0.0, "x": 0.0}
    claims = [Claim("c", "m", "higher", ("base",), primary=True), Claim("c", "x", "higher", ("base",))]
    table = claims_table(per_run, "firm", claims)
    primary = [r for r in table if r["role"] == PRIMARY]
    p = primary[0]["p"]
    assert p == pytest.approx(stats.ttest_1samp(firm, 0.0).pvalue)
    assert 0.0167 < p < 0.05  # significant at 0.05, not at 0.05 / 3
    assert all(r["p_holm"] == pytest.approx(min(1.0, 3 * p)) and r["verdict"] == INCONCLUSIVE for r in primary)
    assert all(r["verdict"] == EXPLORATORY and math.isnan(r["p_holm"]) for r in table if r["role"] == EXPLORATORY)
    one = claims_table({k: v for k, v in per_run.items() if k[1] == 0.1}, "firm", claims)
    assert [r["verdict"] for r in one] == [SUPPORTED, EXPLORATORY]


def test_a_study_of_several_tables_is_one_holm_family():
    """benchmarks/regimes.py builds one table per regime and adjusts their primary rows together."""
    firm, claim = [0.30, 0.10, 0.25, 0.05, 0.20], Claim("c", "m", "higher", ("base",), primary=True)
    tables = [claims_table(_two_algorithms(firm, [0.0] * 5), "firm", [claim]) for _ in range(3)]
    assert all(t[0]["verdict"] == SUPPORTED for t in tables)  # each alone: a family of one
    study = adjust_family([dict(row, regime=i) for i, t in enumerate(tables) for row in t])
    p = tables[0][0]["p"]
    assert all(r["p_holm"] == pytest.approx(min(1.0, 3 * p)) and r["verdict"] == INCONCLUSIVE for r in study)
    assert study[0]["mde_level"] == pytest.approx(0.05 / 3)


def test_run_metrics_average_the_weighting_effect_over_the_trained_rounds():
    rows = [{"round": 0, "comm/bytes_up": 0, "clients": 1, "eval/reward/a": 0.1}] + [
        {"round": r, "comm/bytes_up": 8, "clients": 1, "eval/reward/a": 0.2, "train/weighting_effect": e,
         "train/weighting_effect_direction": e / 2} for r, e in ((1, 0.3), (2, 0.1))]
    metrics = run_metrics(rows, ["a"])
    assert metrics["weighting_effect"] == pytest.approx(0.2)
    assert metrics["weighting_effect_direction"] == pytest.approx(0.1)
    older = [{k: v for k, v in r.items() if not k.startswith("train/weighting")} for r in rows]
    assert math.isnan(run_metrics(older, ["a"])["weighting_effect"])  # a run from before the measure


def test_claims_table_pairs_on_seed():
    # The baseline varies a lot from seed to seed, FIRM is always 0.01 below it (± 0.001): unpaired
    # intervals would overlap, the paired difference is ≈ −0.01 on every seed.
    baseline = [0.5, 1.5, 0.2, 2.0, 0.9]
    per_run = {}
    for seed, b in enumerate(baseline):
        per_run[("local_mgda", 0.1, seed)] = {"drift": b, "reward": b}
        per_run[("firm", 0.1, seed)] = {"drift": b - 0.01 + 0.001 * (-1) ** seed, "reward": b - 0.01 * (-1) ** seed}
    claims = [Claim("drift", "drift", "lower", ("local_mgda",), primary=True),
              Claim("trade-off", "reward", "higher", ("local_mgda",), primary=True)]
    drift, reward = claims_table(per_run, "firm", claims)
    assert drift["interval"].mean == pytest.approx(-0.0098) and drift["interval"].high < 0
    assert drift["verdict"] == SUPPORTED
    assert reward["verdict"] == INCONCLUSIVE  # +0.01, -0.01, ... straddles 0


# --------------------------------------------------------------------------- minimum detectable effect


def test_minimum_detectable_effect_has_80_percent_power_by_simulation():
    # n = 5 seeds, sd 1, level 0.05 / 6: simulate 20 000 paired t-tests with the true mean at the MDE.
    # Monte-Carlo standard error of the power √(0.8 · 0.2 / 20 000) = 0.0028; tolerance 0.012 (≈ 4 SE).
    n, sd, level = 5, 1.0, 0.05 / 6
    mde = minimum_detectable_effect(sd, n, level)
    rng = np.random.default_rng(80)
    d = rng.normal(mde, sd, size=(20_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = np.mean(np.abs(t) > stats.t.ppf(1 - level / 2, n - 1))
    assert power == pytest.approx(0.80, abs=0.012)
    # 10 % smaller effects fall clearly short of 80 %, so the simulation pins the MDE down.
    d_small = rng.normal(0.9 * mde, sd, size=(20_000, n))
    t_small = d_small.mean(1) / (d_small.std(1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t_small) > stats.t.ppf(1 - level / 2, n - 1)) < 0.75


def test_minimum_detectable_effect_matches_the_normal_formula_for_many_seeds_and_scales_with_sd():
    # Large n: the t-test is a z-test, MDE ≈ (z_{1−α/2} + z_{0.8}) · sd / √n.
    n, level = 2_000, 0.01
    normal = (stats.norm.ppf(1 - level / 2) + stats.norm.ppf(0.8)) * 0.3 / math.sqrt(n)
    assert minimum_detectable_effect(0.3, n, level) == pytest.approx(normal, rel=2e-3)
    assert minimum_detectable_effect(2.0, 5, 0.05) == pytest.approx(2 * minimum_detectable_effect(1.0, 5, 0.05))
    assert minimum_detectable_effect(1.0, 10, 0.05 / 7) < minimum_detectable_effect(1.0, 5, 0.05 / 7)
    assert minimum_detectable_effect(0.0, 5, 0.05) == 0.0 and minimum_detectable_effect(1.0, 1, 0.05) == math.inf


def test_primary_rows_carry_the_mde_at_the_bonferroni_level_of_the_family_and_print_it():
    per_run = _null_per_run(np.random.default_rng(1))
    table = claims_table(per_run, "firm_beta1", default_claims(OBJECTIVES))
    primary = [r for r in table if r["role"] == PRIMARY]
    m = len(primary)
    for r in primary:
        assert r["mde_level"] == pytest.approx(0.05 / m)
        assert r["mde"] == pytest.approx(minimum_detectable_effect(r["interval"].sd, r["interval"].n, 0.05 / m))
    text = markdown(table, "firm_beta1")
    sentence = verdict_sentence(primary[0], "firm_beta1")
    assert "MDE (80%)" in text and f"{primary[0]['mde']:.4f}" in text and f"≥ {primary[0]['mde']:.4f}" in sentence
    assert "| exploratory |" in text and "no verdict" in verdict_sentence(
        next(r for r in table if r["role"] == EXPLORATORY), "firm_beta1")


# --------------------------------------------------------------------------- claim declarations


def test_default_claims_declare_exactly_one_primary_metric_per_claim():
    claims = default_claims(OBJECTIVES, ("local_mgda", "linear", "fmgda"), aa_control="firm_copy")
    check_claims(claims)
    primary = {c.claim: c.metric for c in claims if c.primary}
    assert primary == {
        "communication": "uplink_bytes", "drift": "update_dispersion_weighted", "smoothness": "eval_roughness",
        "trade-offs (equal rounds)": "final/mean", "trade-offs (equal uplink)": "equal_uplink/mean",
        "trade-offs (preference sweep)": "hypervolume", "A/A control": "final/mean",
    }
    assert [c for c in claims if c.by_construction] == [claims[0]] and claims[0].metric == "uplink_bytes"
    # Without FMGDA the communication and equal-uplink claims have no row left; without local MGDA the
    # smoothness claim keeps its exploratory rows but has no primary one (no verdict for it).
    names = {c.claim for c in default_claims(OBJECTIVES, ("local_mgda", "linear"))}
    assert "communication" not in names and "trade-offs (equal uplink)" not in names
    smoothness = [c for c in default_claims(OBJECTIVES, ("fmgda",)) if c.claim == "smoothness"]
    assert smoothness and not any(c.primary for c in smoothness)


@pytest.mark.parametrize(
    "claims, message",
    [
        ([Claim("drift", "lambda_dispersion", "lower", ("b",), primary=True),
          Claim("drift", "update_dispersion_weighted", "lower", ("b",), primary=True)], "2 primary metrics"),
        ([Claim("drift", "lambda_dispersion", "lower", ("b",))], "0 primary metrics"),
        ([Claim("drift", "lambda_dispersoin", "lower", ("b",), primary=True)], "unknown metric"),
        ([Claim("drift", "lambda_dispersion", "smaller", ("b",), primary=True)], "better='smaller'"),
        ([Claim("drift", "lambda_dispersion", "lower", (), primary=True)], "baselines is empty"),
        ([Claim("drift", "lambda_dispersion", "lower", ("nope",), primary=True)], r"\['nope'\] are not algorithms"),
        ([Claim("c", "uplink_bytes", "lower", ("b",), primary=True),
          Claim("c", "final/mean", "higher", ("b",), by_construction=True)], "by_construction=True on an exploratory"),
    ],
)
def test_bad_claim_declarations_name_the_setting_and_the_fix(claims, message):
    with pytest.raises(ValueError, match=message) as error:
        check_claims(claims, algorithms=["firm", "b"], reference="firm")
    assert "compare.claims" in str(error.value)


# --------------------------------------------------------------------------- smoothness


def _curve(values):
    return [{"round": t, "eval/reward/a": v} for t, v in enumerate(values)]


def test_eval_roughness_ignores_a_steady_trend_and_scores_an_oscillation():
    from firm_lightning.studies.compare import summarize

    ramp = _curve([0.3 + 0.05 * t for t in range(6)])  # learning steadily, +0.05 per round
    wobble = _curve([0.5 + 0.03 * (-1) ** t for t in range(6)])  # flat, ±0.03 every round
    both = _curve([0.3 + 0.05 * t + 0.03 * (-1) ** t for t in range(6)])
    assert eval_roughness(ramp, ["a"]) == pytest.approx(0.0, abs=1e-12)
    assert eval_roughness(wobble, ["a"]) == pytest.approx(0.06)  # |±0.03 − ∓0.03| = 2 · 0.03
    assert eval_roughness(both, ["a"]) == pytest.approx(0.06)  # the trend is removed, the oscillation stays
    assert eval_roughness(_curve([0.1, 0.3, 0.2]), ["a"]) == pytest.approx(0.15)  # |0.3 − (0.1 + 0.2)/2|
    assert math.isnan(eval_roughness(_curve([0.1, 0.3]), ["a"]))  # two rounds have no trend to deviate from
    rows = [{"algorithm": "x", "alpha": 1.0, "seed": 0, "clients": 1, "comm/bytes_up": 0, "comm/bytes_down": 0, **r}
            for r in wobble]
    assert summarize(rows, ["a"])[0]["eval roughness"][0] == pytest.approx(0.06)  # the summary table's definition


def test_update_cosine_and_equal_uplink_on_hand_made_runs():
    import torch

    straight = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}]
    zigzag = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 0.0])}]
    assert consecutive_update_cosine(straight) == pytest.approx(1.0)
    assert consecutive_update_cosine(zigzag) == pytest.approx(-1.0)
    rows = [{"round": r, "comm/bytes_up": 200 * 2, "clients": 2, "eval/reward/a": r / 10} for r in range(5)]
    at = reward_at_uplink(rows, budget=400.0, objectives=["a"])  # 200 B per client per round: 2 rounds
    assert at["equal_uplink/round"] == 2 and at["equal_uplink/mean"] == pytest.approx(0.2)


# --------------------------------------------------------------------------- settings and configs


def test_compare_settings_check_the_aa_control_and_claims():
    from firm_lightning.algorithms import FIRM, FMGDA
    from firm_lightning.studies.compare import CompareSettings

    algorithms = [FIRM(beta=1.0), FIRM(beta=1.0, name="firm_copy"), FIRM(beta=0.5, name="firm_other"), FMGDA()]
    settings = CompareSettings(algorithms, aa_control="firm_copy")
    aa = [c for c in settings.claims_for(list(OBJECTIVES)) if c.claim == "A/A control"]
    assert aa and all(c.baselines == ("firm_copy",) for c in aa)
    with pytest.raises(
        ValueError, match=r"compare.aa_control='firm_other' is not an identical copy.*changing only name"
    ):
        CompareSettings(algorithms, aa_control="firm_other")
    with pytest.raises(ValueError, match=r"compare.aa_control='missing' is not an algorithm here"):
        CompareSettings(algorithms, aa_control="missing")
    with pytest.raises(ValueError, match=r"compare.family_error_rate=1.5 must be in \(0, 1\)"):
        CompareSettings(algorithms, family_error_rate=1.5)
    with pytest.raises(ValueError, match=r"compare.min_seeds=1"):
        CompareSettings(algorithms, min_seeds=1)
    mine = [{"claim": "communication", "metric": "uplink_bytes", "better": "lower", "baselines": ["fmgda"],
             "primary": True, "by_construction": True}]
    assert CompareSettings(algorithms, claims=mine).claims_for(list(OBJECTIVES)) == [
        Claim("communication", "uplink_bytes", "lower", ("fmgda",), True, True)]
    with pytest.raises(ValueError, match=r"compare.claims\[0\].*baselines \['linear'\]"):
        CompareSettings(algorithms, claims=[{**mine[0], "baselines": ["linear"]}])
    with pytest.raises(ValueError, match=r"compare.claims entry .*keys are claim, metric"):
        CompareSettings(algorithms, claims=[{**mine[0], "primay": True}])
    typo = CompareSettings(algorithms, claims=[{**mine[0], "metric": "final/a_to_n", "by_construction": False}])
    with pytest.raises(ValueError, match=r"compare.claims\[0\].*'final/a_to_n' names no objective.*'final/obj1'"):
        typo.claims_for(list(OBJECTIVES))  # a typo is refused, not a row silently left out of the table
    assert CompareSettings(algorithms, claims=[{**mine[0], "metric": "final/mean"}]).claims_for(list(OBJECTIVES))


def _compare_section(path: Path):
    from jsonargparse import ArgumentParser

    from firm_lightning.studies.compare import CompareSettings

    import yaml

    parser = ArgumentParser()
    parser.add_class_arguments(CompareSettings, "compare")
    section = yaml.safe_load(path.read_text())["compare"]
    config = parser.parse_object({"compare": section})
    return parser.instantiate_classes(config).compare


def test_claims_configs_parse_and_the_quick_one_has_an_aa_control_on_enough_seeds():
    quick = _compare_section(CONFIGS / "claims_quick.yaml")
    assert quick.aa_control and quick.aa_control != quick.reference
    assert len(quick.seeds) >= quick.min_seeds  # the A/A row is tested, not skipped for lack of seeds
    full = _compare_section(CONFIGS / "claims.yaml")
    assert full.aa_control is None and len(full.seeds) >= 8
    claims = full.claims_for(list(OBJECTIVES))
    check_claims(claims, [a.name for a in full.algorithms], full.reference)


def test_claims_can_be_declared_in_a_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "compare:\n"
        "  algorithms:\n"
        "    - class_path: firm_lightning.algorithms.FIRM\n"
        "      init_args: {beta: 1.0}\n"
        "    - class_path: firm_lightning.algorithms.LocalMGDA\n"
        "  claims:\n"
        "    - {claim: drift, metric: lambda_dispersion, better: lower, baselines: [local_mgda], primary: true}\n"
        "    - {claim: drift, metric: update_dispersion_weighted, better: lower, baselines: [local_mgda]}\n"
    )
    settings = _compare_section(config)
    assert settings.claims_for(list(OBJECTIVES)) == [
        Claim("drift", "lambda_dispersion", "lower", ("local_mgda",), primary=True),
        Claim("drift", "update_dispersion_weighted", "lower", ("local_mgda",)),
    ]


# --------------------------------------------------------------------------- per-client evaluation and compare


def _orchestrator(tmp_path, module, datamodule):
    from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
    from firm_lightning.trainer_factory import TrainerFactory

    config = FederationConfig(num_rounds=1, num_clients=datamodule.num_clients, output_dir=str(tmp_path))
    factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path)
    return FederatedOrchestrator(module, datamodule, config, factory, echo=lambda _: None)


def test_per_client_eval_weights_group_rewards_by_each_clients_share(tmp_path):
    data = make_datamodule(3, partition="dirichlet", dirichlet_alpha=0.3)
    module = make_module()
    orchestrator = _orchestrator(tmp_path, module, data)
    groups = sorted(set(data.train_groups))
    metrics = {
        f"eval/group/{g}/{n}": float(k + s) / 10
        for k, g in enumerate(groups)
        for s, n in enumerate(module.objective_names)
    }
    result = orchestrator.engine.client_evaluation(metrics)
    expected = []
    for indices in data.client_indices:
        own = [data.train_groups[i] for i in indices]
        expected.append([sum(own.count(g) * metrics[f"eval/group/{g}/{n}"] for g in groups) / len(own)
                         for n in module.objective_names])
    expected = np.array(expected)
    for s, n in enumerate(module.objective_names):
        assert result[f"eval/client_mean/{n}"] == pytest.approx(expected[:, s].mean())
        assert result[f"eval/worst_client/{n}"] == pytest.approx(expected[:, s].min())
    assert result["eval/worst_client/mean"] == pytest.approx(expected.mean(1).min())
    assert result["eval/worst_client/mean"] < result[f"eval/client_mean/{module.objective_names[0]}"] + 0.1


def test_a_run_records_per_client_eval_and_greedy_eval_ignores_the_seed(tmp_path):
    data = make_datamodule(2, partition="dirichlet", dirichlet_alpha=0.5)
    module = make_module(sampling=SamplingSettings(max_new_tokens=8, num_generations=2, eval_greedy=True))
    orchestrator = _orchestrator(tmp_path, module, data)
    state = orchestrator.run()
    assert {"eval/worst_client/mean", "eval/client_mean/a_to_m", "update_dispersion_weighted"} <= set(state.history[-1])
    assert "eval/worst_client/mean" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    adapter = state.global_adapter
    first = orchestrator.engine.evaluate(adapter)
    module.sampling.eval_seed += 1
    assert orchestrator.engine.evaluate(adapter) == first  # greedy: no sampling noise
    module.sampling.eval_greedy = False
    sampled = orchestrator.engine.evaluate(adapter)
    module.sampling.eval_seed += 1
    assert orchestrator.engine.evaluate(adapter) != sampled  # sampled evaluation does depend on the seed


def test_compare_reports_paired_claims_runs_the_aa_copy_separately_and_reuses_finished_runs(tmp_path):
    from firm_lightning.algorithms import FIRM, FMGDA
    from firm_lightning.studies.compare import CompareSettings, claims_report, run_comparison, run_directory
    from firm_lightning.federation_metrics import payload_bytes
    from firm_lightning.orchestrator import FederationConfig

    torch.manual_seed(0)  # the LoRA initialisation: one fixed outcome of the A/A row's noise
    module = make_module()
    data = make_datamodule(2, partition="dirichlet", dirichlet_alpha=1.0)
    federation = FederationConfig(num_rounds=2, num_clients=2, output_dir=str(tmp_path))
    settings = CompareSettings(
        [FIRM(beta=1.0), FIRM(beta=1.0, name="firm_copy"), FMGDA()], seeds=[0, 1, 2], aa_control="firm_copy"
    )
    trainer = {"max_steps": 1, "accelerator": "cpu"}
    rows = run_comparison(module, data, federation, trainer, settings, echo=lambda _: None)
    alpha = data.hparams["dirichlet_alpha"]
    for seed in (0, 1, 2):  # the copy is a run of its own, on the same seeds
        assert (run_directory(tmp_path, "firm_copy", alpha, seed) / "metrics.csv").is_file()
        assert run_directory(tmp_path, "firm_copy", alpha, seed) != run_directory(tmp_path, "firm_beta1", alpha, seed)
    assert sorted({r["seed"] for r in rows if r["algorithm"] == "firm_copy"}) == [0, 1, 2]
    table, text = claims_report(rows, module.objective_names, tmp_path, settings)
    uplink = next(r for r in table if r["metric"] == "uplink_bytes")
    saved = payload_bytes(module.adapter_state()) * 2  # per client: one adapter fewer per round, 2 rounds
    assert uplink["interval"] == Interval(-saved, -saved, -saved, 3) and uplink["verdict"] == SUPPORTED
    aa = [r for r in table if r["claim"] == "A/A control"]
    assert aa and all(r["baseline"] == "firm_copy" for r in aa)
    aa_primary = next(r for r in aa if r["role"] == PRIMARY)
    assert aa_primary["verdict"] == INCONCLUSIVE  # a real replicate: inconclusive but for the family's 5 %
    # A real replicate: the same start (round 0 identical), its own sampling noise (final rewards differ).
    def run_of(name, seed, round_idx):
        return next(r for r in rows if r["algorithm"] == name and r["seed"] == seed and r["round"] == round_idx)
    for seed in (0, 1, 2):
        assert run_of("firm_copy", seed, 0)["eval/reward/a_to_m"] == run_of("firm_beta1", seed, 0)["eval/reward/a_to_m"]
    assert any(run_of("firm_copy", s, 2)["eval/reward/a_to_m"] != run_of("firm_beta1", s, 2)["eval/reward/a_to_m"]
               for s in (0, 1, 2))
    assert aa_primary["interval"].sd > 0
    assert {"update_cosine", "eval_roughness", "worst_client", "equal_uplink/mean"} <= {r["metric"] for r in table}
    assert all(r["verdict"] in (SUPPORTED, CONTRADICTED, INCONCLUSIVE, EXPLORATORY) for r in table)
    assert "| 1 | communication | by construction | uplink_bytes | lower | fmgda |" in text
    assert "Holm" in text.split("\n\n")[0]  # the method paragraph comes first
    # A second comparison over the same folder reuses every finished run.
    messages = []
    again = run_comparison(module, data, federation, trainer, settings, echo=messages.append)
    assert len(messages) == 9 and all("reused" in m for m in messages)
    assert [(r["algorithm"], r["seed"], r["round"]) for r in again] == [
        (r["algorithm"], r["seed"], r["round"]) for r in rows
    ]
    assert again[-1]["eval/reward/a_to_m"] == pytest.approx(rows[-1]["eval/reward/a_to_m"])


def test_beta_ablation_plot_orders_beta_from_mgda_to_linear(tmp_path):
    from firm_lightning.algorithms import FIRM, Linear, LocalMGDA
    from firm_lightning.studies.compare import plot_beta_ablation

    algorithms = [Linear(), FIRM(beta=1.0), LocalMGDA()]
    assert [a.beta_axis for a in algorithms] == [math.inf, 1.0, 0.0]
    per_run = {
        (a.name, 0.1, s): {
            "lambda_dispersion": 0.1,
            "update_dispersion_weighted": 1.0,
            "final/mean": 0.5,
            "worst_client": 0.4,
        }
        for a in algorithms
        for s in range(3)
    }
    assert plot_beta_ablation(per_run, algorithms, tmp_path / "beta.png").is_file()

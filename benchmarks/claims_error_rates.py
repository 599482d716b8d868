"""Error rates of the claims statistics, before and after issue 18, by simulation; prints JSON.

    python benchmarks/claims_error_rates.py                 # about 2 minutes on a 2-core machine
    python benchmarks/claims_error_rates.py --quick         # fewer replications (≈ 20 s), larger MC error

"Before" is ``firm_lightning/claims.py`` as of commit ``e330117`` (read with ``git show``), so
the numbers are the old code's own, not a re-implementation: percentile-bootstrap intervals
(``scipy.stats.bootstrap``, 10 000 resamples), a verdict on every row read off its own 95 %
interval, "fixed by construction" inferred from equal differences. "After" is the current
``firm_lightning.studies.claims``: t-intervals, one primary metric per claim, Holm across the table.

Measured, each with its Monte-Carlo standard error ``√(p(1 − p)/R)`` over ``R`` replications and a
95 % Wilson interval:

- ``coverage``: how often the 95 % interval of a mean difference contains the true mean 0, for
  normal differences at n = 3, 5, 10 seeds;
- ``single_comparison``: how often one comparison (5 seeds, both arms N(0, 1), nothing differs)
  gets a verdict (supported or contradicted);
- ``family``: how often a whole null study gets at least one verdict: 6 algorithms (FIRM β = 1,
  0.1, 10, local MGDA, linear, FMGDA) × Dirichlet α ∈ {0.1, 1, 100} × 5 seeds, the default claims
  of each version; "before" counts any row, "after" the primary rows (exploratory rows get no
  verdict by design); uplink bytes differ by construction (FMGDA uploads 2×) and are not counted;
- ``chance_equality``: a reward difference equal on 2 seeds (0.0625 both times).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firm_lightning.studies import claims as after  # noqa: E402

BEFORE_COMMIT = "e330117"
OBJECTIVES = ("obj1", "obj2")
ALGORITHMS = ("firm_beta1", "firm_beta0.1", "firm_beta10", "local_mgda", "linear", "fmgda")


def load_before() -> types.ModuleType:
    """firm_lightning/claims.py at BEFORE_COMMIT, as a module (its pareto import stubbed: only hypervolumes use it)."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE_COMMIT}:firm_lightning/claims.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    source = source.replace("from firm_lightning.pareto import hypervolume", "hypervolume = None")
    module = types.ModuleType("claims_before")
    sys.modules["claims_before"] = module  # dataclasses look their module up there
    exec(compile(source, f"claims.py@{BEFORE_COMMIT}", "exec"), module.__dict__)
    return module


def rate(hits: int, replications: int) -> dict:
    """The rate, its Monte-Carlo standard error and a 95 % Wilson interval (meaningful at 0 or 1 too)."""
    p, z = hits / replications, 1.96
    centre = (p + z * z / (2 * replications)) / (1 + z * z / replications)
    half = z * math.sqrt(p * (1 - p) / replications + z * z / (4 * replications**2)) / (1 + z * z / replications)
    return {
        "rate": round(p, 4), "mc_se": round(math.sqrt(p * (1 - p) / replications), 4),
        "wilson95": [round(centre - half, 4), round(centre + half, 4)], "replications": replications,
    }


def coverage(before, replications: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 1.0, size=(replications, n))
    hits_before = hits_after = 0
    for row in d:
        i = before.bootstrap_interval(row)
        hits_before += i.low <= 0.0 <= i.high
        j = after.t_interval(row)
        hits_after += j.low <= 0.0 <= j.high
    return {"before": rate(hits_before, replications), "after": rate(hits_after, replications)}


def single_comparison(before, replications: int, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    hits_before = hits_after = 0
    for _ in range(replications):
        d = rng.normal(size=n) - rng.normal(size=n)
        hits_before += before.verdict(before.bootstrap_interval(d), "higher") != before.INCONCLUSIVE
        i = after.t_interval(d)
        hits_after += after.verdict(i, "higher", after.paired_t_pvalue(i), 0.05) != after.INCONCLUSIVE
    return {"before": rate(hits_before, replications), "after": rate(hits_after, replications)}


def null_per_run(rng, alphas=(0.1, 1.0, 100.0), seeds=range(5), sweep_alphas=(0.1,)) -> dict:
    """A compare study in which no algorithm differs (uplink bytes aside, fixed by construction).

    Both versions' keys."""
    per_run = {}
    for alpha in alphas:
        for s in seeds:
            shared = {"obj1": rng.normal(0.7, 0.08), "obj2": rng.normal(0.5, 0.05), "disp": rng.normal(2.8, 0.1),
                      "lam": rng.normal(0.1, 0.05), "rough": rng.normal(0.03, 0.01), "cos": rng.normal(0.9, 0.02)}
            for a in ALGORITHMS:
                o1, o2 = shared["obj1"] + rng.normal(0, 0.03), shared["obj2"] + rng.normal(0, 0.02)
                rough = shared["rough"] + rng.normal(0, 0.004)
                m = {
                    "final/obj1": o1, "final/obj2": o2, "final/mean": (o1 + o2) / 2,
                    "worst_client": min(o1, o2) + rng.normal(0, 0.01),
                    "update_dispersion_weighted": shared["disp"] + rng.normal(0, 0.05),
                    "lambda_dispersion": shared["lam"] + rng.normal(0, 0.02),
                    "eval_roughness": rough, "eval_change": rough,
                    "update_cosine": shared["cos"] + rng.normal(0, 0.01),
                    "equal_uplink/mean": (o1 + o2) / 2 + rng.normal(0, 0.02),
                    "equal_uplink/worst_client": min(o1, o2) + rng.normal(0, 0.02),
                    "uplink_bytes": 283_008.0 * (2 if a == "fmgda" else 1),
                }
                if alpha in sweep_alphas:
                    m["hypervolume"] = 0.05 + rng.normal(0, 0.002)
                per_run[(a, alpha, s)] = m
    return per_run


def family(before, replications_before: int, replications_after: int, seed: int) -> dict:
    baselines = ("local_mgda", "linear", "fmgda")
    rng = np.random.default_rng(seed)
    old_claims = before.default_claims(OBJECTIVES, baselines)
    hits_before, rows_before = 0, 0
    for _ in range(replications_before):
        table = before.claims_table(null_per_run(rng), "firm_beta1", old_claims)
        counted = [r for r in table if r["metric"] != "uplink_bytes"]
        rows_before = len(counted)
        hits_before += any(r["verdict"] != before.INCONCLUSIVE for r in counted)
    new_claims = after.default_claims(OBJECTIVES, baselines)
    hits_after = any_row_after = 0
    for _ in range(replications_after):
        table = after.claims_table(null_per_run(rng), "firm_beta1", new_claims)
        primary = [r for r in table if r["role"] == after.PRIMARY]
        hits_after += any(r["verdict"] != after.INCONCLUSIVE for r in primary)
        any_row_after += any(
            r["verdict"] in (after.SUPPORTED, after.CONTRADICTED) for r in table if r["role"] != after.BY_CONSTRUCTION
        )
    return {
        "shape": {"algorithms": len(ALGORITHMS), "alphas": 3, "seeds": 5, "rows_with_a_verdict_before": rows_before,
                  "primary_rows_after": len(primary), "rows_after": len(table)},
        "before": rate(hits_before, replications_before),
        "after": rate(hits_after, replications_after),
        "after_any_non_construction_row": rate(any_row_after, replications_after),
    }


def chance_equality(before) -> dict:
    per_run = {("firm", 0.1, 0): {"r": 0.5625}, ("firm", 0.1, 1): {"r": 0.6875},
               ("base", 0.1, 0): {"r": 0.5}, ("base", 0.1, 1): {"r": 0.625}}
    [old] = before.claims_table(per_run, "firm", [before.Claim("trade-off", "r", "higher", ("base",))])
    [new] = after.claims_table(per_run, "firm", [after.Claim("trade-off", "r", "higher", ("base",), primary=True)])
    return {"before": old["verdict"], "after": new["verdict"], "after_note": new["note"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer replications (larger Monte-Carlo error)")
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    scale = 0.2 if args.quick else 1.0
    before = load_before()
    tic = time.perf_counter()
    out = {
        "before_commit": BEFORE_COMMIT,
        "coverage": {f"n={n}": coverage(before, int(4000 * scale), n, args.seed + n) for n in (3, 5, 10)},
        "single_comparison_5_seeds": single_comparison(before, int(4000 * scale), 5, args.seed),
        "family": family(before, int(100 * scale), int(4000 * scale), args.seed),
        "chance_equality_2_seeds": chance_equality(before),
    }
    out["wall_s"] = round(time.perf_counter() - tic, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

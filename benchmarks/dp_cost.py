"""Reward cost of client-level differential privacy (DP-FedAvg) on the shortened tiny config.

    python benchmarks/dp_cost.py --seeds 0 1 2 --clip 1.0 --sigmas 0.3 1.0 [--fraction 0.5]

Runs, for every seed, the same federation (the config of tests/test_cli.py: 4 clients, 3 rounds,
4 local steps) without DP, with clipping only (σ = 0), and with clipping plus noise at each σ.
``--fraction`` sets federation.client_fraction q for every run: ⌈q·4⌉ clients per round without DP,
each client with probability q (Poisson sampling) with DP; min_clients is 1 (a Poisson round may
sample fewer clients, even none).
A run that stops (e.g. every client's gradients NaN) is reported with its error line.
Prints JSON: per setting, the final eval reward per objective (mean, std over seeds), its paired
difference against the run without DP (mean and a 95% t interval over seeds), and ε at δ = 1e-5.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cli import SHORT  # noqa: E402  the exact config the end-to-end test runs

from firm_lightning.cli import main  # noqa: E402

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run(seed: int, dp: list[str], fraction: float = 1.0) -> dict:
    with tempfile.TemporaryDirectory() as out, redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as err:
        try:
            main(["fit", *SHORT, f"--federation.seed={seed}", f"--federation.output_dir={out}",
                  f"--federation.client_fraction={fraction}", "--federation.min_clients=1", *dp])
        except SystemExit:  # e.g. so much noise that every client's gradients became NaN
            return {"failed": err.getvalue().strip().splitlines()[-1]}
        rows = list(csv.DictReader(open(Path(out) / "metrics.csv")))
    last = rows[-1]
    result = {k: float(v) for k, v in last.items() if k.startswith("eval/reward/")}
    if "privacy/epsilon" in last:
        result["epsilon"] = float(last["privacy/epsilon"])
    return result


def mean_ci(values: list[float]) -> dict:
    mean = statistics.mean(values)
    if len(values) < 2:
        return {"mean": mean}
    half = T95[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def main_() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--fraction", type=float, default=1.0, help="federation.client_fraction q")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {"no_dp": []}
    for sigma in [0.0, *args.sigmas]:
        settings[f"clip{args.clip:g}_sigma{sigma:g}"] = [f"--federation.privacy.clipping_norm={args.clip}",
                                                         f"--federation.privacy.noise_multiplier={sigma}"]
    tic = time.perf_counter()
    runs = {name: {s: run(s, dp, args.fraction) for s in args.seeds} for name, dp in settings.items()}
    report = {
        "seeds": args.seeds,
        "client_fraction": args.fraction,
        "config": "tests/test_cli.py SHORT (4 clients, 3 rounds, 4 local steps)",
        "settings": {},
    }
    for name, by_seed in runs.items():
        failed = {s: r["failed"] for s, r in by_seed.items() if "failed" in r}
        if failed:
            report["settings"][name] = {"failed": failed}
            continue
        entry = {}
        for key in [k for k in by_seed[args.seeds[0]] if k.startswith("eval/reward/")]:
            finals = [by_seed[s][key] for s in args.seeds]
            diffs = [by_seed[s][key] - runs["no_dp"][s][key] for s in args.seeds]
            entry[key] = {"final": mean_ci(finals), "minus_no_dp": mean_ci(diffs)}
        if "epsilon" in by_seed[args.seeds[0]]:
            entry["epsilon"] = by_seed[args.seeds[0]]["epsilon"]
        report["settings"][name] = entry
    report["wall_s"] = time.perf_counter() - tic
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main_()

"""Seed-to-seed spread of the eval rewards on the shortened tiny config used by tests/test_cli.py.

    python benchmarks/seed_spread.py --seeds 0 1 2 3 4

Prints JSON: per seed, the eval reward of each objective at round 0 and at the last round, and
per objective the mean and std across seeds of both, and of the change.
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
from contextlib import redirect_stdout
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cli import SHORT  # noqa: E402  the exact config the test runs

from firm_lightning.cli import main  # noqa: E402


def run(seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out, redirect_stdout(io.StringIO()):
        main(["fit", *SHORT, f"--federation.seed={seed}", f"--federation.output_dir={out}"])
        rows = list(csv.DictReader(open(Path(out) / "metrics.csv")))
    keys = [k for k in rows[0] if k.startswith("eval/reward/")]
    return {"first": {k: float(rows[0][k]) for k in keys}, "last": {k: float(rows[-1][k]) for k in keys}}


def main_() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    seeds = parser.parse_args().seeds
    tic = time.perf_counter()
    runs = {s: run(s) for s in seeds}
    summary = {}
    for key in runs[seeds[0]]["first"]:
        first = [runs[s]["first"][key] for s in seeds]
        last = [runs[s]["last"][key] for s in seeds]
        change = [b - a for a, b in zip(first, last)]
        summary[key] = {
            name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
            for name, v in (("first", first), ("last", last), ("change", change))
        }
    print(json.dumps({"seeds": seeds, "runs": runs, "summary": summary, "wall_s": time.perf_counter() - tic}, indent=2))


if __name__ == "__main__":
    main_()

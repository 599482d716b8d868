"""How long the command line takes to answer ``--help``, and what it imports to do so.

    python benchmarks/cli_import.py                       # this checkout, 3 repetitions
    python benchmarks/cli_import.py --before /tmp/base    # also a checkout of an earlier commit, interleaved

Each measurement is a fresh interpreter (``python -m firm_lightning ARGS``, from the checkout's
folder with it first on ``PYTHONPATH``): its wall time and the number of modules it imported. With
``--before``, the two checkouts alternate within each repetition and the JSON carries the ratio
after / before per command (medians), so a busy machine moves both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"--help": ["--help"], "fit --help": ["fit", "--help"], "validate --help": ["validate", "--help"]}
COUNT = "import runpy, sys, io, contextlib\nsys.argv = ['firm_lightning', *sys.argv[1:]]\n" \
        "with contextlib.redirect_stdout(io.StringIO()):\n    try:\n" \
        "        runpy.run_module('firm_lightning', run_name='__main__', alter_sys=True)\n" \
        "    except SystemExit:\n        pass\nprint(len(sys.modules))\n"


def measure(checkout: Path, args: list[str]) -> tuple[float, int]:
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONWARNINGS": "ignore"}
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "firm_lightning", *args], cwd=checkout, env=env, check=True,
                   capture_output=True)
    wall = time.perf_counter() - tic
    modules = subprocess.run([sys.executable, "-c", COUNT, *args], cwd=checkout, env=env, check=True,
                             capture_output=True, text=True).stdout.split()[-1]
    return wall, int(modules)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="a checkout of an earlier commit to compare with")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    checkouts = {"after": ROOT, **({"before": args.before.resolve()} if args.before else {})}
    times = {name: {c: [] for c in COMMANDS} for name in checkouts}
    modules = {name: {} for name in checkouts}
    for _ in range(args.reps):
        for command, argv in COMMANDS.items():
            for name, checkout in checkouts.items():
                wall, count = measure(checkout, argv)
                times[name][command].append(wall)
                modules[name][command] = count
    result = {"load_average_1min": os.getloadavg()[0], "reps": args.reps, "cpus": os.cpu_count()}
    for name in checkouts:
        result[name] = {c: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                            "modules": modules[name][c]} for c, v in times[name].items()}
    if args.before:
        result["after_over_before"] = {c: result["after"][c]["median_s"] / result["before"][c]["median_s"]
                                       for c in COMMANDS}
    result["load_average_1min_end"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

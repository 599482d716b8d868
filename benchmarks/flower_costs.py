"""Flower against the in-process orchestrator on one config: wall time, bytes, reward; and what
differential privacy and SecAgg+ cost.

    python benchmarks/flower_costs.py --out runs/flower_costs [--rounds 2] [--runs fit simulation ...]

Every run is the real command (``python -m firm_lightning ...``) on ``configs/tiny.yaml`` with
``--federation.num_rounds ROUNDS`` and the same seed, so runs differ only by engine or privacy.
Wall time is the whole command (imports, Ray or SuperLink start-up, teardown); every process
uses one intra-op thread (``OMP_NUM_THREADS=1``, as Ray gives each simulated client one CPU), so
the engines are compared at equal parallelism per client. Prints JSON:
per run, wall seconds, final eval rewards, mean per-client bytes per round (adapter payload and
Flower messages) and messages per client per round; ratios against ``fit`` and ``simulation``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "fit": ["fit"],
    "simulation": ["flower"],
    "local_deployment": ["flower", "--flower.engine", "local-deployment"],
    "secagg_plus": ["flower", "--flower.secure_aggregation", "firm_lightning.flower.settings.SecureAggregation"],
    "dp_z0.1_c2": [
        "flower",
        "--federation.privacy.noise_multiplier",
        "0.1",
        "--federation.privacy.clipping_norm",
        "2.0",
    ],
    "dp_z0.01_c2": [
        "flower",
        "--federation.privacy.noise_multiplier",
        "0.01",
        "--federation.privacy.clipping_norm",
        "2.0",
    ],
}


def run(name: str, args: list[str], out: Path, rounds: int) -> dict:
    run_dir = out / name
    command = [sys.executable, "-m", "firm_lightning", *args, "--config", str(ROOT / "configs" / "tiny.yaml"),
               "--federation.num_rounds", str(rounds), "--federation.output_dir", str(run_dir)]
    tic = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - tic
    if code != 0:
        return {"error": f"exit code {code}; see {out / f'{name}.log'}", "wall_s": wall}
    rounds_rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    clients = list(csv.DictReader(open(run_dir / "client_metrics.csv")))
    result = {
        "wall_s": round(wall, 1),
        "federation_s": round(sum(float(r["time/round_s"]) for r in rounds_rows[1:]), 1),
        "final_eval": {
            k.removeprefix("eval/reward/"): round(float(v), 4)
            for k, v in rounds_rows[-1].items()
            if k.startswith("eval/reward/")
        },
        "payload_up_per_client_round": statistics.mean(int(r["comm/bytes_up"]) for r in clients),
        "payload_down_per_client_round": statistics.mean(int(r["comm/bytes_down"]) for r in clients),
    }
    result.update(  # what the transport carried: Flower's serialised messages, or the tensors in-process
        transport_up_per_client_round=statistics.mean(int(r["comm/transport_bytes_up"]) for r in clients),
        transport_down_per_client_round=statistics.mean(int(r["comm/transport_bytes_down"]) for r in clients),
        messages_up_per_client_round=statistics.mean(int(r["comm/messages_up"]) for r in clients),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "flower_costs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {name: run(name, RUNS[name], args.out, args.rounds) for name in args.runs}
    ratios = {}
    for name, r in results.items():
        if "error" in r:
            continue
        if "fit" in results and "wall_s" in results["fit"]:
            ratios[f"{name}/fit wall"] = round(r["wall_s"] / results["fit"]["wall_s"], 2)
        if "flower_up_per_client_round" in r:
            ratios[f"{name} Flower/payload up"] = round(
                r["flower_up_per_client_round"] / r["payload_up_per_client_round"], 4
            )
            ratios[f"{name} Flower/payload down"] = round(
                r["flower_down_per_client_round"] / r["payload_down_per_client_round"], 4
            )
    print(
        json.dumps({"rounds": args.rounds, "config": "configs/tiny.yaml", "runs": results, "ratios": ratios}, indent=2)
    )


if __name__ == "__main__":
    main()

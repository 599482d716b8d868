"""Rerun the cheap measurements the docs quote and write their results files and figures.

The docs never type a measured number by hand: pages render them from ``docs/results/<name>.json``
(``docs/hooks/results.py``), and the strict docs build fails when a page quotes a number its results
file does not hold. This script owns the files it can regenerate in a couple of minutes:

    python scripts/refresh_results.py                  # the offline demo: 8 rounds of configs/tiny.yaml
    python scripts/refresh_results.py --keep DIR       # the same, keeping the run folder in DIR
    python scripts/refresh_results.py --run-dir DIR    # the same files from a finished demo run in DIR
    python scripts/refresh_results.py --check          # rerun, and fail if a quoted digit moved

``make results`` runs the first. It writes ``docs/results/tiny_demo.json`` and the figures
``docs/tiny_eval_rewards.png`` (also the README's and the home page's) and ``docs/tiny_lambdas.png``.
The expensive studies (claims, DP, Flower costs, ...) are not rerun here: their results files say the
command, date and machine of their last run.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DEMO = "tiny_demo"
DEMO_COMMAND = ["fit", "--config", "configs/tiny.yaml"]
FIGURES = {"eval_rewards.png": "tiny_eval_rewards.png", "lambdas.png": "tiny_lambdas.png"}
TIMING = "refresh_timing.json"  # written beside a run this script ran: its wall time and load
QUOTED_DIGITS = 3  # the pages quote rewards and λ to 3 decimals


def run_demo(run_dir: Path) -> dict:
    """Runs the demo into ``run_dir``; returns its wall time and the machine's load around it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "firm_lightning", *DEMO_COMMAND,
               f"--federation.output_dir={run_dir}", "--federation.overwrite=true", "--federation.progress=lines"]
    load_before, start = os.getloadavg()[0], time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - start
    timing = {"wall_s": round(wall, 1), "load": f"{load_before:.1f} → {os.getloadavg()[0]:.1f} (1-minute load "
              "average before → after; other jobs may share the cores)"}
    (run_dir / TIMING).write_text(json.dumps(timing, ensure_ascii=False))  # for a later --run-dir
    return timing


def recorded_timing(run_dir: Path) -> dict:
    path = run_dir / TIMING
    return json.loads(path.read_text()) if path.is_file() else {}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def number(text: str):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def demo_results(run_dir: Path, about: dict) -> dict:
    """The results file of a finished demo run: per-round table, the summary, per-client λ."""
    metrics, clients = rows(run_dir / "metrics.csv"), rows(run_dir / "client_metrics.csv")
    names = [c.removeprefix("eval/reward/") for c in metrics[0] if c.startswith("eval/reward/")]
    rounds = int(metrics[-1]["round"])
    reward = {n: [float(r[f"eval/reward/{n}"]) for r in metrics] for n in names}
    per_client = client_lambdas(clients, names)
    a_to_m = [c[f"lambda/{names[0]}"] for c in per_client.values()]
    trained = metrics[1:]
    values = {
        "config": demo_config(run_dir),
        "round0": {n: reward[n][0] for n in names},
        "final": {n: reward[n][-1] for n in names},
        "change": {n: reward[n][-1] - reward[n][0] for n in names},
        "lowest_after_round0": {"round": min(range(1, rounds + 1), key=lambda r: sum(reward[n][r] for n in names)),
                                **{n: min(reward[n][1:]) for n in names}},
        "bytes_up_per_round": int(first_value(clients, "comm/bytes_up")),
        "bytes_down_per_round": int(first_value(clients, "comm/bytes_down")),
        "lora_parameters": int(first_value(clients, "comm/bytes_up")) // 4,
        "client_mean_lambda": {"min": min(a_to_m), "max": max(a_to_m)},
        "client_lambda_by_round": {str(c): [float(r[f"lambda/{names[0]}"]) for r in clients if int(r["client"]) == c]
                                   for c in per_client},
        "lambda_dispersion_max": max(float(r["lambda_dispersion"]) for r in trained),
        "federation_s": round(sum(float(r["time/round_s"]) for r in trained), 1),
    }
    return {
        "about": about,
        "values": values,
        "tables": {
            "summary": {
                "columns": ["objective", "round 0", f"round {rounds}", "change"],
                "rows": [[f"`{n}`", reward[n][0], reward[n][-1], signed(reward[n][-1] - reward[n][0])] for n in names],
            },
            "eval_rewards": {
                "columns": ["round", *[f"`{n}`" for n in names], "λ dispersion", "update dispersion"],
                "rows": [[int(r["round"]), *[reward[n][i] for n in names], optional(r["lambda_dispersion"], 4),
                          optional(r["update_dispersion"], 3)] for i, r in enumerate(metrics)],
            },
            "client_lambdas": {
                "columns": ["client", "rounds", *[f"λ `{n}`" for n in names], "bytes up per round",
                            "bytes down per round"],
                "rows": [[c, v["rounds"], *[v[f"lambda/{n}"] for n in names], v["up"], v["down"]]
                         for c, v in per_client.items()],
            },
        },
    }


def demo_config(run_dir: Path) -> dict:
    """The settings the pages quote beside the results, from the run's resolved config."""
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = config["data"].get("init_args", config["data"])  # a class_path section once resolved
    federation, sampling = config["federation"], config["model"]["sampling"]
    return {
        "rounds": federation["num_rounds"],
        "clients": federation["num_clients"],
        "local_steps": config["trainer"]["max_steps"],
        "eval_prompts": data["eval_size"],
        "eval_samples": sampling["eval_num_generations"],
        "torch_threads": config.get("torch_threads"),
        "seed": federation["seed"],
    }


def client_lambdas(clients: list[dict], names: list[str]) -> dict:
    """Each client's λ averaged over its rounds (as the run's summary prints it), and its bytes per round."""
    out = {}
    for client in sorted({int(r["client"]) for r in clients}):
        mine = [r for r in clients if int(r["client"]) == client]
        out[client] = {
            "rounds": len(mine),
            **{f"lambda/{n}": sum(float(r[f"lambda/{n}"]) for r in mine) / len(mine) for n in names},
            "up": int(float(mine[0]["comm/bytes_up"])),
            "down": int(float(mine[0]["comm/bytes_down"])),
        }
    return out


def first_value(clients: list[dict], column: str) -> float:
    return float(clients[0][column])


def signed(value: float) -> str:
    return f"{value:+.{QUOTED_DIGITS}f}"


def optional(text: str, digits: int) -> str:
    return f"{float(text):.{digits}f}" if text else "–"


def quoted_differences(committed: dict, fresh: dict) -> list[str]:
    """Every quoted value (3 decimals; integers exactly) the fresh run does not reproduce."""
    moved = []

    def walk(a, b, where):
        if isinstance(a, dict):
            for k in a:
                walk(a[k], b.get(k) if isinstance(b, dict) else None, f"{where}.{k}")
        elif isinstance(a, list):
            for i, x in enumerate(a):
                walk(x, b[i] if isinstance(b, list) and i < len(b) else None, f"{where}[{i}]")
        elif isinstance(a, float) and isinstance(b, (int, float)):
            if round(a, QUOTED_DIGITS) != round(b, QUOTED_DIGITS):
                moved.append(f"{where}: committed {a:.{QUOTED_DIGITS}f}, fresh {b:.{QUOTED_DIGITS}f}")
        elif a != b:
            moved.append(f"{where}: committed {a!r}, fresh {b!r}")

    walk(committed["values"], fresh["values"], "values")
    walk(committed["tables"], fresh["tables"], "tables")
    return [m for m in moved if not m.startswith("values.federation_s")]


def dumps(results: dict) -> str:
    """JSON with one line per table row or list of numbers: a rerun's diff shows which numbers moved."""
    def compact(value, depth: int) -> str:
        pad, end = " " * (depth + 1), " " * depth
        if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
            return "[\n" + ",\n".join(pad + compact(v, depth + 1) for v in value) + "\n" + end + "]"
        if isinstance(value, dict) and value:
            items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {compact(v, depth + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + end + "}"
        return json.dumps(value, ensure_ascii=False)

    return compact(results, 0) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a finished demo run to read instead of running one")
    parser.add_argument("--keep", type=Path, help="run the demo into this folder (kept) instead of a temporary one")
    parser.add_argument("--check", action="store_true", help="compare with the committed file; write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or args.keep or Path(tmp) / "tiny"
        timing = recorded_timing(run_dir) if args.run_dir else run_demo(run_dir)
        about = {
            "title": "The offline demo",
            "command": "python -m firm_lightning " + " ".join(DEMO_COMMAND),
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            **timing,
            "provenance": "Written by `python scripts/refresh_results.py` from the run's metrics.csv and "
                          "client_metrics.csv.",
        }
        fresh = demo_results(run_dir, about)
        path = RESULTS / f"{DEMO}.json"
        if args.check:
            moved = quoted_differences(json.loads(path.read_text()), fresh)
            print("\n".join(moved) or f"{path}: every quoted number reproduced")
            return 1 if moved else 0
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(fresh))
        for source, target in FIGURES.items():
            shutil.copyfile(run_dir / "plots" / source, ROOT / "docs" / target)
        print(f"wrote {path} and {', '.join('docs/' + t for t in FIGURES.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

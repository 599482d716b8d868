"""SGD vs AdamW as the client optimiser on the shortened tiny config (paired over seeds).

    python benchmarks/optimizer_compare.py --seeds 0 1 2

Every optimiser runs the same seeds (same data split, client sampling and sampling seeds).
Prints JSON: per optimiser and seed the final eval reward per objective, the mean λ
dispersion and update dispersion over rounds; per optimiser the mean and 95% t-interval of
each; and the paired difference to AdamW with its 95% t-interval.
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

import torch
from safetensors.torch import load_file
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_cli import SHORT  # noqa: E402  the shortened tiny config the end-to-end test runs

from firm_lightning.cli import main  # noqa: E402

OPTIMIZERS = {
    # AdamW at the module's default settings (what the tiny config used before `optimizer:` existed)
    "adamw_lr0.01": ["--optimizer=AdamW", "--optimizer.lr=0.01", "--optimizer.weight_decay=0.0"],
    # SGD at the same nominal learning rate: a step is lr·d with ‖d‖ <= max_grad_norm = 1
    "sgd_lr0.01": ["--optimizer=SGD", "--optimizer.lr=0.01"],
    # larger SGD steps: Adam moves every active coordinate by ~lr, i.e. ~lr·√P in norm
    "sgd_lr1": ["--optimizer=SGD", "--optimizer.lr=1.0"],
    "sgd_lr10": ["--optimizer=SGD", "--optimizer.lr=10.0"],
    "sgd_lr100": ["--optimizer=SGD", "--optimizer.lr=100.0"],
}


def run(seed: int, name: str) -> dict:
    try:
        result = _run(seed, OPTIMIZERS[name])
    except (ValueError, FloatingPointError) as error:  # a step so large the gradients become non-finite
        result = {"failed": str(error).splitlines()[0]}
    print(json.dumps({"optimizer": name, "seed": seed, **result}), file=sys.stderr, flush=True)  # progress
    return result


def _run(seed: int, optimizer_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out, redirect_stdout(io.StringIO()):
        main(["fit", *SHORT, *optimizer_args, f"--federation.seed={seed}", f"--federation.output_dir={out}",
              "--federation.progress=off"])
        rows = list(csv.DictReader(open(Path(out) / "metrics.csv")))
        clients = list(csv.DictReader(open(Path(out) / "client_metrics.csv")))
        adapters = [load_file(str(Path(out) / "adapters" / f"round_{r:03d}.safetensors")) for r in range(len(rows))]
    result = {k: float(rows[-1][k]) for k in rows[0] if k.startswith("eval/reward/")}
    result.update(
        {f"change/{k}": float(rows[-1][k]) - float(rows[0][k]) for k in rows[0] if k.startswith("eval/reward/")}
    )
    for key in ("lambda_dispersion", "update_dispersion"):
        result[key] = statistics.mean(float(r[key]) for r in rows[1:])
    # ‖d‖ (the clipped min-norm direction, mean over local steps) and the global step per round
    result["direction_norm"] = statistics.mean(float(c["train/update_norm"]) for c in clients)
    result["global_step_norm"] = statistics.mean(
        float(torch.sqrt(sum(((b[k] - a[k]) ** 2).sum() for k in a))) for a, b in zip(adapters, adapters[1:])
    )
    return result


def interval(values: list[float]) -> dict:
    if not values:
        return {"mean": float("nan"), "ci95": [float("nan")] * 2}
    n, mean = len(values), statistics.mean(values)
    half = float(stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / n**0.5) if n > 1 else float("nan")
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def main_() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tic = time.perf_counter()
    runs = {name: {s: run(s, name) for s in args.seeds} for name in args.optimizers}
    ok = {name: {s: r for s, r in by_seed.items() if "failed" not in r} for name, by_seed in runs.items()}
    metrics = sorted({m for by_seed in ok.values() for r in by_seed.values() for m in r})
    summary = {
        name: {m: interval([r[m] for r in by_seed.values()]) for m in metrics}
        for name, by_seed in ok.items()
        if by_seed
    }
    base = "adamw_lr0.01"
    paired = {
        f"{name} - {base}": {
            m: interval([ok[name][s][m] - ok[base][s][m] for s in ok[name] if s in ok[base]]) for m in metrics
        }
        for name in ok
        if name != base and base in ok and ok[name]
    }
    print(json.dumps({"config": SHORT, "seeds": args.seeds, "runs": runs, "summary": summary, "paired": paired,
                      "wall_s": time.perf_counter() - tic}, indent=2))


if __name__ == "__main__":
    main_()

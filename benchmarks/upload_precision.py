"""16-bit uploads: the error of the aggregated update when clients upload their update
``Δ_i = θ_i − θ`` in 16 bits (now) against uploading their weights ``θ_i`` in 16 bits (before).

Trains the clients of one round of ``configs/tiny.yaml`` (4 clients, 6 local steps) from the
initial adapter and after ``--warm_rounds`` rounds, then aggregates their float32 adapters three
ways (float32, weights cast, updates cast) and adds a client that did not train.

    python benchmarks/upload_precision.py [--warm_rounds 2] [--learning_rate 1e-4]

prints JSON: per dtype, the relative error ‖U_16 − U_32‖ / ‖U_32‖ of the aggregated update, and
how far an idle client alone moves the global adapter, against the norm of the real update.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firm_lightning.adapters import ClientUpdate  # noqa: E402
from firm_lightning.aggregation import FedAvg  # noqa: E402
from firm_lightning.config import build_components  # noqa: E402
from firm_lightning.orchestrator import FederatedOrchestrator  # noqa: E402
from firm_lightning.trainer_factory import TrainerFactory, quiet_lightning  # noqa: E402


def flat(state: dict, reference: dict) -> torch.Tensor:
    return torch.cat([(state[k].float() - v.float()).flatten() for k, v in reference.items()])


def measure(uploads: list[ClientUpdate], theta: dict) -> dict:
    exact = flat(FedAvg().aggregate(theta, uploads).adapter, theta)
    idle = ClientUpdate(99, [dict(theta)], uploads[0].num_examples, {})
    out = {"update_norm": float(exact.norm())}
    for dtype in (torch.bfloat16, torch.float16):
        weights = [
            ClientUpdate(u.client_id, [{k: t.to(dtype).float() for k, t in u.adapters[0].items()}], u.num_examples, {})
            for u in uploads
        ]
        deltas = [u.for_upload(theta, dtype).applied_to(theta) for u in uploads]
        name = str(dtype).removeprefix("torch.")
        out[name] = {
            "relative_error_weights_cast": float(
                (flat(FedAvg().aggregate(theta, weights).adapter, theta) - exact).norm() / exact.norm()
            ),
            "relative_error_update_cast": float(
                (flat(FedAvg().aggregate(theta, deltas).adapter, theta) - exact).norm() / exact.norm()
            ),
            "idle_client_moves_weights_cast": float(
                flat({k: t.to(dtype).float() for k, t in theta.items()}, theta).norm()
            ),
            "idle_client_moves_update_cast": float(
                flat(idle.for_upload(theta, dtype).applied_to(theta).adapters[0], theta).norm()
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--warm_rounds", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=None, help="model.learning_rate (small: small updates)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        comps = build_components(
            [
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--federation.output_dir",
                tmp,
                "--federation.num_rounds",
                str(max(1, args.warm_rounds)),
                "--federation.progress",
                "off",
                *(["--model.learning_rate", str(args.learning_rate)] if args.learning_rate else []),
            ]
        )
        orchestrator = FederatedOrchestrator(comps.module, comps.datamodule, comps.federation,
                                             TrainerFactory(comps.trainer_config, tmp), echo=lambda _: None)
        comps.datamodule.setup()
        with quiet_lightning(True):
            start = comps.module.adapter_state()
            report["round_1_from_initial_adapter"] = measure(
                [orchestrator.train_one(start, c, 1) for c in range(4)], start
            )
            if args.warm_rounds:
                theta = orchestrator.run().global_adapter
                nxt = args.warm_rounds + 1
                report[f"round_{nxt}_after_{args.warm_rounds}_rounds"] = measure(
                    [orchestrator.train_one(theta, c, nxt) for c in range(4)], theta)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

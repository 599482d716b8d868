"""DP-FedAvg: clipping, the noise scale, and ε as Opacus' accountant computes it."""

from __future__ import annotations

import csv

import pytest
import torch
from opacus.accountants import RDPAccountant

from conftest import make_datamodule, make_module
from firm_lightning.aggregation import CoordinateMedian, FedAvg
from firm_lightning.client import ClientUpdate
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.privacy import DifferentialPrivacy, clip_update
from firm_lightning.trainer_factory import TrainerFactory


def test_updates_are_clipped_to_the_norm_and_averaged_with_equal_weights():
    g = {"w": torch.zeros(2)}
    long, short = ClientUpdate(0, [{"w": torch.tensor([30.0, 40.0])}], 100, {}), ClientUpdate(1, [{"w": torch.tensor([0.3, 0.4])}], 1, {})
    assert torch.allclose(clip_update(long, g, 1.0)["w"], torch.tensor([0.6, 0.8]))
    assert torch.allclose(clip_update(short, g, 1.0)["w"], torch.tensor([0.3, 0.4]))
    out = DifferentialPrivacy(FedAvg(), clip_norm=1.0, noise_multiplier=0.0, clients_per_round=2).aggregate(g, [long, short])
    assert torch.allclose(out.adapter["w"], torch.tensor([0.45, 0.6]))  # (0.6+0.3)/2, (0.8+0.4)/2


def test_noise_std_is_sigma_times_clip_over_clients():
    dp = DifferentialPrivacy(FedAvg(server_lr=1.0), clip_norm=0.5, noise_multiplier=2.0, clients_per_round=4)
    assert dp.noise_std == pytest.approx(2.0 * 0.5 / 4)
    g = {"w": torch.zeros(400_000)}
    torch.manual_seed(0)
    noise = dp.aggregate(g, [ClientUpdate(i, [dict(g)], 1, {}) for i in range(4)]).adapter["w"]
    # sample std of 400k Gaussians: relative standard error ≈ 1/sqrt(2n) ≈ 0.11%
    assert float(noise.std()) == pytest.approx(0.25, rel=0.01)
    assert abs(float(noise.mean())) < 5 * 0.25 / 400_000**0.5
    with pytest.raises(ValueError, match="needs FedAvg aggregation; got CoordinateMedian"):
        DifferentialPrivacy(CoordinateMedian(), 1.0, 1.0, 2)


def test_epsilon_per_round_matches_opacus_accountant(tmp_path):
    sigma, delta, rounds = 1.1, 1e-5, 2
    config = FederationConfig(num_rounds=rounds, num_clients=2, client_fraction=0.5, output_dir=str(tmp_path),
                              dp_clip_norm=0.1, dp_noise_multiplier=sigma, dp_delta=delta)
    orch = FederatedOrchestrator(make_module(), make_datamodule(2), config,
                                 TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path), echo=lambda _: None)
    orch.run()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))[1:]
    accountant = RDPAccountant()
    for r, row in enumerate(rows, start=1):
        accountant.step(noise_multiplier=sigma, sample_rate=0.5)  # one client of two per round
        assert float(row["privacy/epsilon"]) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
        assert float(row["privacy/noise_std"]) == pytest.approx(sigma * 0.1 / 1)
    assert len(rows) == rounds

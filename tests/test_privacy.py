"""DP-FedAvg: clipping, the noise scale, ε as Opacus' accountant computes it, and noise that no
reader of the config can regenerate."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from conftest import make_datamodule, make_module
from firm_lightning.aggregation import CoordinateMedian, FedAvg
from firm_lightning.client import ClientUpdate
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.privacy import DifferentialPrivacy, SecretGenerator, clip_delta
from firm_lightning.trainer_factory import TrainerFactory


def test_updates_are_clipped_to_the_norm_and_averaged_with_equal_weights():
    g = {"w": torch.zeros(2)}
    long, short = (
        ClientUpdate(0, [{"w": torch.tensor([30.0, 40.0])}], 100, {}),
        ClientUpdate(1, [{"w": torch.tensor([0.3, 0.4])}], 1, {}),
    )
    assert torch.allclose(clip_delta(long.adapters[0], 1.0)["w"], torch.tensor([0.6, 0.8]))
    assert torch.allclose(clip_delta(short.adapters[0], 1.0)["w"], torch.tensor([0.3, 0.4]))
    dp = DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=0.0)
    out = dp.wrap(FedAvg(), 2, SecretGenerator()).aggregate(g, [long, short])
    assert torch.allclose(out.adapter["w"], torch.tensor([0.45, 0.6]))  # (0.6+0.3)/2, (0.8+0.4)/2
    # A sampled client that failed counts as a zero delta: the mean is over the m sampled.
    assert torch.allclose(dp.wrap(FedAvg(), 3, SecretGenerator()).aggregate(g, [long, short]).adapter["w"],
                          torch.tensor([0.3, 0.4]))


def test_noise_std_is_sigma_times_clip_over_sampled_clients():
    dp = DifferentialPrivacy(clipping_norm=0.5, noise_multiplier=2.0)
    private = dp.wrap(FedAvg(server_lr=1.0), 4, SecretGenerator())
    assert private.noise_std == pytest.approx(2.0 * 0.5 / 4)
    g = {"w": torch.zeros(400_000)}
    noise = private.aggregate(g, [ClientUpdate(i, [dict(g)], 1, {}) for i in range(4)]).adapter["w"]
    # sample std of 400k Gaussians: relative standard error ≈ 1/sqrt(2n) ≈ 0.11%
    assert float(noise.std()) == pytest.approx(0.25, rel=0.01)
    assert abs(float(noise.mean())) < 5 * 0.25 / 400_000**0.5
    with pytest.raises(ValueError, match="needs FedAvg aggregation; got CoordinateMedian"):
        dp.wrap(CoordinateMedian(), 2, SecretGenerator())
    with pytest.raises(ValueError, match="federation.privacy.clipping_norm must be > 0"):
        DifferentialPrivacy(clipping_norm=0.0, noise_multiplier=1.0)


def test_the_secret_generator_resumes_exactly_and_two_generators_differ():
    a, b = SecretGenerator(), SecretGenerator()
    saved = a.state_dict()
    first = torch.randn(5, generator=a.generator)
    assert not torch.equal(first, torch.randn(5, generator=b.generator))  # seeded from the OS, not from a config
    a.load_state_dict(saved)
    assert torch.equal(first, torch.randn(5, generator=a.generator))


def _private_run(tmp_path, sigma=1.1, delta=1e-5, rounds=2, num_clients=2, fraction=0.5):
    config = FederationConfig(
        num_rounds=rounds,
        num_clients=num_clients,
        client_fraction=fraction,
        output_dir=str(tmp_path),
        privacy=DifferentialPrivacy(clipping_norm=0.1, noise_multiplier=sigma, delta=delta),
    )
    orch = FederatedOrchestrator(make_module(), make_datamodule(num_clients), config,
                                 TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path), echo=lambda _: None)
    return orch, orch.run()


def test_epsilon_per_round_matches_opacus_accountant(tmp_path):
    sigma, delta, rounds = 1.1, 1e-5, 2
    _private_run(tmp_path, sigma, delta, rounds)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))[1:]
    accountant = RDPAccountant()
    for row in rows:
        accountant.step(noise_multiplier=sigma, sample_rate=0.5)  # one client of two per round
        assert float(row["privacy/epsilon"]) == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
        assert float(row["privacy/noise_std"]) == pytest.approx(sigma * 0.1 / 1)
    assert len(rows) == rounds


def test_the_released_adapter_hides_noise_that_the_config_cannot_regenerate(tmp_path):
    """Two runs of one config release different adapters; and the noise is not what torch would
    draw from any seed a reader can derive from the config (federation.seed, the round)."""
    orch_a, a = _private_run(tmp_path / "a", sigma=5.0, rounds=1, num_clients=2, fraction=1.0)
    orch_b, b = _private_run(tmp_path / "b", sigma=5.0, rounds=1, num_clients=2, fraction=1.0)
    released = load_file(str(tmp_path / "a" / "adapters" / "round_001.safetensors"))
    assert any(not torch.equal(a.global_adapter[k], b.global_adapter[k]) for k in a.global_adapter)
    # The noiseless mean of the same clipped updates (both runs trained the same clients alike).
    start = load_file(str(tmp_path / "a" / "adapters" / "round_000.safetensors"))
    dp = DifferentialPrivacy(clipping_norm=0.1, noise_multiplier=0.0)
    orch_a.module.load_adapter_state(start)
    orch_a.datamodule.setup()
    uploads = [orch_a.train_one(start, c, 1) for c in (0, 1)]
    noiseless = dp.wrap(FedAvg(), 2, SecretGenerator()).aggregate(start, uploads).adapter
    noise = {k: released[k] - noiseless[k] for k in released}
    std = 5.0 * 0.1 / 2
    assert float(torch.cat([n.flatten() for n in noise.values()]).std()) == pytest.approx(std, rel=0.1)
    # What a reader could regenerate: torch's generator seeded by anything derived from the config.
    seed = orch_a.config.seed
    candidates = [seed, 1, int(np.random.SeedSequence([seed, 1], spawn_key=(1,)).generate_state(1)[0]),
                  int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])]
    for candidate in candidates:
        gen = torch.Generator().manual_seed(candidate)
        guess = {k: std * torch.randn(v.shape, generator=gen) for k, v in noise.items()}
        residual = torch.cat([(noise[k] - guess[k]).flatten() for k in noise])
        assert float(residual.std()) > std  # subtracting the guess adds noise instead of removing it

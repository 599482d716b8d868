"""The round engine's rules that do not need a transport: the sample size, who samples, what
hidden uploads (SecAgg+) refuse, privacy on a secure sum, and a Flower client's own state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import make_datamodule, make_module
from firm_lightning.adapters import ClientUpdate
from firm_lightning.aggregation import FedAvg
from firm_lightning.engine import RoundEngine
from firm_lightning.federation import refuse_for_hidden_uploads
from firm_lightning.federation import FederationConfig
from firm_lightning.flower.client_state import ClientStateFiles
from firm_lightning.privacy import DifferentialPrivacy, SecretGenerator, clip_state
from firm_lightning.seeds import sampling_rng
from firm_lightning.trainer_factory import TrainerFactory


@pytest.mark.parametrize("q, n, m", [(0.14, 50, 7), (0.55, 100, 55), (0.07, 100, 7), (0.1, 30, 3), (1 / 3, 3, 1),
                                     (0.3, 10, 3), (0.25, 4, 1), (1.0, 7, 7), (0.01, 10, 1)])
def test_clients_per_round_is_exact(q, n, m):
    assert FederationConfig(num_clients=n, client_fraction=q).clients_per_round == m
    assert FederationConfig(num_clients=n, client_fraction=q, min_clients=min(n, m + 1)).clients_per_round == min(
        n, m + 1
    )


@pytest.fixture(scope="module")
def parts():
    return make_module(), make_datamodule(10)


def _engine(parts, tmp_path, **federation) -> RoundEngine:
    module, data = parts
    config = FederationConfig(num_clients=10, output_dir=str(tmp_path), **federation)
    return RoundEngine(
        module, data, config, TrainerFactory({"max_steps": 1, "logger": False}, tmp_path), echo=lambda _: None
    )


def test_public_sampling_follows_the_seed_and_private_sampling_does_not(parts, tmp_path):
    public = _engine(parts, tmp_path, client_fraction=0.3)
    expected = sorted(int(c) for c in sampling_rng(0, 4).choice(10, size=3, replace=False))
    assert public.sample_clients(4) == public.sample_clients(4) == expected
    dp = DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=1.0)
    draws = {tuple(_engine(parts, tmp_path, client_fraction=0.3, privacy=dp).sample_clients(4)) for _ in range(8)}
    assert len(draws) > 1  # C(10, 3) = 120 samples: 8 equal draws would have probability 120^-7
    private = _engine(parts, tmp_path, client_fraction=0.3, privacy=dp)
    saved = private.secret.state_dict()
    first = private.sample_clients(4)
    private.secret.load_state_dict(saved)
    assert private.sample_clients(4) == first  # what the checkpoint restores on resume


def test_private_sampling_is_poisson_at_the_client_fraction(parts, tmp_path):
    """Under privacy each client trains independently with probability q (the sampling the ε is computed for):
    the sample size varies as Binomial(N, q) and every client is in a fraction q of the rounds (6,000 draws,
    bounds at 5 standard errors)."""
    n, q, draws = 10, 0.3, 6000
    engine = _engine(parts, tmp_path, client_fraction=q, privacy=DifferentialPrivacy(clipping_norm=1.0,
                                                                                     noise_multiplier=1.0))
    samples = [engine.sample_clients(1) for _ in range(draws)]
    sizes = np.array([len(s) for s in samples])
    assert abs(sizes.mean() - n * q) < 5 * (n * q * (1 - q) / draws) ** 0.5
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.1)
    assert (sizes == 0).any() and (sizes >= 6).any()  # not a fixed size
    rates = np.bincount(np.concatenate([np.array(s, dtype=int) for s in samples]), minlength=n) / draws
    assert np.all(np.abs(rates - q) < 5 * (q * (1 - q) / draws) ** 0.5)
    assert all(s == sorted(set(s)) for s in samples)
    assert engine.aggregator.expected_clients == pytest.approx(n * q)  # the noisy sum is divided by q·N


def test_hidden_uploads_refuse_what_needs_one_upload_at_a_time(parts, tmp_path):
    for setting, named in (
        ({"max_update_norm": 1.0}, "max_update_norm"),
        ({"aggregator": "median"}, "aggregator=median"),
        ({"upload_dtype": "float16"}, "upload_dtype"),
    ):
        with pytest.raises(ValueError, match=f"SecAgg\\+.*{named}"):
            refuse_for_hidden_uploads(FederationConfig(num_clients=10, **setting))
        with pytest.raises(ValueError, match="cannot honour"):
            _engine(parts, tmp_path, **setting).__class__(*parts, FederationConfig(num_clients=10, **setting),
                                                          TrainerFactory({"max_steps": 1}), uploads_visible=False)
    refuse_for_hidden_uploads(FederationConfig(num_clients=10))  # plain FedAvg is fine


def test_privacy_on_a_secure_sum_equals_privacy_on_the_single_uploads():
    """Under SecAgg+ the clients clip and weigh one each; the server gets their mean and its count.
    Without noise the aggregate equals server-side clipping of the single uploads (sum over m sampled)."""
    gen = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(6, generator=gen)}
    states = [{"w": theta["w"] + s * torch.randn(6, generator=gen)} for s in (0.1, 3.0, 10.0)]
    dp = DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=0.0)
    server_side = dp.wrap(FedAvg(), 4, SecretGenerator()).aggregate(
        theta, [ClientUpdate(i, [s], 5, {}) for i, s in enumerate(states)]
    )
    clipped = [clip_state(s, theta, 1.0) for s in states]
    mean = {"w": sum(c["w"] for c in clipped) / 3}
    secure = dp.wrap(FedAvg(), 4, SecretGenerator(), clipped_on_client=True).aggregate(
        theta, [ClientUpdate(-1, [mean], 3, {})]
    )
    torch.testing.assert_close(secure.adapter["w"], server_side.adapter["w"])
    assert float((clipped[2]["w"] - theta["w"]).norm()) == pytest.approx(1.0)


def test_a_flower_client_reads_back_its_state_from_before_the_round_it_trains(tmp_path):
    """A resumed server may replay a round the client already trained: it must start from the
    state after its previous round, not from the one it saved in the interrupted round."""
    for round_idx, value in ((1, 1.0), (3, 3.0), (5, 5.0)):
        store = ClientStateFiles(tmp_path, round_idx)
        store["0"] = {"optimizer": {"step": torch.tensor(value)}}
        store.save()
    assert ClientStateFiles(tmp_path, 1).get("0") is None  # nothing before round 1
    assert float(ClientStateFiles(tmp_path, 5).get("0")["optimizer"]["step"]) == 3.0  # replaying round 5
    assert float(ClientStateFiles(tmp_path, 6).get("0")["optimizer"]["step"]) == 5.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_00003", "round_00005"]  # the last two kept


def test_epsilon_uses_the_exact_sampling_rate(parts, tmp_path):
    dp = DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=1.0)
    engine = _engine(parts, tmp_path, client_fraction=0.3, privacy=dp)
    metrics = engine._privacy_metrics(2)
    assert metrics["privacy/epsilon"] == pytest.approx(dp.epsilon(0.3, 2))
    assert metrics["privacy/noise_std"] == pytest.approx(1.0 / 3)
    assert math.isinf(DifferentialPrivacy(clipping_norm=1.0, noise_multiplier=0.0).epsilon(0.3, 1))

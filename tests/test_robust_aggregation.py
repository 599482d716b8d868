"""Coordinate-wise median and trimmed mean: hand-made cases, config selection, and one adversarial
client on the tiny setup, where FedAvg is dragged away and the robust rules are not."""

from __future__ import annotations

import pytest
import torch

from conftest import make_datamodule, make_module
from firm_lightning.aggregation import CoordinateMedian, FedAvg, TrimmedMean
from firm_lightning.algorithms import FMGDA
from firm_lightning.client import ClientUpdate
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.trainer_factory import TrainerFactory


def _updates(*values):
    return [ClientUpdate(i, [{"w": torch.tensor(v)}], 1 + i, {}) for i, v in enumerate(values)]


def test_median_and_trimmed_mean_on_hand_made_updates():
    g = {"w": torch.zeros(2)}
    ups = _updates([1.0, -1.0], [2.0, 0.0], [3.0, 100.0], [-50.0, 1.0])
    # per coordinate sorted: [-50, 1, 2, 3] → median 1.5; [-1, 0, 1, 100] → 0.5
    assert torch.allclose(CoordinateMedian(1.0).aggregate(g, ups).adapter["w"], torch.tensor([1.5, 0.5]))
    assert torch.allclose(CoordinateMedian(0.5).aggregate(g, ups[:3]).adapter["w"], torch.tensor([1.0, 0.0]))
    # trim ⌊0.25·4⌋ = 1 from each end: mean of the middle two
    assert torch.allclose(TrimmedMean(1.0, 0.25).aggregate(g, ups).adapter["w"], torch.tensor([1.5, 0.5]))
    # trim 0 is the unweighted mean (FedAvg weights by example counts instead)
    assert torch.allclose(TrimmedMean(1.0, 0.0).aggregate(g, ups).adapter["w"], torch.tensor([-11.0, 25.0]))
    with pytest.raises(ValueError, match=r"trim_fraction must be in \[0, 0.5\)"):
        TrimmedMean(1.0, 0.5)


def _orchestrator(tmp_path, num_clients=3, **federation):
    config = FederationConfig(num_rounds=1, num_clients=num_clients, output_dir=str(tmp_path), **federation)
    factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path)
    return FederatedOrchestrator(make_module(), make_datamodule(num_clients), config, factory, echo=lambda _: None)


def test_robust_rules_are_selected_from_the_config_and_refused_for_fmgda(tmp_path):
    module, data = make_module(), make_datamodule(2)
    factory = TrainerFactory({"max_steps": 1}, tmp_path)
    build = lambda algorithm=None, **f: FederatedOrchestrator(
        module, data, FederationConfig(num_clients=2, output_dir=str(tmp_path), **f), factory, algorithm)
    assert type(build(aggregator="median", server_lr=0.5).engine.aggregator) is CoordinateMedian
    trimmed = build(aggregator="trimmed_mean", trim_fraction=0.3).engine.aggregator
    assert type(trimmed) is TrimmedMean and trimmed.trim_fraction == 0.3
    with pytest.raises(ValueError, match="aggregates with MinNormOverObjectives; use a single-adapter algorithm"):
        build(FMGDA(), aggregator="median")


def test_one_adversarial_client_drags_fedavg_but_not_median_or_trimmed_mean(tmp_path):
    orch = _orchestrator(tmp_path)
    orch.datamodule.setup()
    theta = orch.module.adapter_state()
    honest = [orch.train_one(theta, c, 1) for c in range(3)]
    # Client 2 turns adversarial: it sends its own update reversed and 1000× larger.
    bad = {k: theta[k] - 1000 * (v - theta[k]) for k, v in honest[2].adapters[0].items()}
    updates = [*honest[:2], ClientUpdate(2, [bad], honest[2].num_examples, honest[2].metrics)]
    flat = lambda s: torch.cat([(s[k] - theta[k]).flatten() for k in theta])
    honest_deltas = torch.stack([flat(u.adapters[0]) for u in honest[:2]])
    lo, hi = honest_deltas.min(0).values, honest_deltas.max(0).values
    norms, rewards = {}, {}
    for name, aggregator in {
        "fedavg": FedAvg(),
        "median": CoordinateMedian(),
        "trimmed_mean": TrimmedMean(trim_fraction=0.34),
    }.items():
        new = aggregator.aggregate(theta, updates).adapter
        delta = flat(new)
        norms[name] = float(delta.norm())
        rewards[name] = orch.engine.evaluate(new)
        if name != "fedavg":  # every coordinate stays within the honest clients' range
            assert bool(((delta >= lo - 1e-6) & (delta <= hi + 1e-6)).all()), name
    honest_norm = float(honest_deltas.norm(dim=1).max())
    print({"update_norm": norms, "honest_max_norm": honest_norm, "eval": rewards})
    assert norms["fedavg"] > 50 * honest_norm
    assert norms["median"] <= honest_norm and norms["trimmed_mean"] <= honest_norm

"""Claims as statistics: bootstrap intervals, verdicts, paired tables; per-client and greedy evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import make_datamodule, make_module
from firm_lightning.claims import (
    CONTRADICTED, INCONCLUSIVE, SUPPORTED, Claim, Interval, bootstrap_interval, claims_table,
    consecutive_update_cosine, reward_at_uplink, verdict,
)
from firm_lightning.module import SamplingSettings
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.trainer_factory import TrainerFactory


def test_bootstrap_interval_of_a_normal_mean_matches_the_textbook_interval():
    rng = np.random.default_rng(0)
    d = rng.normal(0.3, 1.0, size=400)
    i = bootstrap_interval(d)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))  # the normal-theory 95 % interval, ≈ ±0.098
    assert i.mean == pytest.approx(d.mean())
    assert i.low == pytest.approx(d.mean() - half, abs=0.01)
    assert i.high == pytest.approx(d.mean() + half, abs=0.01)
    assert i.n == 400


def test_bootstrap_interval_edge_cases():
    assert bootstrap_interval([2.0, 2.0, 2.0]) == Interval(2.0, 2.0, 2.0, 3)  # a difference fixed by construction
    one = bootstrap_interval([0.5])
    assert (one.low, one.high) == (-math.inf, math.inf)  # one seed concludes nothing
    assert bootstrap_interval([math.nan, 1.0, 3.0]).n == 2  # undefined values are left out
    # The percentile interval of the mean of 5 values lies within their range.
    i = bootstrap_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert 1.0 <= i.low < 3.0 < i.high <= 5.0


@pytest.mark.parametrize(
    "low, high, better, expected",
    [
        (-0.3, -0.1, "lower", SUPPORTED),
        (0.1, 0.3, "lower", CONTRADICTED),
        (-0.1, 0.2, "lower", INCONCLUSIVE),
        (0.1, 0.3, "higher", SUPPORTED),
        (-0.3, -0.1, "higher", CONTRADICTED),
        (-0.2, 0.1, "higher", INCONCLUSIVE),
    ],
)
def test_verdict_reads_the_interval_on_the_predicted_side(low, high, better, expected):
    assert verdict(Interval((low + high) / 2, low, high, 5), better) == expected


def test_verdict_is_inconclusive_with_one_seed_or_inside_the_noise_floor():
    assert verdict(Interval(-1.0, -math.inf, math.inf, 1), "lower") == INCONCLUSIVE
    assert verdict(Interval(-1.0, -1.5, -0.5, 2), "lower") == INCONCLUSIVE  # 2 seeds: the interval is their range
    assert verdict(Interval(-1.0, -1.0, -1.0, 2), "lower") == SUPPORTED  # the same on every seed: by construction
    assert verdict(Interval(0.02, 0.01, 0.03, 5), "higher", noise_floor=0.05) == INCONCLUSIVE
    assert verdict(Interval(0.02, 0.01, 0.03, 5), "higher", noise_floor=0.0) == SUPPORTED


def test_claims_table_pairs_on_seed():
    # The baseline varies a lot from seed to seed, FIRM is always 0.01 below it: unpaired
    # intervals would overlap, the paired difference is -0.01 on every seed.
    baseline = [0.5, 1.5, 0.2, 2.0, 0.9]
    per_run = {}
    for seed, b in enumerate(baseline):
        per_run[("local_mgda", 0.1, seed)] = {"drift": b, "reward": b}
        per_run[("firm", 0.1, seed)] = {"drift": b - 0.01, "reward": b - 0.01 * (-1) ** seed}
    claims = [Claim("drift", "drift", "lower", ("local_mgda",)), Claim("trade-off", "reward", "higher", ("local_mgda",))]
    drift, reward = claims_table(per_run, "firm", claims)
    assert drift["interval"].mean == pytest.approx(-0.01) and drift["interval"].high == pytest.approx(-0.01)
    assert drift["verdict"] == SUPPORTED
    assert reward["verdict"] == INCONCLUSIVE  # +0.01, -0.01, ... straddles 0


def test_update_cosine_and_equal_uplink_on_hand_made_runs():
    import torch

    straight = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}]
    zigzag = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 0.0])}]
    assert consecutive_update_cosine(straight) == pytest.approx(1.0)
    assert consecutive_update_cosine(zigzag) == pytest.approx(-1.0)
    rows = [{"round": r, "comm/bytes_up": 200 * 2, "clients": 2, "eval/reward/a": r / 10} for r in range(5)]
    at = reward_at_uplink(rows, budget=400.0, objectives=["a"])  # 200 B per client per round: 2 rounds
    assert at["equal_uplink/round"] == 2 and at["equal_uplink/mean"] == pytest.approx(0.2)


def _orchestrator(tmp_path, module, datamodule):
    config = FederationConfig(num_rounds=1, num_clients=datamodule.num_clients, output_dir=str(tmp_path))
    factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path)
    return FederatedOrchestrator(module, datamodule, config, factory, echo=lambda _: None)


def test_per_client_eval_weights_group_rewards_by_each_clients_share(tmp_path):
    data = make_datamodule(3, partition="dirichlet", dirichlet_alpha=0.3)
    module = make_module()
    orchestrator = _orchestrator(tmp_path, module, data)
    groups = sorted(set(data.train_groups))
    metrics = {f"eval/group/{g}/{n}": float(k + s) / 10 for k, g in enumerate(groups) for s, n in enumerate(module.objective_names)}
    result = orchestrator.client_evaluation(metrics)
    expected = []
    for indices in data.client_indices:
        own = [data.train_groups[i] for i in indices]
        expected.append([sum(own.count(g) * metrics[f"eval/group/{g}/{n}"] for g in groups) / len(own)
                         for n in module.objective_names])
    expected = np.array(expected)
    for s, n in enumerate(module.objective_names):
        assert result[f"eval/client_mean/{n}"] == pytest.approx(expected[:, s].mean())
        assert result[f"eval/worst_client/{n}"] == pytest.approx(expected[:, s].min())
    assert result["eval/worst_client/mean"] == pytest.approx(expected.mean(1).min())
    assert result["eval/worst_client/mean"] < result[f"eval/client_mean/{module.objective_names[0]}"] + 0.1


def test_a_run_records_per_client_eval_and_greedy_eval_ignores_the_seed(tmp_path):
    data = make_datamodule(2, partition="dirichlet", dirichlet_alpha=0.5)
    module = make_module(sampling=SamplingSettings(max_new_tokens=8, num_generations=2, eval_greedy=True))
    orchestrator = _orchestrator(tmp_path, module, data)
    state = orchestrator.run()
    assert {"eval/worst_client/mean", "eval/client_mean/a_to_m", "update_dispersion_weighted"} <= set(state.history[-1])
    assert "eval/worst_client/mean" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    adapter = state.global_adapter
    first = orchestrator.evaluate(adapter)
    module.sampling.eval_seed += 1
    assert orchestrator.evaluate(adapter) == first  # greedy: no sampling noise
    module.sampling.eval_greedy = False
    sampled = orchestrator.evaluate(adapter)
    module.sampling.eval_seed += 1
    assert orchestrator.evaluate(adapter) != sampled  # sampled evaluation does depend on the seed


def test_compare_reports_paired_claims_and_reuses_finished_runs(tmp_path):
    from firm_lightning.algorithms import FIRM, FMGDA
    from firm_lightning.compare import CompareSettings, claims_report, run_comparison
    from firm_lightning.federation_metrics import payload_bytes

    module = make_module()
    data = make_datamodule(2, partition="dirichlet", dirichlet_alpha=1.0)
    federation = FederationConfig(num_rounds=2, num_clients=2, output_dir=str(tmp_path))
    settings = CompareSettings([FIRM(beta=1.0), FMGDA()], seeds=[0, 1, 2])
    trainer = {"max_steps": 1, "accelerator": "cpu"}
    rows = run_comparison(module, data, federation, trainer, settings, echo=lambda _: None)
    table, text = claims_report(rows, module.objective_names, tmp_path, settings)
    by_metric = {r["metric"]: r for r in table}
    uplink = by_metric["uplink_bytes"]
    saved = payload_bytes(module.adapter_state()) * 2  # per client: one adapter fewer per round, 2 rounds
    assert uplink["interval"] == Interval(-saved, -saved, -saved, 3) and uplink["verdict"] == SUPPORTED
    assert {"update_cosine", "eval_change", "worst_client", "equal_uplink/mean"} <= set(by_metric)
    assert all(r["verdict"] in (SUPPORTED, CONTRADICTED, INCONCLUSIVE) for r in table)
    assert "| 1 | communication | uplink_bytes | lower | fmgda |" in text
    # A second comparison over the same folder reuses every finished run.
    messages = []
    again = run_comparison(module, data, federation, trainer, settings, echo=messages.append)
    assert len(messages) == 6 and all("reused" in m for m in messages)
    assert [(r["algorithm"], r["seed"], r["round"]) for r in again] == [(r["algorithm"], r["seed"], r["round"]) for r in rows]
    assert again[-1]["eval/reward/a_to_m"] == pytest.approx(rows[-1]["eval/reward/a_to_m"])


def test_beta_ablation_plot_orders_beta_from_mgda_to_linear(tmp_path):
    from firm_lightning.algorithms import FIRM, Linear, LocalMGDA
    from firm_lightning.compare import _beta_of, plot_beta_ablation

    algorithms = [Linear(), FIRM(beta=1.0), LocalMGDA()]
    assert [_beta_of(a) for a in algorithms] == [math.inf, 1.0, 0.0]
    per_run = {
        (a.name, 0.1, s): {"lambda_dispersion": 0.1, "update_dispersion_weighted": 1.0, "final/mean": 0.5, "worst_client": 0.4}
        for a in algorithms for s in range(3)
    }
    assert plot_beta_ablation(per_run, algorithms, tmp_path / "beta.png").is_file()

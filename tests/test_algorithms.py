"""Baselines: FMGDA's communication, FIRM's limits (β → ∞ is linear, β = 0 is MGDA), and `compare`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from conftest import make_datamodule, make_module
from firm_lightning.algorithms import FIRM, FMGDA, Algorithm, Linear, LocalMGDA
from firm_lightning.studies.claims import eval_roughness
from firm_lightning.studies.compare import CompareSettings
from firm_lightning.federation_metrics import payload_bytes
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.trainer_factory import TrainerFactory
from firm_lightning.weighting import LinearScalarization, RegularizedMinNorm

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "compare_tiny.yaml")


def _run(tmp_path, algorithm, module=None, rounds=1, steps=1, clients=2, seed=0):
    module = module or make_module()
    config = FederationConfig(num_rounds=rounds, num_clients=clients, seed=seed, output_dir=str(tmp_path))
    factory = TrainerFactory({"max_steps": steps, "accelerator": "cpu"}, tmp_path)
    orch = FederatedOrchestrator(module, make_datamodule(clients), config, factory, algorithm, echo=lambda _: None)
    return orch.run(), module


def test_fmgda_uploads_exactly_s_times_the_bytes_of_firm(tmp_path):
    firm, module = _run(tmp_path / "firm", FIRM(beta=1.0))
    fmgda, _ = _run(tmp_path / "fmgda", FMGDA(), module=module)
    adapter = payload_bytes(module.adapter_state())
    num_objectives = len(module.objective_names)
    for a, b in zip(firm.client_history, fmgda.client_history):
        assert a["comm/bytes_up"] == adapter
        assert b["comm/bytes_up"] == num_objectives * adapter
        assert a["comm/bytes_down"] == b["comm/bytes_down"] == adapter  # one global adapter goes down
    assert fmgda.history[-1]["comm/bytes_up"] == num_objectives * firm.history[-1]["comm/bytes_up"]
    assert sum(fmgda.history[-1][f"server_lambda/{n}"] for n in module.objective_names) == pytest.approx(1.0)


def test_firm_with_huge_beta_uses_p_and_matches_the_linear_baseline(tmp_path):
    module = make_module()
    start = module.adapter_state()
    firm, _ = _run(tmp_path / "firm", FIRM(beta=1e6), module=module, rounds=2, steps=2)
    module.load_adapter_state(start)
    linear, _ = _run(tmp_path / "linear", Linear(), module=module, rounds=2, steps=2)
    for row in firm.client_history:
        assert row["lambda/a_to_m"] == pytest.approx(0.5, abs=1e-5)
    for a, b in zip(firm.history, linear.history):
        for key in ("eval/reward/a_to_m", "eval/reward/n_to_z"):
            assert a[key] == pytest.approx(b[key], abs=1e-4)
    # λ differs from p by ~1e-6 at β = 1e6, and Adam's per-coordinate normalisation amplifies
    # that on near-zero gradient coordinates (measured: max |Δ| up to 9e-5 on weights ~0.04), so
    # compare the whole trajectory's end relative to how far training moved the adapter.
    flat = lambda state: torch.cat([state[k].flatten() for k in sorted(state)])
    moved = (flat(linear.global_adapter) - flat(start)).norm()
    gap = (flat(firm.global_adapter) - flat(linear.global_adapter)).norm()
    assert moved > 0.1 and gap / moved < 1e-3, (float(gap), float(moved))


class _Recorded(RegularizedMinNorm):
    def __init__(self):
        super().__init__(beta=0.0)
        self.calls = []

    def __call__(self, gram):
        lam = super().__call__(gram)
        self.calls.append((gram.double().clone(), lam.double().clone()))
        return lam


class _RecordedMGDA(LocalMGDA):
    def __init__(self):
        super().__init__()
        self.recorder = _Recorded()

    def weighting(self, num_objectives):
        return self.recorder


def test_beta_zero_client_lambdas_are_the_min_norm_solutions_of_their_gram_matrices(tmp_path):
    algorithm = _RecordedMGDA()
    state, _ = _run(tmp_path, algorithm, rounds=1, steps=3)
    calls = algorithm.recorder.calls
    assert len(calls) == 2 * 3  # two clients × three local steps
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    for gram, lam in calls:
        candidates = torch.stack([grid, 1 - grid], dim=1)
        best = ((candidates @ gram) * candidates).sum(1).min()
        value = lam @ gram @ lam
        # λ comes back in the Gram's float32: allow its rounding (a uniform λ would miss by ~1e-2 of the scale)
        assert value <= best + 1e-6 * gram.diag().mean(), (value, best)
    # the client's logged λ is the mean of its steps' λ
    first_client = torch.stack([lam for _, lam in calls[:3]]).mean(0)
    assert state.client_history[0]["lambda/a_to_m"] == pytest.approx(float(first_client[0]), abs=1e-6)


def test_a_new_algorithm_is_one_class(tmp_path):
    class OnlyFirst(Algorithm):
        def weighting(self, num_objectives):
            return LinearScalarization([1.0] + [0.0] * (num_objectives - 1))

    state, _ = _run(tmp_path, OnlyFirst("only_first"))
    assert all(r["lambda/a_to_m"] == 1.0 and r["lambda/n_to_z"] == 0.0 for r in state.client_history)


def test_compare_settings_need_unique_names():
    with pytest.raises(ValueError, match="unique"):
        CompareSettings(algorithms=[FIRM(beta=1.0), FIRM(beta=1.0)])


def test_smoothness_is_the_oscillation_around_the_trend_not_the_learning():
    # mean |r_t − (r_{t−1} + r_{t+1})/2| over the inner rounds: 0.4 − (0 + 0.2)/2 = 0.3
    run = [{"round": r, "eval/reward/a": v} for r, v in enumerate([0.0, 0.4, 0.2])]
    assert eval_roughness(run, ["a"]) == pytest.approx(0.3)
    ramp = [{"round": r, "eval/reward/a": 0.05 * r} for r in range(6)]  # steady learning is not roughness
    assert eval_roughness(ramp, ["a"]) == pytest.approx(0.0, abs=1e-12)


def test_compare_cli_writes_every_output_with_one_row_per_algorithm(tmp_path, capsys):
    from firm_lightning.cli import FIRMCLI

    cli = FIRMCLI(args=[
        "compare", "--config", CONFIG, f"--federation.output_dir={tmp_path}",
        "--federation.num_rounds=1", "--trainer.max_steps=1", "--data.eval_size=8",
        "--data.max_prompts=96", "--compare.seeds=[0]",
    ])
    names = ["firm_beta1", "firm_beta0.1", "local_mgda", "linear", "fmgda"]
    assert [row["algorithm"] for row in cli.summary] == names
    for name in ("metrics.csv", "summary.md", "config.yaml", "plots/eval_rewards.png",
                 "plots/dispersion.png", "plots/reward_vs_uplink.png"):
        assert (tmp_path / name).is_file(), name
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(names) * 2  # rounds 0 and 1 for each algorithm
    summary = (tmp_path / "summary.md").read_text().split("\n\n")[0].splitlines()  # the first table
    assert len(summary) == 2 + len(names) and all(any(n in line for line in summary) for n in names)
    assert "| fmgda" in capsys.readouterr().out


def test_a_run_applies_the_algorithms_weighting_and_restores_the_modules_own(tmp_path):
    module = make_module()
    configured = module.weighting
    state, _ = _run(tmp_path, Linear(preference=[0.9, 0.1]), module=module)
    assert all(r["lambda/a_to_m"] == pytest.approx(0.9) for r in state.client_history)
    assert module.weighting is configured

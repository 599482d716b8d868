"""Reward statistics (NormalizedReward) per client and for evaluation: no client depends on which
clients trained before it, evaluation never updates statistics, every run of a comparison starts
from the same ones, and `validate`/`generate` read a run with the statistics `fit` used."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_datamodule, make_module
from firm_lightning.algorithms import FIRM, Linear
from firm_lightning.cli import FIRMCLI
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.rewards import CharsetReward, NormalizedReward, objective_states
from firm_lightning.module import PolicyGradientSettings
from firm_lightning.trainer_factory import TrainerFactory

ROOT = Path(__file__).resolve().parents[1]


def _normalized(mode: str):
    return [NormalizedReward(CharsetReward("a_to_m", "abcdefghijklm"), mode=mode),
            NormalizedReward(CharsetReward("n_to_z", "nopqrstuvwxyz"), mode=mode)]


def _orchestrator(tmp_path, mode="running", algorithm=None, whiten=False) -> FederatedOrchestrator:
    torch.manual_seed(0)
    module = make_module(objectives=_normalized(mode), loss=PolicyGradientSettings(whiten_advantages=whiten))
    config = FederationConfig(num_rounds=1, num_clients=2, output_dir=str(tmp_path), algorithm=algorithm)
    return FederatedOrchestrator(module, make_datamodule(2), config,
                                 TrainerFactory({"max_steps": 2, "accelerator": "cpu", "logger": False}, tmp_path),
                                 echo=lambda _: None)


def test_a_clients_update_does_not_depend_on_who_trained_before_it(tmp_path):
    orch = _orchestrator(tmp_path)
    state = orch.engine.start()
    theta = state.global_adapter
    alone = orch.train_one(theta, 1, 1, client_states={})
    shared: dict = {}
    orch.train_one(theta, 0, 1, shared)  # client 0 first, in the same round
    after_other = orch.train_one(theta, 1, 1, shared)
    for k in theta:
        assert torch.equal(alone.adapters[0][k], after_other.adapters[0][k]), k
    assert set(shared) == {"0/objectives", "1/objectives"}
    assert shared["0/objectives"] != shared["1/objectives"]  # each client gathered its own statistics


def test_evaluation_never_updates_statistics_and_round_0_is_not_zero_by_construction(tmp_path):
    orch = _orchestrator(tmp_path, mode="calibration")
    state = orch.engine.start()
    calibrated = orch.engine.eval_objective_state
    assert all(s["count"] > 0 for s in calibrated.values())
    again = orch.engine.evaluate(state.global_adapter)
    assert orch.engine.eval_objective_state == calibrated and objective_states(orch.module.objectives) == calibrated
    row = state.history[0]
    assert {k: v for k, v in again.items()} == {k: v for k, v in row.items() if k != "round"}
    # calibrated on another sample than the evaluation's: the normalised round 0 is near 0, not 0
    assert any(row[f"eval/reward/{n}"] != 0.0 for n in ("a_to_m", "n_to_z"))
    for n in ("a_to_m", "n_to_z"):
        raw, stats = row[f"eval/raw_reward/{n}"], calibrated[n]
        std = (stats["_m2"] / stats["count"]) ** 0.5
        assert row[f"eval/reward/{n}"] == pytest.approx((raw - stats["mean"]) / std, abs=1e-5)


def test_every_run_of_a_comparison_starts_from_the_same_statistics(tmp_path):
    first = _orchestrator(tmp_path / "firm", mode="running", algorithm=FIRM(beta=1.0))
    start = first.module.adapter_state()
    a = first.run()
    second = FederatedOrchestrator(first.module, first.datamodule,
                                   FederationConfig(num_rounds=1, num_clients=2, output_dir=str(tmp_path / "linear"),
                                                    algorithm=Linear()),
                                   first.trainers, echo=lambda _: None)
    first.module.load_adapter_state(start)
    b = second.run()
    assert a.history[0] == b.history[0]  # the same initial adapter scores the same, whatever ran before


@pytest.fixture(scope="module")
def normalized_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("normalized")
    objectives = {"model": {"objectives": [
        {"class_path": "firm_lightning.rewards.NormalizedReward", "init_args": {"mode": mode, "reward": {
            "class_path": "firm_lightning.rewards.CharsetReward", "init_args": {"name": name, "charset": chars}}}}
        for mode, name, chars in (("calibration", "a_to_m", "abcdefghijklm"), ("running", "n_to_z", "nopqrstuvwxyz"))]}}
    extra = out / "normalized.yaml"
    extra.write_text(yaml.safe_dump(objectives))
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(extra), "--federation.num_clients=2",
            "--trainer.max_steps=2", "--data.max_prompts=48", "--data.eval_size=8", "--data.batch_size=4",
            "--model.sampling.max_new_tokens=6", "--model.sampling.eval_num_generations=1", "--federation.num_rounds=2",
            f"--federation.output_dir={out / 'run'}"]
    FIRMCLI(["fit", *args])
    with open(out / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return out / "run", args, rows


def test_validate_prints_what_fit_recorded_for_the_same_adapter(normalized_run):
    run, args, rows = normalized_run
    assert (run / "adapters" / "objective_state.json").is_file()
    for r in (1, 2):
        results = FIRMCLI(["validate", *args, f"--ckpt_path={run / 'adapters' / f'round_{r:03d}.safetensors'}"]).results
        for key in ("eval/reward/a_to_m", "eval/reward/n_to_z", "eval/raw_reward/a_to_m", "eval/raw_reward/n_to_z"):
            assert results[key] == pytest.approx(float(rows[r][key]), abs=1e-4), (r, key)
    final = FIRMCLI(["validate", *args, f"--ckpt_path={run / 'adapters' / 'final'}"]).results
    assert final["eval/reward/a_to_m"] == pytest.approx(float(rows[-1]["eval/reward/a_to_m"]), abs=1e-4)


def test_validate_needs_the_runs_statistics_and_says_where_they_are(normalized_run, tmp_path):
    run, args, _ = normalized_run
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run / "adapters" / "round_001.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="--objective_state"):
        FIRMCLI(["validate", *args, f"--ckpt_path={lone}"])
    named = FIRMCLI(["validate", *args, f"--ckpt_path={lone}",
                     f"--objective_state={run / 'adapters' / 'objective_state.json'}"]).results
    assert named["eval/reward/a_to_m"] != 0.0


def test_generate_scores_with_the_runs_statistics_and_shows_raw_scores(normalized_run, capsys):
    run, args, _ = normalized_run
    cli = FIRMCLI(["generate", *args, f"--ckpt_path={run / 'adapters' / 'final'}", "--generate.num_responses=4",
                   '--generate.prompts=["Tell me about rivers."]'])
    out = capsys.readouterr().out
    assert "raw:" in out
    stats = {n: s for n, s in __import__("json").loads((run / "adapters" / "objective_state.json").read_text()).items()}
    for g in cli.generations:
        s = stats["a_to_m"]
        expected = (g.raw_rewards["a_to_m"] - s["mean"]) / (s["_m2"] / s["count"]) ** 0.5
        assert g.rewards["a_to_m"] == pytest.approx(expected, abs=1e-5)  # not z-scores of its own batch
    assert abs(sum(g.rewards["a_to_m"] for g in cli.generations)) > 1e-3


def test_a_reward_constant_up_to_round_off_normalises_to_zero():
    class Ulp(CharsetReward):
        def __call__(self, prompts, responses):  # 4.0 and its float32 neighbour: one ulp of spread
            return torch.tensor(
                [4.0, float(torch.nextafter(torch.tensor(4.0), torch.tensor(5.0)))] * (len(responses) // 2)
            )

    flat = NormalizedReward(Ulp("u", "a"), mode="calibration")
    assert torch.equal(flat(["p"] * 4, ["x"] * 4), torch.zeros(4))
    real = NormalizedReward(CharsetReward("c", "a"), mode="calibration")
    scored = real(["p"] * 4, ["a", "b", "a", "b"])
    assert scored.std(unbiased=False) == pytest.approx(1.0)


def test_a_calibration_batch_without_spread_does_not_freeze_the_objective_at_zero():
    """Calibration keeps gathering until the rewards spread: raw [1, 0] after an all-zero first batch must not
    normalise to [0, 0] for the rest of the run (with beta = 0 the client then never moved)."""
    normalized = NormalizedReward(CharsetReward("a", "a"), mode="calibration")
    assert torch.equal(normalized(["p"] * 4, ["b"] * 4), torch.zeros(4))  # no spread yet: no signal
    spread = normalized(["p"] * 2, ["a", "b"])
    assert spread[0] > 0 > spread[1]
    frozen_state = normalized.state_dict()
    later = normalized(["p"] * 2, ["a", "b"])
    assert torch.equal(later, spread) and normalized.state_dict() == frozen_state  # frozen once it spread
    raw = torch.tensor([0.0, 0, 0, 0, 1, 0], dtype=torch.float64)  # the six rewards the statistics were made of
    assert later[0].item() == pytest.approx(((1 - raw.mean()) / raw.std(unbiased=False)).item(), rel=1e-6)


def test_reward_models_are_pointed_at_local_folders_from_the_command_line(tmp_path):
    from firm_lightning.config import build_components

    config = tmp_path / "rm.yaml"
    config.write_text(yaml.safe_dump({"model": {"objectives": [
        {"class_path": "firm_lightning.rewards.NormalizedReward", "init_args": {"reward": {
            "class_path": "firm_lightning.rewards.HFRewardModel",
            "init_args": {"name": "helpful", "name_or_path": "Ray2333/gpt2-large-helpful-reward_model"}}}},
        {"class_path": "firm_lightning.rewards.HFRewardModel",
         "init_args": {"name": "harmless", "name_or_path": "Ray2333/gpt2-large-harmless-reward_model"}},
    ]}}))
    base = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(config)]
    paths = '{"helpful": "/models/help", "harmless": "/models/harm"}'
    module = build_components([*base, "--reward_models", paths]).module
    assert module.objectives[0].reward.name_or_path == "/models/help"
    assert module.objectives[1].name_or_path == "/models/harm"
    with pytest.raises(ValueError, match=r"--reward_models names \['helpfull'\]"):
        build_components([*base, "--reward_models", '{"helpfull": "/models/help"}'])


class _AlikeAtFirst(CharsetReward):
    """Scores every response alike (0) for its first ``alike`` calls, then by its characters: a sparse reward
    early in training."""

    def __init__(self, name: str, charset: str, alike: int) -> None:
        super().__init__(name, charset)
        self.alike, self.calls = alike, 0

    def __call__(self, prompts, responses):
        self.calls += 1
        return torch.zeros(len(responses)) if self.calls <= self.alike else super().__call__(prompts, responses)


def _calibrating_engine(tmp_path, alike: int):
    torch.manual_seed(0)
    objectives = [NormalizedReward(_AlikeAtFirst("a_to_m", "abcdefghijklm", alike), mode="calibration"),
                  NormalizedReward(CharsetReward("n_to_z", "nopqrstuvwxyz"), mode="calibration")]
    config = FederationConfig(num_rounds=1, num_clients=2, output_dir=str(tmp_path))
    factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu", "logger": False}, tmp_path)
    datamodule = make_datamodule(2, eval_size=8, eval_batch_size=4)  # two held-out batches of 4 prompts
    return FederatedOrchestrator(make_module(objectives=objectives), datamodule, config, factory,
                                 echo=lambda _: None).engine


def test_evaluation_statistics_are_calibrated_on_more_batches_until_the_rewards_spread(tmp_path):
    """A first held-out batch of equal rewards is not accepted as the evaluation statistics: they would
    normalise every evaluation reward of the run to 0. The next batch is scored too."""
    engine = _calibrating_engine(tmp_path, alike=1)
    state = engine.start()
    stats = engine.eval_objective_state
    assert stats["a_to_m"]["count"] == 2 * 4 * engine.module.sampling.eval_num_generations  # both batches
    assert stats["n_to_z"]["count"] == 4 * engine.module.sampling.eval_num_generations  # spread at once: one batch
    assert stats["a_to_m"]["_m2"] > 0
    assert state.history[0]["eval/reward/a_to_m"] != 0.0


def test_evaluation_statistics_that_never_spread_are_refused_naming_the_objective(tmp_path):
    engine = _calibrating_engine(tmp_path, alike=10**6)
    with pytest.raises(ValueError, match=r"cannot calibrate the statistics of 'a_to_m'.*mode: fixed"):
        engine.start()

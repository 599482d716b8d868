"""Faulty clients are left out with the reason logged; too few healthy ones stop the run with the state saved."""

from __future__ import annotations

import csv
import logging
import math

import pytest
import torch

from conftest import make_datamodule, make_module
from firm_lightning import checkpoint
from firm_lightning.aggregation import screen_update
from firm_lightning.algorithms import Algorithm
from firm_lightning.client import ClientProcedure, ClientUpdate, SingleAdapter
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig, FederationError, FederationState
from firm_lightning.rewards import CharsetReward
from firm_lightning.trainer_factory import TrainerFactory


class NaNForPrompts(CharsetReward):
    """A reward that breaks (NaN) on some prompts: those of one client."""

    def __init__(self, name, charset, bad_prompts):
        super().__init__(name, charset)
        self.bad_prompts = set(bad_prompts)

    def __call__(self, prompts, responses):
        rewards = super().__call__(prompts, responses)
        return torch.where(torch.tensor([p in self.bad_prompts for p in prompts]), math.nan, rewards)


class Faulty(ClientProcedure):
    """Real local training, except for the clients told to misbehave."""

    def __init__(self, faults: dict[int, str]):
        self.inner, self.faults, self.uploads = SingleAdapter(), faults, {}

    def run(self, module, global_adapter, dataloader, trainer, client_id, num_examples):
        fault = self.faults.get(client_id)
        if fault == "raise":
            raise RuntimeError("simulated crash inside the client")
        if fault == "nan":
            return ClientUpdate(
                client_id, [{k: torch.full_like(v, math.nan) for k, v in global_adapter.items()}], num_examples, {}
            )
        if fault == "shape":
            return ClientUpdate(client_id, [{k: torch.zeros(3) for k in global_adapter}], num_examples, {})
        update = self.inner.run(module, global_adapter, dataloader, trainer, client_id, num_examples)
        self.uploads[client_id] = update.adapters[0]
        return update


class FaultyAlgorithm(Algorithm):
    """The configured weighting and FedAvg, with the faulty client procedure (``federation.algorithm``)."""

    def __init__(self, faults: dict[int, str]):
        super().__init__("faulty")
        self.faulty = Faulty(faults)

    def procedure(self) -> ClientProcedure:
        return self.faulty


def _federation(tmp_path, faults, min_clients, bad_reward_client=None, num_clients=5, **federation):
    data = make_datamodule(num_clients=num_clients)
    data.setup()
    second = CharsetReward("n_to_z", "nopqrstuvwxyz")
    if bad_reward_client is not None:
        second = NaNForPrompts("n_to_z", "nopqrstuvwxyz", data.client_prompts(bad_reward_client))
    module = make_module(objectives=[CharsetReward("a_to_m", "abcdefghijklm"), second])
    messages = []
    config = FederationConfig(num_clients=num_clients, min_clients=min_clients, output_dir=str(tmp_path),
                              algorithm=FaultyAlgorithm(faults), **{"num_rounds": 1, **federation})
    orch = FederatedOrchestrator(module, data, config, TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path),
                                 echo=messages.append)
    return orch, messages


def test_raising_nan_and_misshapen_clients_are_excluded_and_the_log_says_why(tmp_path, caplog):
    orch, messages = _federation(tmp_path, {1: "raise", 2: "nan", 3: "shape"}, min_clients=1, bad_reward_client=0)
    with caplog.at_level(logging.WARNING, logger="firm_lightning"):
        state = orch.run()
    log = "\n".join(messages)
    assert "client 0 failed: ValueError: Reward function 'n_to_z' returned non-finite rewards" in log
    assert "client 1 failed: RuntimeError: simulated crash inside the client" in log
    assert "client 2 rejected:" in log and "holds NaN or inf" in log
    assert "client 3 rejected:" in log and "has shape (3,)" in log
    # One line per failure, naming the file that holds its whole traceback (none on stderr).
    traceback_file = tmp_path / "clients" / "client_001" / "round_001" / "traceback.txt"
    assert f"client 1 failed: RuntimeError: simulated crash inside the client (traceback: {traceback_file})" in log
    assert "Traceback" in traceback_file.read_text() and "simulated crash" in traceback_file.read_text()
    assert "Traceback" not in caplog.text
    row = state.history[-1]
    assert (row["clients"], row["failed_clients"], row["rejected_clients"]) == (1, 2, 2)
    with open(tmp_path / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    assert (last["failed_clients"], last["rejected_clients"]) == ("2", "2")
    # Only the healthy client was merged: with FedAvg over one client the new global adapter is its upload.
    healthy = orch.engine.algorithm.faulty.uploads[4]
    assert all(torch.allclose(state.global_adapter[k], healthy[k], rtol=0, atol=1e-6) for k in healthy)
    assert [r["client"] for r in state.client_history] == [4]


def test_fewer_healthy_clients_than_min_clients_stops_clearly_with_the_state_saved(tmp_path):
    orch, _ = _federation(tmp_path, {0: "raise", 1: "raise", 2: "nan", 3: "shape"}, min_clients=3)
    with pytest.raises(FederationError) as failure:
        orch.run()
    message = str(failure.value)
    assert "Round 1: only 1 of 5 clients returned a usable update, fewer than federation.min_clients=3" in message
    assert "client 0 failed: RuntimeError" in message and "client 3 rejected" in message
    assert "--federation.resume true" in message
    saved, _ = checkpoint.load_state(tmp_path / "checkpoint", FederationState)
    assert saved.round == 0 and set(saved.global_adapter) == set(orch.module.adapter_state())


def test_a_client_failing_the_same_way_round_after_round_stops_the_run_and_the_summary_lists_failures(tmp_path):
    # Client 1 raises in every round, the others train: the rounds go on, one line per failure ...
    orch, messages = _federation(tmp_path, {1: "raise"}, min_clients=1, num_clients=2, num_rounds=2)
    state = orch.run()
    assert [(f["round"], f["client"]) for f in state.client_failures] == [(1, 1), (2, 1)]
    assert sum("client 1 failed" in m for m in messages) == 2
    # ... and the summary names the clients that failed, how often, and where the last traceback is.
    summary = (tmp_path / "summary.txt").read_text()
    traceback_file = tmp_path / "clients" / "client_001" / "round_002" / "traceback.txt"
    assert (f"client 1: 2 round(s) (1, 2); last error: RuntimeError: simulated crash inside the client "
            f"(traceback: {traceback_file})") in summary
    # Resumed for a third round with a limit of 2: the failures saved in the checkpoint count too.
    orch, _ = _federation(tmp_path, {1: "raise"}, min_clients=1, num_clients=2, num_rounds=3, max_failed_rounds=2,
                          resume=True)
    with pytest.raises(FederationError) as stop:
        orch.run()
    message = str(stop.value)
    assert message.startswith("Client 1 failed with the same error in 3 of its rounds in a row (rounds 1, 2, 3): "
                              "RuntimeError: simulated crash inside the client; its traceback: ")
    assert "--federation.resume true" in message and "federation.max_failed_rounds=2" in message
    assert checkpoint.load_state(tmp_path / "checkpoint", FederationState)[0].round == 2


def test_a_failure_streak_is_broken_by_a_round_the_client_trained_in():
    from firm_lightning.engine import repeated_failure_rounds
    from firm_lightning.state import ClientFailure

    failed = lambda r, error="E: x": {"round": r, "client": 3, "error": error, "traceback": ""}
    state = FederationState(round=5, global_adapter={}, client_failures=[failed(1), failed(2, "E: y"), failed(4)],
                            client_history=[{"round": 3, "client": 3}, {"round": 5, "client": 1}])
    assert repeated_failure_rounds(state, ClientFailure(3, 6, "E: x")) == [4, 6]  # trained in round 3
    state.client_history = []
    assert repeated_failure_rounds(state, ClientFailure(3, 6, "E: x")) == [4, 6]  # round 2: another error
    assert repeated_failure_rounds(state, ClientFailure(1, 6, "E: x")) == [6]


def test_update_screening_checks_keys_shapes_dtypes_finiteness_and_norm():
    g = {"a": torch.zeros(2), "b": torch.zeros(1, 1)}
    update = lambda state: ClientUpdate(7, [state], 1, {})
    assert screen_update(update({"a": torch.ones(2), "b": torch.ones(1, 1)}), g) is None
    assert "missing ['b']" in screen_update(update({"a": torch.ones(2)}), g)
    assert "has shape (3,)" in screen_update(update({"a": torch.ones(3), "b": torch.ones(1, 1)}), g)
    half = update({"a": torch.ones(2, dtype=torch.float16), "b": torch.ones(1, 1)})
    assert "dtype torch.float16, expected torch.float32" in screen_update(half, g)
    assert "dtype torch.float16, expected torch.float32" in screen_update(half, g, upload_dtype=torch.float16)
    # federation.upload_dtype: a client uploads its update θ_i − θ in that dtype
    half_delta = ClientUpdate(
        7, [{"a": torch.ones(2, dtype=torch.float16), "b": torch.ones(1, 1, dtype=torch.float16)}], 1, {}, delta=True
    )
    assert screen_update(half_delta, g, upload_dtype=torch.float16) is None
    assert "expected torch.bfloat16" in screen_update(half_delta, g, upload_dtype=torch.bfloat16)
    assert "no federation.upload_dtype" in screen_update(half_delta, g)
    assert "NaN or inf" in screen_update(update({"a": torch.tensor([0.0, math.inf]), "b": torch.ones(1, 1)}), g)
    big = update({"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(1, 1)})  # ‖Δ‖ = 5
    assert screen_update(big, g, max_update_norm=5.0) is None
    assert "update norm 5 exceeds federation.max_update_norm=4.9" in screen_update(big, g, max_update_norm=4.9)
    big_delta = ClientUpdate(
        7,
        [{"a": torch.tensor([3.0, 4.0], dtype=torch.bfloat16), "b": torch.zeros(1, 1, dtype=torch.bfloat16)}],
        1,
        {},
        delta=True,
    )  # ‖Δ‖ = 5, uploaded as the delta itself
    assert "update norm 5 exceeds" in screen_update(big_delta, {k: v + 1 for k, v in g.items()}, 4.9, torch.bfloat16)


def test_a_nan_batch_is_refused_before_it_poisons_normalisation_statistics():
    from firm_lightning.rewards import NormalizedReward, check_rewards

    class Flaky(CharsetReward):
        calls = 0

        def __call__(self, prompts, responses):
            Flaky.calls += 1
            rewards = super().__call__(prompts, responses)
            return torch.full_like(rewards, math.nan) if Flaky.calls == 2 else rewards

    normalized = NormalizedReward(Flaky("a_to_m", "abc"), mode="running")
    normalized(["p", "p"], ["abc", "xyz"])
    before = normalized.state_dict()
    with pytest.raises(ValueError, match="Reward function 'a_to_m' returned non-finite rewards"):
        normalized(["p", "p"], ["abc", "xyz"])
    with pytest.raises(ValueError, match="Reward function 'a_to_m' returned 3 rewards for 2 responses"):
        check_rewards("a_to_m", torch.ones(3), ["a", "b"])
    assert normalized.state_dict() == before
    assert torch.isfinite(normalized(["p", "p"], ["abc", "xyz"])).all()

"""Aggregation, federation metrics, client sampling, trainer factory and the orchestrator's memory."""

from __future__ import annotations

import gc

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from conftest import make_datamodule, make_module
from firm_lightning.aggregation import FedAvg, MinNormOverObjectives
from firm_lightning.client import ClientUpdate
from firm_lightning.federation_metrics import lambda_dispersion, payload_bytes, update_dispersion
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.trainer_factory import TrainerFactory


def _state(*values):
    return {"a": torch.tensor(values[:2], dtype=torch.float32), "b": torch.tensor([[values[2]]], dtype=torch.float32)}


def _updates(states, num_examples=None):
    num_examples = num_examples or [1] * len(states)
    return [
        ClientUpdate(i, s if isinstance(s, list) else [s], n, {}) for i, (s, n) in enumerate(zip(states, num_examples))
    ]


def test_fedavg_matches_hand_computed_weighted_average():
    g = _state(0.0, 0.0, 0.0)
    clients = [_state(1.0, 2.0, 3.0), _state(4.0, 8.0, -3.0)]
    out = FedAvg(server_lr=1.0).aggregate(g, _updates(clients, [1, 3])).adapter
    # weights 1/4 and 3/4
    assert torch.allclose(out["a"], torch.tensor([0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * 8]))
    assert torch.allclose(out["b"], torch.tensor([[0.25 * 3 - 0.75 * 3]]))


def test_server_lr_scales_the_step_and_zero_leaves_theta_unchanged():
    g = _state(1.0, 1.0, 1.0)
    clients = [_state(3.0, 5.0, 1.0)]
    assert all(torch.equal(v, g[k]) for k, v in FedAvg(0.0).aggregate(g, _updates(clients)).adapter.items())
    half = FedAvg(0.5).aggregate(g, _updates(clients)).adapter
    assert torch.allclose(half["a"], torch.tensor([2.0, 3.0]))


def test_fedavg_refuses_malformed_updates():
    g = _state(0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="missing"):
        FedAvg().aggregate(g, _updates([{"a": g["a"]}]))
    with pytest.raises(ValueError, match="shape"):
        FedAvg().aggregate(g, _updates([{"a": torch.zeros(3), "b": g["b"]}]))
    with pytest.raises(ValueError, match="NaN"):
        FedAvg().aggregate(g, _updates([_state(float("nan"), 0.0, 0.0)]))
    with pytest.raises(ValueError, match="No client updates"):
        FedAvg().aggregate(g, [])
    with pytest.raises(ValueError, match="expects one"):
        FedAvg().aggregate(g, _updates([[g, g]]))
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(-1.0)


def test_fmgda_server_step_is_min_norm_over_the_averaged_per_objective_deltas():
    g = {"w": torch.zeros(2)}
    # two clients, two objectives; averaged deltas: Δ_1 = (1, 0), Δ_2 = (0, 2)
    c0 = [{"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    c1 = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([0.0, 3.0])}]
    result = MinNormOverObjectives(server_lr=1.0).aggregate(g, _updates([c0, c1]))
    # min-norm of orthogonal (1,0) and (0,2): λ ∝ (1/1, 1/4) → (0.8, 0.2); step (0.8, 0.4)
    assert result.server_lambdas == pytest.approx([0.8, 0.2])
    assert torch.allclose(result.adapter["w"], torch.tensor([0.8, 0.4]))
    # client 0's effective update: 0.8·(2,0) + 0.2·(0,1)
    assert torch.allclose(result.client_adapters[0]["w"], torch.tensor([1.6, 0.2]))


def test_payload_bytes_counts_numel_times_element_size():
    state = {"x": torch.zeros(3, 4, dtype=torch.float32), "y": torch.zeros(10, dtype=torch.bfloat16)}
    assert payload_bytes(state) == 3 * 4 * 4 + 10 * 2


def test_dispersion_metrics_on_hand_made_cases():
    g = {"w": torch.zeros(2)}
    same = [{"w": torch.tensor([1.0, 1.0])}] * 3
    assert update_dispersion(same, g) == pytest.approx(0.0)
    # deltas (1,0) and (-1,0)+(2,0)... mean (1,0); deviations (±1, 0) → mean sq 1; / ‖mean‖² = 1
    assert update_dispersion([{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([2.0, 0.0])}], g) == pytest.approx(
        1.0
    )
    assert lambda_dispersion([[0.5, 0.5], [0.5, 0.5]]) == pytest.approx(0.0)
    # mean (0.5, 0.5); each deviates by (±0.5, ∓0.5) → squared norm 0.5
    assert lambda_dispersion([[1.0, 0.0], [0.0, 1.0]]) == pytest.approx(0.5)


def _orchestrator(tmp_path, num_clients, module=None, **federation):
    module = module or make_module()
    data = make_datamodule(num_clients=num_clients)
    config = FederationConfig(num_clients=num_clients, output_dir=str(tmp_path), **{"num_rounds": 1, **federation})
    factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path)
    return FederatedOrchestrator(module, data, config, factory, echo=lambda _: None)


def test_client_sampling_is_seeded_and_respects_fraction_and_minimum(tmp_path):
    orch = _orchestrator(tmp_path, 10, client_fraction=0.3, min_clients=4)
    picks = [orch.engine.sample_clients(r) for r in range(1, 6)]
    assert all(len(p) == 4 and len(set(p)) == 4 and all(0 <= c < 10 for c in p) for p in picks)
    assert picks == [orch.engine.sample_clients(r) for r in range(1, 6)]  # same seed, same clients
    assert len({tuple(p) for p in picks}) > 1  # rounds differ
    assert len(_orchestrator(tmp_path, 10, client_fraction=0.75, module=orch.module).engine.sample_clients(1)) == 8


def test_trainer_factory_builds_fresh_callbacks_and_distinct_log_dirs(tmp_path):
    spec = {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {}}
    ready = LearningRateMonitor()
    factory = TrainerFactory({"max_steps": 2, "callbacks": [spec, ready]}, tmp_path)
    t1, t2 = factory.client_trainer(0, 1), factory.client_trainer(1, 1)
    monitors = lambda t: [c for c in t.callbacks if isinstance(c, LearningRateMonitor)]
    assert len(monitors(t1)) == 2
    assert not {id(c) for c in monitors(t1)} & {id(c) for c in monitors(t2)}
    assert ready not in t1.callbacks
    assert t1.logger.log_dir != t2.logger.log_dir
    assert factory.client_trainer(0, 2).logger.log_dir != t1.logger.log_dir
    with pytest.raises(ValueError, match="max_steps"):
        TrainerFactory({}, tmp_path)


def _live_tensor_bytes() -> int:
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                s = obj.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        except Exception:
            continue
    return sum(storages.values())


def _base_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.policy.named_parameters() if "lora_" not in n)


def test_orchestrator_holds_one_base_model_whatever_the_number_of_clients(tmp_path):
    module = make_module()
    base_ptrs = {p.data_ptr() for n, p in module.policy.named_parameters() if "lora_" not in n}
    sizes = {}
    for n in (2, 6):
        orch = _orchestrator(tmp_path / str(n), n, module=module)
        state = orch.run()
        assert len(state.client_history) == n
        del orch, state
        sizes[n] = _live_tensor_bytes()
    # The base weights are the very same storages, never copied or re-created.
    assert base_ptrs == {p.data_ptr() for n, p in module.policy.named_parameters() if "lora_" not in n}
    # Four more clients must not add anything close to one more base model in live tensor storage.
    assert sizes[6] - sizes[2] < 0.25 * _base_bytes(module), (sizes, _base_bytes(module))


def test_per_client_log_directories_are_distinct(tmp_path):
    orch = _orchestrator(tmp_path, 3, num_rounds=2)
    orch.run()
    dirs = sorted(
        p.relative_to(tmp_path / "clients").as_posix() for p in (tmp_path / "clients").glob("client_*/round_*")
    )
    assert dirs == [f"client_{c:03d}/round_{r:03d}" for c in range(3) for r in (1, 2)]
    assert all(any((tmp_path / "clients" / d).iterdir()) for d in dirs)


def test_round_metrics_count_the_bytes_actually_sent(tmp_path):
    module = make_module()
    adapter_bytes = payload_bytes(module.adapter_state())
    orch = _orchestrator(tmp_path, 2, module=module)
    state = orch.run()
    for row in state.client_history:
        assert row["comm/bytes_up"] == adapter_bytes == row["comm/bytes_down"]
    assert state.history[-1]["comm/bytes_up"] == 2 * adapter_bytes
    lora_numel = sum(p.numel() for n, p in module.policy.named_parameters() if "lora_" in n)
    assert adapter_bytes == lora_numel * 4  # LoRA tensors only, float32: no embeddings ride along


def test_data_and_federation_client_counts_must_agree(tmp_path):
    with pytest.raises(ValueError, match="num_clients"):
        FederatedOrchestrator(
            make_module(), make_datamodule(num_clients=3), FederationConfig(num_clients=2),
            TrainerFactory({"max_steps": 1}, tmp_path),
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"client_fraction": 0.0}, "client_fraction"),
        ({"min_clients": 9}, "min_clients"),
        ({"num_rounds": 0}, "num_rounds"),
    ],
)
def test_federation_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FederationConfig(num_clients=4, **kwargs)


def test_a_client_round_is_reproducible_whatever_ran_before(tmp_path):
    orch = _orchestrator(tmp_path, 2)
    orch.datamodule.setup("fit")
    start = orch.module.adapter_state()
    first = orch.train_one(start, client_id=1, round_idx=3)
    orch.train_one(start, client_id=0, round_idx=3)  # consumes randomness in between
    torch.rand(100)
    again = orch.train_one(start, client_id=1, round_idx=3)
    assert all(torch.equal(first.adapters[0][k], again.adapters[0][k]) for k in first.adapters[0])
    other_round = orch.train_one(start, client_id=1, round_idx=4)
    assert any(not torch.equal(first.adapters[0][k], other_round.adapters[0][k]) for k in first.adapters[0])


def test_save_adapters_false_keeps_only_the_final_adapter(tmp_path):
    _orchestrator(tmp_path, 2, num_rounds=2, save_adapters=False).run()
    assert not list((tmp_path / "adapters").glob("round_*.safetensors"))
    assert (tmp_path / "adapters" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapters" / "final" / "adapter_config.json").is_file()


def test_the_weighting_effect_reaches_the_client_rows_the_round_row_and_the_progress_line(tmp_path):
    lines = []
    config = FederationConfig(num_clients=2, output_dir=str(tmp_path), num_rounds=1, progress="lines")
    factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, tmp_path)
    state = FederatedOrchestrator(make_module(), make_datamodule(num_clients=2), config, factory,
                                  echo=lines.append).run()
    for key in ("train/weighting_effect", "train/weighting_effect_direction"):
        per_client = [row[key] for row in state.client_history]
        assert len(per_client) == 2 and all(v > 0 for v in per_client)  # FIRM β = 1: λ ≠ p moves the step
        assert state.history[-1][key] == pytest.approx(sum(per_client) / 2)
    row = state.history[-1]
    expected = f"λ effect {row['train/weighting_effect']:.3f} (on d {row['train/weighting_effect_direction']:.3f})"
    assert any(line.startswith("round 1/1 | eval") and expected in line for line in lines), lines

"""Lightning-native federation: loggers, Lightning and federation callbacks, client optimiser,
progress, generate and help.

CLI runs use a very short version of the tiny config (1 client per round, 1-2 local steps,
4-token responses) so that each costs a few seconds.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_datamodule, make_module
from firm_lightning.callbacks import EarlyStopping, FederationCallback, SaveBestAdapter
from firm_lightning.cli import FIRMCLI, main
from firm_lightning.client_optimizer import use_client_optimizer
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.progress import PlainLines, ProgressBar, progress_callback
from firm_lightning.rewards import CharsetReward
from firm_lightning.trainer_factory import TrainerFactory

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
TINY = [
    "--config",
    CONFIG,
    "--federation.num_clients=2",
    "--federation.client_fraction=0.5",
    "--federation.min_clients=1",
    "--trainer.max_steps=1",
    "--data.eval_size=4",
    "--data.max_prompts=48",
    "--data.batch_size=2",
    "--model.sampling.max_new_tokens=4",
    "--model.sampling.num_generations=2",
    "--model.sampling.eval_num_generations=1",
]
OBJECTIVES = ("a_to_m", "n_to_z")


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _write_config(tmp_path: Path, section: dict) -> str:
    path = tmp_path / "extra.yaml"
    path.write_text(yaml.safe_dump(section))
    return str(path)


# ---- round metrics through Lightning loggers ----


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loggers")
    loggers = {"trainer": {"logger": [
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out)}},
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(out)}},
        {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
         "init_args": {"experiment_name": "firm", "tracking_uri": f"file:{out / 'mlruns'}"}},
    ]}, "federation": {"callbacks": [  # federation callbacks by class_path, as a user's YAML has them
        {"class_path": "firm_lightning.callbacks.SaveBestAdapter", "init_args": {"monitor": "eval/reward/n_to_z"}},
    ]}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its local file store behind this switch
        main(["fit", *TINY, "--config", _write_config(out, loggers), "--federation.num_rounds=2",
              f"--federation.output_dir={out}"])
    return out


def test_tensorboard_holds_one_eval_point_per_round(logged_run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_run / "federation"))
    events.Reload()
    recorded = _rows(logged_run / "metrics.csv")
    for name in OBJECTIVES:
        series = events.Scalars(f"eval/reward/{name}")
        assert [e.step for e in series] == [0, 1, 2]
        assert [e.value for e in series] == pytest.approx([float(r[f"eval/reward/{name}"]) for r in recorded])
    assert {"lambda_dispersion", "update_dispersion", "comm/bytes_up"} <= set(events.Tags()["scalars"])
    # each client fit is a run of its own, with its local steps
    client_runs = sorted(
        p.relative_to(logged_run / "clients").as_posix() for p in (logged_run / "clients").glob("client_*/round_*")
    )
    assert len(client_runs) == 2 and all(re.fullmatch(r"client_00\d/round_00[12]", r) for r in client_runs)
    client_events = EventAccumulator(str(logged_run / "clients" / client_runs[0]))
    client_events.Reload()
    assert "lambda/a_to_m" in client_events.Tags()["scalars"]


def test_federation_callbacks_come_from_yaml(logged_run: Path):
    values = [float(r["eval/reward/n_to_z"]) for r in _rows(logged_run / "metrics.csv")]
    best = json.loads((logged_run / "adapters" / "best.json").read_text())
    assert best["monitor"] == "eval/reward/n_to_z" and best["value"] == pytest.approx(max(values))


def test_csv_logger_holds_one_eval_point_per_round(logged_run: Path):
    rows = [r for r in _rows(logged_run / "federation" / "metrics.csv") if r.get("eval/reward/a_to_m")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(r["eval/reward/n_to_z"] for r in rows)


def test_mlflow_holds_one_eval_point_per_round_and_nests_the_client_runs(logged_run: Path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{logged_run / 'mlruns'}")
    experiment = client.get_experiment_by_name("firm")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert "federation" in runs and len(runs) == 3, sorted(runs)
    federation = runs.pop("federation")
    for name in OBJECTIVES:
        history = client.get_metric_history(federation.info.run_id, f"eval/reward/{name}")
        assert sorted(m.step for m in history) == [0, 1, 2]
    for run_name, run in runs.items():
        assert re.fullmatch(r"client_00\d/round_00[12]", run_name)
        assert run.data.tags["mlflow.parentRunId"] == federation.info.run_id
        assert "lambda/a_to_m" in run.data.metrics


# ---- Lightning callbacks inside client fits, from YAML ----

LIGHTNING_CALLBACKS = {
    "LearningRateMonitor": {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                            "init_args": {"logging_interval": "step"}},
    "Timer": {"class_path": "lightning.pytorch.callbacks.Timer", "init_args": {"duration": "00:00:00:00"}},
    "ModelSummary": {"class_path": "lightning.pytorch.callbacks.ModelSummary", "init_args": {"max_depth": 1}},
    "DeviceStatsMonitor": {"class_path": "lightning.pytorch.callbacks.DeviceStatsMonitor",
                           "init_args": {"cpu_stats": True}},
}


@pytest.mark.parametrize("name", list(LIGHTNING_CALLBACKS))
def test_lightning_callback_runs_inside_client_fits_from_yaml(name, tmp_path, monkeypatch):
    summaries = []
    if name == "ModelSummary":
        from lightning.pytorch.callbacks import ModelSummary

        real = ModelSummary.summarize
        monkeypatch.setattr(
            ModelSummary, "summarize", staticmethod(lambda *a, **k: summaries.append(a) or real(*a, **k))
        )
    extra = _write_config(tmp_path, {"trainer": {"callbacks": [LIGHTNING_CALLBACKS[name]]}})
    main(["fit", *TINY, "--config", extra, "--federation.num_rounds=1", "--trainer.max_steps=2",
          "--federation.progress=off", f"--federation.output_dir={tmp_path}"])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # the resolved config was saved
    assert saved["trainer"]["callbacks"][0]["class_path"].endswith(name)
    if name == "Timer":  # a zero-length timer ends the client fit before its first local step
        assert saved["trainer"]["callbacks"][0]["init_args"]["interval"] == "step"
        before, after = (load_file(str(tmp_path / "adapters" / f"round_00{r}.safetensors")) for r in (0, 1))
        assert all(torch.equal(before[k], after[k]) for k in before)
        return
    (client_log,) = (tmp_path / "clients").glob("client_*/round_001/metrics.csv")
    steps = [r for r in _rows(client_log) if r.get("lambda/a_to_m")]
    assert len(steps) == 2  # both local steps ran with the callback in place
    if name == "LearningRateMonitor":
        assert [float(r["lr-AdamW"]) for r in _rows(client_log) if r.get("lr-AdamW")] == [0.01, 0.01]
    elif name == "ModelSummary":
        lora = load_file(str(tmp_path / "adapters" / "round_000.safetensors"))
        assert len(summaries) == 1 and summaries[0][2] == sum(t.numel() for t in lora.values())  # trainable = LoRA
    elif name == "DeviceStatsMonitor":
        assert any("cpu_percent" in k for k in _rows(client_log)[0])


def test_timer_callback_prints_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", CONFIG, "--trainer.callbacks+=Timer", "--print_config"])
    assert "interval: step" in capsys.readouterr().out


# ---- federation callbacks, early stopping, best adapter, progress lines ----


class Recorder(FederationCallback):
    def __init__(self):
        self.calls = []

    def on_federation_start(self, orchestrator, state):
        self.calls.append(("federation_start", state.round))

    def on_round_start(self, orchestrator, state, round_idx, clients):
        self.calls.append(("round_start", round_idx, tuple(clients)))

    def on_client_start(self, orchestrator, round_idx, client_id):
        self.calls.append(("client_start", round_idx, client_id))

    def on_client_end(self, orchestrator, round_idx, update):
        self.calls.append(("client_end", round_idx, update.client_id))

    def on_round_end(self, orchestrator, state, row):
        self.calls.append(("round_end", row["round"], state.round))

    def on_federation_end(self, orchestrator, state):
        self.calls.append(("federation_end", state.round))


def _orchestrator(tmp_path, callbacks=(), trainer=None, **config) -> FederatedOrchestrator:
    config = FederationConfig(
        **{"num_rounds": 2, "num_clients": 2, "output_dir": str(tmp_path), "callbacks": list(callbacks), **config}
    )
    trainers = TrainerFactory({"max_steps": 1, "accelerator": "cpu", **(trainer or {})}, tmp_path)
    module = make_module()
    return FederatedOrchestrator(module, make_datamodule(2, max_prompts=32, eval_size=4), config, trainers)


def test_federation_callbacks_see_every_hook_in_order_and_early_stopping_says_why(tmp_path, capsys):
    recorder = Recorder()
    stop = EarlyStopping(monitor="eval/reward/a_to_m", patience=2, min_delta=1.0)  # a reward cannot rise by 1.0
    best = SaveBestAdapter(monitor="eval/reward/n_to_z")
    state = _orchestrator(tmp_path, [recorder, stop, best], num_rounds=4, progress="lines").run()
    per_round = lambda r: [("round_start", r, (0, 1)), ("client_start", r, 0), ("client_end", r, 0),  # noqa: E731
                           ("client_start", r, 1), ("client_end", r, 1), ("round_end", r, r)]
    assert recorder.calls == [("federation_start", 0), *per_round(1), *per_round(2), ("federation_end", 2)]
    assert state.round == 2 and len(state.history) == 3
    out = capsys.readouterr().out
    assert (
        "stopped after round 2/4: EarlyStopping: eval/reward/a_to_m did not improve by more than 1.0 for 2 rounds"
        in out
    )
    assert re.search(r"^round 1/4 \| eval a_to_m=\d\.\d{3} n_to_z=\d\.\d{3} \| λ-dispersion", out, re.M)
    assert "\r" not in out  # plain lines: stdout is not a terminal
    # the best global adapter by eval/reward/n_to_z is the one of the best round
    values = [r["eval/reward/n_to_z"] for r in state.history]
    meta = json.loads((tmp_path / "adapters" / "best.json").read_text())
    assert meta["round"] == max(range(len(values)), key=lambda r: (values[r], -r)) and meta["value"] == pytest.approx(
        max(values)
    )
    saved, expected = load_file(str(tmp_path / "adapters" / "best.safetensors")), load_file(
        str(tmp_path / "adapters" / f"round_{meta['round']:03d}.safetensors"))
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert state.client_states == {}  # reset: nothing kept between rounds


def test_a_monitor_nobody_records_is_named_with_what_is_recorded():
    with pytest.raises(KeyError, match=r"monitors 'eval/reward/helpful'.*recorded: eval/reward/a_to_m"):
        EarlyStopping(monitor="eval/reward/helpful")._value({"round": 0, "eval/reward/a_to_m": 0.1})
    with pytest.raises(TypeError, match="Lightning callbacks .* belong under trainer.callbacks"):
        from lightning.pytorch.callbacks import Timer

        _orchestrator(Path("/tmp"), [Timer()])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _FakeOrchestrator:
    config = FederationConfig(num_rounds=2)


def test_progress_is_one_bar_in_a_terminal_lines_otherwise_and_can_be_switched_off():
    assert isinstance(progress_callback("auto", stream=_Terminal()), ProgressBar)
    assert isinstance(progress_callback("auto", stream=io.StringIO()), PlainLines)
    assert type(progress_callback("off")) is FederationCallback
    with pytest.raises(ValueError, match="must be one of auto, bar, lines, off"):
        progress_callback("verbose")
    stream = _Terminal()
    bar, orch = ProgressBar(stream), _FakeOrchestrator()
    state = type("S", (), {"round": 0, "history": [{"round": 0, "eval/reward/a_to_m": 0.1}]})()
    bar.on_federation_start(orch, state)
    for r in (1, 2):
        bar.on_client_start(orch, r, 3)
        bar.on_round_end(orch, state, {"round": r, "eval/reward/a_to_m": 0.1 * (r + 1)})
    bar.on_federation_end(orch, state)
    text = stream.getvalue()
    assert "2/2" in text and "a_to_m=0.300" in text and "client 3" in text
    assert text.count("\n") <= 1  # redrawn in place: no line per round


# ---- the client optimiser ----


def _one_client_step(tmp_path: Path, optimizer: list[str]) -> dict[str, torch.Tensor]:
    main(["fit", *TINY, *optimizer, "--federation.num_rounds=1", "--federation.progress=off",
          "--federation.save_adapters=true", f"--federation.output_dir={tmp_path}"])
    before, after = (load_file(str(tmp_path / "adapters" / f"round_00{r}.safetensors")) for r in (0, 1))
    return {k: after[k] - before[k] for k in before}  # server_lr = 1 and one client: the client's update


def test_optimizer_config_reaches_the_client_sgd_steps_along_d_adam_moves_each_coordinate_by_lr(tmp_path):
    lr = 0.01
    adam = _one_client_step(
        tmp_path / "adam", ["--optimizer=AdamW", f"--optimizer.lr={lr}", "--optimizer.weight_decay=0"]
    )
    sgd = _one_client_step(tmp_path / "sgd", ["--optimizer=SGD", f"--optimizer.lr={lr}"])
    adam_flat, sgd_flat = (torch.cat([v.flatten() for v in d.values()]) for d in (adam, sgd))
    moved = adam_flat.abs() > 0.1 * lr
    # Adam's first step is lr · g/(|g| + eps) = lr · sign(g) on every coordinate with a gradient well above eps
    at_lr = ((adam_flat[moved].abs() - lr).abs() < 0.01 * lr).float().mean()
    print(f"Adam: {int(moved.sum())} coordinates moved, {float(at_lr):.4f} of them by lr ± 1%")
    assert moved.sum() > 100 and at_lr > 0.95
    # SGD's step is lr · d with ‖d‖ clipped to max_grad_norm = 1
    assert 0 < sgd_flat.norm() <= lr * 1.0 + 1e-6
    assert adam_flat.norm() > 10 * sgd_flat.norm()
    # same direction of travel on the coordinates both moved (the same seed gives the same rollouts)
    both = moved & (sgd_flat.abs() > 0)
    assert (torch.sign(adam_flat[both]) == torch.sign(sgd_flat[both])).float().mean() > 0.95


def test_persist_keeps_each_clients_optimizer_and_scheduler_state_across_rounds(tmp_path):
    orchestrator = _orchestrator(tmp_path, num_rounds=3, client_fraction=0.5, client_optimizer_state="persist",
                                 progress="off", trainer={"max_steps": 2})
    use_client_optimizer(orchestrator.module, {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
                         {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": 0.5}})
    state = orchestrator.run()
    participations = {str(c): sum(1 for r in state.client_history if r["client"] == c) for c in (0, 1)}
    assert set(state.client_states) == {k for k, n in participations.items() if n}
    for client, saved in state.client_states.items():
        steps = 2 * participations[client]  # 2 local steps per round the client took part in, accumulated
        assert all(float(s["step"]) == steps for s in saved["optimizer"]["state"].values())
        assert saved["lr_schedulers"][0]["last_epoch"] == steps
        assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 * 0.5**steps)
        assert all(t.device.type == "cpu" for s in saved["optimizer"]["state"].values() for t in s.values())


def test_reduce_lr_on_plateau_and_a_scheduler_without_optimizer_are_refused():
    with pytest.raises(ValueError, match="ReduceLROnPlateau needs a monitored metric"):
        use_client_optimizer(make_module(), {"class_path": "torch.optim.SGD"},
                             {"class_path": "torch.optim.lr_scheduler.ReduceLROnPlateau"})
    with pytest.raises(ValueError, match="lr_scheduler: needs an optimizer: group"):
        FIRMCLI(args=["fit", *TINY, "--lr_scheduler=StepLR", "--lr_scheduler.step_size=1"])


# ---- generate and help ----


def test_generate_prints_one_response_per_prompt_with_each_objectives_reward(logged_run: Path, capsys):
    prompts = ["Tell me about rivers.", "How do I bake bread?"]
    cli = FIRMCLI(args=["generate", *TINY, f"--ckpt_path={logged_run / 'adapters' / 'final'}",
                        f"--generate.prompts={json.dumps(prompts)}"])
    out = capsys.readouterr().out
    assert out.count("response: ") == 2 and [g.prompt for g in cli.generations] == prompts
    scorers = [CharsetReward("a_to_m", "abcdefghijklm"), CharsetReward("n_to_z", "nopqrstuvwxyz")]
    for g in cli.generations:
        for scorer in scorers:  # the printed rewards are the objectives' rewards of the printed response
            expected = float(scorer([g.prompt], [g.response])[0])
            assert g.rewards[scorer.name] == pytest.approx(expected)
            assert f"{scorer.name}={expected:.4f}" in out
    assert f"adapter: {logged_run / 'adapters' / 'final'}" in out
    with pytest.raises(ValueError, match="generate.prompts is empty"):
        FIRMCLI(args=["generate", *TINY])


def test_fit_help_explains_fit_and_every_federation_option(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # undo the line wrapping
    assert "Run a whole federation: N rounds of client sampling" in out
    assert "--federation.num_rounds NUM_ROUNDS Number of federated rounds N (server aggregations)." in out
    assert "Runs the full optimization routine" not in out.split("options:")[0]
    for option in ("federation.client_optimizer_state", "model.sampling.num_generations", "model.loss.kl_coef",
                   "model.learning_rate", "model.lora.r"):
        help_text = re.search(rf"--{re.escape(option)} \S+ (.*?)\(type:", out).group(1)
        assert len(help_text.split()) >= 3, (option, help_text)


def test_profilers_given_by_class_are_built_per_client_and_simple_shows_its_table(tmp_path, capsys, caplog):
    """A Trainer argument given as a class (here a profiler) is built fresh for every client fit, like
    callbacks and loggers; `--trainer.profiler simple` prints its table with federation.quiet on."""
    import logging

    profiles = tmp_path / "profiles"
    main(["fit", *TINY, "--federation.num_rounds=1", f"--federation.output_dir={tmp_path / 'a'}",
          "--trainer.profiler", "SimpleProfiler", f"--trainer.profiler.dirpath={profiles}"])
    written = sorted(p.name for p in profiles.glob("*.txt"))
    assert written and all("client_00" in name and "round_001" in name for name in written), written
    assert "Action" in (profiles / written[0]).read_text()  # the profiler's table
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.profilers"):
        main(["fit", *TINY, "--federation.num_rounds=1", f"--federation.output_dir={tmp_path / 'b'}",
              "--trainer.profiler", "simple"])
    assert "Profiler Report" in caplog.text + capsys.readouterr().err


def test_a_bad_setting_fails_before_any_client_trains(tmp_path, capsys):
    out = tmp_path / "bad"
    with pytest.raises(SystemExit):
        main(["fit", *TINY, f"--federation.output_dir={out}", "--model.learning_rate", "-1"])
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "learning rate" in captured.err and "model.learning_rate" in captured.err
    assert "round 1" not in captured.out and not (out / "clients").exists()

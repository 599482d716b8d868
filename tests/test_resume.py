"""Resume: a run killed with SIGKILL mid-round and resumed equals an uninterrupted run; checkpoints
survive crashes while they are written; an incompatible config is refused naming what differs."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_datamodule, make_module
from firm_lightning import checkpoint
from firm_lightning.callbacks import FederationCallback
from firm_lightning.checkpoint import CheckpointError
from firm_lightning.cli import main
from firm_lightning.gradients import WEIGHTING_EFFECT
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig, FederationState
from firm_lightning.report import summary_table
from firm_lightning.rewards import CharsetReward, HFRewardModel, NormalizedReward
from firm_lightning.trainer_factory import TrainerFactory

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2
TINY = [
    "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
    f"--federation.num_rounds={ROUNDS}", "--federation.num_clients=2", "--federation.min_clients=1",
    "--trainer.max_steps=1", "--data.max_prompts=32", "--data.eval_size=4", "--data.batch_size=4",
    "--data.partition=iid", "--model.sampling.max_new_tokens=8", "--model.sampling.num_generations=2",
    "--model.sampling.eval_num_generations=1",
    # The lowest eval reward: an early round, not the last one, so a resume must remember it.
    '--federation.callbacks=[{"class_path": "firm_lightning.callbacks.SaveBestAdapter", '
    '"init_args": {"monitor": "eval/reward/a_to_m", "mode": "min"}}]',
]


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in csv.DictReader(f)]


def _kill_during_round(out: Path, round_idx: int) -> subprocess.Popen:
    """Start `fit` in a subprocess and SIGKILL it as soon as it starts training round ``round_idx``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "firm_lightning", *TINY, f"--federation.output_dir={out}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    proc.seen = []

    def watch():
        for line in proc.stdout:
            proc.seen.append(line)
            if line.startswith(f"round {round_idx}/{ROUNDS} | training"):
                os.kill(proc.pid, signal.SIGKILL)
                return

    proc.watcher = threading.Thread(target=watch, daemon=True)
    proc.watcher.start()
    return proc


def test_sigkill_mid_round_then_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    proc = _kill_during_round(killed, 2)
    main([*TINY, f"--federation.output_dir={straight}"])  # meanwhile, in this process
    proc.wait(timeout=300)
    proc.watcher.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL, "".join(proc.seen)
    # It died during round 2: round 1 is the last finished one, round 2 left nothing behind.
    assert checkpoint.load_state(killed / "checkpoint", FederationState)[0].round == 1
    # It died holding the folder's lock: the file stays, the lock (the kernel's) does not block the resume.
    assert f'"pid": {proc.pid}' in (killed / ".lock").read_text()
    assert [int(r["round"]) for r in _rows(killed / "metrics.csv")] == [0, 1]

    capsys.readouterr()
    main([*TINY, f"--federation.output_dir={killed}", "--federation.resume=true"])
    out = capsys.readouterr().out
    # It continued from round 2: the rounds already finished were not trained again.
    assert f"resume: round 1 of {ROUNDS} finished" in out
    assert f"round 1/{ROUNDS} | training" not in out and f"round 2/{ROUNDS} | training" in out

    final = lambda d: load_file(str(d / "adapters" / "final" / "adapter_model.safetensors"))
    a, b = final(killed), final(straight)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert _rows(killed / "metrics.csv") == _rows(straight / "metrics.csv")
    assert _rows(killed / "client_metrics.csv") == _rows(straight / "client_metrics.csv")
    assert len(_rows(straight / "metrics.csv")) == ROUNDS + 1
    # SaveBestAdapter kept the same best round and adapter across the resume.
    best = lambda d: (
        json.loads((d / "adapters" / "best.json").read_text()),
        load_file(str(d / "adapters" / "best.safetensors")),
    )
    (meta_a, best_a), (meta_b, best_b) = best(killed), best(straight)
    assert meta_a == meta_b and meta_b["round"] < ROUNDS, (meta_a, meta_b)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_b)


def _orchestrator(out, module=None, **federation) -> FederatedOrchestrator:
    module = module or seeded(make_module)
    config = FederationConfig(num_clients=2, output_dir=str(out), **{"num_rounds": 1, **federation})
    factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu"}, out)
    return FederatedOrchestrator(module, make_datamodule(2), config, factory, echo=lambda _: None)


def seeded(build, **kwargs):
    torch.manual_seed(0)  # the same LoRA initialisation for every module built here
    return build(**kwargs)


def test_more_rounds_extend_a_finished_run_and_reward_statistics_are_restored(tmp_path):
    normalized = lambda: seeded(
        make_module,
        objectives=[
            NormalizedReward(CharsetReward("a_to_m", "abcdefghijklm"), mode="running"),
            CharsetReward("n_to_z", "nopqrstuvwxyz"),
        ],
    )
    first = _orchestrator(tmp_path / "a", normalized()).run()
    stats = first.objective_state["a_to_m"]
    assert stats["count"] > 0
    resumed_module = normalized()
    extended = _orchestrator(tmp_path / "a", resumed_module, num_rounds=2, resume=True).run()
    straight = _orchestrator(tmp_path / "b", normalized(), num_rounds=2).run()
    assert [r["round"] for r in extended.history] == [0, 1, 2]
    assert all(torch.equal(extended.global_adapter[k], v) for k, v in straight.global_adapter.items())
    assert extended.objective_state == straight.objective_state
    with pytest.raises(CheckpointError, match="holds 2 finished rounds but federation.num_rounds=1"):
        _orchestrator(tmp_path / "a", normalized(), resume=True).run()


def test_resume_with_another_config_is_refused_naming_the_difference(tmp_path):
    _orchestrator(tmp_path, num_rounds=1).engine.save_checkpoint(
        FederationState(round=0, global_adapter=make_module().adapter_state()))
    other_objective = make_module(objectives=[CharsetReward("a_to_m", "abc"), CharsetReward("n_to_z", "nopqrstuvwxyz")])
    with pytest.raises(CheckpointError, match=r"objectives\[0\]\.charset: was .*, now \[\"a\", \"b\", \"c\"\]"):
        _orchestrator(tmp_path, other_objective, resume=True).run()
    from conftest import TINY_LORA
    import dataclasses
    with pytest.raises(CheckpointError, match=r"lora\.r: was 8, now 4"):
        _orchestrator(tmp_path, make_module(lora=dataclasses.replace(TINY_LORA, r=4)), resume=True).run()
    from firm_lightning.policy import TinyPolicy
    with pytest.raises(CheckpointError, match=r"model\.config\.n_embd: was 64, now 32"):
        _orchestrator(tmp_path, make_module(policy=TinyPolicy(hidden_size=32)), resume=True).run()
    with pytest.raises(CheckpointError, match=r"federation\.seed: was 0, now 5"):
        _orchestrator(tmp_path, seed=5, resume=True).run()


def _saved(directory: Path, round_idx: int) -> FederationState:
    state = FederationState(round=round_idx, global_adapter={"w": torch.full((3,), float(round_idx))},
                            history=[{"round": r, "x": r / 3} for r in range(round_idx + 1)])
    checkpoint.save_state(directory, state, {"fingerprint": {"a": 1}})
    return state


def test_a_crash_while_writing_leaves_the_previous_state_loadable(tmp_path):
    _saved(tmp_path, 1)
    # The process dies in the middle of writing round 2's tensor file ...
    with mock.patch("firm_lightning.checkpoint.os.fsync", side_effect=SystemExit("killed")):
        with pytest.raises(SystemExit):
            _saved(tmp_path, 2)
    # ... and a half-written temporary file from an earlier crash lies around too.
    (tmp_path / ".state.json.tmp").write_text('{"round": 9, "trunc')
    state, extra = checkpoint.load_state(tmp_path, FederationState)
    assert state.round == 1 and torch.equal(state.global_adapter["w"], torch.ones(3))
    assert state.history[-1] == {"round": 1, "x": 1 / 3} and extra["fingerprint"] == {"a": 1}


def test_a_crash_while_writing_metrics_leaves_the_previous_file_whole(tmp_path):
    """metrics.csv is what a resumed comparison reads to reuse a finished run: never half-written."""
    from firm_lightning.report import write_csv

    path = tmp_path / "metrics.csv"
    write_csv(path, [{"round": 0, "eval/reward/a": 0.5}])
    before = path.read_bytes()
    with mock.patch("firm_lightning.checkpoint.os.fsync", side_effect=SystemExit("killed")):
        with pytest.raises(SystemExit):
            write_csv(path, [{"round": 0, "eval/reward/a": 0.5}, {"round": 1, "eval/reward/a": 0.7}])
    assert path.read_bytes() == before
    write_csv(path, [{"round": 0, "eval/reward/a": 0.5}, {"round": 1, "eval/reward/a": 0.7}])
    with open(path, newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["0", "1"]


def test_disk_full_while_saving_keeps_the_previous_state_and_says_so(tmp_path):
    _saved(tmp_path, 1)
    with mock.patch("firm_lightning.checkpoint.os.fsync", side_effect=OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(
            OSError, match="No space left on the device while writing .*earlier checkpoint is intact.*resume true"
        ):
            _saved(tmp_path, 2)
    assert not list(tmp_path.glob(".*.tmp"))
    assert checkpoint.load_state(tmp_path, FederationState)[0].round == 1


def test_a_damaged_tensor_file_is_refused_not_loaded(tmp_path):
    _saved(tmp_path, 1)
    (tensor_file,) = tmp_path.glob("state_*.safetensors")
    tensor_file.write_bytes(tensor_file.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        checkpoint.load_state(tmp_path, FederationState)


def test_every_field_is_saved_including_dicts_of_tensors_per_client(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Extended(FederationState):
        client_optimizer: dict = dataclasses.field(default_factory=dict)

    state = Extended(round=2, global_adapter={"w": torch.ones(2)},
                     client_optimizer={3: {"step": 5, "exp_avg": {0: torch.arange(4.0)}}, 7: {}})
    checkpoint.save_state(tmp_path, state, {})
    loaded, _ = checkpoint.load_state(tmp_path, Extended)
    assert loaded.round == 2 and set(loaded.client_optimizer) == {3, 7}
    assert torch.equal(loaded.client_optimizer[3]["exp_avg"][0], torch.arange(4.0))
    assert loaded.client_optimizer[3]["step"] == 5
    assert "pickle" not in (tmp_path / "state.json").read_text()


def test_compare_resumes_each_run_from_its_own_checkpoint(tmp_path):
    from firm_lightning.algorithms import FIRM, Linear
    from firm_lightning.studies.compare import CompareSettings, run_comparison

    module, messages = seeded(make_module), []
    settings = CompareSettings(algorithms=[FIRM(beta=1.0), Linear()], seeds=[0])
    trainer = {"max_steps": 1, "accelerator": "cpu"}
    config = FederationConfig(num_rounds=1, num_clients=2, output_dir=str(tmp_path))
    run_comparison(module, make_datamodule(2), config, trainer, settings, echo=lambda m: None)
    config = FederationConfig(num_rounds=2, num_clients=2, output_dir=str(tmp_path), resume=True)
    rows = run_comparison(module, make_datamodule(2), config, trainer, settings, echo=messages.append)
    for name in ("firm_beta1", "linear"):
        assert f"[{name} α=1 seed=0] resume: round 1 of 2 finished" in "\n".join(messages)
        assert [r["round"] for r in rows if r["algorithm"] == name] == [0, 1, 2]
    assert sum("training clients" in m for m in messages) == 2  # one new round per run, none repeated


PRE_REFACTOR = ROOT / "tests" / "fixtures" / "pre_refactor_run"
PRE_REFACTOR_ARGS = [
    "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.path=firm_lightning/data/prompts.jsonl",
    "--federation.num_clients=2", "--federation.min_clients=1",
    "--trainer.max_steps=1", "--data.max_prompts=32", "--data.eval_size=4", "--data.batch_size=4",
    "--data.partition=iid", "--model.sampling.max_new_tokens=8", "--model.sampling.num_generations=2",
    "--model.sampling.eval_num_generations=1", "--federation.progress=off", "--federation.num_rounds=2",
]


def test_a_run_saved_by_the_code_before_the_restructuring_resumes_and_continues_exactly(tmp_path, capsys, monkeypatch):
    """Class paths and the resume fingerprint are public API: a checkpoint written by the code of
    commit a4c3627 (tests/fixtures/pre_refactor_run) resumes, and round 2 is bit-identical to that code's.
    (The prompt file is named relative to the repository: the fingerprint records data.path as given.)"""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    out.mkdir()
    import shutil

    shutil.copytree(PRE_REFACTOR / "checkpoint", out / "checkpoint")
    main([*PRE_REFACTOR_ARGS, f"--federation.output_dir={out}", "--federation.resume=true"])
    assert "resume: round 1 of 2 finished" in capsys.readouterr().out
    expected = load_file(str(PRE_REFACTOR / "expected_round_002.safetensors"))
    resumed = load_file(str(out / "adapters" / "round_002.safetensors"))
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    rows, old_rows = _rows(out / "metrics.csv"), _rows(PRE_REFACTOR / "expected_metrics.csv")
    assert set(rows[0]) - set(old_rows[0]) == set(WEIGHTING_EFFECT), "the only metrics added since that code's"
    assert [{k: r[k] for k in old} for r, old in zip(rows, old_rows)] == old_rows and len(rows) == len(old_rows)


def _wrapped(inner: str = "hf", name_or_path: str = "rm/harmless", template: str = "{prompt} {response}",
             mean: float = 0.5, std: float = 2.0):
    """A module whose first objective wraps a reward model (never loaded: the fingerprint only describes it)."""
    wrapped = (HFRewardModel("a_to_m", name_or_path, template=template) if inner == "hf"
               else CharsetReward("a_to_m", "abcdefghijklm"))
    return seeded(make_module, objectives=[NormalizedReward(wrapped, mode="fixed", mean=mean, std=std),
                                           CharsetReward("n_to_z", "nopqrstuvwxyz")])


def test_resume_refuses_a_changed_wrapped_objective_in_one_line_naming_it(tmp_path):
    """What a NormalizedReward is built from is in the fingerprint: the reward it wraps (its class, model
    path, template) and its fixed statistics."""
    module = _wrapped()
    _orchestrator(tmp_path, module).engine.save_checkpoint(
        FederationState(round=0, global_adapter=module.adapter_state()))
    assert _orchestrator(tmp_path, _wrapped(), resume=True).engine.saved_state().round == 0
    changes = {
        "objectives[0].reward.class": _wrapped(inner="charset"),
        "objectives[0].reward.name_or_path": _wrapped(name_or_path="rm/helpful"),
        "objectives[0].reward.template": _wrapped(template="{prompt}{response}"),
        "objectives[0].configured_statistics.mean": _wrapped(mean=0.0),
        "objectives[0].configured_statistics.std": _wrapped(std=1.0),
    }
    for key, changed in changes.items():
        with pytest.raises(CheckpointError) as refused:
            _orchestrator(tmp_path, changed, resume=True).run()
        assert "\n" not in str(refused.value) and f"{key}: was" in str(refused.value), str(refused.value)


def test_a_checkpoint_of_an_earlier_fingerprint_version_compares_only_what_it_recorded(tmp_path):
    _orchestrator(tmp_path).engine.save_checkpoint(FederationState(round=0, global_adapter=seeded(
        make_module).adapter_state()))
    meta_path = tmp_path / "checkpoint" / "state.json"
    meta = json.loads(meta_path.read_text())
    assert meta["fingerprint_version"] == checkpoint.FINGERPRINT_VERSION
    del meta["fingerprint"]["training"]["loss"]["advantages"]  # a key this version records and an older did not
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"training\.loss\.advantages: absent before"):
        _orchestrator(tmp_path, resume=True).engine.saved_state()

    del meta["fingerprint_version"]  # written before versions were recorded: version 1
    meta_path.write_text(json.dumps(meta))
    lines = []
    resumed = _orchestrator(tmp_path, resume=True)
    resumed.engine.echo = lines.append
    assert resumed.engine.saved_state().round == 0
    assert any("version 1) does not record training.loss.advantages; not compared" in line for line in lines), lines
    # ... and a change it did record is still refused
    with pytest.raises(CheckpointError, match=r"federation\.seed: was 0, now 5"):
        _orchestrator(tmp_path, seed=5, resume=True).engine.saved_state()


def test_the_fingerprint_describes_callable_settings():
    """A wrapped reward (a callable object) is described like any setting, a function by its name, a network a
    setting holds by its class (its weights are state)."""
    import math

    class Holder:
        def __init__(self):
            self.reward, self.scale, self.net = CharsetReward("a", "ba"), math.sqrt, torch.nn.Linear(1, 1)

    described = checkpoint.describe(Holder())
    assert described["reward"] == {"class": "firm_lightning.rewards.CharsetReward", "name": "a", "charset": ["a", "b"]}
    assert described["scale"] == "math.sqrt" and described["net"] == "torch.nn.modules.linear.Linear"


class _InterruptAfterRound(FederationCallback):
    """Ctrl-C as round ``round_idx`` ends (its state is saved by then)."""

    def __init__(self, round_idx: int) -> None:
        self.round_idx = round_idx

    def on_round_end(self, federation, state, row) -> None:
        if state.round == self.round_idx:
            raise KeyboardInterrupt


def test_a_resumed_run_reports_the_time_of_all_its_segments(tmp_path, monkeypatch):
    """summary.txt's time is the run's, summed over the processes that ran it: the first process's clock runs
    1000 times fast, so its share dwarfs the second's. A finished run resumed again keeps its summary."""
    from firm_lightning import engine

    real = time.perf_counter
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: 1000 * real()))
    with pytest.raises(KeyboardInterrupt):
        _orchestrator(tmp_path, num_rounds=2, callbacks=[_InterruptAfterRound(1)]).run()
    first = checkpoint.load_state(tmp_path / "checkpoint", FederationState)[0]
    assert first.round == 1 and not (tmp_path / "summary.txt").exists()
    monkeypatch.undo()
    tic = time.perf_counter()
    state = _orchestrator(tmp_path, num_rounds=2, resume=True).run()
    second = time.perf_counter() - tic
    assert first.wall_s < state.wall_s < first.wall_s + second
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.startswith(f"FIRM federation: 2 rounds in {state.wall_s:.1f}s\n"), summary
    _orchestrator(tmp_path, num_rounds=2, resume=True).run()  # finished: nothing is trained
    assert (tmp_path / "summary.txt").read_text() == summary


def test_a_checkpoint_without_a_recorded_time_resumes_with_the_time_unknown(tmp_path):
    """Checkpoints written before the run's time was saved load with ``wall_s`` None; the summary then
    states no time rather than only the last process's."""
    checkpoint.save_state(tmp_path, FederationState(round=1, global_adapter={"w": torch.ones(2)}, wall_s=3.5), {})
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["fields"].pop("wall_s") == 3.5
    (tmp_path / "state.json").write_text(json.dumps(meta))
    loaded, _ = checkpoint.load_state(tmp_path, FederationState)
    assert loaded.wall_s is None
    loaded.history = [{"round": 0, "eval/reward/a": 0.1}, {"round": 1, "eval/reward/a": 0.2}]
    assert summary_table(loaded, ["a"], loaded.wall_s).splitlines()[0] == "FIRM federation: 1 rounds"

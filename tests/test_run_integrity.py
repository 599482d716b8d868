"""Run folders that never lie, through the command line: one writer at a time, a clean start or an
explicit one, nothing written by a refused run (a listing with hashes before and after each refusal),
one line for bad prompts, and Ctrl-C ending in one line and exit code 130 wherever it lands."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import shutil
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors.torch import load_file

from firm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2
TINY = [
    "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), f"--federation.num_rounds={ROUNDS}",
    "--federation.num_clients=2", "--federation.min_clients=1", "--trainer.max_steps=1", "--data.max_prompts=32",
    "--data.eval_size=4", "--data.batch_size=4", "--data.partition=iid", "--model.sampling.max_new_tokens=8",
    "--model.sampling.num_generations=2", "--model.sampling.eval_num_generations=1", "--federation.progress=off",
]


def objectives(second: str, **init_args) -> str:
    """``--model.objectives`` with a_to_m and, as n_to_z, the reward class ``second`` (from tests/run_faults.py)."""
    first = {"name": "a_to_m", "charset": "abcdefghijklm"}
    return "--model.objectives=" + json.dumps([
        {"class_path": "firm_lightning.rewards.CharsetReward", "init_args": first},
        {"class_path": second, "init_args": {"name": "n_to_z", "charset": "nopqrstuvwxyz", **init_args}},
    ])


def listing(path: Path) -> dict[str, str]:
    """Every file and folder under ``path`` (hidden ones included) with a hash of its bytes."""
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def refused(capsys, args: list[str]) -> str:
    """Run the CLI, expect exit code 1 and one line without a traceback; return the line."""
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    main([*TINY, f"--federation.output_dir={out}"])
    return out


def test_a_second_fit_is_refused_while_the_first_runs_and_the_folder_holds_one_run(tmp_path, capsys):
    """The first fit runs in a thread of this process (a lock taken twice in one process is refused as from
    another: flock locks belong to each opening of the file; tests/test_run_folder.py holds one in another
    process), held in its first evaluation while the second fit tries the same folder."""
    out, block = tmp_path / "same", tmp_path / "hold"
    block.touch()  # the first run waits in its first evaluation while this file exists
    ended = []

    def first_fit():
        try:
            main([*TINY, "--federation.num_rounds=1", f"--federation.output_dir={out}",
                  objectives("run_faults.WaitsWhileFileExists", block_file=str(block))])
            ended.append(0)
        except BaseException as error:  # noqa: B036 (reported by the assertion below)
            ended.append(error)

    first = threading.Thread(target=first_fit)
    first.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").is_file() or b"pid" not in (out / ".lock").read_bytes():
            assert first.is_alive() and time.monotonic() < deadline, ended
            time.sleep(0.1)
        before = listing(out)
        with pytest.raises(SystemExit) as stop:
            main([*TINY, "--federation.seed=7", f"--federation.output_dir={out}"])
        assert stop.value.code == 1
        err = capsys.readouterr().err
        assert f"error: {out} is in use by another run (PID {os.getpid()} on " in err and "`fit`" in err, err
        assert listing(out) == before
    finally:
        block.unlink()
        first.join(timeout=300)
    assert ended == [0]
    # Every file is the first run's: its seed, its rounds, its numbers in the model card.
    assert yaml.safe_load((out / "config.yaml").read_text())["federation"]["seed"] == 0
    metrics = rows(out / "metrics.csv")
    assert [int(r["round"]) for r in metrics] == [0, 1]
    card = (out / "adapters" / "final" / "README.md").read_text()
    for name in ("a_to_m", "n_to_z"):
        first_eval, last_eval = (float(metrics[i][f"eval/reward/{name}"]) for i in (0, -1))
        assert f"| `{name}` | {first_eval:.4f} | {last_eval:.4f} |" in card
    assert not (out / ".lock").exists()


def test_a_rerun_is_refused_without_resume_and_overwrite_leaves_no_file_of_the_old_run(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = listing(out)
    line = refused(capsys, [*TINY, f"--federation.output_dir={out}"])
    assert f"{out} already holds a run" in line
    assert "--federation.resume true" in line and "--federation.overwrite true" in line
    assert listing(out) == before
    started = time.time()
    main([*TINY, "--federation.num_rounds=1", "--federation.overwrite=true", f"--federation.output_dir={out}"])
    old = [p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime < started]
    assert old == []
    assert [int(r["round"]) for r in rows(out / "metrics.csv")] == [0, 1]
    assert not (out / "adapters" / "round_002.safetensors").exists()
    assert not list((out / "clients").glob("*/round_002"))


def _damage_tensors(out: Path) -> None:
    latest = json.loads((out / "checkpoint" / "state.json").read_text())["tensor_file"]
    path = out / "checkpoint" / latest
    path.write_bytes(path.read_bytes()[:-16])


def _damage_json(out: Path) -> None:
    (out / "checkpoint" / "state.json").write_text('{"format_version": 1, "tensor_fi')


@pytest.mark.parametrize("args, damage, message", [
    (["--federation.num_clients=3"], None, "federation.num_clients: was 2, now 3"),
    (["--model.lora.r=4"], None, "lora.r: was 8, now 4"),
    ([], _damage_tensors, "does not match its checksum"),
    ([], _damage_json, "Cannot read the federation checkpoint"),
])
def test_a_refused_resume_leaves_the_folder_byte_identical(finished, tmp_path, capsys, args, damage, message):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    if damage is not None:
        damage(out)
    before = listing(out)
    line = refused(capsys, [*TINY, *args, "--federation.resume=true", f"--federation.output_dir={out}"])
    assert message in line
    if damage is not None:  # the previous state is named, and the adapters of every round
        assert "The state after round 1 is intact beside it" in line and "--federation.resume_from previous" in line
    assert listing(out) == before


def test_a_damaged_latest_state_resumes_from_the_previous_one_when_asked(finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    _damage_tensors(out)
    main([*TINY, "--federation.resume=true", "--federation.resume_from=previous", f"--federation.output_dir={out}"])
    assert "resume: round 1 of 2 finished" in capsys.readouterr().out
    final = lambda d: load_file(str(d / "adapters" / "final" / "adapter_model.safetensors"))
    a, b = final(out), final(finished)
    assert all(torch.equal(a[k], b[k]) for k in b)  # round 2 trained again, exactly as the first time
    untimed = lambda d: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows(d / "metrics.csv")]
    assert untimed(out) == untimed(finished)


def _prompts(path: Path, edit) -> Path:
    lines = (ROOT / "firm_lightning" / "data" / "prompts.jsonl").read_bytes().splitlines()[:40]
    path.write_bytes(b"\n".join(edit(lines)) + b"\n")
    return path


def _row(text: str) -> bytes:
    return json.dumps({"prompt": text, "topic": "cooking"}).encode()


@pytest.mark.parametrize("case", ["not_utf8", "empty_prompt", "long_held_out", "long_training", "no_new_tokens",
                                  "nan_reward"])
def test_a_run_refused_before_round_1_writes_nothing(tmp_path, capsys, case):
    out = tmp_path / "new" / "run"
    data = tmp_path / "prompts.jsonl"
    args, expected = [], ""
    if case == "not_utf8":
        _prompts(data, lambda lines: [*lines[:6], b'{"prompt": "caf\xe9 au lait?", "topic": "cooking"}', *lines[7:]])
        args, expected = [f"--data.path={data}"], f"{data} is not UTF-8 text: byte "
        expected_too = "(row 7, line 7) is 0xe9"
    elif case == "empty_prompt":
        _prompts(data, lambda lines: [*lines[:11], _row("  "), *lines[12:]])
        args, expected = [f"--data.path={data}"], f"{data} row 12: the prompt is empty"
    elif case == "long_held_out":  # every prompt is too long: the held-out ones are checked first
        _prompts(data, lambda lines: [_row("why? " * 60) for _ in lines])
        args, expected = [f"--data.path={data}"], f"{data} row "
        expected_too = "a held-out prompt is 256 tokens long as the policy reads it, more than the 248 that fit"
    elif case == "long_training":
        _prompts(data, lambda lines: [*lines[:30], _row("x" * 3000), *lines[31:]])
        args, expected = [f"--data.path={data}"], f"{data} row 31: a training prompt is 256 tokens long"
    elif case == "no_new_tokens":
        args, expected = ["--model.sampling.max_new_tokens=0"], "sampling.max_new_tokens must be >= 1"
    elif case == "nan_reward":
        args, expected = [objectives("run_faults.NaNReward")], "Reward function 'n_to_z' returned non-finite rewards"
    line = refused(capsys, [*TINY, *args, f"--federation.output_dir={out}"])
    assert expected in line, line
    if case in ("not_utf8", "long_held_out"):
        assert expected_too in line
    if case == "long_held_out":
        assert "--data.max_prompt_tokens 248" in line
    assert not (tmp_path / "new").exists()  # not even the folder


def test_long_prompts_are_cut_only_when_asked_and_the_cut_is_reported(tmp_path):
    from conftest import make_datamodule, make_module

    data = _prompts(tmp_path / "prompts.jsonl", lambda lines: [*lines[:30], _row("x" * 3000), *lines[31:]])
    limit = make_module().prompt_limit()  # the tiny policy: 256 positions, 8 new tokens
    cut = {side: make_datamodule(path=str(data), max_prompt_tokens=100, truncation_side=side)
           for side in ("left", "right")}
    for side, datamodule in cut.items():
        datamodule.limit_prompts(limit)
        datamodule.setup()
        assert datamodule.load_notes == [f"data.max_prompt_tokens=100: cut 1 of 40 prompts from the {side}"]
    (left,) = [p for p in cut["left"].train_prompts + cut["left"].eval_prompts if p.startswith("x")]
    assert left == "x" * 100 and max(limit.measure(cut["right"].train_prompts)) <= limit.max_tokens
    refused = make_datamodule(path=str(data))
    refused.limit_prompts(limit)
    with pytest.raises(ValueError, match=f"{data} row 31: a (training|held-out) prompt is 256 tokens long"):
        refused.setup()


def test_an_existing_output_dir_that_cannot_be_written_is_one_line(tmp_path, capsys):
    out = tmp_path / "read_only"
    out.mkdir()
    real_open = os.open

    def no_write(path, flags, *args):  # what a read-only folder does (chmod does not stop root)
        if Path(path).parent == out and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    with mock.patch("firm_lightning.run_folder.os.open", no_write):
        line = refused(capsys, [*TINY, f"--federation.output_dir={out}"])
    assert f"Cannot write to federation.output_dir '{out}' (Permission denied)" in line
    assert "pass a writable folder with --federation.output_dir" in line
    assert listing(out) == {}


@pytest.mark.parametrize("call, where", [(1, "evaluation"), (2, "client fit")])
def test_ctrl_c_ends_in_one_line_and_exit_code_130_and_the_run_resumes(finished, tmp_path, capsys, call, where):
    out, done = tmp_path / "run", tmp_path / "interrupted"
    # Ctrl-C raises KeyboardInterrupt, as in a shell (a pytest-xdist worker ignores SIGINT by default).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_and_resume(finished, out, done, capsys, call, where)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_and_resume(finished, out, done, capsys, call, where):
    interrupting = objectives("run_faults.InterruptsOnCall", call=call, done_file=str(done))
    one_round = "--federation.num_rounds=1"
    with pytest.raises(SystemExit) as stop:
        main([*TINY, one_round, interrupting, f"--federation.output_dir={out}"])
    assert stop.value.code == 130 and done.exists()
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1] == "interrupted; continue with `--federation.resume true` (same output_dir)"
    assert "Traceback" not in err
    if where == "evaluation":  # round 0 was being evaluated: nothing was written
        assert not out.exists()
        return
    assert [int(r["round"]) for r in rows(out / "metrics.csv")] == [0]
    main([*TINY, one_round, interrupting, "--federation.resume=true", f"--federation.output_dir={out}"])
    assert "resume: round 0 of 1 finished" in capsys.readouterr().out
    # The same rewards as the uninterrupted run's (the class differs, not what it scores): its round 1 adapter.
    a = load_file(str(out / "adapters" / "final" / "adapter_model.safetensors"))
    b = load_file(str(finished / "adapters" / "round_001.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sweep_run_that_is_not_finished_starts_over_or_resumes_under_its_lock(tmp_path):
    """compare and pareto reuse their finished runs; one that is not is resumed when asked and it saved a
    checkpoint, else started over with its earlier files removed first (``overwrite``: the engine clears
    them, tested above on ``fit``), always holding the run's lock."""
    from conftest import make_datamodule, make_module
    from firm_lightning.algorithms import FIRM
    from firm_lightning.federation import FederationConfig
    from firm_lightning.orchestrator import FederatedOrchestrator, run_federation
    from firm_lightning.run_folder import RunFolder

    folder = RunFolder(tmp_path / "runs" / "firm").create()
    seen = []

    def run(self, accepted=None):
        seen.append((self.config.resume, self.config.overwrite, folder.lock_file.is_file()))

    module = make_module()
    for resume in (False, True):
        config = FederationConfig(num_rounds=1, num_clients=2, output_dir=str(tmp_path), resume=resume)
        with mock.patch.object(FederatedOrchestrator, "run", run):
            run_federation(module, make_datamodule(2), config, {"max_steps": 1}, FIRM(beta=1.0),
                           module.adapter_state(), folder.path)
        (folder.checkpoint / "state.json").parent.mkdir(exist_ok=True)
        (folder.checkpoint / "state.json").write_text("{}")  # a checkpoint to resume from, for the next pass
    assert seen == [(False, True, True), (True, False, True)]

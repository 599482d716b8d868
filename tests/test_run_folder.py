"""The run folder: one object knows the file names of ``output_dir`` and reads them back."""

from __future__ import annotations

import ast
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from firm_lightning.report import write_csv
from firm_lightning.run_folder import RunFolder, load_adapter_file, objective_state_beside

PACKAGE = Path(__file__).resolve().parents[1] / "firm_lightning"


def _finished_run(path: Path, rounds: int) -> RunFolder:
    folder = RunFolder(path).create()
    write_csv(folder.metrics, [{"round": r, "eval/reward/a": 0.1 * r, "clients": "" if r == 0 else 2}
                               for r in range(rounds + 1)])
    folder.summary.write_text("done\n")
    return folder


def test_names_follow_the_documented_layout(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.round_adapter(5) == tmp_path / "adapters" / "round_005.safetensors"
    assert folder.objective_state == tmp_path / "adapters" / "objective_state.json"
    assert folder.final == tmp_path / "adapters" / "final"
    assert folder.best_adapter("best") == tmp_path / "adapters" / "best.safetensors"
    assert folder.best_record("best") == tmp_path / "adapters" / "best.json"
    assert folder.client_state(3) == tmp_path / "clients" / "client_003" / "state"
    assert folder.server_error.parent == folder.flower
    entries = folder.entries()
    assert {folder.config, folder.metrics, folder.summary, folder.checkpoint, folder.adapters} <= set(entries)
    assert all(p.parent == tmp_path for p in entries)  # top-level: what a clean start would clear


def test_finished_means_the_summary_and_the_asked_number_of_rounds(tmp_path):
    folder = RunFolder(tmp_path / "run")
    assert not folder.is_finished() and folder.history() == []
    folder = _finished_run(tmp_path / "run", rounds=2)
    assert folder.is_finished() and folder.is_finished(2)
    assert not folder.is_finished(3)  # a shorter run is not the run asked for
    assert not folder.is_finished(since=time.time() + 60)  # not written by the run that started then
    folder.summary.unlink()
    assert not folder.is_finished(2)  # metrics alone: a run in progress or interrupted


def test_history_reads_numbers_with_nan_for_empty_cells(tmp_path):
    rows = _finished_run(tmp_path, rounds=2).history()
    assert [r["round"] for r in rows] == [0, 1, 2] and isinstance(rows[0]["round"], int)
    assert math.isnan(rows[0]["clients"]) and rows[2]["clients"] == 2.0
    assert rows[2]["eval/reward/a"] == pytest.approx(0.2)


def test_round_adapters_are_in_round_order_and_skip_other_files(tmp_path):
    folder = RunFolder(tmp_path)
    folder.adapters.mkdir(parents=True)
    for r in (1000, 2, 0, 999):
        save_file({"w": torch.full((1,), float(r))}, str(folder.round_adapter(r)))
    save_file({"w": torch.zeros(1)}, str(folder.adapters / "round_best.safetensors"))  # a SaveBestAdapter name
    assert [p.name for p in folder.round_adapters()] == [
        "round_000.safetensors", "round_002.safetensors", "round_999.safetensors", "round_1000.safetensors"]
    assert float(load_adapter_file(folder.round_adapter(1000))["w"]) == 1000.0


def test_resolved_config_is_the_runs_own_or_its_sweeps(tmp_path):
    sweep = RunFolder(tmp_path / "sweep").create()
    sweep.config.write_text(yaml.safe_dump({"federation": {"output_dir": str(sweep.path)}, "pareto": {}}))
    run = RunFolder(sweep.runs / "linear" / "p_0.5").create()
    path, config = run.resolved_config()
    assert path == sweep.config and "pareto" in config
    stray = RunFolder(tmp_path / "elsewhere").create()  # a config.yaml saved for another folder does not count
    stray.config.write_text(yaml.safe_dump({"federation": {"output_dir": str(tmp_path / "other")}}))
    assert stray.resolved_config() == (None, None)


def test_adapter_and_statistics_lookups(tmp_path):
    folder = RunFolder(tmp_path)
    folder.final.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, str(folder.final / "adapter_model.safetensors"))
    assert torch.equal(load_adapter_file(folder.final)["w"], torch.ones(2))  # a peft folder
    with pytest.raises(FileNotFoundError, match="No adapter at"):
        load_adapter_file(tmp_path / "nope.safetensors")
    assert objective_state_beside(folder.final) is None
    folder.objective_state.write_text("{}")
    assert objective_state_beside(folder.final) == folder.objective_state  # above an adapter folder
    assert objective_state_beside(folder.round_adapter(1)) == folder.objective_state  # beside a file


def _string_constants(path: Path) -> set[str]:
    """Every string literal of a module but its docstrings (prose may name files; code may not)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def test_only_the_run_folder_spells_the_run_files():
    names = {"metrics.csv", "client_metrics.csv", "summary.txt", "objective_state.json", "server_error.txt",
             "checkpoint", "adapters", "plots", "adapter_model.safetensors", "adapter_config.json", "config.yaml",
             "summary.md", "pareto.csv", "pareto.png", "hypervolume.json", "traceback.txt", ".lock"}
    allowed = {("config.py", "config.yaml")}  # a temporary file that holds a config text, not a run's file
    found = [(p.relative_to(PACKAGE).as_posix(), name) for p in PACKAGE.rglob("*.py") if p.name != "run_folder.py"
             for name in names & _string_constants(p) if (p.name, name) not in allowed]
    assert found == []


def _listing(path: Path) -> dict[str, str]:
    """Every file and folder under ``path`` with its content hash (folders: "dir")."""
    import hashlib

    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*"))}


def test_a_second_writer_is_refused_naming_the_holder_and_the_folder_is_left_as_found(tmp_path):
    import os
    import socket

    from firm_lightning.run_folder import RunFolderError

    folder = RunFolder(tmp_path / "a" / "run")
    with folder.lock("fit"):
        assert folder.lock_file.is_file()
        with pytest.raises(RunFolderError) as refused:
            with RunFolder(tmp_path / "a" / "run").lock("fit"):
                pass
        assert f"{folder.path} is in use by another run (PID {os.getpid()} on {socket.gethostname()}" in str(
            refused.value)
        assert "`fit`" in str(refused.value)
    # Released: nothing the lock made is left, not even the folders it created.
    assert not (tmp_path / "a").exists()
    with RunFolder(tmp_path / "b").lock("compare", shared=True), RunFolder(tmp_path / "b").lock("compare", shared=True):
        with pytest.raises(RunFolderError, match="is in use by another run"):
            RunFolder(tmp_path / "b").lock("fit").__enter__()


def test_a_killed_holder_leaves_no_lock_that_blocks_the_next_run(tmp_path):
    import signal
    import subprocess
    import sys

    folder = RunFolder(tmp_path / "run")
    # The leaf module alone (not the package, which imports torch): the holder is up in a moment.
    script = (f"import importlib.util, time\nspec = importlib.util.spec_from_file_location('rf', "
              f"{str(PACKAGE / 'run_folder.py')!r})\nrf = importlib.util.module_from_spec(spec)\n"
              f"spec.loader.exec_module(rf)\nrf.RunFolder({str(folder.path)!r}).lock('fit').__enter__()\n"
              "print('locked', flush=True)\ntime.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        stale = folder.lock_file.read_bytes()
        with pytest.raises(ValueError, match=f"PID {holder.pid} on"):
            folder.lock("fit").__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    before = _listing(folder.path)
    with folder.lock("fit"):  # the kernel dropped the dead holder's lock; its file is still there
        assert folder.lock_file.read_bytes() != stale
    assert _listing(folder.path) == before  # its record is put back as it was


def test_a_clean_start_or_an_explicit_one(tmp_path):
    from firm_lightning.run_folder import RunFolderError

    folder = _finished_run(tmp_path / "run", rounds=3)
    folder.adapters.mkdir()
    save_file({"w": torch.zeros(1)}, str(folder.round_adapter(3)))
    (folder.clients / "client_000" / "round_003").mkdir(parents=True)
    (folder.clients / "client_000" / "round_001").mkdir(parents=True)
    (folder.path / "notes.txt").write_text("mine")  # not a run's file: never removed
    with pytest.raises(RunFolderError, match=r"already holds a run \(summary.txt, metrics.csv.*--federation.resume "
                                             r"true.*--federation.overwrite true"):
        folder.check_clean_start(resume=False, overwrite=False)
    with pytest.raises(RunFolderError, match="no checkpoint"):
        folder.check_clean_start(resume=True, overwrite=False)
    folder.check_clean_start(resume=False, overwrite=True)
    with pytest.raises(RunFolderError, match="already holds a run"):  # a sweep does not mix with a single run
        folder.check_clean_start(resume=False, overwrite=False, sweep=True)
    sweep = RunFolder(tmp_path / "sweep").create()
    write_csv(sweep.metrics, [{"round": 0}])
    (sweep.runs / "alpha1_seed0" / "firm").mkdir(parents=True)
    sweep.check_clean_start(resume=False, overwrite=False, sweep=True)  # its own reports and runs: reused
    folder.discard_after(1)  # a resume from round 1: what later rounds left goes, and the finished marker
    assert not folder.summary.exists() and not folder.round_adapter(3).exists()
    assert not (folder.clients / "client_000" / "round_003").exists()
    assert (folder.clients / "client_000" / "round_001").is_dir()
    folder.config.write_text("a config")
    folder.clear()
    assert sorted(p.name for p in folder.path.iterdir()) == ["notes.txt"]
    folder.check_clean_start(resume=False, overwrite=False)  # a config alone is no run


def test_the_previous_state_stays_until_a_newer_one_is_intact(tmp_path):
    from firm_lightning import checkpoint
    from firm_lightning.state import FederationState

    for r in range(3):
        checkpoint.save_state(tmp_path, FederationState(round=r, global_adapter={"w": torch.full((2,), float(r))}), {})
    assert len(list(tmp_path.glob("state_*.safetensors"))) == 2  # round 2 and round 1; round 0 went
    assert checkpoint.load_state(tmp_path, FederationState)[0].round == 2
    assert checkpoint.load_state(tmp_path, FederationState, "previous")[0].round == 1
    (latest,) = tmp_path.glob("state_00002_*.safetensors")
    latest.write_bytes(latest.read_bytes()[:-8])
    with pytest.raises(checkpoint.CheckpointError, match="does not match its checksum"):
        checkpoint.load_state(tmp_path, FederationState)
    assert checkpoint.previous_round(tmp_path) == 1
    checkpoint.promote_previous(tmp_path)
    assert checkpoint.load_state(tmp_path, FederationState)[0].round == 1

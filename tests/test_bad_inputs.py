"""Bad input, as a new user would give it: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from unittest import mock

import pytest
from flwr_datasets.partitioner import Partitioner

from conftest import make_datamodule
from firm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--config", str(ROOT / "configs" / "tiny.yaml"), "--federation.num_rounds=1", "--federation.num_clients=2",
    "--trainer.max_steps=1", "--data.max_prompts=40", "--data.eval_size=4", "--model.sampling.max_new_tokens=4",
    "--model.sampling.num_generations=2", "--model.sampling.eval_num_generations=1",
]


def _error_line(capsys, args: list[str]) -> str:
    """Run the CLI, expect exit code 1, return its one-line error (and check there is no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Subtypes" not in err, err
    last = err.strip().splitlines()[-1]
    assert "[Errno" not in last
    assert last.startswith("error: ") and last.endswith("(--debug or FIRM_DEBUG=1 shows the traceback)")
    return last


def test_empty_prompt_file(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    line = _error_line(
        capsys, ["fit", *FAST, f"--data.path={tmp_path / 'empty.jsonl'}", f"--federation.output_dir={tmp_path / 'o'}"]
    )
    assert f"the prompt file {tmp_path / 'empty.jsonl'} is empty (no rows)" in line
    (tmp_path / "blank.jsonl").write_text("\n\n")
    line = _error_line(
        capsys, ["fit", *FAST, f"--data.path={tmp_path / 'blank.jsonl'}", f"--federation.output_dir={tmp_path / 'o'}"]
    )
    assert "is empty (no rows)" in line


def test_zero_local_steps(tmp_path, capsys):
    line = _error_line(capsys, ["fit", *FAST, "--trainer.max_steps=0", f"--federation.output_dir={tmp_path}"])
    assert "trainer.max_steps sets the number of local steps K per client per round and must be > 0 (got 0)" in line


def test_corrupt_adapter_file_to_validate(tmp_path, capsys):
    bad = tmp_path / "round_001.safetensors"
    bad.write_bytes(b"this is not an adapter at all, just text")
    line = _error_line(capsys, ["validate", *FAST, f"--ckpt_path={bad}", f"--federation.output_dir={tmp_path}"])
    assert f"{bad} is not a readable safetensors adapter (Error while deserializing header: header too large)" in line


def test_negative_beta_and_preference_off_the_simplex(tmp_path, capsys):
    line = _error_line(
        capsys, ["fit", *FAST, "--model.weighting.init_args.beta=-1", f"--federation.output_dir={tmp_path}"]
    )
    assert line.startswith("error: beta must be finite and >= 0 (got -1.0)")
    line = _error_line(
        capsys,
        ["fit", *FAST, "--model.weighting.init_args.preference=[0.7, 0.7]", f"--federation.output_dir={tmp_path}"],
    )
    assert line.startswith("error: preference must sum to 1")


def test_debug_shows_the_full_traceback(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="must be > 0"):
        main(["fit", *FAST, "--trainer.max_steps=0", "--debug", f"--federation.output_dir={tmp_path}"])
    monkeypatch.setenv("FIRM_DEBUG", "1")
    with pytest.raises(ValueError, match="must be > 0"):
        main(["fit", *FAST, "--trainer.max_steps=0", f"--federation.output_dir={tmp_path}"])


def test_more_clients_than_prompts_and_a_missing_column(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"prompt {i}", "topic": "t"}) + "\n" for i in range(6)))
    line = _error_line(capsys, ["fit", *FAST, f"--data.path={rows}", "--data.prompt_column=text",
                                "--federation.num_clients=4", f"--federation.output_dir={tmp_path / 'o'}"])
    assert "num_clients=4 is more than the 2 training prompts (6 loaded - 4 eval)" in line
    line = _error_line(capsys, ["fit", *FAST, f"--data.path={rows}", f"--federation.output_dir={tmp_path / 'o'}"])
    assert "prompt_column='prompt' is not a column of" in line and "available columns: ['text', 'topic']" in line


class _OneEmptyShard(Partitioner):
    """Puts every row in partition 0 and none in partition 1."""

    @property
    def num_partitions(self) -> int:
        return 2

    def load_partition(self, partition_id: int):
        return self.dataset.select(range(len(self.dataset)) if partition_id == 0 else [])


def test_an_empty_client_shard_is_refused():
    data = make_datamodule(num_clients=2)
    data._make_partitioner = lambda: _OneEmptyShard()
    with pytest.raises(
        ValueError, match=r"the 'iid' partition left client\(s\) \[1\] without prompts; use fewer clients"
    ):
        data.setup()


def test_a_reward_model_that_cannot_be_loaded(tmp_path, capsys):
    rm = json.dumps([{"class_path": "firm_lightning.rewards.HFRewardModel",
                      "init_args": {"name": "helpful", "name_or_path": str(tmp_path / "no_such_model")}}])
    line = _error_line(capsys, ["fit", *FAST, f"--model.objectives={rm}", f"--federation.output_dir={tmp_path / 'o'}"])
    assert f"Reward model 'helpful': could not load '{tmp_path / 'no_such_model'}'" in line
    assert "local folder made with save_pretrained" in line


def test_an_output_directory_that_cannot_be_written(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    line = _error_line(capsys, ["fit", *FAST, f"--federation.output_dir={tmp_path / 'a_file' / 'run'}"])
    assert f"Cannot write to federation.output_dir '{tmp_path / 'a_file' / 'run'}'" in line
    assert "pass a writable folder with --federation.output_dir" in line


def test_disk_full_while_saving_the_state(tmp_path, capsys):
    full = OSError(errno.ENOSPC, "No space left on device")
    with mock.patch("firm_lightning.checkpoint.os.fsync", side_effect=full):
        line = _error_line(capsys, ["fit", *FAST, f"--federation.output_dir={tmp_path}"])
    # The first file written atomically (metrics.csv or the checkpoint) meets the full disk.
    assert f"No space left on the device while writing {tmp_path}" in line
    assert "Free some space, then continue with `--federation.resume true`" in line
    assert not list(tmp_path.rglob(".*.tmp"))

"""The federation on Flower: simulation engine, a local SuperLink + SuperNodes deployment,
byte counts from Flower's own message sizes, and no process left behind.

Each test runs the real command (``python -m firm_lightning flower``) in a subprocess and
records, while it runs, every process descended from it (Ray's, Flower's), by PID.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from firm_lightning.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]

# The tiny config, shortened: 2 clients, 2 rounds, 2 local steps (with one, LoRA's A matrices
# cannot move yet: B starts at zero), short samples.
SHORT = """
federation: {num_rounds: 2, num_clients: 2, min_clients: 2, quiet: true}
trainer: {max_steps: 2}
data: {max_prompts: 64, eval_size: 4, batch_size: 4, eval_batch_size: 4}
model:
  sampling: {num_generations: 2, max_new_tokens: 6, eval_num_generations: 1}
"""


def _config(tmp_path: Path) -> list[str]:
    short = tmp_path / "short.yaml"
    short.write_text(SHORT)
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--config", str(short)]


class Run:
    """The command in a subprocess; every descendant PID is recorded while it runs."""

    def __init__(self, args: list[str], interrupt_when=None, timeout_s: float = 400) -> None:
        self.log = log = tempfile.TemporaryFile("w+")  # a file, not a pipe: Flower and Ray log a lot
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "firm_lightning", *args], cwd=ROOT, stdout=log,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.seen: dict[int, psutil.Process] = {}
        self.commands: dict[int, str] = {}  # read when first seen: a finished process has none
        self.interrupted = False
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._record()
            if interrupt_when and not self.interrupted and interrupt_when(self.output_so_far()):
                self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
                self.interrupted = True
            time.sleep(0.5)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.output = self.output_so_far()
        log.close()

    def output_so_far(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def _record(self) -> None:
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            if child.pid not in self.seen:
                self.seen[child.pid] = child
                try:
                    self.commands[child.pid] = " ".join(child.cmdline()) or child.name()
                except psutil.Error:
                    self.commands[child.pid] = ""

    def names(self) -> str:
        return "\n".join(self.commands.values())

    def survivors(self) -> list[str]:
        alive = []
        for p in self.seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
            except psutil.Error:
                pass
        return alive


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _in_process(tmp_path: Path, out: Path, *extra: str) -> None:
    torch.set_num_threads(1)  # as Ray runs each simulated client (one CPU each)
    cli_main(["fit", *_config(tmp_path), "--federation.output_dir", str(out), *extra])


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flower_sim")
    run = Run(["flower", *_config(tmp), "--federation.output_dir", str(tmp / "flower")])
    return tmp, run


def test_simulation_matches_in_process_orchestrator(simulation):
    tmp, run = simulation
    assert run.proc.returncode == 0, run.output[-3000:]
    assert "raylet" in run.names(), "the run did not go through Ray"
    assert run.survivors() == [], f"processes left behind: {run.survivors()}"
    _in_process(tmp, tmp / "in_process")
    # Same seeds, same client sampling, each client fit seeded by client_seed(seed, round,
    # client), one thread per client, aggregation in client order: the global adapters agree.
    for r in (1, 2):
        flower = load_file(str(tmp / "flower" / "adapters" / f"round_{r:03d}.safetensors"))
        local = load_file(str(tmp / "in_process" / "adapters" / f"round_{r:03d}.safetensors"))
        assert flower.keys() == local.keys()
        for k in local:
            torch.testing.assert_close(flower[k], local[k], rtol=1e-6, atol=1e-7)
    assert not torch.equal(load_file(str(tmp / "flower" / "adapters" / "round_000.safetensors"))[k], flower[k])
    flower_rows, local_rows = _rows(tmp / "flower" / "metrics.csv"), _rows(tmp / "in_process" / "metrics.csv")
    assert len(flower_rows) == len(local_rows) == 3
    for a, b in zip(flower_rows, local_rows):
        for key in ("eval/reward/a_to_m", "eval/reward/n_to_z", "lambda/a_to_m", "comm/bytes_up"):
            if a["round"] != "0" or key.startswith("eval/"):  # round 0 has no training metrics
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key


def test_flower_counts_the_adapter_plus_framing(simulation):
    tmp, run = simulation
    rows = _rows(tmp / "flower" / "client_metrics.csv")
    assert len(rows) == 4  # 2 clients × 2 rounds
    for row in rows:
        payload, up, down = int(row["comm/bytes_up"]), int(row["flower/bytes_up"]), int(row["flower/bytes_down"])
        assert int(row["flower/messages_up"]) == 1
        # Flower sends the same float32 tensors plus its framing (npy headers, keys, object
        # headers, metrics): more than the tensors, by a bounded overhead.
        assert payload < up < 1.2 * payload, (payload, up)
        if row["round"] == "1":
            # Flower stores objects by content hash and sends each distinct one once: the initial
            # adapter's B matrices are all zero, hence identical, and travel once.
            assert down < payload, (payload, down)
        else:
            assert payload < down < 1.2 * payload, (payload, down)


def test_ctrl_c_stops_every_flower_and_ray_process(tmp_path):
    def clients_are_up(output: str) -> bool:  # Ray and both ClientApp actors are running
        return "Flower: 2 clients on nodes" in output

    # Many rounds, so that the federation cannot end on its own before the Ctrl-C.
    args = ["flower", *_config(tmp_path), "--federation.num_rounds", "40", "--federation.output_dir", str(tmp_path / "out")]
    run = Run(args, interrupt_when=clients_are_up)
    assert run.interrupted, run.output[-3000:]
    assert "raylet" in run.names()
    # Not asserted: the exit code and the CLI's "interrupted" line. Inside the full suite the
    # SIGINT also reaches the simulation child, whose Flower run stops gracefully and returns, so
    # the command has exited 0 (twice, 40 rounds or 2); alone it exits 130 with the one-line
    # message. What the issue requires is that nothing is left running:
    assert run.survivors() == [], f"processes left behind after Ctrl-C: {run.survivors()}"


def test_local_deployment_runs_fmgda_with_s_times_the_upload(simulation, capsys):
    """SuperLink + 2 SuperNodes on 127.0.0.1; the algorithm is FMGDA (S = 2 adapters per upload),
    compared with FIRM's upload in the simulation above."""
    tmp_path, firm = simulation
    out = tmp_path / "deployment"
    run = Run(["flower", *_config(tmp_path), "--federation.output_dir", str(out), "--flower.engine", "local-deployment",
               "--flower.algorithm", "firm_lightning.algorithms.FMGDA"])
    assert run.proc.returncode == 0, run.output[-3000:]
    names = run.names()
    assert names.count("flower-supernode") >= 2 and "flower-superlink" in names and "flwr-clientapp" in names
    assert run.survivors() == [], f"processes left behind: {run.survivors()}"
    # Each SuperNode held only its own client's prompts.
    node_prompts = [(out / "flower" / f"node_{c}" / "prompts.jsonl").read_text().splitlines() for c in (0, 1)]
    assert node_prompts[0] and node_prompts[1] and not set(node_prompts[0]) & set(node_prompts[1])
    for row in _rows(out / "client_metrics.csv"):  # and trained on exactly those
        assert int(row["num_examples"]) == len(node_prompts[int(row["client"])])
    rows = _rows(out / "metrics.csv")
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert rows[2]["server_lambda/a_to_m"] != ""  # the server's min-norm over the S deltas ran
    fmgda_row, firm_row = _rows(out / "client_metrics.csv")[-1], _rows(tmp_path / "flower" / "client_metrics.csv")[-1]
    assert int(fmgda_row["comm/bytes_up"]) == 2 * int(firm_row["comm/bytes_up"])  # S = 2 adapters
    ratio = int(fmgda_row["flower/bytes_up"]) / int(firm_row["flower/bytes_up"])
    assert 1.9 < ratio <= 2.0, ratio  # S× the arrays, as Flower counts them; the envelope is paid once
    adapter = out / "adapters" / "round_002.safetensors"
    cli_main(["validate", *_config(tmp_path), "--ckpt_path", str(adapter), "--federation.output_dir", str(tmp_path / "v")])
    printed = capsys.readouterr().out
    assert f"adapter: {adapter}" in printed and "eval/reward/a_to_m" in printed
    assert float(printed.split("eval/reward/a_to_m")[1].split()[0]) == pytest.approx(float(rows[-1]["eval/reward/a_to_m"]), abs=1e-4)


@pytest.mark.parametrize("num_objectives", [1, 2])  # FedAvg (FIRM), MinNormOverObjectives (FMGDA)
def test_secure_aggregation_needs_only_the_weighted_mean(num_objectives):
    """SecAgg+ hands the server only Σ n_i θ_i / Σ n_i (float64, as Flower dequantises it); the
    aggregators are linear in the uploads, so the new global adapter is the one they compute from
    the single uploads."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    from firm_lightning.aggregation import FedAvg, MinNormOverObjectives
    from firm_lightning.client import ClientUpdate
    from firm_lightning.flower.secure_aggregation import SecAggStrategy
    from firm_lightning.flower.strategy import FIRMStrategy, RoundUpdates

    gen = torch.Generator().manual_seed(0)
    initial = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
    counts = [5, 10, 20]
    uploads = [[{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}
                for _ in range(num_objectives)] for _ in counts]
    aggregator = FedAvg(0.5) if num_objectives == 1 else MinNormOverObjectives(0.5)
    expected = aggregator.aggregate(initial, [ClientUpdate(i, u, n, {}) for i, (u, n) in enumerate(zip(uploads, counts))]).adapter

    mean = [sum(n * u[s][k].double().numpy() for u, n in zip(uploads, counts)) / sum(counts)
            for s in range(num_objectives) for k in initial]
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), n, {"client-id": i, "train/kl": 0.1}))
               for i, n in enumerate(counts)]
    strategy = FIRMStrategy(aggregator, lambda r: [0, 1, 2], {0: 10, 1: 11, 2: 12}, dict(enumerate(counts)))
    strategy.rounds[1] = RoundUpdates(global_adapter=initial, uploads_visible=False)
    parameters, _ = SecAggStrategy(strategy, initial, evaluate_fn=None, timeout_s=1).aggregate_fit(1, results, [])

    new = dict(zip(initial, (torch.from_numpy(a) for a in parameters_to_ndarrays(parameters))))
    for k in initial:
        assert new[k].dtype == torch.float32
        torch.testing.assert_close(new[k], expected[k], rtol=1e-5, atol=1e-6)
    record = strategy.rounds[1]
    assert [u.client_id for u in record.updates] == [0, 1, 2] and record.updates[2].metrics == {"train/kl": 0.1}


def test_an_error_stops_the_whole_process_tree_even_across_sessions(tmp_path):
    """What ``launch`` relies on when a run fails: leaving the ``ProcessGroup`` stops every
    descendant, also one that opened a session of its own (as Flower's SuperExec does)."""
    from firm_lightning.flower.processes import ProcessGroup, flower_env

    script = tmp_path / "tree.py"
    script.write_text(
        "import os, subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "time.sleep(300)\n"
    )
    with pytest.raises(RuntimeError, match="the run failed"):
        with ProcessGroup(grace_s=5) as group:
            parent = group.start([sys.executable, str(script)], flower_env())
            deadline = time.monotonic() + 60
            while len(psutil.Process(parent.pid).children(recursive=True)) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            raise RuntimeError("the run failed")
    assert len(group.pids) == 3
    for pid, process in group.processes.items():
        assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE, pid

"""The federation on Flower: simulation engine, a local SuperLink + SuperNodes deployment,
byte counts from Flower's own message sizes, and no process left behind.

Each test runs the real command (``python -m firm_lightning flower``) in a subprocess and
records, while it runs, every process descended from it (Ray's, Flower's), by PID.
"""

from __future__ import annotations

import csv
import http.client
import json
import math
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
import yaml
from safetensors.torch import load_file

from firm_lightning.cli import main as cli_main
from firm_lightning.distributed import free_port
from firm_lightning.flower.partition import PARTITION_ID, PROMPTS_FILE, write_partition
from firm_lightning.flower.processes import ProcessGroup, alive, flower_env, wait_for_port

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

    def __init__(self, args: list[str], interrupt_when=None, timeout_s: float = 400, interrupt=None) -> None:
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
                if interrupt is None:
                    self.proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the foreground process
                else:
                    self._record()
                    interrupt(self)
                self.interrupted = True
            time.sleep(0.1 if interrupt_when and not self.interrupted else 0.5)
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


def _rules_config(tmp: Path) -> list[str]:
    """SHORT plus the federation rules both transports must honour alike: 3 clients (client 1's
    reward crashes on its own prompts), coordinate-wise median, an update-norm bound, federation
    callbacks (early stopping after round 2 of 4: nothing improves by 1.0) and a TensorBoard logger."""
    from firm_lightning.config import build_components

    data = build_components([*_config(tmp), "--federation.num_clients", "3"]).datamodule
    data.setup()
    rules = {
        "federation": {
            "num_rounds": 4,
            "num_clients": 3,
            "min_clients": 2,
            "aggregator": "median",
            "max_update_norm": 100.0,
            "callbacks": [
                {
                    "class_path": "firm_lightning.callbacks.EarlyStopping",
                    "init_args": {"monitor": "eval/reward/a_to_m", "min_delta": 1.0, "patience": 2},
                },
                {
                    "class_path": "firm_lightning.callbacks.SaveBestAdapter",
                    "init_args": {"monitor": "eval/reward/n_to_z"},
                },
            ],
        },
        "trainer": {
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp)}}
        },
        "model": {
            "objectives": [
                {
                    "class_path": "firm_lightning.rewards.CharsetReward",
                    "init_args": {"name": "a_to_m", "charset": "abcdefghijklm"},
                },
                {
                    "class_path": "tests.flower_faults.FailsOnPrompts",
                    "init_args": {
                        "name": "n_to_z",
                        "charset": "nopqrstuvwxyz",
                        "prompts": data.client_prompts(1),
                        "block_file": str(tmp / "hold_round"),
                    },
                },
            ]
        },
    }
    path = tmp / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return [*_config(tmp), "--config", str(path)]


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flower_sim")
    run = Run(["flower", *_rules_config(tmp), "--federation.output_dir", str(tmp / "flower")])
    return tmp, run


def _tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "federation"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_simulation_honours_every_federation_rule_as_in_process(simulation):
    tmp, run = simulation
    assert run.proc.returncode == 0, run.output[-3000:]
    assert "raylet" in run.names(), "the run did not go through Ray"
    assert run.survivors() == [], f"processes left behind: {run.survivors()}"
    _in_process(tmp, tmp / "in_process", *_rules_config(tmp)[4:])
    flower_rows, local_rows = _rows(tmp / "flower" / "metrics.csv"), _rows(tmp / "in_process" / "metrics.csv")
    assert list(flower_rows[0]) == list(local_rows[0])  # the same columns, in the same order
    # EarlyStopping stopped both after round 2 of 4.
    assert [r["round"] for r in flower_rows] == [r["round"] for r in local_rows] == ["0", "1", "2"]
    assert "stopped after round 2/4: EarlyStopping" in run.output
    # Same seeds, same client sampling, each client fit seeded by (seed, round, client), one
    # thread per client, the same screening and median in client order: the adapters agree.
    for r in (1, 2):
        flower = load_file(str(tmp / "flower" / "adapters" / f"round_{r:03d}.safetensors"))
        local = load_file(str(tmp / "in_process" / "adapters" / f"round_{r:03d}.safetensors"))
        assert flower.keys() == local.keys()
        for k in local:
            torch.testing.assert_close(flower[k], local[k], rtol=0, atol=1e-6)
    assert not torch.equal(load_file(str(tmp / "flower" / "adapters" / "round_000.safetensors"))[k], flower[k])
    for a, b in zip(flower_rows[1:], local_rows[1:]):
        assert (
            (a["failed_clients"], a["clients"]) == (b["failed_clients"], b["clients"]) == ("1", "2")
        )  # client 1 left out
        for key in ("eval/reward/a_to_m", "eval/reward/n_to_z", "lambda/a_to_m", "comm/bytes_up", "update_dispersion"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), key
    assert "client 1 failed" in run.output and "simulated crash" in run.output
    for out in (tmp / "flower", tmp / "in_process"):
        assert {r["client"] for r in _rows(out / "client_metrics.csv")} == {"0", "2"}
        assert _tensorboard_steps(out, "eval/reward/a_to_m") == [0, 1, 2]  # the round logger fired every round
    best = [json.loads((tmp / out / "adapters" / "best.json").read_text()) for out in ("flower", "in_process")]
    assert best[0]["round"] == best[1]["round"] and best[0]["value"] == pytest.approx(best[1]["value"], rel=1e-5)


def test_flower_counts_the_adapter_plus_framing(simulation):
    tmp, run = simulation
    rows = _rows(tmp / "flower" / "client_metrics.csv")
    assert len(rows) == 4  # 2 healthy clients × 2 rounds
    for row in rows:
        payload, up, down = (
            int(row["comm/bytes_up"]),
            int(row["comm/transport_bytes_up"]),
            int(row["comm/transport_bytes_down"]),
        )
        assert int(row["comm/messages_up"]) == 1
        # Flower sends the same float32 tensors plus its framing (npy headers, keys, object
        # headers, metrics): more than the tensors, by a bounded overhead.
        assert payload < up < 1.2 * payload, (payload, up)
        if row["round"] == "1":
            # Flower stores objects by content hash and sends each distinct one once: the initial
            # adapter's B matrices are all zero, hence identical, and travel once.
            assert down < payload, (payload, down)
        else:
            assert payload < down < 1.2 * payload, (payload, down)
    for row in _rows(tmp / "in_process" / "client_metrics.csv"):  # in-process the transport carries the tensors
        assert row["comm/transport_bytes_up"] == row["comm/bytes_up"]


def _kill_tree(run_like) -> None:
    for process in [psutil.Process(run_like.proc.pid), *run_like.seen.values()]:
        try:
            process.kill()
        except psutil.Error:
            pass


def test_sigkill_mid_round_then_resume_ends_bit_identical(simulation):
    """Killed (SIGKILL, every process) while round 2 trains, then rerun with resume: the same
    final adapter, bit for bit, as the uninterrupted run; early stopping stops it at the same round."""
    tmp, first = simulation
    assert first.proc.returncode == 0, first.output[-3000:]
    out = tmp / "killed"
    args = ["flower", *_rules_config(tmp), "--federation.output_dir", str(out)]
    hold = tmp / "hold_round"  # while it exists the clients' scoring hangs: round 2 is held mid-way

    def round_2_is_training(text: str) -> bool:
        if "round 1/4 | eval" in text:
            hold.touch()
        return "round 2/4 | training clients" in text and hold.exists()

    killed = Run(args, interrupt_when=round_2_is_training, interrupt=_kill_tree)
    hold.unlink(missing_ok=True)
    assert killed.interrupted and killed.proc.returncode != 0, killed.output[-3000:]
    saved = json.loads((out / "checkpoint" / "state.json").read_text())
    assert saved["fields"]["round"] == 1  # the last finished round
    resumed = Run([*args, "--federation.resume", "true"])
    assert resumed.proc.returncode == 0, resumed.output[-3000:]
    assert "resume: round 1 of 4 finished" in resumed.output and "stopped after round 2/4" in resumed.output
    expected = load_file(str(tmp / "flower" / "adapters" / "final" / "adapter_model.safetensors"))
    final = load_file(str(out / "adapters" / "final" / "adapter_model.safetensors"))
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert [r["round"] for r in _rows(out / "metrics.csv")] == ["0", "1", "2"]


def test_privacy_and_16_bit_uploads_on_flower_then_ctrl_c_stops_every_process(tmp_path):
    """federation.privacy on Flower: the same ε (and noise scale) in metrics.csv as in-process, the client
    rows only in the server-private record, and the 16-bit upload carries half the bytes; the run is then
    interrupted with Ctrl-C after round 1
    of 40 and no Flower or Ray process is left."""
    extra = ["--federation.privacy.clipping_norm", "0.1", "--federation.privacy.noise_multiplier", "1.3",
             "--federation.upload_dtype", "float16"]
    out = tmp_path / "flower"
    # Many rounds, so that the federation cannot end on its own before the Ctrl-C.
    run = Run(
        ["flower", *_config(tmp_path), "--federation.output_dir", str(out), "--federation.num_rounds", "40", *extra],
        interrupt_when=lambda text: "round 1/40 | eval" in text,
    )
    assert run.interrupted, run.output[-3000:]
    assert "raylet" in run.names()
    # Not asserted: the exit code and the CLI's "interrupted" line. Inside the full suite the
    # SIGINT also reaches the simulation child, whose Flower run stops gracefully and returns, so
    # the command has exited 0; alone it exits 130 with the one-line message. What the issue
    # requires is that nothing is left running:
    assert run.survivors() == [], f"processes left behind after Ctrl-C: {run.survivors()}"

    _in_process(tmp_path, tmp_path / "in_process", "--federation.num_rounds", "1", *extra)
    flower, local = _rows(out / "metrics.csv")[1], _rows(tmp_path / "in_process" / "metrics.csv")[1]
    assert flower["round"] == local["round"] == "1"
    assert float(flower["privacy/epsilon"]) == pytest.approx(float(local["privacy/epsilon"]), rel=1e-12)
    assert float(flower["privacy/noise_std"]) == float(local["privacy/noise_std"]) == pytest.approx(1.3 * 0.1 / 2)
    assert 0 < float(flower["privacy/epsilon"]) < math.inf
    # Under privacy the client rows are the server's own (outside the guarantee), on Flower as in-process.
    assert not (out / "client_metrics.csv").exists() and "clients" not in flower
    up = [int(r["comm/bytes_up"]) for r in _rows(out / "server_private" / "client_metrics.csv") if r["round"] == "1"]
    adapter_bytes = sum(t.numel() * 4 for t in load_file(str(out / "adapters" / "round_000.safetensors")).values())
    assert up == [adapter_bytes // 2] * 2  # float16 deltas


def test_moved_keys_are_refused_naming_the_new_one(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text("flower:\n  privacy:\n    class_path: firm_lightning.flower.privacy.DifferentialPrivacy\n")
    for args, new in ((["--config", str(old)], "federation.privacy"),
                      (["--flower.algorithm", "firm_lightning.algorithms.FMGDA"], "federation.algorithm"),
                      (["--federation.dp_clip_norm", "1.0"], "federation.privacy.clipping_norm")):
        with pytest.raises(SystemExit):
            cli_main(["flower", *_config(tmp_path), *args])
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "has moved: use " + new in err, err


def test_local_deployment_runs_fmgda_with_s_times_the_upload(simulation, capsys):
    """SuperLink + 2 SuperNodes on 127.0.0.1; the algorithm is FMGDA (S = 2 adapters per upload),
    compared with FIRM's upload in the simulation above."""
    tmp_path, firm = simulation
    out = tmp_path / "deployment"
    run = Run(["flower", *_config(tmp_path), "--federation.output_dir", str(out), "--flower.engine", "local-deployment",
               "--federation.algorithm", "firm_lightning.algorithms.FMGDA"])
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
    ratio = int(fmgda_row["comm/transport_bytes_up"]) / int(firm_row["comm/transport_bytes_up"])
    assert 1.9 < ratio <= 2.0, ratio  # S× the arrays, as Flower counts them; the envelope is paid once
    adapter = out / "adapters" / "round_002.safetensors"
    cli_main(
        ["validate", *_config(tmp_path), "--ckpt_path", str(adapter), "--federation.output_dir", str(tmp_path / "v")]
    )
    printed = capsys.readouterr().out
    assert f"adapter: {adapter}" in printed and "eval/reward/a_to_m" in printed
    assert float(printed.split("eval/reward/a_to_m")[1].split()[0]) == pytest.approx(
        float(rows[-1]["eval/reward/a_to_m"]), abs=1e-4
    )


@pytest.mark.parametrize("num_objectives", [1, 2])  # FedAvg (FIRM), MinNormOverObjectives (FMGDA)
def test_secure_aggregation_needs_only_the_weighted_mean(num_objectives):
    """SecAgg+ hands the server only Σ n_i θ_i / Σ n_i (float64, as Flower dequantises it); the
    aggregators are linear in the uploads, so the new global adapter is the one they compute from
    the single uploads."""
    from types import SimpleNamespace

    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from firm_lightning.aggregation import FedAvg, MinNormOverObjectives
    from firm_lightning.client import ClientUpdate
    from firm_lightning.flower.secure_aggregation import SecAggStrategy
    from firm_lightning.state import FederationState

    gen = torch.Generator().manual_seed(0)
    initial = {"a": torch.randn(3, 2, generator=gen), "b": torch.randn(4, generator=gen)}
    counts = [5, 10, 20]
    uploads = [[{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in initial.items()}
                for _ in range(num_objectives)] for _ in counts]
    aggregator = FedAvg(0.5) if num_objectives == 1 else MinNormOverObjectives(0.5)
    expected = aggregator.aggregate(
        initial, [ClientUpdate(i, u, n, {}) for i, (u, n) in enumerate(zip(uploads, counts))]
    ).adapter

    class Engine:  # the round engine's side of the protocol, recording what it is handed
        stop_reason = None
        begin_round = lambda self, state, r: [0, 1, 2]
        client_started = client_finished = lambda self, *a: None

        def conclude(self, state, round_idx, reports, failures, secure_mean=None, **extras):
            self.reports, self.failures = reports, failures
            return FederationState(round_idx, aggregator.aggregate(state.global_adapter, [secure_mean]).adapter)

    mean = [sum(n * u[s][k].double().numpy() for u, n in zip(uploads, counts)) / sum(counts)
            for s in range(num_objectives) for k in initial]
    results = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), n, {"client-id": i, "train/kl": 0.1}))
               for i, n in enumerate(counts)]
    engine = Engine()
    strategy = SecAggStrategy(engine, FederationState(0, initial), {0: 10, 1: 11, 2: 12}, timeout_s=1)
    proxies = SimpleNamespace(wait_for=lambda n, timeout: True,
                              all=lambda: {n: SimpleNamespace(node_id=n) for n in (10, 11, 12)})
    assert len(strategy.configure_fit(1, ndarrays_to_parameters([]), proxies)) == 3
    strategy.aggregate_fit(1, results, [])
    new = strategy.state.global_adapter
    for k in initial:
        assert new[k].dtype == torch.float32
        torch.testing.assert_close(new[k], expected[k], rtol=1e-5, atol=1e-6)
    assert sorted(u.client_id for u in engine.reports) == [0, 1, 2] and engine.reports[2].metrics == {"train/kl": 0.1}
    assert engine.failures == []


def test_an_error_stops_the_whole_process_tree_even_across_sessions(tmp_path):
    """What ``launch`` relies on when a run fails: leaving the ``ProcessGroup`` stops every
    descendant, also one that opened a session of its own (as Flower's SuperExec does)."""

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


# ---------------------------------------------------------------- a deployment that lets no one in


def _credentials(folder: Path) -> Path:
    """What docs/flower.md has the operator make: a CA, the SuperLink's certificate for 127.0.0.1 signed by it,
    and a P-384 key pair per SuperNode in OpenSSH format (made with `cryptography`, as `openssl` and
    `ssh-keygen` would)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(name: str, key, issuer: str, signer, ca: bool, names=()):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    (folder / "ca.crt").write_bytes(certificate("firm test CA", ca_key, "firm test CA", ca_key, True))
    (folder / "server.pem").write_bytes(certificate("127.0.0.1", server_key, "firm test CA", ca_key, False, [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]))
    (folder / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    for node in ("node_0", "node_1", "stranger"):
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / node).write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        (folder / f"{node}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return folder


def _supernode(port: int, client: int, work: Path, prompts: Path, *security: str) -> list[str]:
    node = work / f"node_{client}"
    return ["flower-supernode", *security, "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1",
            "--port", str(free_port()), "--node-config",
            f'{PARTITION_ID}={client} {PROMPTS_FILE}="{prompts}" output-dir="{node}"']


def test_a_tls_deployment_with_supernode_authentication_lets_only_registered_nodes_in(tmp_path):
    """docs/flower.md's deployment on 127.0.0.1: a SuperLink with TLS and SuperNode authentication, two
    registered SuperNodes that train one round — the same adapter as the plain in-process run — and, refused,
    a SuperNode whose key was never registered and a plaintext client. Nothing is left running."""
    from firm_lightning.config import build_components

    creds, work, out = _credentials(tmp_path / "creds"), tmp_path / "work", tmp_path / "secure"
    (work / "home").mkdir(parents=True)
    port = free_port()
    (work / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{creds / "ca.crt"}"\n')
    env = flower_env(work / "home")
    config = [*_config(tmp_path), "--federation.num_rounds", "1"]
    data = build_components(config).datamodule
    data.setup()
    prompts = [write_partition(data, c, work / f"node_{c}" / "prompts.jsonl") for c in (0, 1)]
    tls = ["--root-certificates", str(creds / "ca.crt")]
    with ProcessGroup() as group:
        link = group.start(["flower-superlink", "--ssl-ca-certfile", str(creds / "ca.crt"), "--ssl-certfile",
                            str(creds / "server.pem"), "--ssl-keyfile", str(creds / "server.key"),
                            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                            "--host", "127.0.0.1", "--port", str(port)], env, work / "superlink.log", cwd=work)
        wait_for_port(port, proc=link, log=work / "superlink.log")
        for node in ("node_0", "node_1"):  # the operator registers the two authorised public keys
            subprocess.run(["flwr", "supernode", "register", str(creds / f"{node}.pub"), "secure"], env=env,
                           check=True, capture_output=True, timeout=60)
        for client in (0, 1):
            group.start(_supernode(port, client, work, prompts[client], *tls, "--auth-supernode-private-key",
                                   str(creds / f"node_{client}")), env, work / f"node_{client}.log", cwd=work)
        stranger = group.start(_supernode(port, 0, work, prompts[0], *tls, "--auth-supernode-private-key",
                                          str(creds / "stranger"), "--max-retries", "1"), env, work / "stranger.log")
        plaintext = group.start(_supernode(port, 1, work, prompts[1], "--insecure", "--max-retries", "1"), env,
                                work / "plaintext.log")
        federation = group.start([sys.executable, "-m", "firm_lightning", "flower", *config, "--federation.output_dir",
                                  str(out), "--flower.engine", "deployment", "--flower.superlink", "secure"], env,
                                 work / "flower.log", cwd=ROOT)
        assert group.wait(federation, timeout_s=400) == 0, (work / "flower.log").read_text()[-3000:]
        for refused in (stranger, plaintext):
            assert group.wait(refused, timeout_s=60) != 0
        with pytest.raises((ConnectionError, http.client.HTTPException)):  # no plaintext answer from the link
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", "/")
            connection.getresponse()
    assert alive(group) == [], "processes left behind"
    # Flower 1.42's words (pinned): the link refused the unregistered key; the plaintext client could not
    # connect (exit code 305; the reason it prints, a reset or a disconnect, depends on timing) and never
    # received a message.
    assert "Failed to activate SuperNode" in (work / "stranger.log").read_text()
    plaintext_log = (work / "plaintext.log").read_text()
    assert "Exit Code: 305" in plaintext_log and "Received successfully" not in plaintext_log
    assert [r["round"] for r in _rows(out / "metrics.csv")] == ["0", "1"]
    _in_process(tmp_path, tmp_path / "plain", "--federation.num_rounds", "1")
    secure = load_file(str(out / "adapters" / "final" / "adapter_model.safetensors"))
    plain = load_file(str(tmp_path / "plain" / "adapters" / "final" / "adapter_model.safetensors"))
    assert secure.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(secure[k], plain[k], rtol=0, atol=1e-6)

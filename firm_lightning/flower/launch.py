"""Start a federation on Flower from the ``flower`` command: simulation, a local deployment
(SuperLink + one SuperNode per client on 127.0.0.1) or a run on an existing SuperLink.

Everything runs in child processes that ``ProcessGroup`` stops on return, error or Ctrl-C.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from firm_lightning.datamodule import PromptDataModule
from firm_lightning.flower.partition import PARTITION_ID, PROMPTS_FILE, write_partition
from firm_lightning.flower.records import CONFIG_KEY
from firm_lightning.distributed import free_port
from firm_lightning.flower.processes import ProcessGroup, flower_env, wait_for_port
from firm_lightning.flower.settings import FlowerSettings
from firm_lightning.run_folder import RunFolder, atomic_write
from firm_lightning.state import FederationError

LOCAL_CONNECTION = "firm-local"


def launch(
    config_path: Path,
    settings: FlowerSettings,
    datamodule: PromptDataModule,
    echo: Callable[[str], None] = print,
    processes: ProcessGroup | None = None,
) -> ProcessGroup:
    """Run the federation the saved config describes; return the (stopped) processes it used."""
    text = _for_the_server(config_path.read_text())
    run = RunFolder(yaml.safe_load(text)["federation"]["output_dir"])
    work = run.flower
    work.mkdir(parents=True, exist_ok=True)
    atomic_write(run.flower_config, text.encode())
    started = time.time()
    try:
        with processes or ProcessGroup() as group:
            if settings.engine == "simulation":
                _simulate(group, run.flower_config)
            elif settings.engine == "local-deployment":
                _local_deployment(group, work, text, settings, datamodule, echo)
            else:
                _flwr_run(group, write_app(work / "app", text), settings.superlink, flower_env())
    except RuntimeError as error:
        _raise_server_error(run, started, error)
        raise
    # The summary is on this machine unless the SuperLink's ServerApp runs elsewhere.
    if settings.engine != "deployment" and not run.is_finished(since=started):
        raise RuntimeError(f"The Flower run ended without finishing the federation (no new {run.summary}); see the "
                           "log above" + (f" and {work}/*.log." if settings.engine == "local-deployment" else "."))
    return group


def _raise_server_error(run: RunFolder, started: float, cause: BaseException) -> None:
    """The server's own message (e.g. too few clients, a config it refused), when it left one here."""
    path = run.server_error
    if path.is_file() and path.stat().st_mtime >= started:
        kind, _, message = path.read_text().partition("\n")
        raise (FederationError if kind == "FederationError" else ValueError)(message) from cause


def _simulate(group: ProcessGroup, config: Path) -> None:
    proc = group.start([sys.executable, "-m", "firm_lightning.flower.simulation", str(config)], flower_env())
    if group.wait(proc) != 0:
        raise RuntimeError(f"The Flower simulation failed (exit code {proc.returncode}); see its log above.")


def _local_deployment(group: ProcessGroup, work: Path, text: str, settings: FlowerSettings,
                      datamodule: PromptDataModule, echo) -> None:
    home = work / "home"
    home.mkdir(exist_ok=True)
    port = settings.port or free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{LOCAL_CONNECTION}"\n\n[superlink.{LOCAL_CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = flower_env(home)
    link_log = work / "superlink.log"
    link = group.start(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                        "--disable-runtime-dependency-installation"], env, link_log, cwd=work)
    wait_for_port(port, proc=link, log=link_log)
    for client in range(datamodule.num_clients):
        node = work / f"node_{client}"
        prompts = write_partition(datamodule, client, node / "prompts.jsonl")  # all this node holds
        node_config = f'{PARTITION_ID}={client} {PROMPTS_FILE}="{prompts}" output-dir="{node}"'
        group.start(
            [
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            env,
            work / f"node_{client}.log",
            cwd=node,
        )
    echo(f"Flower local deployment: SuperLink 127.0.0.1:{port}, {datamodule.num_clients} SuperNodes; logs in {work}/")
    _flwr_run(group, write_app(work / "app", text), LOCAL_CONNECTION, env)


def _flwr_run(group: ProcessGroup, app_dir: Path, connection: str, env: dict) -> None:
    proc = group.start(["flwr", "run", str(app_dir), connection, "--stream"], env)
    if group.wait(proc) != 0:
        raise RuntimeError(f"`flwr run` failed (exit code {proc.returncode}); see its output above.")


def write_app(app_dir: Path, config_text: str) -> Path:
    """A Flower app folder: its pyproject.toml names the two apps and carries the config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    quoted = config_text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    (app_dir / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "firm-lightning-app"
version = "1.0.0"
description = "FIRM federation (firm_lightning) on Flower"
license = "Apache-2.0"
dependencies = []  # firm_lightning and flwr must be installed on every machine

[tool.flwr.app]
publisher = "firm-lightning"

[tool.flwr.app.components]
serverapp = "firm_lightning.flower.server_app:app"
clientapp = "firm_lightning.flower.client_app:app"

[tool.flwr.app.config]
{CONFIG_KEY} = """
{quoted}"""
''')
    return app_dir


def _for_the_server(config_text: str) -> str:
    """The config the server app runs: output_dir absolute (its processes start elsewhere), and no overwrite
    (the ``flower`` command cleared the folder already; the server must not remove what it wrote since)."""
    config = yaml.safe_load(config_text)
    config["federation"]["output_dir"] = str(Path(config["federation"]["output_dir"]).resolve())
    config["federation"]["overwrite"] = False
    return yaml.safe_dump(config, sort_keys=False)

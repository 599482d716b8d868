"""Both Flower apps build their objects from the same resolved YAML as ``fit``.

The ``flower`` command saves the resolved config (``config.yaml``) and hands its text to the
apps (bound in simulation, as the run config entry ``firm-config`` in a deployment). Each app
process parses it with the same ``FIRMCLI`` parser and keeps the result: a ``ClientApp``
process serves many rounds with one model.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from firm_lightning.datamodule import PromptDataModule
from firm_lightning.module import FIRMClientModule
from firm_lightning.orchestrator import FederationConfig

if TYPE_CHECKING:
    from firm_lightning.flower.settings import FlowerSettings

CONFIG_KEY = "firm-config"  # run-config entry holding the YAML text in a deployment


@dataclass
class Components:
    module: FIRMClientModule
    datamodule: PromptDataModule
    federation: FederationConfig
    trainer_config: dict
    settings: "FlowerSettings"
    config_text: str


_CACHE: dict[str, Components] = {}


def load_components(config_text: str) -> Components:
    """The objects the config describes, built once per process (seeded like ``fit``)."""
    key = hashlib.sha256(config_text.encode()).hexdigest()
    if key not in _CACHE:
        _CACHE.clear()  # one federation per process: do not keep an old model alive
        _CACHE[key] = _build(config_text)
    return _CACHE[key]


def _build(config_text: str) -> Components:
    from firm_lightning.cli import FIRMCLI  # the CLI imports this package

    class _Build(FIRMCLI):
        def _run_subcommand(self, subcommand: str) -> None:
            """Only parse and instantiate."""

    argv = sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(config_text)
        sys.argv = argv[:1]  # a Ray worker's own arguments are not ours to parse
        try:
            cli = _Build(args=["flower", "--config", str(path)])
        finally:
            sys.argv = argv
    settings = cli._section("flower")
    weighting = settings.algorithm.weighting(len(cli.model.objective_names))
    if weighting is not None:  # the algorithm's in-client weighting, as the orchestrator applies it
        cli.model.weighting = weighting
    return Components(
        module=cli.model,
        datamodule=cli.datamodule,
        federation=cli._section("federation"),
        trainer_config=cli._get(cli.config, "trainer").as_dict(),
        settings=settings,
        config_text=config_text,
    )

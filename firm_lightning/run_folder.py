"""The run folder: the one place that knows the file names of ``federation.output_dir`` and reads them back.

Layout of ``output_dir``::

    config.yaml                  the resolved config (written by the CLI)
    metrics.csv                  one row per round: eval/reward/<objective>, lambda_dispersion, ...
    client_metrics.csv           one row per client per round: lambda/<objective>, train/reward/<objective>, bytes
    adapters/round_<r>.safetensors, adapters/adapter_config.json, adapters/final/ (a peft adapter folder
                                 with a Hugging Face model card, README.md), adapters/<best>.safetensors and
                                 adapters/<best>.json (SaveBestAdapter's best round), adapters/<best>/ (the same
                                 as a peft folder), adapters/objective_state.json (the evaluation statistics)
    checkpoint/                  the server's state after the last finished round (resume)
    plots/eval_rewards.png, plots/lambdas.png
    summary.txt                  the table printed at the end, written last: the run's "finished" marker
    clients/client_<id>/round_<r>/  each client fit's own Lightning logs (clients/client_<id>/state on Flower nodes)
    federation/                  the round metrics of file-based Lightning loggers
    flower/                      the ``flower`` command's work folder (its config, apps, logs, server error)
    server_private/              with federation.privacy only: what the guarantee does not cover, never read by
                                 the outputs above: metrics.csv and client_metrics.csv with every training
                                 statistic, clients/ (the client fits' logs and a Flower node's state), README.txt

A ``compare`` or ``pareto`` sweep folder holds ``config.yaml``, its own reports and ``runs/``, one
run folder per run of the sweep.

Every writer takes its paths from a :class:`RunFolder` and every reader reads through one, so
renaming a file or changing what "finished" means is one edit here. A leaf module: it imports
nothing from the package.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Optional

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

OBJECTIVE_STATE_FILE = "objective_state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names inside an adapter folder
ADAPTER_CONFIG = "adapter_config.json"
_ROUND_ADAPTER = re.compile(r"round_(\d+)\.safetensors")
_SWEEP_DEPTH = 4  # how far above a run resolved_config looks for the config of the sweep that made it


class RunFolder:
    """The files of one run in ``path`` (``federation.output_dir``): their names and their readers.

    Names are paths whether or not the file exists yet. The readers never write: a run in
    progress may be read by another process (files are replaced atomically by their writers).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def create(self) -> "RunFolder":
        """Make the folder (and its parents) before a run's first file is written; every writer starts here."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # ---- names ----

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def client_metrics(self) -> Path:
        return self.path / "client_metrics.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.txt"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def adapters(self) -> Path:
        return self.path / "adapters"

    def round_adapter(self, round_idx: int) -> Path:
        return self.adapters / f"round_{round_idx:03d}.safetensors"

    @property
    def final(self) -> Path:
        """The peft folder of the last global adapter."""
        return self.adapters / "final"

    def best_adapter(self, filename: str) -> Path:
        """SaveBestAdapter's file; ``best_record(filename)`` beside it names its round and value."""
        return self.adapters / f"{filename}.safetensors"

    def best_record(self, filename: str) -> Path:
        return self.adapters / f"{filename}.json"

    def best_folder(self, filename: str) -> Path:
        """The peft folder the writer packages SaveBestAdapter's file into at the end."""
        return self.adapters / filename

    @property
    def objective_state(self) -> Path:
        """The evaluation statistics of the run, beside the adapters (read by validate and generate)."""
        return self.adapters / OBJECTIVE_STATE_FILE

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def reward_plot(self) -> Path:
        return self.plots / "eval_rewards.png"

    @property
    def lambda_plot(self) -> Path:
        return self.plots / "lambdas.png"

    @property
    def clients(self) -> Path:
        return self.path / "clients"

    @staticmethod
    def client_name(client_id: int) -> str:
        """A client's folder under ``clients/`` (its fits' logs, a Flower node's state)."""
        return f"client_{client_id:03d}"

    @staticmethod
    def round_name(round_idx: int) -> str:
        """One round's folder of a client's logs."""
        return f"round_{round_idx:03d}"

    def client_state(self, client_id: int, private: bool = False) -> Path:
        """A Flower node's own copy of its client's state (stateful objectives, persisted optimiser); ``private``:
        under differential privacy, in the server-private record (the folder names who trained)."""
        return (self.private_clients if private else self.clients) / self.client_name(client_id) / "state"

    @property
    def server_private(self) -> Path:
        """Under differential privacy: the record outside the guarantee (the server's own, never published)."""
        return self.path / "server_private"

    @property
    def private_readme(self) -> Path:
        return self.server_private / "README.txt"

    @property
    def private_metrics(self) -> Path:
        """Every round's full row: the released one plus the training statistics of the sampled clients."""
        return self.server_private / "metrics.csv"

    @property
    def private_client_metrics(self) -> Path:
        return self.server_private / "client_metrics.csv"

    @property
    def private_clients(self) -> Path:
        """Under differential privacy, where the client fits log (``clients`` otherwise)."""
        return self.server_private / "clients"

    @property
    def federation_logs(self) -> Path:
        return self.path / "federation"

    @property
    def flower(self) -> Path:
        """The ``flower`` command's work folder."""
        return self.path / "flower"

    @property
    def flower_config(self) -> Path:
        return self.flower / "config.yaml"

    @property
    def server_error(self) -> Path:
        """The Flower server's user-facing error, for the ``flower`` command to print."""
        return self.flower / "server_error.txt"

    @property
    def runs(self) -> Path:
        """A sweep's (``compare``, ``pareto``) own runs, each a run folder of its own below this one."""
        return self.path / "runs"

    def entries(self) -> list[Path]:
        """Every top-level file and folder a run writes here, present or not (what a clean start must clear)."""
        return [self.config, self.metrics, self.client_metrics, self.summary, self.checkpoint, self.adapters,
                self.plots, self.clients, self.federation_logs, self.flower, self.server_private]

    # ---- readers ----

    def is_finished(self, num_rounds: Optional[int] = None, since: Optional[float] = None) -> bool:
        """Whether a run finished here: the summary (written last) is present, written at or after
        ``since`` (a ``time.time()``) when given, and the last recorded round is ``num_rounds`` when given."""
        if not self.summary.is_file() or (since is not None and self.summary.stat().st_mtime < since):
            return False
        if num_rounds is None:
            return True
        history = self.history()
        return bool(history) and history[-1]["round"] == num_rounds

    def history(self) -> list[dict]:
        """The round rows of ``metrics.csv`` as numbers (an empty cell is NaN, ``round`` an int); [] before any."""
        if not self.metrics.is_file():
            return []
        with open(self.metrics, newline="") as f:
            rows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in csv.DictReader(f)]
        for row in rows:
            row["round"] = int(row["round"])
        return rows

    def round_adapters(self) -> list[Path]:
        """The saved global adapter of every round, in round order (round 0 first)."""
        found = [(int(m[1]), p) for p in self.adapters.glob("round_*.safetensors")
                 if (m := _ROUND_ADAPTER.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def resolved_config(self) -> tuple[Optional[Path], Optional[dict]]:
        """The ``config.yaml`` the CLI saved for this run and its content: here, or in the sweep folder above
        (``compare``/``pareto``) whose ``federation.output_dir`` it is; (None, None) without one."""
        for folder in [self.path, *list(self.path.parents)[:_SWEEP_DEPTH]]:
            path = RunFolder(folder).config
            if not path.is_file():
                continue
            try:
                config = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError:
                return None, None
            out = (config.get("federation") or {}).get("output_dir")
            if out is not None and Path(out).resolve() == folder.resolve():
                return path, config
        return None, None


def objective_state_beside(ckpt_path: str | Path) -> Optional[Path]:
    """``objective_state.json`` next to an adapter file, or in/above an adapter folder (adapters/final)."""
    p = Path(ckpt_path)
    for folder in ((p, p.parent) if p.is_dir() else (p.parent,)):
        if (folder / OBJECTIVE_STATE_FILE).is_file():
            return folder / OBJECTIVE_STATE_FILE
    return None


def load_adapter_file(path: str | Path) -> dict:
    """The tensors of an adapter file, refusing files that are not readable safetensors."""
    file = adapter_file(path)
    try:
        return load_file(str(file))
    except SafetensorError as error:
        example = RunFolder("<output_dir>")
        raise ValueError(
            f"{file} is not a readable safetensors adapter ({error}): it is damaged, truncated or another kind of "
            f"file. Pass an adapter written by `fit` ({example.adapters}/round_<r>.safetensors or adapters/final)."
        ) from error


def adapter_file(path: str | Path) -> Path:
    """A .safetensors adapter file, or a peft adapter folder holding adapter_model.safetensors."""
    p = Path(path)
    if p.is_dir():
        p = p / ADAPTER_WEIGHTS
    if not p.is_file():
        raise FileNotFoundError(
            f"No adapter at {str(path)!r}: pass a .safetensors file written by `fit` "
            f"(e.g. {RunFolder('<output_dir>').round_adapter(5)}) or a folder holding {ADAPTER_WEIGHTS}."
        )
    return p

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

A ``compare`` or ``pareto`` sweep folder holds ``config.yaml``, its own reports (``metrics.csv``,
``summary.md``, ``plots/``; ``pareto.csv``, ``pareto.png``, ``hypervolume.json``) and ``runs/``, one
run folder per run of the sweep.

One writer at a time: a run holds :meth:`RunFolder.lock` for its whole life (an OS file lock on
``.lock``, which dies with its process, so a killed run never blocks its resume); a second run into
the folder is refused naming the holder. A run starts clean or explicitly: into a folder holding
another run's files it must resume it or overwrite it (:meth:`RunFolder.check_clean_start`,
:meth:`RunFolder.clear`), never mix with it.

Every writer takes its paths from a :class:`RunFolder` and every reader reads through one, so
renaming a file or changing what "finished" means is one edit here. A leaf module: it imports
nothing from the package (nor torch, but to read or write tensors).
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import yaml
from safetensors import SafetensorError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): runs are not locked
    fcntl = None

if TYPE_CHECKING:
    import torch

_log = logging.getLogger(__name__)
OBJECTIVE_STATE_FILE = "objective_state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's names inside an adapter folder
ADAPTER_CONFIG = "adapter_config.json"
_ROUND_ADAPTER = re.compile(r"round_(\d+)\.safetensors")
_ROUND_FOLDER = re.compile(r"round_(\d+)\D*")  # a client fit's log folder (FMGDA adds a tag)
LOCK_FILE = ".lock"
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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _unwritable(self.path, error) from error
        return self

    def lock(self, command: str, shared: bool = False) -> "RunLock":
        """The folder's lock for one run's life (``with folder.lock("fit"): ...``): refused at once, naming the
        holder, while another run holds it. ``shared``: processes that share one sweep on purpose
        (``compare.share_folder``) hold it together; a run that wants the folder alone is still refused."""
        return RunLock(self, command, shared)

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

    def client_traceback(self, client_id: int, round_idx: int, private: bool = False) -> Path:
        """The full traceback of a client fit that failed, beside that fit's logs (``private``: under
        differential privacy, in the server-private record: the path names who was sampled)."""
        clients = self.private_clients if private else self.clients
        return clients / self.client_name(client_id) / self.round_name(round_idx) / "traceback.txt"

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

    @property
    def sweep_summary(self) -> Path:
        """``compare``'s summary table, claims and verdicts."""
        return self.path / "summary.md"

    @property
    def pareto_table(self) -> Path:
        return self.path / "pareto.csv"

    @property
    def pareto_plot(self) -> Path:
        return self.path / "pareto.png"

    @property
    def hypervolume(self) -> Path:
        return self.path / "hypervolume.json"

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    def entries(self) -> list[Path]:
        """Every top-level file and folder a run or a sweep writes here, present or not (what overwrite clears);
        the summary first, so that a folder being cleared never looks finished."""
        return [self.summary, self.config, self.metrics, self.client_metrics, self.checkpoint, self.adapters,
                self.plots, self.clients, self.federation_logs, self.flower, self.sweep_summary, self.pareto_table,
                self.pareto_plot, self.hypervolume, self.runs, self.server_private]

    def run_files(self, sweep: bool = False) -> list[Path]:
        """The files of an earlier run here: what a new run would mix with. ``config.yaml`` and the ``flower``
        command's work folder are not a run's results (the ``flower`` command writes them before its server
        starts); a sweep (``sweep``) reuses its own reports and runs, and mixes only with a single run's files."""
        single = [self.summary, self.metrics, self.client_metrics, self.checkpoint, self.adapters, self.plots,
                  self.clients, self.federation_logs, self.server_private]
        if sweep:
            single = [p for p in single if p not in (self.metrics, self.plots)]
        else:
            single += [self.sweep_summary, self.pareto_table, self.hypervolume, self.runs]
        return [p for p in single if p.exists()]

    # ---- a clean start or an explicit one ----

    def check_clean_start(self, resume: bool, overwrite: bool, sweep: bool = False) -> None:
        """Refuse to start a run here over another run's files unless it resumes that run (``resume``, with a
        checkpoint to resume from) or removes them first (``overwrite``, then :meth:`clear`). Writes nothing."""
        found = self.run_files(sweep)
        if overwrite or not found or (resume and self.has_checkpoint()):
            return
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:4]) + (", ..." if len(found) > 4 else "")
        start_over = "start over with --federation.overwrite true (removes its files first)"
        if resume:
            raise RunFolderError(
                f"Cannot resume in {self.path}: it holds files of a run ({names}) but no checkpoint "
                f"({self.checkpoint}/) to resume from; {start_over}, or pass another --federation.output_dir."
            )
        raise RunFolderError(
            f"{self.path} already holds a run ({names}): continue it with --federation.resume true, {start_over}, "
            "or pass another --federation.output_dir."
        )

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint was saved here (readable or not: resume reports a damaged one)."""
        return self.checkpoint.is_dir() and any(self.checkpoint.iterdir())

    def clear(self) -> None:
        """Remove every file of an earlier run or sweep here (``federation.overwrite``); the lock and files that
        are not a run's stay."""
        for entry in self.entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)

    def discard_after(self, round_idx: int) -> None:
        """Before a resume from round ``round_idx``: remove what rounds after it left (their adapters and client
        logs, from a round that did not finish or a damaged latest state) and the finished marker."""
        self.summary.unlink(missing_ok=True)
        for path in self.adapters.glob("round_*.safetensors"):
            if (m := _ROUND_ADAPTER.fullmatch(path.name)) and int(m[1]) > round_idx:
                path.unlink()
        for path in self.clients.glob("client_*/round_*"):
            if (m := _ROUND_FOLDER.fullmatch(path.name)) and int(m[1]) > round_idx and path.is_dir():
                shutil.rmtree(path)

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


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"No space left on the device while writing {path}; any earlier checkpoint is intact. "
                "Free some space, then continue with `--federation.resume true`.",
            ) from error
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename itself must reach the disk; not every platform can open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """A safetensors file (an adapter), written atomically like every file of a run folder."""
    from safetensors.torch import save as safetensors_bytes  # torch only where tensors are written

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


class RunFolderError(ValueError):
    """A run folder that cannot take this run: another run holds it, or it holds another run's files."""


class RunLock:
    """An OS lock on a run folder for one run's life (``RunFolder.lock``).

    ``fcntl.flock`` on ``<folder>/.lock``: the kernel drops it when its process ends, however it ends,
    so a killed run leaves no lock behind that could block its resume. The holder (PID, host, start
    time, command) is written into the file for a refused run to name. Taking the lock creates the
    folder if needed; releasing it removes what taking it created (the lock file, empty folders), so a
    run refused before writing anything leaves the folder exactly as it found it.
    """

    def __init__(self, folder: RunFolder, command: str, shared: bool = False) -> None:
        self.folder, self.command, self.shared = folder, command, shared
        self._fd: Optional[int] = None
        self._created: list[Path] = []
        self._previous: Optional[bytes] = None  # a lock file left by a killed run: restored as it was

    def __enter__(self) -> "RunLock":
        path = self.folder.path
        self._created = [p for p in (path, *path.parents) if not p.exists()]
        self.folder.create()
        if fcntl is None:
            return self
        try:
            self._acquire()
        except BaseException:
            self._remove_created()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> None:
        file = self.folder.lock_file
        while True:
            try:
                self._previous = file.read_bytes() if file.exists() else None
                fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise _unwritable(self.folder.path, error) from error
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunFolderError(
                    f"{self.folder.path} is in use by another run ({holder}): wait for it to end, or pass another "
                    "--federation.output_dir."
                ) from None
            except OSError as error:  # a file system without locks (some network mounts): run unlocked
                os.close(fd)
                if self._previous is None:
                    file.unlink(missing_ok=True)
                _log.warning("%s cannot be locked (%s): nothing stops a second run from writing there too.",
                             self.folder.path, error.strerror or error)
                return
            if _same_file(fd, file):  # not unlinked by a releasing holder between our open and our lock
                break
            os.close(fd)
        self._fd = fd
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": self.command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)

    def release(self) -> None:
        """Give the folder up: the lock file goes (or gets back a killed run's record), then empty folders created."""
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the last holder tidies up
                if self._previous is None:
                    self.folder.lock_file.unlink(missing_ok=True)
                else:
                    os.ftruncate(self._fd, 0)
                    os.pwrite(self._fd, self._previous, 0)
            except BlockingIOError:
                pass  # another process shares the lock: it still needs the file
            finally:
                os.close(self._fd)
                self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; a folder the run wrote into is not empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"PID {record['pid']} on {record['host']}, started {record['started']}, "
                f"`{record['command']}`")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that is starting"


def _unwritable(path: Path, error: OSError) -> OSError:
    return OSError(
        error.errno or errno.EACCES,
        f"Cannot write to federation.output_dir {str(path)!r} ({error.strerror or error}); "
        "pass a writable folder with --federation.output_dir.",
    )


def objective_state_beside(ckpt_path: str | Path) -> Optional[Path]:
    """``objective_state.json`` next to an adapter file, or in/above an adapter folder (adapters/final)."""
    p = Path(ckpt_path)
    for folder in ((p, p.parent) if p.is_dir() else (p.parent,)):
        if (folder / OBJECTIVE_STATE_FILE).is_file():
            return folder / OBJECTIVE_STATE_FILE
    return None


def load_adapter_file(path: str | Path) -> dict:
    """The tensors of an adapter file, refusing files that are not readable safetensors."""
    from safetensors.torch import load_file  # torch only where tensors are read

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

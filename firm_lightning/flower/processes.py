"""Processes started for Flower (Ray, SuperLink, SuperNodes) and their guaranteed teardown.

Every command runs in a session of its own; on exit — normal, error or Ctrl-C — the whole tree
of every started process (found by parent links, which also cross the sessions some Flower
processes open for themselves) is sent SIGTERM, then SIGKILL after a grace period, and reaped.
``ProcessGroup.pids`` lists every process seen, so a test can check that none survives.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import psutil


def flower_env(flwr_home: Optional[Path] = None) -> dict[str, str]:
    """Environment for Flower and Ray processes: no telemetry, no dependency installs."""
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",  # Ray would otherwise re-create the env with uv
        PYTHONUNBUFFERED="1",
        # Flower starts its helpers (flower-superexec, flwr-serverapp, ...) by name.
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    # Children import the same firm_lightning as this process (a checkout, not another install).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


class ProcessGroup:
    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self.started: list[subprocess.Popen] = []
        # psutil handles remember each process's start time: a recycled PID is never signalled.
        self.processes: dict[int, psutil.Process] = {}

    def __enter__(self) -> "ProcessGroup":
        # SIGTERM (e.g. a job scheduler) unwinds like Ctrl-C, so the processes are stopped too.
        in_main = threading.current_thread() is threading.main_thread()
        self._previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            if self._previous is not None:
                signal.signal(signal.SIGTERM, self._previous)

    def start(
        self, command: Sequence[str], env: dict, log: Optional[Path] = None, cwd: Optional[Path] = None
    ) -> subprocess.Popen:
        out = open(log, "w") if log is not None else None
        try:
            proc = subprocess.Popen(
                list(command), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True,  # a terminal's Ctrl-C reaches us only; we stop the tree
            )
        finally:
            if out is not None:
                out.close()
        self.started.append(proc)
        self._add(proc.pid)
        return proc

    @property
    def pids(self) -> set[int]:
        return set(self.processes)

    def _add(self, pid: int) -> None:
        if pid not in self.processes:
            try:
                self.processes[pid] = psutil.Process(pid)
            except psutil.Error:
                pass

    def wait(self, proc: subprocess.Popen, timeout_s: Optional[float] = None) -> int:
        """Wait for ``proc``, recording its descendants while it runs (they may outlive it)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while proc.poll() is None:
            self._record_descendants()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{proc.args[0]} did not finish in {timeout_s:.0f}s.")
            time.sleep(0.5)
        return proc.returncode

    def stop(self) -> None:
        """SIGTERM everything, SIGKILL what is left after the grace period; return only when nothing runs.

        Rescans after every signal: a process may start another while it stops (Ray does), and
        an orphan re-parented to init is still found by its session.
        """
        deadline = time.monotonic() + self.grace_s
        sig = signal.SIGTERM
        while True:
            self._record_descendants()
            alive = _alive(self.processes.values())
            if not alive:
                break
            if time.monotonic() > deadline:
                sig = signal.SIGKILL
            for p in alive:
                _signal(p, sig)
            psutil.wait_procs(alive, timeout=0.5)
            if sig == signal.SIGKILL and time.monotonic() > deadline + self.grace_s:
                break  # unkillable (e.g. in uninterruptible sleep): give up rather than hang
        for proc in self.started:
            proc.poll()  # reap our direct children

    def _record_descendants(self) -> None:
        """Every process below the started ones, by parent links, and any in their sessions (orphans too)."""
        for p in list(self.processes.values()):
            try:
                for child in p.children(recursive=True):
                    self._add(child.pid)
            except psutil.Error:
                pass
        sessions = {proc.pid for proc in self.started}  # each started process leads a session of its own
        for p in psutil.process_iter():
            if p.pid not in self.processes:
                try:
                    if os.getsid(p.pid) in sessions:
                        self._add(p.pid)
                except OSError:
                    pass


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _alive(processes) -> list[psutil.Process]:
    """The processes still running (same PID *and* start time); zombies count as gone."""
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def alive(group: "ProcessGroup") -> list[int]:
    return [p.pid for p in _alive(group.processes.values())]


def _signal(p: psutil.Process, sig: int) -> None:
    try:
        p.send_signal(sig)
    except psutil.Error:
        pass


def wait_for_port(
    port: int, timeout_s: float = 60.0, proc: Optional[subprocess.Popen] = None, log: Optional[Path] = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited with code {proc.returncode} before listening on 127.0.0.1:{port}; see {log}."
            )
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"Nothing listens on 127.0.0.1:{port} after {timeout_s:.0f}s; see {log}.")

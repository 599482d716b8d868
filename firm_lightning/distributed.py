"""Several devices per client: ``--trainer.strategy ddp --trainer.devices k``.

How the ranks cooperate:

- **Launch.** ``python -m firm_lightning fit ... --trainer.strategy ddp --trainer.devices k``
  starts ranks 1..k-1 itself, as Lightning's subprocess launcher does: the same command again,
  with ``LOCAL_RANK``/``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set (one node).
  Every rank parses the same config and builds the same policy, data and objectives. The
  process group (gloo on CPU, NCCL on CUDA) is set up once, at launch, and serves every client
  fit of the run. No external launcher (torchrun) is needed or supported.
- **Rank 0 runs the federation** (round engine: client sampling, aggregation, evaluation,
  privacy noise, checkpoints, metrics, plots, logs); it alone writes files. Before each client
  fit it broadcasts what the fit needs: the client, the round, the global adapter and that
  client's carried state (reward statistics, a persisted optimiser state). **Ranks > 0 only
  serve client fits**: they run the same ``fit_client`` with the same seeds, in lockstep with
  rank 0, and keep nothing from it (rank 0's upload is the client's).
- **Inside a client fit** (``FIRMClientModule.training_step``): ``data.batch_size`` stays the
  client's global batch per local step. Every rank gets the whole batch (no distributed
  sampler), samples the responses of its contiguous share of the prompts (shares differ by at
  most one prompt) from each prompt's own generator (``sampling.per_prompt_seeds``: as one
  process would draw them), and the ranks exchange their rollouts: every
  rank then scores the whole batch (identical rewards, advantages and reward statistics). Each
  rank computes the per-objective gradients of its own rows, with the whole batch's loss
  normalisers, and the ``S`` gradients are summed over the ranks (``all_reduce``): exactly the
  whole batch's gradients however unequal the shares. Every rank then computes the same Gram
  matrix, λ and step. Lightning's ``DistributedDataParallel`` wrapper is not used: its gradient
  hooks never run under ``torch.autograd.grad``, and building it would broadcast every weight,
  base model included, at every client fit.
- **Failures.** A client fit that fails the same way on every rank (bad rewards, say) is left
  out of its round as without DDP. A rank that dies ends the run: rank 0 stops the others and
  itself; a rank > 0 whose rank 0 is gone exits. A rank stuck in a collective because another
  raised alone waits for the process group's timeout (30 minutes).

Supported: ``trainer.strategy`` ``auto`` (one device) or ``ddp``, ``trainer.num_nodes`` 1, and
the ``fit`` command (``validate``, ``generate``, ``compare``, ``pareto`` and ``flower`` run a
client on one device).
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

SUPPORTED_STRATEGIES = ("auto", "ddp")
_LAUNCHED = "FIRM_DDP_LAUNCHED"  # set on every rank this module started (or rank 0 after it launched)


# ---------------------------------------------------------------------------- settings


def requested_devices(trainer_kwargs: dict) -> int:
    """How many devices (ranks) one client asks for: ``trainer.devices`` as an int, a list or a string."""
    devices = trainer_kwargs.get("devices")
    if devices is None or devices == "auto":
        return 1
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        devices = devices.strip()
        return len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    return int(devices)


def check_strategy(trainer_kwargs: dict) -> None:
    """Refuse what a FIRM client cannot run, naming the key and what is supported."""
    strategy = trainer_kwargs.get("strategy")
    name = strategy if isinstance(strategy, str) or strategy is None else type(strategy).__name__
    if isinstance(strategy, dict):
        name = strategy.get("class_path", str(strategy))
    if name is not None and name not in SUPPORTED_STRATEGIES and not isinstance(strategy, ClientDDPStrategy):
        raise ValueError(
            f"trainer.strategy={name!r} is not supported: a FIRM client computes S per-objective gradients with "
            "torch.autograd.grad and combines them itself, which sharded strategies (FSDP, DeepSpeed, ...) and "
            f"spawn-based launchers do not allow. Supported: {list(SUPPORTED_STRATEGIES)} — `ddp` with "
            "`--trainer.devices k` runs each client on k devices of one machine."
        )
    devices = requested_devices(trainer_kwargs)
    if devices > 1 and name != "ddp" and not isinstance(strategy, ClientDDPStrategy):
        raise ValueError(
            f"trainer.devices={trainer_kwargs.get('devices')!r} asks for {devices} devices per client: "
            "set `--trainer.strategy ddp` as well (the only multi-device strategy supported)."
        )
    if int(trainer_kwargs.get("num_nodes") or 1) != 1:
        raise ValueError(
            f"trainer.num_nodes={trainer_kwargs.get('num_nodes')} is not supported: the ranks of one client run on "
            "one machine; set trainer.num_nodes to 1."
        )


def client_trainer_kwargs(kwargs: dict) -> dict:
    """A client Trainer's arguments: ``ddp`` becomes ``ClientDDPStrategy``, and every rank gets the whole
    batch (no distributed sampler: ``data.batch_size`` is the client's global batch, shared in the module)."""
    if kwargs.get("strategy") != "ddp":
        return kwargs
    if requested_devices(kwargs) == 1:
        return {**kwargs, "strategy": "auto"}  # one device: no process group to set up
    return {**kwargs, "strategy": ClientDDPStrategy(), "use_distributed_sampler": False}


def single_device_kwargs(kwargs: dict) -> dict:
    """An evaluation Trainer's arguments under DDP: rank 0 evaluates alone, on its own device."""
    if kwargs.get("strategy") != "ddp":
        return kwargs
    accelerator = str(kwargs.get("accelerator") or "auto")
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return {**kwargs, "strategy": "auto", "devices": [_rank().local] if cuda else 1}


# ---------------------------------------------------------------------------- the strategy


class ClientDDPStrategy(DDPStrategy):
    """Lightning's DDP strategy for one FIRM client fit, on ranks this module launched.

    Three changes: no ``DistributedDataParallel`` wrapper (FIRM all-reduces its per-objective
    gradients itself, see the module docstring); the RNG state survives the process-group setup
    (Lightning's ``reset_seed()`` there would replace the client's seed with the global one, so
    every client and round would sample alike); and no launching from inside a fit.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="popen", **kwargs)

    def _configure_launcher(self) -> None:
        if self.num_processes * self.num_nodes > 1 and not launched():
            raise ValueError(
                "trainer.strategy=ddp with several devices runs from `python -m firm_lightning fit`, which starts one "
                "process per device itself; other commands (validate, generate, compare, pareto, flower) run a "
                "client on one device: set --trainer.devices 1."
            )
        super()._configure_launcher()  # the processes exist already (LOCAL_RANK is set): it starts none

    def setup_distributed(self) -> None:
        with rng_kept():
            super().setup_distributed()

    def configure_ddp(self) -> None:
        pass  # no DistributedDataParallel: see the class docstring


@contextmanager
def rng_kept():
    """Restore torch's (CPU and CUDA), numpy's and Python's RNG states on exit."""
    import numpy as np

    python, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


# ---------------------------------------------------------------------------- launching


@dataclass
class _Rank:
    rank: int = 0
    world: int = 1
    local: int = 0


def _rank() -> _Rank:
    if not launched():
        return _Rank()
    return _Rank(int(os.environ["RANK"]), int(os.environ[_LAUNCHED]), int(os.environ["LOCAL_RANK"]))


def launched() -> bool:
    """Whether this process is one of several ranks of a client started by ``launch_ranks``."""
    return _LAUNCHED in os.environ


@dataclass
class Ranks:
    """This process's place among a client's ranks; rank 0 holds the others' processes."""

    rank: int = 0
    world: int = 1
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> "Ranks":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.world <= 1:
            return
        if self.rank == 0:
            try:
                release_ranks()  # the other ranks return from serving, then exit
            except Exception:  # noqa: BLE001 - the process group is broken: stop them instead
                _terminate(self.processes)
            for process in self.processes:
                try:
                    process.wait(timeout=120 if exc_type is not None else None)
                except subprocess.TimeoutExpired:
                    _terminate([process])
        if dist.is_initialized():
            dist.destroy_process_group()


def launch_ranks(trainer_kwargs: dict) -> Ranks:
    """``trainer.strategy=ddp`` with ``k > 1`` devices: start ranks 1..k-1 (this command again) and
    join the process group; otherwise nothing (one process, rank 0 of 1)."""
    check_strategy(trainer_kwargs)
    world = requested_devices(trainer_kwargs) if trainer_kwargs.get("strategy") == "ddp" else 1
    if world <= 1:
        return Ranks()
    processes = []
    if not launched():  # this is rank 0, started by the user
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                          NODE_RANK="0", LOCAL_RANK="0", RANK="0")
        os.environ[_LAUNCHED] = str(world)
        command = _this_command()
        for rank in range(1, world):
            env = {**os.environ, "LOCAL_RANK": str(rank), "RANK": str(rank)}
            processes.append(subprocess.Popen(command, env=env))
        _watch_children(processes)
    else:
        _watch_parent()
    rank = int(os.environ["RANK"])
    _init_process_group(trainer_kwargs, rank, world)
    # Rank 0 evaluates alone (single_device_kwargs): Lightning's advice to sync epoch-level metrics does not apply.
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*when logging on epoch level in distributed.*")
    return Ranks(rank, world, processes)


def _this_command() -> list[str]:
    """The command that started this process, to run again (as Lightning's subprocess launcher does)."""
    import __main__

    if getattr(__main__, "__spec__", None) is None:
        return [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]]
    return [sys.executable, "-m", __main__.__spec__.name, *sys.argv[1:]]


def free_port() -> int:
    """A TCP port nothing listens on now, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(trainer_kwargs: dict, rank: int, world: int) -> None:
    accelerator = str(trainer_kwargs.get("accelerator") or "auto")
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)


def _watch_children(processes: list[subprocess.Popen]) -> None:
    """Rank 0: a rank that dies would leave the others waiting in a collective; stop them and this one."""

    def watch() -> None:
        while True:
            for rank, process in enumerate(processes, start=1):
                code = process.poll()
                if code not in (None, 0):
                    print(f"firm_lightning: rank {rank} exited with code {code}; stopping the other ranks.",
                          file=sys.stderr, flush=True)
                    _terminate(processes)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            if all(p.poll() == 0 for p in processes):
                return
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="firm-ddp-children").start()


def _terminate(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)


def _watch_parent() -> None:
    """Ranks > 0: exit when rank 0 (the parent process) is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="firm-ddp-parent").start()


# ---------------------------------------------------------------------------- rank 0 drives, ranks > 0 serve


def announce_client_fit(global_adapter: dict, client_id: int, round_idx: int, client_states: Optional[dict]) -> None:
    """Rank 0, before a client fit: tell the other ranks to run it too (no-op without DDP)."""
    if not _serving():
        return
    carried = None if client_states is None else {k: v for k, v in client_states.items() if _belongs(k, client_id)}
    adapter = {k: v.detach().cpu() for k, v in global_adapter.items()}
    _broadcast({"client_id": client_id, "round_idx": round_idx, "global_adapter": adapter, "client_states": carried})


def release_ranks() -> None:
    """Rank 0, when the federation ends (or fails): the other ranks stop serving."""
    if _serving():
        _broadcast(None)


def serve_client_fits(fit: Callable[..., Any]) -> int:
    """Ranks > 0: run ``fit(global_adapter, client_id, round_idx, client_states)`` for every client fit
    rank 0 announces, until it releases them; returns how many fits ran."""
    fits = 0
    while (message := _broadcast(None)) is not None:
        try:
            fit(**message)
        except Exception as error:  # noqa: BLE001 - rank 0 meets the same failure and reports it
            print(f"firm_lightning rank {dist.get_rank()}: client {message['client_id']} round {message['round_idx']} "
                  f"failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        fits += 1
    print(f"firm_lightning rank {dist.get_rank()}: served {fits} client fits", file=sys.stderr, flush=True)
    return fits


def _serving() -> bool:
    return launched() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() == 0


def _broadcast(message):
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _belongs(key: str, client_id: int) -> bool:
    """A ``client_states`` key of this client: ``"<id>"``, ``"<id>/..."`` or ``"<id>_..."``."""
    return re.match(rf"{client_id}(?:$|[/_])", key) is not None


# ---------------------------------------------------------------------------- inside a client fit


def shares(num: int, world: int) -> list[slice]:
    """Contiguous shares of ``num`` items over ``world`` ranks, sizes differing by at most one."""
    base, extra = divmod(num, world)
    bounds = [0]
    for rank in range(world):
        bounds.append(bounds[-1] + base + (1 if rank < extra else 0))
    return [slice(bounds[r], bounds[r + 1]) for r in range(world)]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

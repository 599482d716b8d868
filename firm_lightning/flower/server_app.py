"""The Flower ``ServerApp``: find the clients, build the round engine, let Flower carry the rounds.

1. Ask every SuperNode which client it is (a ``query`` message) and wait for all
   ``federation.num_clients`` of them.
2. Build the ``RoundEngine`` from the same config as ``fit`` and ``start()`` it: round 0's
   evaluation, or a checked resume from ``<output_dir>/checkpoint``.
3. ``FIRMStrategy`` (or, with ``flower.secure_aggregation``, the SecAgg+ workflow) runs the
   remaining rounds with Flower; the engine screens, aggregates, evaluates, records,
   checkpoints and fires the callbacks, exactly as in-process, plus Flower's byte counts.
4. ``engine.finish``: final adapter, plots, summary.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from firm_lightning.config import Components, load_components
from firm_lightning.engine import RoundEngine
from firm_lightning.flower.accounting import MeasuredGrid
from firm_lightning.flower.records import CLIENT_ID, CONFIG_KEY, METRICS, NUM_EXAMPLES, adapter_record
from firm_lightning.flower.secure_aggregation import run_secure
from firm_lightning.flower.settings import FlowerSettings
from firm_lightning.flower.strategy import FIRMStrategy
from firm_lightning.memory import steady_memory
from firm_lightning.run_folder import RunFolder, atomic_write
from firm_lightning.state import FederationError, FederationState
from firm_lightning.trainer_factory import TrainerFactory, quiet_lightning, stays_on_device


def server_app(config_text: Optional[str] = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        text = config_text if config_text is not None else context.run_config.get(CONFIG_KEY)
        if text is None:
            raise ValueError(
                f"The run config has no {CONFIG_KEY!r}: start the run with `python -m firm_lightning flower`."
            )
        run_server(grid, load_components(str(text), {"flower": FlowerSettings}), context)

    return app


def run_server(grid: Grid, comps: Components, context: Context, echo: Callable[[str], None] = print) -> FederationState:
    try:
        return _run_server(grid, comps, context, echo)
    except (FederationError, ValueError, OSError) as error:  # a user error: the `flower` command prints it
        path = RunFolder(comps.federation.output_dir).server_error
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = "FederationError" if isinstance(error, FederationError) else "ValueError"
        atomic_write(path, f"{kind}\n{error}".encode())
        raise


def _run_server(grid: Grid, comps: Components, context: Context, echo: Callable[[str], None]) -> FederationState:
    federation, settings = comps.federation, comps.sections["flower"]
    settings.check(federation)
    grid = MeasuredGrid(grid)
    nodes, num_examples = discover_clients(grid, federation.num_clients, settings.timeout_s, echo)
    trainers = TrainerFactory(comps.trainer_config, Path(federation.output_dir))
    secure = settings.secure_aggregation is not None
    engine = RoundEngine(comps.module, comps.datamodule, federation, trainers, echo=echo, uploads_visible=not secure)
    with quiet_lightning(federation.quiet), stays_on_device(comps.module), steady_memory():
        state = engine.start()
        if secure:
            state = run_secure(
                engine, state, nodes, num_examples, settings.secure_aggregation, grid, context, settings.timeout_s
            )
        else:
            strategy = FIRMStrategy(engine, state, nodes, grid)
            strategy.start(grid, adapter_record(state.global_adapter), len(engine.remaining_rounds(state)),
                           timeout=settings.timeout_s)
            state = strategy.state
        return engine.finish(state)


def discover_clients(
    grid: Grid, num_clients: int, timeout_s: float, echo=print
) -> tuple[dict[int, int], dict[int, int]]:
    """Client id -> node id and client id -> example count, from each SuperNode's answer to a ``query``."""
    deadline = time.monotonic() + timeout_s
    while len(node_ids := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Only {len(node_ids)} of federation.num_clients={num_clients} SuperNodes connected in "
                f"{timeout_s:.0f}s."
            )
        time.sleep(1.0)
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    clients: dict[int, int] = {}
    num_examples: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout_s):
        if reply.has_error():
            raise RuntimeError(
                f"SuperNode {reply.metadata.src_node_id} could not say which client it is: {reply.error.reason}"
            )
        client = int(reply.content[METRICS][CLIENT_ID])
        if client in clients:
            raise ValueError(f"Two SuperNodes claim client {client}: give each node its own partition-id.")
        clients[client] = reply.metadata.src_node_id
        num_examples[client] = int(reply.content[METRICS][NUM_EXAMPLES])
    if sorted(clients) != list(range(num_clients)):
        raise ValueError(
            f"The SuperNodes hold clients {sorted(clients)} but federation.num_clients={num_clients} needs "
            f"partition-id 0..{num_clients - 1}, one per node."
        )
    echo(f"Flower: {num_clients} clients on nodes {[clients[c] for c in sorted(clients)]}")
    return clients, num_examples


app = server_app()

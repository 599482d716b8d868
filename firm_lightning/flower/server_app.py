"""The Flower ``ServerApp``: Flower's strategy loop drives this library's aggregators.

1. Ask every SuperNode which client it is (a ``query`` message) and wait for all
   ``federation.num_clients`` of them.
2. ``FIRMStrategy`` (wrapped by the configured privacy strategy, if any) runs
   ``federation.num_rounds`` rounds with Flower's ``Strategy.start``.
3. After every round, ``FlowerRounds`` (the ``evaluate_fn``) evaluates the new global adapter
   on the held-out prompts and writes the same ``metrics.csv``, ``client_metrics.csv``,
   adapters, plots and summary as ``fit``, plus Flower's byte counts (``flower/bytes_*``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from firm_lightning.flower.components import CONFIG_KEY, Components, load_components
from firm_lightning.flower.accounting import MeasuredGrid
from firm_lightning.flower.records import CLIENT_ID, METRICS, NUM_EXAMPLES, adapter_record, record_adapter
from firm_lightning.flower.strategy import FIRMStrategy
from firm_lightning.orchestrator import FederatedOrchestrator, FederationState, quiet_lightning, stays_on_device
from firm_lightning.trainer_factory import TrainerFactory


def server_app(config_text: Optional[str] = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        text = config_text if config_text is not None else context.run_config.get(CONFIG_KEY)
        if text is None:
            raise ValueError(f"The run config has no {CONFIG_KEY!r}: start the run with `python -m firm_lightning flower`.")
        run_server(grid, load_components(str(text)), context)

    return app


def run_server(grid: Grid, comps: Components, context: Context, echo: Callable[[str], None] = print) -> FederationState:
    federation, settings = comps.federation, comps.settings
    grid = MeasuredGrid(grid)
    nodes, num_examples = discover_clients(grid, federation.num_clients, settings.timeout_s, echo)
    records = FlowerRounds(comps, grid, echo)
    strategy = FIRMStrategy(settings.algorithm.aggregator(federation.server_lr), records.sample_clients, nodes, num_examples)
    records.strategy = strategy
    with quiet_lightning(federation.quiet), stays_on_device(comps.module):
        comps.datamodule.setup("fit")
        settings.privacy.run(
            strategy, grid, context, adapter_record(comps.module.adapter_state()), federation.num_rounds,
            settings.timeout_s, records, len(records.sample_clients(1)),
        )
    return records.finish()


def discover_clients(grid: Grid, num_clients: int, timeout_s: float, echo=print) -> tuple[dict[int, int], dict[int, int]]:
    """Client id -> node id and client id -> example count, from each SuperNode's answer to a ``query``."""
    deadline = time.monotonic() + timeout_s
    while len(node_ids := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Only {len(node_ids)} of federation.num_clients={num_clients} SuperNodes connected in {timeout_s:.0f}s.")
        time.sleep(1.0)
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in node_ids]
    clients: dict[int, int] = {}
    num_examples: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout_s):
        if reply.has_error():
            raise RuntimeError(f"SuperNode {reply.metadata.src_node_id} could not say which client it is: {reply.error.reason}")
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


class FlowerRounds(FederatedOrchestrator):
    """The server's records after each Flower round (``Strategy.start``'s ``evaluate_fn``).

    Reuses the in-process orchestrator's evaluation, client sampling, metrics and writer; only
    the training happens elsewhere (on the SuperNodes, through ``FIRMStrategy``).
    """

    def __init__(self, comps: Components, grid: MeasuredGrid, echo: Callable[[str], None] = print) -> None:
        federation = comps.federation
        trainers = TrainerFactory(comps.trainer_config, Path(federation.output_dir))
        super().__init__(comps.module, comps.datamodule, federation, trainers, comps.settings.algorithm, echo=echo)
        self.grid = grid
        self.strategy: Optional[FIRMStrategy] = None
        self.state: Optional[FederationState] = None
        self._started = self._tic = time.perf_counter()

    def __call__(self, server_round: int, arrays) -> MetricRecord:
        adapter = record_adapter(arrays)
        self.state = self.initial_state() if server_round == 0 else self._record(server_round, adapter)
        self._tic = time.perf_counter()
        self.grid.round = server_round + 1  # what the grid carries next belongs to the next round
        row = self.state.history[-1]
        return MetricRecord({k: float(v) for k, v in row.items() if k.startswith("eval/")})

    def _record(self, round_idx: int, adapter: dict) -> FederationState:
        seen = self.strategy.rounds.get(round_idx)
        if seen is None or seen.result is None:
            raise RuntimeError(
                f"Round {round_idx} produced no aggregate (a privacy wrapper skips aggregation when a client "
                "reports an error; see the Flower log above)."
            )
        nodes = self.strategy.client_nodes
        client_rows = [
            {
                **self._client_row(u, round_idx, seen.global_adapter),
                "flower/bytes_up": self.grid.up[(round_idx, nodes[u.client_id])],
                "flower/bytes_down": self.grid.down[(round_idx, nodes[u.client_id])],
                "flower/messages_up": self.grid.messages_up[(round_idx, nodes[u.client_id])],
            }
            for u in seen.updates
        ]
        row = {
            "round": round_idx,
            **self.evaluate(adapter),
            **self._round_metrics(seen.updates, seen.result, seen.global_adapter, client_rows),
            "flower/bytes_up": sum(r["flower/bytes_up"] for r in client_rows),
            "flower/bytes_down": sum(r["flower/bytes_down"] for r in client_rows),
            "time/round_s": time.perf_counter() - self._tic,
        }
        if not seen.uploads_visible:  # SecAgg+: no single client's update is ever seen
            row["update_dispersion"] = math.nan
        state = FederationState(
            round=round_idx, global_adapter=adapter,
            history=[*self.state.history, row], client_history=[*self.state.client_history, *client_rows],
        )
        self.writer.record_round(state, row, client_rows)
        evals = " ".join(f"{k.removeprefix('eval/reward/')}={v:.3f}" for k, v in row.items() if k.startswith("eval/reward/"))
        self.echo(
            f"round {round_idx}/{self.config.num_rounds} | eval {evals} | up {row['comm/bytes_up']:,} B adapters, "
            f"{row['flower/bytes_up']:,} B Flower messages | {row['time/round_s']:.1f}s"
        )
        return state

    def finish(self) -> FederationState:
        self.writer.finish(self.state, time.perf_counter() - self._started, self.config)
        return self.state


app = server_app()

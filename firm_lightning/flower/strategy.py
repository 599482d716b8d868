"""``FIRMStrategy``: a Flower Message API strategy that drives the library's round engine.

Flower's ``Strategy.start`` owns the loop and the messages; every decision is the engine's:
``configure_train`` asks it which clients train (and fires the client-start hooks as the
messages go out), ``aggregate_train`` hands it the replies (errors and missing replies become
failures, left out as in-process, down to ``federation.min_clients``) and returns the adapter
``engine.conclude`` produced. Flower numbers rounds from 1, so a resumed federation adds the
rounds it already has; once a callback asks to stop, the remaining rounds send no messages.
"""

from __future__ import annotations

from logging import INFO
from typing import Iterable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from firm_lightning.adapters import ClientUpdate
from firm_lightning.engine import RoundEngine
from firm_lightning.flower.accounting import MeasuredGrid
from firm_lightning.flower.records import ARRAYS, CONFIG, adapter_record, content_update
from firm_lightning.state import ClientFailure, FederationState


class FIRMStrategy(Strategy):
    def __init__(self, engine: RoundEngine, state: FederationState, client_nodes: dict[int, int],
                 grid: Optional[MeasuredGrid] = None) -> None:
        self.engine = engine
        self.state = state  # the federation state after the last concluded round
        self.client_nodes = client_nodes  # client id -> Flower node id
        self.node_clients = {node: client for client, node in client_nodes.items()}
        self.grid = grid  # counts Flower's bytes per round and node, when measured
        self.offset = state.round  # Flower's round 1 is the federation's round offset + 1
        self.sampled: dict[int, list[int]] = {}

    def federation_round(self, server_round: int) -> int:
        return self.offset + server_round

    def summary(self) -> None:
        log(INFO, "\t├──> FIRM round engine: %s, aggregator %s, clients %s", self.engine.algorithm.name,
            type(self.engine.aggregator).__name__, sorted(self.client_nodes))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        round_idx = self.federation_round(server_round)
        if self.engine.stop_reason:  # a callback stopped the federation: no clients for the remaining rounds
            return []
        clients = self.sampled[round_idx] = self.engine.begin_round(self.state, round_idx)
        if self.grid is not None:
            self.grid.round = round_idx
        config["server-round"] = round_idx
        messages = []
        for client in clients:
            self.engine.client_started(round_idx, client)
            messages.append(
                Message(
                    RecordDict({ARRAYS: arrays, CONFIG: config}),
                    dst_node_id=self.client_nodes[client],
                    message_type=MessageType.TRAIN,
                )
            )
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        round_idx = self.federation_round(server_round)
        if round_idx not in self.sampled:  # stopped before this round
            return None, None
        updates, failures = self._read(round_idx, list(replies))
        self.state = self.engine.conclude(
            self.state, round_idx, updates, failures,
            client_extras=self._client_traffic(round_idx, updates), round_extras=self._round_traffic(round_idx),
        )
        # Flower logs these metrics; under privacy how many clients replied is not released.
        metrics = None if self.engine.private else MetricRecord({"clients": len(updates)})
        return adapter_record(self.state.global_adapter), metrics

    def _read(self, round_idx: int, replies: list[Message]) -> tuple[list[ClientUpdate], list[ClientFailure]]:
        updates, failures, answered = [], [], set()
        for message in replies:
            client = self.node_clients.get(message.metadata.src_node_id)
            answered.add(client)
            if message.has_error():  # the exception's type and message; its traceback is in the node's log
                reason = " ".join(str(message.error.reason).split()) or f"error code {message.error.code}"
                failures.append(self.engine.client_failed(round_idx, client, reason))
                continue
            update = content_update(message.content)
            updates.append(update)
            self.engine.client_finished(round_idx, update)
        for client in self.sampled[round_idx]:
            if client not in answered:
                failures.append(self.engine.client_failed(round_idx, client, "no reply within flower.timeout_s"))
        return updates, failures

    def _client_traffic(self, round_idx: int, updates: list[ClientUpdate]) -> dict[int, dict]:
        if self.grid is None:
            return {}
        return {u.client_id: self.grid.client_metrics(round_idx, self.client_nodes[u.client_id]) for u in updates}

    def _round_traffic(self, round_idx: int) -> dict:
        if self.grid is None:
            return {}
        return self.grid.round_metrics(round_idx, [self.client_nodes[c] for c in self.sampled[round_idx]])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return []  # the engine evaluates the global adapter itself, on the held-out prompts

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

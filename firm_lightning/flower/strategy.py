"""``FIRMStrategy``: a Flower Message API strategy around this library's aggregators.

``configure_train`` sends the global adapter to the clients the in-process orchestrator would
sample in this round (seeded by (seed, round)); ``aggregate_train`` turns the replies back into
``ClientUpdate``s, in client order, and calls the algorithm's aggregator (``FedAvg`` with the
server learning rate, or FMGDA's ``MinNormOverObjectives``). What it aggregated is kept per
round for the server's records. Flower's
strategy wrappers (differential privacy) wrap it like any other strategy.
"""

from __future__ import annotations

from logging import INFO
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from firm_lightning.aggregation import AggregationResult, Aggregator
from firm_lightning.client import ClientUpdate
from firm_lightning.flower.records import ARRAYS, CONFIG, adapter_record, content_update, record_adapter


@dataclass
class RoundUpdates:
    """One round as the server saw it: the global adapter sent, the uploads, the aggregation."""

    global_adapter: dict
    updates: list[ClientUpdate] = field(default_factory=list)
    result: Optional[AggregationResult] = None
    uploads_visible: bool = True  # False under SecAgg+: the server saw only the clients' mean


class FIRMStrategy(Strategy):
    def __init__(
        self,
        aggregator: Aggregator,
        sample_clients: Callable[[int], list[int]],
        client_nodes: dict[int, int],
        num_examples: dict[int, int],
    ) -> None:
        self.aggregator = aggregator
        self.sample_clients = sample_clients
        self.client_nodes = client_nodes  # client id -> Flower node id
        self.num_examples = num_examples  # client id -> prompts it holds
        self.rounds: dict[int, RoundUpdates] = {}

    def summary(self) -> None:
        log(INFO, "\t├──> FIRM strategy: aggregator %s, clients %s", type(self.aggregator).__name__, sorted(self.client_nodes))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config["server-round"] = server_round
        record = self.rounds[server_round] = RoundUpdates(global_adapter=record_adapter(arrays))
        messages = []
        for client in self.sample_clients(server_round):
            messages.append(Message(
                RecordDict({ARRAYS: arrays, CONFIG: config}), dst_node_id=self.client_nodes[client], message_type=MessageType.TRAIN
            ))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        replies = list(replies)
        errors = [f"node {m.metadata.src_node_id}: {m.error.reason}" for m in replies if m.has_error()]
        if errors:
            raise RuntimeError(f"Round {server_round}: {len(errors)} client(s) failed: " + "; ".join(errors))
        record = self.rounds[server_round]
        record.updates = [content_update(message.content) for message in replies]
        # Sorted by client id: the in-process orchestrator's order, so float sums agree exactly.
        record.updates.sort(key=lambda u: u.client_id)
        record.result = self.aggregator.aggregate(record.global_adapter, record.updates)
        return adapter_record(record.result.adapter), MetricRecord({"clients": len(record.updates)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the global adapter itself, on the held-out prompts

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

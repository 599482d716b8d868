"""Message sizes as Flower counts them, next to the in-process count of the adapter tensors.

- ``wire_bytes``: what Flower transfers for a message: every object of its tree (message,
  records, arrays, array chunks) serialised by Flower's own ``deflate`` (headers, metadata,
  the ``.npy`` serialisation of each array). HTTP/TLS framing around it is not included.
- ``record_bytes``: Flower's ``count_bytes`` over the records (what ``message_size_mod`` logs).
- ``payload_bytes`` (``federation_metrics``): numel × element size of the adapter tensors, the
  in-process orchestrator's count. The difference is Flower's framing overhead.
"""

from __future__ import annotations

from collections import defaultdict

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def wire_bytes(message: Message) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def record_bytes(message: Message) -> int:
    return sum(record.count_bytes() for record in message.content.values())


class MeasuredGrid:
    """A Flower ``Grid`` that counts ``wire_bytes`` of every message it carries, per round and
    node: training messages, and every extra message a protocol such as SecAgg+ exchanges.

    ``round`` is set by whoever drives the rounds (the strategy, when it sends a round's messages).
    Its counts become ``comm/transport_bytes_*`` and ``comm/messages_up`` in the metric rows.
    """

    def __init__(self, grid) -> None:
        self._grid = grid
        self.round = 0
        self.down: dict[tuple[int, int], int] = defaultdict(int)  # (round, node) -> bytes sent to it
        self.up: dict[tuple[int, int], int] = defaultdict(int)  # (round, node) -> bytes it sent
        self.messages_up: dict[tuple[int, int], int] = defaultdict(int)

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for m in messages:  # counted after sending: the grid fills in their metadata
            self.down[(self.round, m.metadata.dst_node_id)] += wire_bytes(m)
        for r in replies:
            self.up[(self.round, r.metadata.src_node_id)] += wire_bytes(r)
            self.messages_up[(self.round, r.metadata.src_node_id)] += 1
        return replies

    def client_metrics(self, round_idx: int, node: int) -> dict:
        key = (round_idx, node)
        return {"comm/transport_bytes_up": self.up[key], "comm/transport_bytes_down": self.down[key],
                "comm/messages_up": self.messages_up[key]}

    def round_metrics(self, round_idx: int, nodes) -> dict:
        """Over every node sampled in the round: a failed client's traffic counts too."""
        return {"comm/transport_bytes_up": sum(self.up[(round_idx, n)] for n in nodes),
                "comm/transport_bytes_down": sum(self.down[(round_idx, n)] for n in nodes)}

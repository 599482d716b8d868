"""Message sizes as Flower counts them, next to the in-process count of the adapter tensors.

- ``wire_bytes``: what Flower transfers for a message: every object of its tree (message,
  records, arrays, array chunks) serialised by Flower's own ``deflate`` (headers, metadata,
  the ``.npy`` serialisation of each array). HTTP/TLS framing around it is not included.
- ``record_bytes``: Flower's ``count_bytes`` over the records (what ``message_size_mod`` logs).
- ``payload_bytes`` (``federation_metrics``): numel × element size of the adapter tensors, the
  in-process orchestrator's count. The difference is Flower's framing overhead.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects


def wire_bytes(message: Message) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values())


def record_bytes(message: Message) -> int:
    return sum(record.count_bytes() for record in message.content.values())

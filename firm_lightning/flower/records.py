"""What travels in Flower messages: adapters as ``ArrayRecord``s, a client's upload as a reply.

A reply carries one ``ArrayRecord`` per uploaded adapter (``arrays.0``, ``arrays.1``, ...: one
for FIRM and its single-adapter baselines, ``S`` for FMGDA) and one ``MetricRecord`` with the
client id, its example count, whether the arrays are updates ``θ_i − θ`` (16-bit uploads) and its
local-training summary.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from firm_lightning.adapters import ClientUpdate

ARRAYS = "arrays"  # the key Flower's strategies and DP mods use for the global model
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"  # Flower's weighting key
CLIENT_ID = "client-id"
UPLOAD_DELTA = "upload-delta"  # 1: the arrays are θ_i − θ (federation.upload_dtype), 0: θ_i
CONFIG_KEY = "firm-config"  # run-config entry holding the YAML text in a deployment


def adapter_record(adapter: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in adapter.items()})


def record_adapter(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def update_content(update: ClientUpdate) -> RecordDict:
    records = {f"{ARRAYS}.{s}": adapter_record(a) for s, a in enumerate(update.adapters)}
    metrics = {CLIENT_ID: update.client_id, NUM_EXAMPLES: update.num_examples, UPLOAD_DELTA: int(update.delta),
               **update.metrics}
    return RecordDict({**records, METRICS: MetricRecord(metrics)})


def content_update(content: RecordDict) -> ClientUpdate:
    metrics = dict(content[METRICS])
    client_id, num_examples = int(metrics.pop(CLIENT_ID)), int(metrics.pop(NUM_EXAMPLES))
    delta = bool(metrics.pop(UPLOAD_DELTA, 0))
    keys = sorted((k for k in content.array_records), key=lambda k: int(k.rsplit(".", 1)[1]))
    adapters = [record_adapter(content[k]) for k in keys]
    return ClientUpdate(client_id, adapters, num_examples, {k: float(v) for k, v in metrics.items()}, delta=delta)


"""The Flower ``ClientApp``: the library's one client fit (``fit_client``) behind Flower messages.

``train``: load the global adapter from the message, fit with a fresh Lightning ``Trainer``
exactly as the in-process loop fits this client in this round (same seed, data order,
weighting and upload encoding), and reply with the upload. ``query``: tell the server which
client this node is and how many prompts it holds.

``app`` (used by a deployment) reads the config from the run config; ``client_app(text)``
binds it (simulation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from firm_lightning.adapters import ClientUpdate
from firm_lightning.client import fit_client
from firm_lightning.config import Components, load_components
from firm_lightning.datamodule import ClientData
from firm_lightning.flower.client_state import ClientStateFiles
from firm_lightning.flower.partition import client_data
from firm_lightning.flower.records import (
    ARRAYS, CLIENT_ID, CONFIG, CONFIG_KEY, METRICS, NUM_EXAMPLES, record_adapter, update_content,
)
from firm_lightning.flower.secure_aggregation import (
    from_legacy_fit, is_legacy_fit, secure_aggregation_mod, to_legacy_fit_reply,
)
from firm_lightning.flower.settings import FlowerSettings
from firm_lightning.privacy import clip_state
from firm_lightning.run_folder import RunFolder
from firm_lightning.trainer_factory import TrainerFactory, quiet_lightning, stays_on_device

OUTPUT_DIR = "output-dir"  # node-config key: where this node writes its Lightning logs and its own state


def client_app(config_text: Optional[str] = None) -> ClientApp:
    app = ClientApp(mods=[secure_aggregation_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        comps = _components(config_text, context)
        data = client_data(comps.datamodule, context.node_config)
        if is_legacy_fit(msg.content):  # SecAgg+ speaks Flower's legacy fit layout
            content = from_legacy_fit(msg.content, list(comps.module.adapter_state()))
            update = fit_round(comps, data, content, context.node_config, secure=True)
            return Message(to_legacy_fit_reply(update), reply_to=msg)
        update = fit_round(comps, data, msg.content, context.node_config)
        return Message(update_content(update), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        data = client_data(_components(config_text, context).datamodule, context.node_config)
        metrics = MetricRecord({CLIENT_ID: data.client_id, NUM_EXAMPLES: data.num_examples})
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)

    return app


def fit_round(
    comps: Components, data: ClientData, content: RecordDict, node_config: dict, secure: bool = False
) -> ClientUpdate:
    """``fit_client`` on this node's data; under SecAgg+ with privacy, the client clips its own update."""
    federation = comps.federation
    round_idx = int(content[CONFIG]["server-round"])
    global_adapter = record_adapter(content[ARRAYS])
    output_dir = Path(str(node_config.get(OUTPUT_DIR, federation.output_dir)))
    private = federation.privacy is not None
    # This client's own state (its objectives' statistics; its optimiser with persist), on its own disk; under
    # privacy beside its logs in the server-private record (in a simulation this machine's run folder).
    store = ClientStateFiles(RunFolder(output_dir).client_state(data.client_id, private=private), round_idx)
    trainers = TrainerFactory(comps.trainer_config, output_dir)
    if private:
        trainers.log_clients_privately()
    with quiet_lightning(federation.quiet), stays_on_device(comps.module):
        update = fit_client(
            comps.module, federation.resolved_algorithm, global_adapter, data, round_idx,
            trainers, federation.seed, client_states=store,
            persist_optimizer=federation.client_optimizer_state == "persist",
            upload_dtype=_upload_dtype(federation.upload_dtype),
        )
    if store.states:
        store.save()
    if secure and federation.privacy is not None:
        # The server only sees the secure sum, so clipping moves here; equal weights (one each).
        clipped = [clip_state(a, global_adapter, federation.privacy.clipping_norm) for a in update.adapters]
        update = dataclasses.replace(update, adapters=clipped, num_examples=1)
    return update


def _upload_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name == "bfloat16":  # Flower's ArrayRecord holds numpy arrays, and numpy has no bfloat16
        raise ValueError("federation.upload_dtype=bfloat16 cannot travel in Flower messages; use float16 on Flower.")
    return getattr(torch, name) if name else None


def _components(config_text: Optional[str], context: Context) -> Components:
    if config_text is None:
        if CONFIG_KEY not in context.run_config:
            raise ValueError(
                f"The run config has no {CONFIG_KEY!r}: run this app through "
                "`python -m firm_lightning flower`, which writes it into the app's pyproject.toml."
            )
        config_text = str(context.run_config[CONFIG_KEY])
    return load_components(config_text, {"flower": FlowerSettings})


app = client_app()

"""The Flower ``ClientApp``: the library's client procedure, unchanged, behind Flower messages.

``train``: load the global adapter from the message, fit with a fresh Lightning ``Trainer``
(``FIRMClientModule``, the algorithm's ``ClientProcedure``) seeded exactly as the in-process
orchestrator seeds this client in this round, and reply with the adapter(s) it uploads.
``query``: tell the server which client this node is and how many prompts it holds.

``app`` (used by a deployment) reads the config from the run config; ``client_app(text)``
binds it (simulation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from firm_lightning.client import ClientUpdate
from firm_lightning.flower.components import CONFIG_KEY, Components, load_components
from firm_lightning.flower.partition import ClientData, client_data
from firm_lightning.flower.privacy import client_privacy_mod
from firm_lightning.flower.secure_aggregation import from_legacy_fit, is_legacy_fit, to_legacy_fit_reply
from firm_lightning.flower.records import ARRAYS, CLIENT_ID, CONFIG, METRICS, NUM_EXAMPLES, record_adapter, update_content
from firm_lightning.orchestrator import client_seed, quiet_lightning, stays_on_device
from firm_lightning.trainer_factory import TrainerFactory

OUTPUT_DIR = "output-dir"  # node-config key: where this node writes its Lightning logs


def client_app(config_text: Optional[str] = None) -> ClientApp:
    app = ClientApp(mods=[client_privacy_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        comps = _components(config_text, context)
        data = client_data(comps.datamodule, context.node_config)
        if is_legacy_fit(msg.content):  # SecAgg+ speaks Flower's legacy fit layout
            content = from_legacy_fit(msg.content, list(comps.module.adapter_state()))
            update = fit_round(comps, data, content, context.node_config)
            return Message(to_legacy_fit_reply(update), reply_to=msg)
        update = fit_round(comps, data, msg.content, context.node_config)
        return Message(update_content(update), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        data = client_data(_components(config_text, context).datamodule, context.node_config)
        metrics = MetricRecord({CLIENT_ID: data.client_id, NUM_EXAMPLES: data.num_examples})
        return Message(RecordDict({METRICS: metrics}), reply_to=msg)

    return app


def fit_round(comps: Components, data: ClientData, content: RecordDict, node_config: dict) -> ClientUpdate:
    """The client procedure on this node's data, seeded by client_seed(seed, round, client) as in-process."""
    round_idx = int(content[CONFIG]["server-round"])
    global_adapter = record_adapter(content[ARRAYS])
    output_dir = Path(str(node_config.get(OUTPUT_DIR, comps.federation.output_dir)))
    trainers = TrainerFactory(comps.trainer_config, output_dir)
    torch.manual_seed(client_seed(comps.federation.seed, round_idx, data.client_id))
    with quiet_lightning(comps.federation.quiet), stays_on_device(comps.module):
        update = comps.settings.algorithm.procedure().run(
            comps.module,
            global_adapter,
            dataloader=lambda: data.loader(round_idx),
            trainer=lambda tag: trainers.client_trainer(data.client_id, round_idx, tag),
            client_id=data.client_id,
            num_examples=data.num_examples,
        )
    return update.cast(_upload_dtype(comps.federation.upload_dtype))


def _upload_dtype(name):
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
    return load_components(config_text)


app = client_app()

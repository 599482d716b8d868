"""A client's prompts on its own node: from the shared data set (simulation) or from a file that
holds only that client's partition (a SuperNode's ``--node-config 'prompts-file="..."'``).

Either way the batches are the ones the in-process orchestrator draws for that client: the
same prompts in the same order, shuffled by (seed, client, round).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from firm_lightning.datamodule import ClientData, PromptDataModule, load_rows

PARTITION_ID = "partition-id"  # Flower's node-config key (set by the simulation engine)
PROMPTS_FILE = "prompts-file"


def client_data(datamodule: PromptDataModule, node_config: dict) -> ClientData:
    if PARTITION_ID not in node_config:
        raise ValueError(
            f"This SuperNode has no {PARTITION_ID!r} in its node config: start it with "
            f"--node-config '{PARTITION_ID}=<client id> {PROMPTS_FILE}=\"<its prompts .jsonl>\"'."
        )
    client_id = int(node_config[PARTITION_ID])
    if PROMPTS_FILE not in node_config:
        return datamodule.client_data(client_id)
    prompts, groups = _read_partition(str(node_config[PROMPTS_FILE]), datamodule)
    return ClientData(client_id, prompts, groups, datamodule.batch_size, datamodule.seed)


def write_partition(datamodule: PromptDataModule, client_id: int, path: Path) -> Path:
    """Write client ``client_id``'s prompts (in partition order) as JSONL: what its node holds."""
    groups = datamodule.train_groups
    rows = [
        {datamodule.prompt_column: datamodule.train_prompts[i],
         **({datamodule.group_column: groups[i]} if groups is not None else {})}
        for i in datamodule.client_indices[client_id]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_partition(path: str, datamodule: PromptDataModule) -> tuple[list[str], Optional[list[str]]]:
    rows = load_rows(path)
    if datamodule.prompt_column not in rows.column_names:
        raise ValueError(f"{path} has no {datamodule.prompt_column!r} column (columns: {rows.column_names}).")
    groups = None
    if datamodule.group_column is not None and datamodule.group_column in rows.column_names:
        groups = [str(g) for g in rows[datamodule.group_column]]
    return list(rows[datamodule.prompt_column]), groups

"""Prompts from Anthropic's HH-RLHF: the first Human turn of each conversation, by subset.

The dataset's rows are whole conversations (``chosen``/``rejected``) in the format
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, stored per subset folder (``helpful-base``,
``harmless-base``, ...). ``HHRLHFDataModule`` keeps the first Human turn as the prompt, in the
same format and ending with ``"\\n\\nAssistant:"`` so the policy answers it, and the subset
name as the grouping column: ``partition: column`` gives one client per subset,
``partition: dirichlet`` a skewed mix. ``read_subsets`` is the one reader of HH-RLHF subsets (a hub
name or a local copy), shared with the evaluation protocol (``firm_lightning.evaluation``).

Prompts stay in this format whatever the policy: it is the input format of the HH reward
models (``template: "{prompt} {response}"``). A chat policy does not see the markup: with its
chat template, ``sampling.user_message: question`` (the default) sends the question alone as
the user message (see ``firm_lightning.sequences.user_message``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union

import datasets

from firm_lightning.datamodule import PromptDataModule
from firm_lightning.sequences import HH_ASSISTANT as ASSISTANT
from firm_lightning.sequences import HH_HUMAN as HUMAN


def first_human_turn(conversation: str) -> str:
    """``"\\n\\nHuman: <first turn>\\n\\nAssistant:"`` from an HH-RLHF conversation."""
    start = conversation.find(HUMAN)
    if start < 0:
        raise ValueError(f"No '\\n\\nHuman:' turn in conversation {conversation[:80]!r}: is this HH-RLHF data?")
    start += len(HUMAN)
    end = conversation.find(ASSISTANT, start)
    turn = conversation[start:] if end < 0 else conversation[start:end]
    return f"{HUMAN} {turn.strip()}{ASSISTANT}"


def _prompt_row(row: dict, column: str, subset: str) -> dict[str, str]:
    """``datasets.map`` function. Module-level with plain-value ``fn_kwargs``: map fingerprints
    the function by pickling it, and a closure over the data module would pickle the data
    module, its Trainer and through it the policy's weights (GBs of peak memory in validate)."""
    return {"prompt": first_human_turn(row[column]), "subset": subset}


class HHRLHFDataModule(PromptDataModule):
    """``PromptDataModule`` over HH-RLHF subsets (hub name, or a local copy with the same folders)."""

    def __init__(
        self,
        path: str = "Anthropic/hh-rlhf",
        subsets: list[str] = ["helpful-base", "harmless-base"],  # noqa: B006 (read-only)
        split: str = "train",
        conversation_column: str = "chosen",
        eval_size: Union[int, float] = 256,
        num_clients: int = 4,
        partition: Literal["iid", "dirichlet", "column"] = "dirichlet",
        dirichlet_alpha: float = 1.0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        max_prompts: Optional[int] = 20_000,
        seed: int = 0,
        max_prompt_tokens: Optional[int] = None,
        truncation_side: Literal["left", "right"] = "left",
    ) -> None:
        super().__init__(
            path=path, split=split, prompt_column="prompt", group_column="subset", eval_size=eval_size,
            num_clients=num_clients, partition=partition, dirichlet_alpha=dirichlet_alpha,
            batch_size=batch_size, eval_batch_size=eval_batch_size, max_prompts=max_prompts, seed=seed,
            max_prompt_tokens=max_prompt_tokens, truncation_side=truncation_side,
        )
        self.save_hyperparameters()
        self.subsets = list(subsets)
        self.conversation_column = conversation_column

    def _raw_rows(self) -> datasets.Dataset:
        return read_subsets(self.path, self.subsets, self.split, self.conversation_column, _prompt_row)


def read_subsets(path: str, subsets: Sequence[str], split: str, column: str, to_row: Callable) -> datasets.Dataset:
    """The ``split`` rows of HH-RLHF ``subsets`` (a hub name or a local copy), concatenated in this order.

    Each row becomes ``to_row(row, column=column, subset=name)``: a module-level function called with
    plain ``fn_kwargs``, so ``datasets.map`` pickles nothing large (see ``_prompt_row``).
    """
    parts = []
    for name in subsets:
        rows = _read_subset(path, name, split)
        if column not in rows.column_names:
            raise ValueError(
                f"HH-RLHF subset {name!r} has no column {column!r} (columns: {rows.column_names}); "
                "set conversation_column to one of them (HHRLHFDataModule) or check that this is HH-RLHF data."
            )
        parts.append(rows.map(to_row, fn_kwargs={"column": str(column), "subset": str(name)},
                              remove_columns=rows.column_names))
    return datasets.concatenate_datasets(parts)


def _read_subset(path: str, name: str, split: str) -> datasets.Dataset:
    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted((local / name).glob(f"{split}.json*"))
        if not files:
            available = sorted(p.name for p in local.iterdir() if p.is_dir())
            raise ValueError(
                f"No {split}.jsonl[.gz] for HH-RLHF subset {name!r} under {local} "
                f"(subset folders there: {available}); fix `subsets` or `split`."
            )
        return datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
    try:
        return datasets.load_dataset(path, data_dir=name, split=split)
    except Exception as error:
        raise FileNotFoundError(
            f"Could not load HH-RLHF subset {name!r} from {path!r}: {type(error).__name__}: {error}. "
            "Check the subset name (helpful-base, harmless-base, helpful-online, helpful-rejection-sampled, "
            f"red-team-attempts). If this machine is offline, pre-download with "
            f"`huggingface-cli download --repo-type dataset {path} --local-dir DIR` and pass path: DIR."
        ) from error

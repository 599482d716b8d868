"""Prompt data for FIRM: one LightningDataModule that also serves federated clients.

Data flow (all of it in ``setup()``, which runs once):

1. ``load_rows`` reads the rows: a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file,
   a directory written by ``Dataset.save_to_disk``, or a Hugging Face hub dataset name.
   A local text file must be UTF-8 (refused naming the byte and line otherwise).
2. Only the prompt (and group) columns are kept; both are checked to exist.
3. The rows are shuffled with ``seed`` and capped at ``max_prompts``. Shuffling first makes
   the eval set a random sample and makes flwr-datasets' ``IidPartitioner`` (which cuts
   contiguous shards) really IID.
4. The first ``eval_size`` rows become the held-out eval set; the rest is the training set.
   Every kept prompt must be non-empty and, measured in the policy's tokens (``limit_prompts``: the
   model side measures, this module imports none of it), fit the policy's context beside the
   response; else it is refused naming its row, or cut by ``max_prompt_tokens``.
5. A flwr-datasets partitioner ("iid", "dirichlet" over ``group_column``, or "column": one
   client per group value) splits the training set into ``num_clients`` parts. Each part
   is recorded as a list of indices into the training set (``client_indices``).

Consumers: a federated loop calls ``client_dataloader(client_id, round_idx)`` per client and
round; plain Lightning training uses ``train_dataloader``/``val_dataloader``. Every batch is
a dict ``{"prompt": list[str]}``, plus ``"group": list[str]`` when there is a group column.
Everything is seeded: the same ``seed`` gives the same eval set, split and batch order.
"""

from __future__ import annotations

import codecs
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Union

import datasets
import lightning as L
import torch
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)
from torch.utils.data import DataLoader, Dataset

DEFAULT_PROMPTS = str(Path(__file__).resolve().parent / "data" / "prompts.jsonl")

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Suffixes that mark a path as a local file even when we cannot load that type.
_LOCAL_SUFFIXES = set(_FILE_BUILDERS) | {".txt", ".tsv", ".arrow", ".gz", ".zip", ".xz", ".bz2"}
_PARTITIONS = ("iid", "dirichlet", "column")
_ROW = "__row__"  # helper column: lets us read back which rows a partitioner chose
_FILE_ROW = "__file_row__"  # helper column: each prompt's row in the data as given, for messages
_TEXT_SUFFIXES = (".json", ".jsonl", ".csv")
# Settings added after runs were saved, with their defaults: left out of the resume fingerprint while at
# those defaults, so that the runs saved before them still resume.
ADDED_SETTINGS = {"max_prompt_tokens": None, "truncation_side": "left"}
# A client with no prompts cannot train a round, so Dirichlet resamples until each has one.
_MIN_CLIENT_PROMPTS = 1


# --------------------------------------------------------------------------- loading
def _looks_local(path: str) -> bool:
    """True if ``path`` is meant as a local path rather than a hub id.

    Hub ids are ``name`` or ``org/name``, so one "/" alone does not make a path local;
    a data-file extension, a leading "/", "." or "~", a backslash or a second "/" does.
    """
    p = path.replace("\\", "/")
    return (Path(p).suffix.lower() in _LOCAL_SUFFIXES or p.startswith(("/", ".", "~"))
            or p.count("/") > 1 or "\\" in path)


def _load_local_dir(path: Path, subset: Optional[str], split: str) -> datasets.Dataset:
    # save_to_disk leaves state.json (Dataset) or dataset_dict.json (DatasetDict) behind;
    # any other directory is a folder of data files that load_dataset can infer.
    if not ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return datasets.load_dataset(str(path), subset, split=split)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"split {split!r} not in {path} (splits: {sorted(ds)}); "
                             f"pass split= one of those")
        ds = ds[split]
    return ds


def _load_hub(name: str, subset: Optional[str], split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # offline, unknown name, bad subset: all need the same advice
        raise FileNotFoundError(
            f"could not load hub dataset {name!r} (subset={subset!r}, split={split!r}): "
            f"{type(e).__name__}: {e}. This machine may be offline. Pre-download it with "
            f"`huggingface-cli download --repo-type dataset {name}` on a machine with "
            f"network access, or pass a local .jsonl/.csv/.parquet file or save_to_disk "
            f"directory as path=") from e


def load_rows(path: str, subset: Optional[str] = None, split: str = "train") -> datasets.Dataset:
    """Load a ``datasets.Dataset`` from a local file, a save_to_disk directory or the hub."""
    local = Path(path).expanduser()
    if local.is_file():
        builder = _FILE_BUILDERS.get(local.suffix.lower())
        if builder is None:
            raise ValueError(f"unsupported file type {local.suffix!r} for {path}: "
                             f"convert it to one of {sorted(_FILE_BUILDERS)}")
        empty = ValueError(f"the prompt file {path} is empty (no rows); give a file with one "
                           f"prompt per row")
        if local.stat().st_size == 0:
            raise empty
        if local.suffix.lower() in _TEXT_SUFFIXES:
            check_utf8(local)
        # A single data file always comes back as the builder's one "train" split.
        try:
            return datasets.load_dataset(builder, data_files=str(local), split="train")
        except StopIteration:  # datasets' json builder on an empty file
            raise empty from None
        except ValueError as error:  # ... and on one holding only blank lines
            if "corresponds to no data" in str(error):
                raise empty from None
            raise
    if local.is_dir():
        return _load_local_dir(local, subset, split)
    if _looks_local(path):  # a typo'd local path should not turn into a hub request
        raise FileNotFoundError(f"local path {path!r} does not exist; check the path, "
                                f"or omit path= to use the shipped {DEFAULT_PROMPTS}")
    return _load_hub(path, subset, split)


def check_utf8(path: Path) -> None:
    """Refuse a file that is not UTF-8, naming the first bad byte and its line (read in chunks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                held = len(error.object) - len(chunk)  # bytes of a character begun in the chunk before
                line = lines + error.object[: error.start].count(b"\n") + 1
                row = {".jsonl": line, ".csv": line - 1}.get(path.suffix.lower())  # a CSV's line 1 is its header
                where = f"row {row}, line {line}" if row else f"line {line}"
                raise ValueError(
                    f"{path} is not UTF-8 text: byte {offset - held + error.start} ({where}) is "
                    f"0x{error.object[error.start]:02x}; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text: it ends inside a character (byte {offset - 1}); "
                         "save the file as UTF-8") from None


@dataclass
class PromptLimit:
    """What the policy can hold of a prompt, measured by the model side (this module imports no model code).

    ``max_tokens``: the longest prompt, as ``measure`` counts it, that the policy's context holds beside a
    response (None: unknown, nothing is refused); ``measure``: each prompt's length in the policy's tokens
    as it is fed to the policy; ``cut(prompt, n, side)``: the prompt shortened to ``n`` of its own tokens
    from ``side``, or None when it has no more than that; ``why``: the limit in words, for messages.
    """

    max_tokens: Optional[int]
    measure: Callable[[list[str]], list[int]]
    cut: Callable[[str, int, str], Optional[str]]
    why: str


# --------------------------------------------------------------------------- batching
class _Prompts(Dataset):
    """Rows of (prompt, group) served as dicts; groups may be absent."""

    def __init__(self, prompts: list[str], groups: Optional[list[str]]):
        self.prompts, self.groups = prompts, groups

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict[str, str]:
        row = {"prompt": self.prompts[i]}
        if self.groups is not None:
            row["group"] = self.groups[i]
        return row


def collate_prompts(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """Keep strings as lists: tokenisation happens in the model, not the loader."""
    return {key: [r[key] for r in rows] for key in rows[0]}


def _generator(*keys: int) -> torch.Generator:
    # Hash the keys instead of adding them, so (seed=1, client=0) and (seed=0, client=1)
    # do not share a batch order; sha256 also accepts negative seeds.
    digest = hashlib.sha256(repr(keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def client_prompt_loader(prompts: list[str], groups: Optional[list[str]], batch_size: int,
                         seed: int, client_id: int, round_idx: int) -> DataLoader:
    """A client's prompts shuffled in an order fixed by (seed, client, round): the same batches
    whether the prompts come from the whole data set or from the client's own file."""
    return DataLoader(_Prompts(prompts, groups), batch_size=batch_size, shuffle=True,
                      generator=_generator(seed, client_id, round_idx), collate_fn=collate_prompts)


@dataclass
class ClientData:
    """One client's shard: its prompts (and groups) and how they are batched.

    Built from the whole data set (``PromptDataModule.client_data``, in-process and in
    simulation) or from a file holding only that client's prompts (a SuperNode).
    """

    client_id: int
    prompts: list[str]
    groups: Optional[list[str]]
    batch_size: int
    seed: int

    @property
    def num_examples(self) -> int:
        return len(self.prompts)

    def loader(self, round_idx: int) -> DataLoader:
        return client_prompt_loader(self.prompts, self.groups, self.batch_size, self.seed, self.client_id, round_idx)


# --------------------------------------------------------------------------- module
class PromptDataModule(L.LightningDataModule):
    """Prompts split into a held-out eval set and ``num_clients`` training partitions.

    See the module docstring for the data flow. Accessors call ``setup()`` on demand, so a
    federated loop can use the module without a Trainer.

    Args:
        path: A local JSON/JSONL/CSV/Parquet file, a ``save_to_disk`` folder or a hub dataset name.
        subset: The dataset's configuration (subset) name, if it has several.
        split: The split to read.
        prompt_column: The column holding the prompts.
        group_column: A grouping column (e.g. topic) for the dirichlet and column partitions; null if none.
        eval_size: Held-out prompts for evaluating the global adapter (a count, or a fraction if < 1).
        num_clients: Number of client partitions (linked to federation.num_clients).
        partition: iid, dirichlet (a Dirichlet draw over group_column per client) or column (one client per group).
        dirichlet_alpha: Concentration of the Dirichlet partition: small is heterogeneous, large is close to iid.
        batch_size: B: prompts per local step.
        eval_batch_size: Prompts per evaluation batch.
        max_prompts: Use only the first this many prompts (null: all).
        seed: Seeds the eval split, the partition and the batch order (linked to federation.seed).
        max_prompt_tokens: Cut every prompt longer than this many of the policy's tokens at load (from
            truncation_side) and report how many were cut; null: a prompt the policy's context cannot hold beside
            sampling.max_new_tokens is refused, naming its row.
        truncation_side: Which end of a long prompt max_prompt_tokens cuts: left (keeps the end, where the
            question is, as chat models truncate) or right.
    """

    def __init__(
        self,
        path: str = DEFAULT_PROMPTS,
        subset: Optional[str] = None,
        split: str = "train",
        prompt_column: str = "prompt",
        group_column: Optional[str] = "topic",
        eval_size: Union[int, float] = 48,
        num_clients: int = 4,
        partition: Literal["iid", "dirichlet", "column"] = "iid",
        dirichlet_alpha: float = 1.0,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        max_prompts: Optional[int] = None,
        seed: int = 0,
        max_prompt_tokens: Optional[int] = None,
        truncation_side: Literal["left", "right"] = "left",
    ):
        super().__init__()
        self.save_hyperparameters()
        self.path, self.subset, self.split = str(path), subset, split
        self.prompt_column, self.group_column = prompt_column, group_column
        self.eval_size, self.num_clients = eval_size, num_clients
        self.partition, self.dirichlet_alpha = partition, dirichlet_alpha
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.max_prompts, self.seed = max_prompts, seed
        self.max_prompt_tokens, self.truncation_side = max_prompt_tokens, truncation_side
        self._check_config()
        self._train_prompts: Optional[list[str]] = None
        self._train_groups: Optional[list[str]] = None
        self._eval_prompts: list[str] = []
        self._eval_groups: Optional[list[str]] = None
        self._client_indices: list[list[int]] = []
        self._file_rows: dict[str, list[int]] = {}  # "eval"/"train": each prompt's row in the data as given
        self._prompt_limit: Optional[PromptLimit] = None
        self._limit_applied: Optional[tuple] = None
        self.load_notes: list[str] = []  # what loading did that a user should know (prompts cut)

    def _check_config(self) -> None:
        """Fail at construction on settings that are wrong whatever the data."""
        if self.partition not in _PARTITIONS:
            raise ValueError(f"partition={self.partition!r} is unknown; use one of {_PARTITIONS}")
        if self.num_clients < 1:
            raise ValueError(f"num_clients={self.num_clients}: need at least 1 client")
        if self.partition != "iid" and self.group_column is None:
            raise ValueError(f"partition={self.partition!r} splits by a group column but "
                             f"group_column=None; name one (e.g. group_column='topic') "
                             f"or use partition='iid'")
        e = self.eval_size
        if e < 0 or (isinstance(e, float) and e >= 1):
            raise ValueError(f"eval_size={e}: give a count >= 0 or a fraction in [0, 1)")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"dirichlet_alpha={self.dirichlet_alpha} must be > 0")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} must be >= 1 (or null: refuse long "
                             f"prompts instead of cutting them)")
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side={self.truncation_side!r} is unknown; use 'left' or 'right'")

    # ------------------------------------------------------------------ setup
    def setup(self, stage: Optional[str] = None) -> None:
        if self._train_prompts is not None:  # Lightning calls setup per stage; load once
            return
        ds = self._load()
        n_eval = self._eval_count(len(ds))
        self._check_enough_training_rows(len(ds), n_eval)
        eval_rows, train_rows = ds.select(range(n_eval)), ds.select(range(n_eval, len(ds)))
        self._eval_prompts, self._eval_groups = self._columns(eval_rows)
        self._train_prompts, self._train_groups = self._columns(train_rows)
        self._file_rows = {"eval": list(eval_rows[_FILE_ROW]), "train": list(train_rows[_FILE_ROW])}
        self._refuse_empty_prompts()
        self._fit_prompts()
        self._client_indices = self._partition_train()

    # ------------------------------------------------------------------ prompts the policy can hold
    def limit_prompts(self, limit: PromptLimit) -> None:
        """Check (or cut, with ``max_prompt_tokens``) every prompt against what the policy can hold: at
        load, or now if the prompts are loaded already."""
        self._prompt_limit = limit
        if self._train_prompts is not None:
            self._fit_prompts()

    def _refuse_empty_prompts(self) -> None:
        for part in ("eval", "train"):
            prompts = self._eval_prompts if part == "eval" else self._train_prompts
            empty = [row for row, p in zip(self._file_rows[part], prompts) if not p.strip()]
            if empty:
                more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
                raise ValueError(f"{self.path} row {min(empty) + 1}{more}: the prompt is empty; remove the "
                                 f"row or write a prompt in it ({self.prompt_column!r})")

    def _fit_prompts(self) -> None:
        limit = self._prompt_limit
        key = None if limit is None else (limit.max_tokens, limit.why)
        if limit is None or key == self._limit_applied:
            return
        if self.max_prompt_tokens is not None:
            cut = self._cut(limit, "eval") + self._cut(limit, "train")
            total = len(self._eval_prompts) + len(self._train_prompts)
            self.load_notes.append(f"data.max_prompt_tokens={self.max_prompt_tokens}: cut {cut} of {total} prompts "
                                   f"from the {self.truncation_side}")
        if limit.max_tokens is not None:
            for part in ("eval", "train"):
                self._refuse_too_long(limit, part)
        self._limit_applied = key

    def _cut(self, limit: PromptLimit, part: str) -> int:
        prompts = self._eval_prompts if part == "eval" else self._train_prompts
        cut = 0
        for i, prompt in enumerate(prompts):
            shorter = limit.cut(prompt, self.max_prompt_tokens, self.truncation_side)
            if shorter is not None:
                prompts[i], cut = shorter, cut + 1
        return cut

    def _refuse_too_long(self, limit: PromptLimit, part: str) -> None:
        prompts = self._eval_prompts if part == "eval" else self._train_prompts
        lengths = limit.measure(prompts)
        over = [(row, n) for row, n in zip(self._file_rows[part], lengths) if n > limit.max_tokens]
        if not over:
            return
        row, n = min(over)
        more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
        room = limit.max_tokens - limit.measure([""])[0]  # what the template or BOS leaves of the limit
        kind = "held-out" if part == "eval" else "training"
        raise ValueError(
            f"{self.path} row {row + 1}{more}: a {kind} prompt is {n} tokens long as the policy reads it, more than "
            f"the {limit.max_tokens} that fit ({limit.why}); shorten or remove it, or cut long prompts at load with "
            f"--data.max_prompt_tokens {max(room, 1)}"
        )

    def _raw_rows(self) -> datasets.Dataset:
        """The rows before column checks and shuffling (subclasses read other formats here)."""
        return load_rows(self.path, self.subset, self.split)

    def _load(self) -> datasets.Dataset:
        ds = self._raw_rows()
        if len(ds) == 0:
            raise ValueError(f"{self.path} holds no rows (split={self.split!r}); give data with at "
                             f"least one prompt per client plus the eval set")
        wanted = [c for c in (self.prompt_column, self.group_column) if c is not None]
        for col in wanted:
            if col not in ds.column_names:
                kind = "prompt_column" if col == self.prompt_column else "group_column"
                hint = "" if kind == "prompt_column" else (
                    " (or group_column=None with partition='iid')")
                raise ValueError(f"{kind}={col!r} is not a column of {self.path}; available "
                                 f"columns: {ds.column_names}. Pass {kind}= one of them{hint}")
        ds = ds.select_columns(wanted)
        ds = ds.add_column(_FILE_ROW, list(range(len(ds)))).shuffle(seed=self.seed)
        if self.max_prompts is not None:
            ds = ds.select(range(min(self.max_prompts, len(ds))))
        return ds

    def _eval_count(self, n_rows: int) -> int:
        e = self.eval_size
        n_eval = round(e * n_rows) if isinstance(e, float) else int(e)
        if n_eval >= n_rows:
            raise ValueError(f"eval_size={e} takes {n_eval} of the {n_rows} loaded prompts, "
                             f"leaving none to train on; lower eval_size or load more rows "
                             f"(max_prompts={self.max_prompts})")
        return n_eval

    def _check_enough_training_rows(self, n_rows: int, n_eval: int) -> None:
        n_train = n_rows - n_eval
        if self.num_clients > n_train:
            raise ValueError(f"num_clients={self.num_clients} is more than the {n_train} "
                             f"training prompts ({n_rows} loaded - {n_eval} eval); use "
                             f"fewer clients, a smaller eval_size or more data")

    def _columns(self, ds: datasets.Dataset) -> tuple[list[str], Optional[list[str]]]:
        # Plain lists: datasets 4 returns a lazy Column whose per-row indexing reads Arrow each
        # time (0.13 s per client dataloader on 480 prompts).
        prompts = list(ds[self.prompt_column])
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"prompt_column={self.prompt_column!r} must hold strings, "
                             f"found {type(bad[0]).__name__} {bad[0]!r}; clean the data first")
        if self.group_column is None:
            return prompts, None
        return prompts, [str(g) for g in list(ds[self.group_column])]  # batches carry str groups

    # ------------------------------------------------------------------ partitioning
    def _make_partitioner(self) -> Partitioner:
        if self.partition == "iid":
            return IidPartitioner(num_partitions=self.num_clients)
        if self.partition == "dirichlet":
            return DirichletPartitioner(
                num_partitions=self.num_clients, partition_by=self.group_column,
                alpha=float(self.dirichlet_alpha), min_partition_size=_MIN_CLIENT_PROMPTS,
                self_balancing=False, seed=self.seed)
        return NaturalIdPartitioner(partition_by=self.group_column)

    def _partition_train(self) -> list[list[int]]:
        # The partitioners return row subsets, not indices: give them an in-memory table
        # with a row-number column and read it back from each partition.
        table = {_ROW: list(range(len(self._train_prompts)))}
        if self.group_column is not None:
            table[self.group_column] = self._train_groups
        part = self._make_partitioner()
        part.dataset = datasets.Dataset.from_dict(table)
        n_parts = self._count_partitions(part)
        if self.partition == "column" and n_parts != self.num_clients:
            values = sorted(set(self._train_groups))
            raise ValueError(f"partition='column' makes one client per distinct "
                             f"{self.group_column!r} value in the training set ({n_parts}: "
                             f"{values}) but num_clients={self.num_clients}; set "
                             f"num_clients={n_parts} or use partition='dirichlet'")
        shards = [list(part.load_partition(i)[_ROW]) for i in range(n_parts)]
        empty = [i for i, shard in enumerate(shards) if not shard]
        if empty:  # a client without prompts could not train a single step
            raise ValueError(f"the {self.partition!r} partition left client(s) {empty} without "
                             f"prompts; use fewer clients (num_clients={self.num_clients}), "
                             f"another partition or more data")
        return shards

    def _count_partitions(self, part: Partitioner) -> int:
        if not isinstance(part, DirichletPartitioner):
            return part.num_partitions
        # For Dirichlet this draws the split; it resamples (warning each time) when a client
        # gets fewer than _MIN_CLIENT_PROMPTS rows and gives up after 10 tries.
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*min_partition_size.*")
                return part.num_partitions
        except ValueError as e:
            raise ValueError(f"Dirichlet partition (alpha={self.dirichlet_alpha}) left a "
                             f"client with fewer than {_MIN_CLIENT_PROMPTS} prompt(s) in "
                             f"every try ({e}); use a larger dirichlet_alpha, fewer "
                             f"clients (num_clients={self.num_clients}) or more data") from e

    # ------------------------------------------------------------------ accessors
    @property
    def train_prompts(self) -> list[str]:
        self.setup()
        return list(self._train_prompts)

    @property
    def train_groups(self) -> Optional[list[str]]:
        """Group value of each training prompt (aligned with ``train_prompts``), or None."""
        self.setup()
        return None if self._train_groups is None else list(self._train_groups)

    @property
    def eval_prompts(self) -> list[str]:
        self.setup()
        return list(self._eval_prompts)

    @property
    def eval_groups(self) -> Optional[list[str]]:
        self.setup()
        return None if self._eval_groups is None else list(self._eval_groups)

    @property
    def client_indices(self) -> list[list[int]]:
        """Per client, its indices into ``train_prompts``; every index is in exactly one."""
        self.setup()
        return [list(c) for c in self._client_indices]

    def _indices(self, client_id: int) -> list[int]:
        self.setup()
        if not 0 <= client_id < len(self._client_indices):
            n = len(self._client_indices)
            raise IndexError(f"client_id={client_id} out of range: there are {n} clients "
                             f"(ids 0..{n - 1})")
        return self._client_indices[client_id]

    def num_examples(self, client_id: int) -> int:
        return len(self._indices(client_id))

    def client_prompts(self, client_id: int) -> list[str]:
        return [self._train_prompts[i] for i in self._indices(client_id)]

    def _client_groups(self, client_id: int) -> Optional[list[str]]:
        if self._train_groups is None:
            return None
        return [self._train_groups[i] for i in self._indices(client_id)]

    def client_data(self, client_id: int) -> ClientData:
        """Client ``client_id``'s shard, as a client holds it."""
        return ClientData(
            client_id, self.client_prompts(client_id), self._client_groups(client_id), self.batch_size, self.seed
        )

    # ------------------------------------------------------------------ loaders
    def client_dataloader(self, client_id: int, round_idx: int = 0) -> DataLoader:
        """Client ``client_id``'s prompts, shuffled in an order fixed by (seed, client, round)."""
        return client_prompt_loader(self.client_prompts(client_id), self._client_groups(client_id),
                                    self.batch_size, self.seed, client_id, round_idx)

    def train_dataloader(self) -> DataLoader:
        """All training prompts (centralised training); -1 keeps it apart from client ids."""
        self.setup()
        return DataLoader(_Prompts(self._train_prompts, self._train_groups),
                          batch_size=self.batch_size, shuffle=True,
                          generator=_generator(self.seed, -1), collate_fn=collate_prompts)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_Prompts(self._eval_prompts, self._eval_groups),
                          batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=collate_prompts)

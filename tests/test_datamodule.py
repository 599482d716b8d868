"""Tests for firm_lightning.datamodule.PromptDataModule and the shipped prompt file."""

from __future__ import annotations

import collections
import importlib.util
import json
import string
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

import firm_lightning.datamodule as dm_mod
from firm_lightning.datamodule import DEFAULT_PROMPTS, PromptDataModule

REPO = Path(__file__).resolve().parent.parent
ALLOWED = set(string.printable) - set("\t\r\x0b\x0c\n")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def toy_rows(per_topic: int = 15, topics: tuple[str, ...] = ("a", "b", "c", "d")) -> list[dict]:
    return [{"prompt": f"{t} question number {i}", "topic": t, "extra": i}
            for t in topics for i in range(per_topic)]


@pytest.fixture
def toy_file(tmp_path) -> str:
    return write_jsonl(tmp_path / "toy.jsonl", toy_rows())


def shipped_rows() -> list[dict]:
    return [json.loads(line) for line in Path(DEFAULT_PROMPTS).read_text().splitlines()]


def skew(dm: PromptDataModule) -> float:
    """Mean over clients of the total-variation distance to the global topic mix."""
    groups = dm.train_groups
    topics = sorted(set(groups))
    glob = collections.Counter(groups)
    tvs = []
    for idx in dm.client_indices:
        local = collections.Counter(groups[i] for i in idx)
        tvs.append(0.5 * sum(abs(local[t] / len(idx) - glob[t] / len(groups)) for t in topics))
    return sum(tvs) / len(tvs)


# --------------------------------------------------------------------------- partitions
@pytest.mark.parametrize("partition,clients", [("iid", 4), ("dirichlet", 4), ("column", 6)])
def test_every_training_prompt_goes_to_exactly_one_client(partition, clients):
    dm = PromptDataModule(partition=partition, num_clients=clients)
    idx = dm.client_indices
    flat = [i for c in idx for i in c]
    assert len(idx) == clients
    assert len(flat) == len(set(flat)), "a prompt was given to two clients"
    assert set(flat) == set(range(len(dm.train_prompts))), "a prompt was given to no client"
    assert all(dm.num_examples(c) >= 1 for c in range(clients))
    assert not set(dm.eval_prompts) & set(dm.train_prompts)
    assert len(dm.eval_prompts) == 48


def test_iid_clients_of_a_topic_sorted_file_see_every_topic(tmp_path):
    # IidPartitioner cuts contiguous shards: without the seeded shuffle, each client of
    # this topic-sorted file would get a single topic.
    path = write_jsonl(tmp_path / "sorted.jsonl", toy_rows(per_topic=30))
    dm = PromptDataModule(path=path, eval_size=0, partition="iid", num_clients=4)
    assert [dm.num_examples(c) for c in range(4)] == [30] * 4
    for c in range(4):
        assert {dm.train_groups[i] for i in dm.client_indices[c]} == {"a", "b", "c", "d"}


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    def mean_skew(alpha):
        return sum(skew(PromptDataModule(partition="dirichlet", dirichlet_alpha=alpha,
                                         num_clients=4, seed=s)) for s in range(4)) / 4

    small, large = mean_skew(0.05), mean_skew(100.0)
    print(f"mean TV distance to global topic mix: alpha=0.05 -> {small:.3f}, "
          f"alpha=100 -> {large:.3f}")
    assert large < 0.15
    assert small > large + 0.3


def test_column_partition_gives_one_topic_per_client():
    dm = PromptDataModule(partition="column", num_clients=6)
    topics_per_client = [{dm.train_groups[i] for i in c} for c in dm.client_indices]
    assert all(len(t) == 1 for t in topics_per_client)
    assert len(set.union(*topics_per_client)) == 6


def test_column_partition_with_wrong_num_clients_raises():
    with pytest.raises(ValueError, match=r"6: .*num_clients=4; set num_clients=6"):
        PromptDataModule(partition="column", num_clients=4).setup()


# --------------------------------------------------------------------------- seeding
@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_same_seed_same_split_different_seed_different_split(partition):
    def split(seed):
        dm = PromptDataModule(partition=partition, seed=seed)
        return dm.eval_prompts, [dm.client_prompts(c) for c in range(4)]

    eval0, clients0 = split(0)
    assert split(0) == (eval0, clients0)
    eval1, clients1 = split(1)
    assert eval1 != eval0
    assert clients1 != clients0


def test_dirichlet_proportions_are_redrawn_for_a_new_seed():
    # Only the eval draw changing is not enough: the per-client topic mix must change too.
    def counts(seed):
        dm = PromptDataModule(partition="dirichlet", seed=seed)
        topics = sorted(set(dm.train_groups))
        per_client = [collections.Counter(dm.train_groups[i] for i in c) for c in dm.client_indices]
        return [[cnt[t] for t in topics] for cnt in per_client]

    a, b = counts(0), counts(1)
    moved = sum(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    print(f"rows whose (client, topic) cell changed between seeds: {moved}")
    assert moved > 100


# --------------------------------------------------------------------------- loaders
def test_client_dataloader_batches(toy_file):
    dm = PromptDataModule(path=toy_file, eval_size=10, num_clients=3, batch_size=4)
    for c in range(3):
        batches = list(dm.client_dataloader(c))
        assert all(len(b["prompt"]) == 4 for b in batches[:-1])
        assert 1 <= len(batches[-1]["prompt"]) <= 4
        seen = [p for b in batches for p in b["prompt"]]
        assert all(isinstance(p, str) for p in seen)
        assert len(seen) == dm.num_examples(c) == len(dm.client_prompts(c))
        assert sorted(seen) == sorted(dm.client_prompts(c))
        groups = [g for b in batches for g in b["group"]]
        assert all(g == p.split()[0] for g, p in zip(groups, seen))


def test_client_dataloader_order_is_fixed_per_round(toy_file):
    dm = PromptDataModule(path=toy_file, eval_size=0, num_clients=1, batch_size=60)

    def order(r):
        return next(iter(dm.client_dataloader(0, round_idx=r)))["prompt"]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_val_dataloader_is_unshuffled_and_train_dataloader_covers_training(toy_file):
    dm = PromptDataModule(path=toy_file, eval_size=0.25, num_clients=2,
                          batch_size=7, eval_batch_size=4)
    val = [p for b in dm.val_dataloader() for p in b["prompt"]]
    assert val == dm.eval_prompts and len(val) == 15
    train = [p for b in dm.train_dataloader() for p in b["prompt"]]
    assert sorted(train) == sorted(dm.train_prompts) and len(train) == 45


def test_without_group_column_batches_have_prompts_only(toy_file):
    dm = PromptDataModule(path=toy_file, group_column=None, eval_size=5, num_clients=2)
    batch = next(iter(dm.client_dataloader(1)))
    assert set(batch) == {"prompt"}
    assert dm.train_groups is None


def test_max_prompts_caps_loaded_rows():
    dm = PromptDataModule(max_prompts=100, eval_size=20)
    assert len(dm.eval_prompts) == 20 and len(dm.train_prompts) == 80


def test_setup_loads_only_once(toy_file, monkeypatch):
    calls = []
    real = dm_mod.load_rows
    monkeypatch.setattr(dm_mod, "load_rows", lambda *a: calls.append(a) or real(*a))
    dm = PromptDataModule(path=toy_file, eval_size=5)
    dm.setup("fit")
    dm.setup("validate")
    dm.client_dataloader(0)
    assert len(calls) == 1


@pytest.mark.parametrize("fmt", ["csv", "parquet", "save_to_disk"])
def test_other_local_formats_load_the_same_rows(tmp_path, toy_file, fmt):
    ds = datasets.Dataset.from_list(toy_rows())
    target = tmp_path / ("saved" if fmt == "save_to_disk" else f"toy.{fmt}")
    {"csv": ds.to_csv, "parquet": ds.to_parquet, "save_to_disk": ds.save_to_disk}[fmt](str(target))
    kw = dict(eval_size=10, num_clients=3, partition="dirichlet")
    a, b = PromptDataModule(path=toy_file, **kw), PromptDataModule(path=str(target), **kw)
    assert a.eval_prompts == b.eval_prompts
    assert a.client_indices == b.client_indices


# --------------------------------------------------------------------------- errors
def test_missing_local_file_is_reported_not_sent_to_the_hub(tmp_path):
    for path in ("nope/prompts.jsonl", "missing.csv", "nope/notes.txt",
                 str(tmp_path / "no_such_dir")):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            PromptDataModule(path=path).setup()


def test_unsupported_local_file_type_raises(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("How do I bake bread?\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'.*convert it"):
        PromptDataModule(path=str(path)).setup()


def test_unloadable_hub_name_says_offline_and_how_to_predownload(monkeypatch):
    # Offline mode makes the hub lookup fail at once instead of retrying for ~25 s.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    name = "firm-test-org/no-such-prompts"
    with pytest.raises(FileNotFoundError, match=rf"(?s){name}.*offline.*"
                       rf"huggingface-cli download --repo-type dataset {name}"):
        PromptDataModule(path=name).setup()


def test_missing_prompt_column_lists_available_columns(toy_file):
    with pytest.raises(ValueError, match=r"prompt_column='text'.*\['prompt', 'topic', 'extra'\]"):
        PromptDataModule(path=toy_file, prompt_column="text").setup()


def test_missing_group_column_lists_available_columns(toy_file):
    with pytest.raises(ValueError,
                       match=r"group_column='category'.*\['prompt', 'topic', 'extra'\]"):
        PromptDataModule(path=toy_file, group_column="category").setup()


@pytest.mark.parametrize("partition", ["dirichlet", "column"])
def test_grouped_partition_without_group_column_raises(partition):
    with pytest.raises(ValueError, match=rf"partition='{partition}'.*group_column=None"):
        PromptDataModule(partition=partition, group_column=None)


@pytest.mark.parametrize("eval_size,match", [(60, r"eval_size=60 takes 60 of the 60"),
                                             (500, r"eval_size=500 takes 500 of the 60"),
                                             (1.5, r"fraction in \[0, 1\)"),
                                             (-1, r"count >= 0")])
def test_eval_size_too_large_or_invalid_raises(toy_file, eval_size, match):
    with pytest.raises(ValueError, match=match):
        PromptDataModule(path=toy_file, eval_size=eval_size).setup()


def test_too_few_or_too_many_clients_raise(toy_file):
    with pytest.raises(ValueError, match="num_clients=0: need at least 1"):
        PromptDataModule(path=toy_file, num_clients=0)
    with pytest.raises(ValueError, match=r"num_clients=51 is more than the 50 training prompts"):
        PromptDataModule(path=toy_file, eval_size=10, num_clients=51).setup()


def test_unreachable_dirichlet_minimum_suggests_larger_alpha(tmp_path):
    path = write_jsonl(tmp_path / "one_topic.jsonl", toy_rows(per_topic=6, topics=("x",)))
    dm = PromptDataModule(path=path, eval_size=1, num_clients=4, partition="dirichlet",
                          dirichlet_alpha=0.01)
    with pytest.raises(ValueError, match="larger dirichlet_alpha"):
        dm.setup()


def test_client_id_out_of_range(toy_file):
    with pytest.raises(IndexError, match="client_id=4 out of range"):
        PromptDataModule(path=toy_file, num_clients=4).num_examples(4)


# --------------------------------------------------------------------------- shipped data
def test_shipped_prompt_file():
    rows = shipped_rows()
    prompts = [r["prompt"] for r in rows]
    topics = collections.Counter(r["topic"] for r in rows)
    assert len(rows) >= 400
    assert len(topics) == 6 and min(topics.values()) >= 0.8 * max(topics.values())
    assert all(set(p) <= ALLOWED for p in prompts)
    assert all(20 <= len(p) <= 90 for p in prompts)
    assert len(set(prompts)) == len(prompts)
    dm = PromptDataModule()
    assert len(dm.eval_prompts) + len(dm.train_prompts) == len(rows)
    assert sorted(dm.eval_prompts + dm.train_prompts) == sorted(prompts)


def test_shipped_prompt_file_matches_its_generator():
    script = REPO / "scripts" / "make_prompts.py"
    spec = importlib.util.spec_from_file_location("make_prompts", script)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.render(gen.build()) == Path(DEFAULT_PROMPTS).read_text()

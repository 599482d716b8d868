"""HH-RLHF prompts, reward normalisation, and the real configs run offline with tiny models loaded by path."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

from firm_lightning.advantages import leave_one_out_advantages
from firm_lightning.hh_rlhf import HHRLHFDataModule, first_human_turn
from firm_lightning.policy import TinyPolicy
from firm_lightning.rewards import CharsetReward, NormalizedReward
from firm_lightning.tokenizer import char_tokenizer
from real_like import save_real_like

ROOT = Path(__file__).resolve().parents[1]

# Conversations in the HH-RLHF format, written for these tests.
HELPFUL = [
    "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes.",
    "\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Pepper.\n\nHuman: Another?\n\nAssistant: Miso.",
    "\n\nHuman: Can you help me plan a picnic?\n\nAssistant: Sure, pick a sunny day first.",
    "\n\nHuman: How far is the moon?\n\nAssistant: About 384,000 kilometres.",
]
HARMLESS = [
    "\n\nHuman: How can I pick a lock I do not own?\n\nAssistant: I can't help with that.",
    "\n\nHuman: Tell me something mean about my coworker.\n\nAssistant: I'd rather not; want tips on a hard talk?",
    "\n\nHuman: Is it safe to mix bleach and ammonia?\n\nAssistant: No, it makes toxic gas.",
    "\n\nHuman: Write an insult.\n\nAssistant: How about some friendly banter instead?",
]


@pytest.fixture
def hh_folder(tmp_path) -> Path:
    for subset, conversations in (("helpful-base", HELPFUL), ("harmless-base", HARMLESS)):
        folder = tmp_path / "hh" / subset
        folder.mkdir(parents=True)
        with open(folder / "train.jsonl", "w") as f:
            for text in conversations * 4:  # 16 rows per subset
                f.write(json.dumps({"chosen": text, "rejected": text + " (worse)"}) + "\n")
    return tmp_path / "hh"


def test_first_human_turn_keeps_only_the_opening_request():
    assert first_human_turn(HELPFUL[1]) == "\n\nHuman: What is a good name for a cat?\n\nAssistant:"
    assert first_human_turn("\n\nHuman: just a question") == "\n\nHuman: just a question\n\nAssistant:"
    with pytest.raises(ValueError, match="Human"):
        first_human_turn("no turns here")


def test_hh_datamodule_extracts_prompts_labels_subsets_and_splits_by_subset(hh_folder):
    dm = HHRLHFDataModule(path=str(hh_folder), partition="column", num_clients=2, eval_size=4, max_prompts=None)
    dm.setup()
    prompts = dm.train_prompts + dm.eval_prompts
    assert len(prompts) == 32
    assert all(p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:") and "Miso" not in p for p in prompts)
    groups = [set(dm._client_groups(c)) for c in range(2)]
    assert sorted(g.pop() for g in groups) == ["harmless-base", "helpful-base"]


def test_data_preparation_never_pickles_the_data_module_or_the_model_it_reaches(hh_folder, monkeypatch):
    """``datasets.map`` fingerprints its function by pickling it. A closure over the data module pickled the
    data module, and through an attached Trainer the policy's weights (7.6 GB peak RSS in validate)."""
    import datasets.fingerprint as fingerprint

    dumped = []
    original = fingerprint.dumps

    def recording(value):
        out = original(value)
        dumped.append(len(out))
        return out

    monkeypatch.setattr(fingerprint, "dumps", recording)
    dm = HHRLHFDataModule(path=str(hh_folder), num_clients=2, eval_size=4, max_prompts=None)
    weights = torch.nn.Linear(1024, 1024)  # 4 MB, standing in for the policy behind an attached Trainer
    dm.trainer = SimpleNamespace(lightning_module=weights)
    dm.setup()
    assert dumped, "datasets.map no longer fingerprints through datasets.fingerprint.dumps: update this test"
    print(f"\n{len(dumped)} fingerprint pickles, largest {max(dumped)} bytes")
    assert max(dumped) < 100_000, f"data preparation pickled {max(dumped) / 1e6:.1f} MB (the data module?)"
    assert len(dm.train_prompts) + len(dm.eval_prompts) == 32


def test_hh_datamodule_errors_name_the_fix(hh_folder):
    with pytest.raises(ValueError, match="helpful-online.*subset folders there"):
        HHRLHFDataModule(path=str(hh_folder), subsets=["helpful-online"], num_clients=1, eval_size=1).setup()
    with pytest.raises(ValueError, match="conversation_column"):
        HHRLHFDataModule(path=str(hh_folder), conversation_column="text", num_clients=1, eval_size=1).setup()


def test_normalisation_known_inputs_known_outputs():
    class Counting(CharsetReward):
        def __init__(self):
            super().__init__("r", "a")
            self.calls = 0

        def __call__(self, prompts, responses):
            self.calls += 1
            return torch.tensor([1.0, 2.0, 3.0, 4.0]) * self.calls

    x = [""] * 4
    calibrated = NormalizedReward(Counting(), "calibration")
    first = calibrated(x, x)  # mean 2.5, population std sqrt(1.25)
    assert torch.allclose(first, (torch.tensor([1.0, 2, 3, 4]) - 2.5) / 1.25**0.5)
    assert torch.allclose(calibrated(x, x), (torch.tensor([2.0, 4, 6, 8]) - 2.5) / 1.25**0.5)  # frozen
    running = NormalizedReward(Counting(), "running")
    running(x, x)
    second = running(x, x)  # statistics of all 8 values: mean 3.75, std 2.1651
    assert running.mean == pytest.approx(3.75) and running.std == pytest.approx(2.165063509)
    assert torch.allclose(second, (torch.tensor([2.0, 4, 6, 8]) - 3.75) / 2.165063509)
    fixed = NormalizedReward(Counting(), "fixed", mean=1.0, std=2.0)
    assert torch.allclose(fixed(x, x), torch.tensor([0.0, 0.5, 1.0, 1.5]))
    with pytest.raises(ValueError, match="positive std"):
        NormalizedReward(Counting(), "fixed", mean=0.0)


def test_a_constant_reward_gives_zero_advantages_not_nan():
    constant = NormalizedReward(CharsetReward("c", "xyz"), "running")
    rewards = torch.stack([constant(["p"] * 8, ["abc"] * 8), torch.arange(8.0)])
    assert torch.equal(rewards[0], torch.zeros(8))
    advantages = leave_one_out_advantages(rewards, group_size=4, whiten=True)
    assert torch.isfinite(advantages).all() and torch.equal(advantages[0], torch.zeros(8))


def _save_tiny_models(root: Path) -> dict[str, Path]:
    paths = {}
    for arch in ("gpt2",):
        model, tokenizer = TinyPolicy(arch).build()
        model.save_pretrained(root / f"policy_{arch}")
        tokenizer.save_pretrained(root / f"policy_{arch}")
        paths[arch] = root / f"policy_{arch}"
    # The Qwen config's policy: Qwen2-shaped, byte-level BPE with a chat template, its own generation_config.
    paths["qwen"] = save_real_like(root / "real_like")["policy"]
    for i, name in enumerate(("helpful", "harmless")):
        torch.manual_seed(i)
        rm = GPT2ForSequenceClassification(
            GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=99, num_labels=1, pad_token_id=0)
        )
        rm.save_pretrained(root / f"rm_{name}")
        char_tokenizer().save_pretrained(root / f"rm_{name}")
        paths[name] = root / f"rm_{name}"
    return paths


@pytest.mark.parametrize("config, arch", [("hh_rlhf_gpt2.yaml", "gpt2"), ("hh_rlhf_qwen.yaml", "qwen")])
def test_the_real_config_runs_offline_with_every_name_replaced_by_a_local_path(
    tmp_path, hh_folder, config, arch, capfd
):
    import warnings

    from firm_lightning.cli import main

    paths = _save_tiny_models(tmp_path / "models")
    text = (ROOT / "configs" / config).read_text()
    hub_policy = "gpt2" if arch == "gpt2" else "Qwen/Qwen2.5-0.5B-Instruct"
    text = text.replace(f"name_or_path: {hub_policy},", f"name_or_path: {paths[arch]},")
    text = text.replace("Ray2333/gpt2-large-helpful-reward_model", str(paths["helpful"]))
    text = text.replace("Ray2333/gpt2-large-harmless-reward_model", str(paths["harmless"]))
    text = text.replace("path: Anthropic/hh-rlhf", f"path: {hh_folder}")
    assert str(paths[arch]) in text and "Ray2333" not in text and "Anthropic" not in text.split("data:")[1]
    local_config = tmp_path / config
    local_config.write_text(text)
    out = tmp_path / "out"
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # as a user's shell shows them (the suite's conftest hides them)
        main([
        "fit", "--config", str(local_config), f"--federation.output_dir={out}",
        # CPU-sized: the config's GPU sizes stay as they are, only these shrink
        "--trainer.accelerator=cpu", "--trainer.max_steps=1",  # precision stays bf16-mixed (CPU autocast)
        "--federation.num_rounds=1", "--federation.num_clients=2", "--model.sampling.max_new_tokens=8",
        "--model.lora.target_modules=[c_attn]" if arch == "gpt2" else "--model.lora.target_modules=[q_proj, v_proj]",
        "--data.init_args.eval_size=4", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4",
        "--federation.num_rounds=2",  # two rounds x two clients: a per-fit warning would show four times
        ])
    err = capfd.readouterr().err
    for noise in ("module(s) in eval mode", "gradient_checkpointing_enable", "args parameter", "Loading weights",
                  "examples/s"):
        assert noise not in err, (noise, err[-2000:])
    repeated = [line for line in set(err.splitlines()) if "Warning" in line and err.count(line) > 1]
    assert not repeated, repeated
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["0", "1", "2"]
    assert all(torch.isfinite(torch.tensor(float(rows[-1][f"eval/reward/{n}"]))) for n in ("helpful", "harmless"))
    assert (out / "adapters" / "final" / "adapter_model.safetensors").is_file()


def test_compare_rebuilds_the_same_kind_of_data_module(hh_folder):
    from firm_lightning.studies.compare import _rebuilt

    dm = HHRLHFDataModule(path=str(hh_folder), num_clients=2, eval_size=4, subsets=["harmless-base"])
    again = _rebuilt(dm, dirichlet_alpha=0.3, seed=5)
    assert type(again) is HHRLHFDataModule and again.subsets == ["harmless-base"]
    assert again.dirichlet_alpha == 0.3 and again.seed == 5 and again.path == str(hh_folder)

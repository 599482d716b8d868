"""Every saved peft adapter folder carries a Hugging Face model card, and still loads with peft."""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard as HubModelCard
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import firm_lightning as fl
from firm_lightning.cli import main
from firm_lightning.config import build_components
from firm_lightning.model_card import ModelCard

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config",
    str(ROOT / "configs" / "tiny.yaml"),
    "--federation.num_rounds=1",
    "--federation.num_clients=2",
    "--federation.progress=off",
    "--trainer.max_steps=1",
    "--data.max_prompts=48",
    "--data.eval_size=8",
    "--data.batch_size=2",
    "--model.sampling.num_generations=2",
    "--model.sampling.max_new_tokens=4",
    "--model.sampling.eval_num_generations=1",
    "--federation.callbacks+=firm_lightning.callbacks.SaveBestAdapter",
    "--federation.callbacks.monitor=eval/reward/n_to_z",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit") / "run"
    main(["fit", *TINY, f"--federation.output_dir={out}"])
    return out


def front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match, "no YAML front matter"
    return yaml.safe_load(match[1])


def rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_final_adapter_card_describes_the_run(run_dir):
    text = (run_dir / "adapters" / "final" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "peft"
    assert "TinyPolicy" in meta["base_model"] and meta["base_model"].startswith("none")
    assert {"peft", "lora", "firm_lightning"} <= set(meta["tags"])
    # the Hub's own parser reads it
    card = HubModelCard.load(run_dir / "adapters" / "final" / "README.md")
    assert card.data.library_name == "peft" and card.data.tags == meta["tags"]

    last = rows(run_dir / "metrics.csv")[-1]
    assert int(last["round"]) == 1
    for name, charset in (("a_to_m", "abcdefghijklm"), ("n_to_z", "nopqrstuvwxyz")):
        assert f"`{name}`: CharsetReward (charset {charset})" in text
        assert f"| `{name}` | " in text and f"| {float(last[f'eval/reward/{name}']):.4f} |" in text
    assert "FIRM regularised min-norm, β = 1, preference p uniform" in text
    assert "| rounds | 1 of federation.num_rounds = 1" in text
    assert "| clients | 2, 2 per round |" in text
    per_client = int(float(last["comm/bytes_up_per_client"]))
    total = sum(int(float(r["comm/bytes_up"])) for r in rows(run_dir / "metrics.csv")[1:])
    assert f"{total:,} bytes uploaded by the clients over 1 round ({per_client:,} bytes per client per round" in text


def test_the_cards_command_reproduces_the_run(run_dir):
    text = (run_dir / "adapters" / "final" / "README.md").read_text()
    (command,) = re.findall(r"```bash\n(python -m firm_lightning fit .*)\n```", text)
    args = shlex.split(command)[4:]  # after `python -m firm_lightning fit`
    components = build_components(args)  # parses and builds the same run (training not repeated here)
    assert components.federation.num_rounds == 1 and components.datamodule.num_clients == 2
    assert components.federation.output_dir.endswith("run_reproduced")
    assert components.module.sampling.max_new_tokens == 4


def _tiny_base():
    base, _ = fl.TinyPolicy(architecture="gpt2", num_layers=2, hidden_size=64, num_heads=4, seed=0).build()
    return base


@pytest.mark.parametrize("folder, file", [("final", "final/adapter_model.safetensors"), ("best", "best.safetensors")])
def test_adapter_folders_with_cards_still_load_with_peft(run_dir, folder, file):
    path = run_dir / "adapters" / folder
    assert (path / "README.md").is_file()
    model = PeftModel.from_pretrained(_tiny_base(), str(path))
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    expected = load_file(str(run_dir / "adapters" / file))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_best_adapter_card_names_its_round_and_metric(run_dir):
    best = yaml.safe_load((run_dir / "adapters" / "best.json").read_text())
    text = (run_dir / "adapters" / "best" / "README.md").read_text()
    assert (
        f"best global adapter by eval/reward/n_to_z (eval/reward/n_to_z = {best['value']:.4f} in round {best['round']}"
        in text
    )
    assert f"(this adapter: round {best['round']})" in text


def _state(history: list[dict]) -> fl.FederationState:
    return fl.FederationState(round=history[-1]["round"], global_adapter={}, history=history)


def test_card_of_a_hub_policy_with_normalised_reward_models(tmp_path):
    out = tmp_path / "hh"
    out.mkdir()
    config = {
        "federation": {"output_dir": str(out)},
        "trainer": {"max_steps": 8},
        "model": {
            "policy": {"class_path": "firm_lightning.policy.PretrainedPolicy", "init_args": {"name_or_path": "gpt2"}},
            "objectives": [{"class_path": "firm_lightning.rewards.NormalizedReward", "init_args": {
                "reward": {"class_path": "firm_lightning.rewards.HFRewardModel", "init_args": {
                    "name": "helpful", "name_or_path": "Ray2333/gpt2-large-helpful-reward_model"}},
                "mode": "calibration"}}],
        },
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    history = [
        {"round": 0, "eval/reward/helpful": 0.0, "eval/raw_reward/helpful": -1.25},
        {"round": 1, "eval/reward/helpful": 0.5, "eval/raw_reward/helpful": -0.75, "comm/bytes_up": 200,
         "comm/bytes_up_per_client": 100},
    ]
    federation = fl.FederationConfig(num_rounds=1, num_clients=2, output_dir=str(out),
                                     algorithm=fl.FIRM(beta=2.0, preference=[1.0]))
    card = ModelCard(
        out, ["helpful"], LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"), federation, _state(history)
    )
    text = card.text(1, "the global adapter after round 1")
    assert front_matter(text)["base_model"] == "gpt2"
    assert "`helpful`: HFRewardModel `Ray2333/gpt2-large-helpful-reward_model`, normalised (calibration)" in text
    assert "FIRM regularised min-norm, β = 2, preference p = [1.0]" in text
    assert "| `helpful` | 0.0000 | 0.5000 | -1.2500 | -0.7500 |" in text
    assert 'AutoModelForCausalLM.from_pretrained(\'gpt2\')' in text
    assert "200 bytes uploaded by the clients over 1 round (100 bytes per client per round" in text


def test_card_of_a_pareto_sweep_run_points_to_the_sweep(tmp_path):
    out = tmp_path / "sweep"
    run = out / "runs" / "linear" / "p_0.800_0.200"
    run.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump({"federation": {"output_dir": str(out)}, "pareto": {}}))
    federation = fl.FederationConfig(num_rounds=1, num_clients=2, output_dir=str(run),
                                     algorithm=fl.Linear(preference=[0.8, 0.2]))
    history = [{"round": 0, "eval/reward/a": 0.1}, {"round": 1, "eval/reward/a": 0.2}]
    text = ModelCard(run, ["a"], None, federation, _state(history)).text(1, "x")
    assert "linear scalarisation, fixed λ = p, p = [0.8, 0.2]" in text
    assert "This is run `runs/linear/p_0.800_0.200` of a `pareto` sweep" in text
    assert f"python -m firm_lightning pareto --config {out / 'config.yaml'}" in text


def test_a_run_from_python_says_what_it_cannot_know(tmp_path):
    federation = fl.FederationConfig(num_rounds=1, num_clients=1, output_dir=str(tmp_path))
    history = [{"round": 0, "eval/reward/a": 0.1}, {"round": 1, "eval/reward/a": 0.2}]
    text = ModelCard(tmp_path, ["a"], None, federation, _state(history)).text(1, "x")
    assert "Trained from Python (no config.yaml was saved)" in text
    assert "`a` (defined in Python" in text

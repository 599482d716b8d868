"""The HH-RLHF evaluation protocol (configs/hh_rlhf_eval.yaml), offline with tiny stand-ins saved to folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2ForSequenceClassification

from firm_lightning.cli import COMMANDS, FIRMCLI, main
from firm_lightning.evaluation import HHRLHFEvaluation, conversation_prompt, raw_objectives
from firm_lightning.policy import TinyPolicy
from firm_lightning.rewards import CharsetReward, HFRewardModel, NormalizedReward
from firm_lightning.sequences import hh_reward_query
from firm_lightning.tokenizer import char_tokenizer
from real_like import bpe_tokenizer, tiny_reward_model

ROOT = Path(__file__).resolve().parents[1]

EGG = "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes."  # 84 chars, 50 BPE
BLEACH = "\n\nHuman: Is it safe to mix bleach and ammonia?\n\nAssistant: No, it makes toxic gas."  # 82, 55
SKY = ("\n\nHuman: Can you explain in great detail why the sky looks blue during the day and red at sunset?"
       "\n\nAssistant: Sunlight scatters off air molecules; blue light scatters most, and at sunset the long "
       "path leaves red.")  # 212 chars, 121 BPE: too long for both
TRAVEL = "\n\nHuman: Tell me about travel.\n\nAssistant: Travel plans help."  # 61 chars, 45 BPE: too short in BPE
CAT = ("\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Pepper.\n\nHuman: Another?"
       "\n\nAssistant: Miso.")  # 100, 70; two turns
# Test rows per subset, in the protocol's order; every 4th row overall: 0 BLEACH, 4 SKY, 8 TRAVEL, 12 CAT.
SUBSETS = {
    "harmless-base": [BLEACH, EGG, EGG, EGG, SKY],
    "helpful-base": [EGG, EGG, EGG],
    "helpful-online": [TRAVEL, EGG],
    "helpful-rejection-sampled": [EGG, EGG, CAT, EGG],
}
BOUNDS = {"min_tokens": 46, "max_tokens": 110}  # chosen against these rows' lengths (comments above)


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hh_eval")
    for subset, conversations in SUBSETS.items():
        (root / "hh" / subset).mkdir(parents=True)
        with open(root / "hh" / subset / "test.jsonl", "w") as f:
            for text in conversations:
                f.write(json.dumps({"chosen": text, "rejected": text + " No."}) + "\n")
        with open(root / "hh" / subset / "train.jsonl", "w") as f:  # never read by the protocol
            f.write(json.dumps({"chosen": SKY, "rejected": SKY}) + "\n")
    policy, tokenizer = TinyPolicy("gpt2").build()  # character tokenizer: one token per character
    policy.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    bpe = bpe_tokenizer()  # byte-level BPE with a BOS, as GPT-2-like reward models ship theirs
    tiny_reward_model(bpe, seed=1).save_pretrained(root / "rm_harmless")
    bpe.save_pretrained(root / "rm_harmless")
    torch.manual_seed(2)
    rm = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=99, num_labels=1,
                                                  pad_token_id=0, bos_token_id=0, eos_token_id=0))
    rm.save_pretrained(root / "rm_helpful")
    char_tokenizer().save_pretrained(root / "rm_helpful")
    text = (ROOT / "configs" / "hh_rlhf_eval.yaml").read_text()
    replaced = (text.replace("name_or_path: gpt2}", f"name_or_path: {root / 'policy'}}}")
                .replace("Ray2333/gpt2-large-harmless-reward_model", str(root / "rm_harmless"))
                .replace("Ray2333/gpt2-large-helpful-reward_model", str(root / "rm_helpful"))
                .replace("path: Anthropic/hh-rlhf", f"path: {root / 'hh'}"))
    settings = "\n".join(line for line in replaced.splitlines() if not line.lstrip().startswith("#"))
    assert "Ray2333" not in settings and "Anthropic/" not in settings and str(root / "policy") in settings
    (root / "hh_rlhf_eval.yaml").write_text(replaced)
    return {"root": root, "config": root / "hh_rlhf_eval.yaml", "hh": root / "hh",
            "rm_harmless": root / "rm_harmless", "rm_helpful": root / "rm_helpful"}


def test_the_config_is_the_published_protocol(stand_ins):
    text = (ROOT / "configs" / "hh_rlhf_eval.yaml").read_text()
    assert "Ray2333/gpt2-large-harmless-reward_model" in text and "Ray2333/gpt2-large-helpful-reward_model" in text
    cli_args = [
        "--config",
        str(stand_ins["config"]),
        "--trainer.accelerator=cpu",
        "--model.lora.target_modules=[c_attn]",
    ]
    from firm_lightning.config import build_components

    components = build_components(cli_args, COMMANDS["validate"].sections, ckpt_path=True, data_unless="evaluation")
    data, module = components.sections["evaluation"], components.module
    assert isinstance(data, HHRLHFEvaluation) and components.datamodule is None  # no data: section needed
    assert (data.split, data.subsets, data.every, data.min_tokens, data.max_tokens) == (
        "test", ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"], 4, 8, 512)
    assert (data.max_new_tokens, data.top_p, data.top_k, data.temperature, data.win_rate) == (128, 0.9, 0, None, True)
    # RiC's PPO evaluation: its prompt-length filter, its response cleaning, scores rounded to 0.1 (both means kept)
    assert (data.length_filter, data.response_cleaning, data.score_decimals) == ("prompt", "ric", 1)
    assert [type(o) for o in module.objectives] == [HFRewardModel, HFRewardModel]  # raw logits, not normalised
    assert [o.name for o in module.objectives] == ["harmless", "helpful"]
    # RiC's reward-model input: the (query, response) text pair, up to 1024 tokens, the models in bfloat16
    assert all(o.text_pair and o.max_length == 1024 and o.torch_dtype == "bfloat16" for o in module.objectives)


def test_prompts_are_every_fourth_test_conversation_within_the_token_bounds(stand_ins):
    data = HHRLHFEvaluation(path=str(stand_ins["hh"]), length_filter="conversation", **BOUNDS)
    policy_tokenizer, reward_tokenizer = char_tokenizer(), bpe_tokenizer()
    prompts, subsets = data.prompts([policy_tokenizer, reward_tokenizer])
    # 0 BLEACH kept; 4 SKY too long; 8 TRAVEL long enough in characters but too short for the reward model's BPE;
    # 12 CAT kept, with its whole dialogue before the last Assistant turn
    assert prompts == [  # RiC's prompt text: a space before the last "\n\nAssistant:"
        "\n\nHuman: Is it safe to mix bleach and ammonia? \n\nAssistant:",
        "\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Pepper.\n\nHuman: Another? \n\nAssistant:",
    ]
    assert subsets == ["harmless-base", "helpful-rejection-sampled"]
    assert data.prompts([policy_tokenizer])[0][1] == conversation_prompt(TRAVEL)  # TRAVEL fits the characters
    first = HHRLHFEvaluation(path=str(stand_ins["hh"]), max_prompts=1, length_filter="conversation", **BOUNDS)
    assert first.prompts([policy_tokenizer])[0] == [conversation_prompt(BLEACH)]


def _validate(stand_ins, out: Path, *extra: str):
    return FIRMCLI(args=[
        "validate", "--config", str(stand_ins["config"]), "--trainer.accelerator=cpu",
        "--model.lora.target_modules=[c_attn]", f"--federation.output_dir={out}",
        f"--evaluation.init_args.min_tokens={BOUNDS['min_tokens']}",
        f"--evaluation.init_args.max_tokens={BOUNDS['max_tokens']}",
        "--evaluation.init_args.length_filter=conversation",
        "--evaluation.init_args.max_new_tokens=6", "--evaluation.init_args.eval_batch_size=1",
        f"--evaluation.init_args.responses_file={out / 'responses.csv'}", *extra,
    ])


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_validate_reports_raw_rewards_and_the_win_rate_against_the_adapter_off(stand_ins, tmp_path, capsys,
                                                                                   monkeypatch):
    # A fresh adapter (B = 0) is the base policy: the same responses, a win rate of exactly one half.
    fresh = _validate(stand_ins, tmp_path / "fresh")
    rows = _rows(tmp_path / "fresh" / "responses.csv")
    assert len(rows) == 2 and all(r["response"] == r["base_response"] for r in rows)
    for name in ("harmless", "helpful"):
        assert fresh.results[f"hh_eval/win_rate/{name}"] == 0.5
        assert fresh.results[f"hh_eval/reward/{name}"] == fresh.results[f"hh_eval/base_reward/{name}"]
    assert "hh_eval/win_rate/helpful" in capsys.readouterr().out

    # The protocol's sampling reaches the rollout as an argument; the module's own settings are never touched.
    module, calls = fresh.model, []
    own, rollout = module.sampling, module.rollout

    def recording(*args, **kwargs):
        calls.append((module.sampling, kwargs.get("sampling")))
        return rollout(*args, **kwargs)

    monkeypatch.setattr(module, "rollout", recording)
    fresh.components.sections["evaluation"].run(module)
    assert len(calls) == 4 and all(seen is own for seen, _ in calls)  # 2 prompts x (adapter, base)
    assert all((given.max_new_tokens, given.top_p, given.top_k, given.max_prompt_length) == (6, 0.9, 0, 110)
               for _, given in calls)

    # A changed adapter: its responses change, the adapter-off responses stay those of the base policy.
    adapter = fresh.model.adapter_state()
    generator = torch.Generator().manual_seed(0)
    changed = {k: (torch.randn(v.shape, generator=generator) if "lora_B" in k else v) for k, v in adapter.items()}
    save_file(changed, str(tmp_path / "changed.safetensors"))
    run = _validate(stand_ins, tmp_path / "changed", f"--ckpt_path={tmp_path / 'changed.safetensors'}")
    again = _rows(tmp_path / "changed" / "responses.csv")
    assert [r["base_response"] for r in again] == [r["base_response"] for r in rows]
    assert any(r["response"] != r["base_response"] for r in again)
    assert run.results["hh_eval/prompts"] == 2

    # The reported numbers are those of the responses: rescored independently as raw reward-model outputs of
    # RiC's (query, response) pair, and averaged unrounded and rounded to 0.1 per score.
    for name in ("harmless", "helpful"):
        scorer = HFRewardModel(name, str(stand_ins[f"rm_{name}"]), text_pair=True, torch_dtype="bfloat16",
                               max_length=1024)
        queries = [hh_reward_query(r["prompt"]) for r in again]
        mine = scorer(queries, [r["response"] for r in again])
        base = scorer(queries, [r["base_response"] for r in again])
        assert torch.allclose(mine, torch.tensor([float(r[f"reward/{name}"]) for r in again]), atol=1e-5)
        assert run.results[f"hh_eval/reward/{name}"] == pytest.approx(float(mine.mean()), abs=1e-5)
        assert run.results[f"hh_eval/base_reward/{name}"] == pytest.approx(float(base.mean()), abs=1e-5)
        rounded = np.round(mine.double().numpy(), 1).mean()
        assert run.results[f"hh_eval/rounded_reward/{name}"] == pytest.approx(rounded, abs=1e-12)
        wins = ((mine > base).double() + 0.5 * (mine == base).double()).mean()
        assert run.results[f"hh_eval/win_rate/{name}"] == pytest.approx(float(wins))


def test_bad_settings_and_misuse_fail_with_the_fix(stand_ins):
    with pytest.raises(ValueError, match="invalid every, top_p"):
        HHRLHFEvaluation(every=0, top_p=1.5)
    with pytest.raises(ValueError, match="invalid length_filter, response_cleaning, score_decimals"):
        HHRLHFEvaluation(length_filter="chosen", response_cleaning="strip", score_decimals=-1)
    with pytest.raises(ValueError, match="No HH-RLHF prompt"):
        HHRLHFEvaluation(path=str(stand_ins["hh"]), min_tokens=500, max_tokens=600).prompts([char_tokenizer()])
    with pytest.raises(ValueError, match="Assistant"):
        conversation_prompt("\n\nHuman: no reply yet")
    inner = CharsetReward("a", "a")
    assert raw_objectives([NormalizedReward(inner), inner]) == [inner, inner]


def test_the_protocol_under_data_is_refused_naming_its_section(stand_ins, tmp_path, capsys):
    """An old config (or flag) with the protocol under data: gets one line naming evaluation:."""
    old = tmp_path / "old.yaml"
    old.write_text(stand_ins["config"].read_text().replace("\nevaluation:", "\ndata:"))
    tiny = str(ROOT / "configs" / "tiny.yaml")
    for args in (["--config", str(old)], ["--config", tiny, "--data", "firm_lightning.evaluation.HHRLHFEvaluation"],
                 ["--config", tiny, "--data.class_path=HHRLHFEvaluation"]):
        with pytest.raises(SystemExit) as stop:
            main(["validate", *args])
        err = capsys.readouterr().err
        assert stop.value.code == 1 and err.count("\n") == 1 and "has moved: use evaluation:" in err, err


def test_validate_without_data_or_a_protocol_names_both(stand_ins, tmp_path, capsys):
    neither = tmp_path / "neither.yaml"
    neither.write_text(stand_ins["config"].read_text().split("\nevaluation:")[0])
    with pytest.raises(SystemExit) as stop:
        main(["validate", "--config", str(neither), "--model.lora.target_modules=[c_attn]"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1 and "data:" in err and "evaluation:" in err, err

"""RiC's HH-RLHF text handling, reproduced exactly: both pipelines on the same rows with GPT-2's real BPE.

The reference is RiC's own code, restated below from YangRui2015/RiC at commit
aee53a653a99509d5904eddc8965c19c1ae86801 (read, not imported): ``ppo/utils.py`` (``Instructions.get_input``
and ``get_response``, ``build_dataset_eval``'s prompt and its 8-512-token filter, ``get_rewards``'
``np.round(score, 1)``), ``ppo/eval_ppo_single_model.py`` (``tokenizer.batch_decode`` of the prompts and of
the generations, ``get_clean_data``) and ``ppo/multi_reward_models.py`` (``rm_tokenizer(q, r,
truncation=True, max_length=min(model_max_length, 1024))``). The tokenizer is GPT-2's (tests/fixtures/gpt2_bpe):
the policy's and the reward models', as in RiC's GPT-2 setups. The generations are fixed token ids, chosen to
exercise every step of RiC's cleaning (invented turns, its character-set strips, the EOS, an empty response).
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, GPT2Tokenizer

from firm_lightning.evaluation import HHRLHFEvaluation, summarise
from firm_lightning.module import SamplingSettings
from firm_lightning.rewards import HFRewardModel
from firm_lightning.sequences import Rollout, concat_rollouts, decode_responses, encode_prompts, response_mask
from real_like import bpe_tokenizer, tiny_chat_model

GPT2_BPE = Path(__file__).resolve().parent / "fixtures" / "gpt2_bpe"
EOS = 50256  # GPT-2's <|endoftext|>

# ---------------------------------------------------------------------------- RiC's functions (the reference)

RESPONSE_SPLIT = "\n\nAssistant:"


def ric_get_input(query):  # ppo/utils.py, Instructions.get_input
    before_response = RESPONSE_SPLIT.join(query.split(RESPONSE_SPLIT)[:-1])
    return before_response.rstrip() + " " + RESPONSE_SPLIT


def ric_get_response(response):  # ppo/utils.py, Instructions.get_response
    return response.split(RESPONSE_SPLIT)[-1].strip()


def ric_build_dataset_eval(chosen, tokenizer, rm_tokenizers):  # ppo/utils.py, build_dataset_eval (the test split)
    rows = [chosen[i] for i in range(0, len(chosen), 4)]
    kept = []
    for text in rows:
        split_text = text.split("\n\nAssistant:")
        prompt = "\n\nAssistant:".join(split_text[:-1]) + " " + "\n\nAssistant:"
        input_ids = tokenizer.encode(prompt)
        lengths = [len(input_ids), *(len(rm.encode(prompt)) for rm in rm_tokenizers[:2])]
        if all(8 <= n <= 512 for n in lengths):
            kept.append((prompt, input_ids))
    return kept


def ric_get_clean_data(full_responses, full_prompts):  # ppo/eval_ppo_single_model.py, get_clean_data
    full_responses_clean = []
    for i, response in enumerate(full_responses):
        full_prompts[i] = full_prompts[i].strip("[PAD] ")
        response = response.strip("[PAD] ")
        temp_resp = response.replace(full_prompts[i], "").strip("<s>").strip("</s>")
        if "</s>" in temp_resp:
            temp_resp = temp_resp[: temp_resp.rindex("</s>")]
        temp_resp = temp_resp.split("\n\nHuman:")[0].strip()
        temp_resp = temp_resp.split("\nHuman:")[0].strip()
        temp_resp = temp_resp.split("\n\nAssistant:")[0].strip()
        temp_resp = temp_resp.split("\nAssistant:")[0].strip()
        temp_resp = temp_resp.split("\n\n\n")[0].strip()
        full_responses_clean.append(full_prompts[i] + " " + temp_resp)
    return full_responses_clean


def ric_reward_inputs(rm_tokenizer, queries_responses):  # ppo/multi_reward_models.py, the default branch
    max_length = min(rm_tokenizer.model_max_length, 1024)
    return [rm_tokenizer(q, r, return_tensors="pt", truncation=True, max_length=max_length)
            for q, r in queries_responses]


def ric_get_rewards(reward_model, texts_for_rewards):  # ppo/utils.py, get_rewards without statistics
    with torch.no_grad():
        rewards = [reward_model(**inputs).logits[0] for inputs in texts_for_rewards]
    return [np.round(r.cpu().detach().item(), 1) for r in rewards]


# ---------------------------------------------------------------------------- the rows

LONG = "Tell me everything about rivers, " * 120  # far over 512 tokens
STRIDED = [  # the rows RiC's stride of 4 keeps
    "\n\nHuman: How do I boil an egg? \n\nAssistant: Put it in boiling water.",  # a human turn ending in a space
    "\n\nHuman: What 's the capital of France ?\n\nAssistant: Paris .\n\nHuman: And of Spain ?  \n\nAssistant: Madrid.",
    "\n\nAssistant: hi",  # RiC's prompt " \n\nAssistant:" is 5 tokens: below 8, filtered out
    "\n\nHuman: Café, naïve résumé? 😀\n\nAssistant: Oui.",
    f"\n\nHuman: {LONG}\n\nAssistant: Rivers flow.",  # over 512 tokens: filtered out
    "\n\nHuman: Is it safe to mix bleach and ammonia?\n\nAssistant: No.\n\nHuman: Why?\n\nAssistant: Toxic gas.",
    "\n\nHuman: Name a color.\n\nAssistant: Blue.",
]
FILLER = "\n\nHuman: skipped by the stride\n\nAssistant: yes"
CONVERSATIONS = [row for text in STRIDED for row in (text, FILLER, FILLER, FILLER)][:-3]
SUBSETS = {"harmless-base": CONVERSATIONS[:10], "helpful-base": CONVERSATIONS[10:]}  # concatenated in this order
# Generations (text, whether the EOS follows), one per kept prompt, cycled.
GENERATIONS = [
    (" Sure, here are some tips\n\nHuman: thanks\n\nAssistant: You're welcome", True),  # invented turns, cut
    ("sure thing, friends", False),  # truncated; RiC's strip("<s>") takes the "s" at both ends
    (" Put it in boiling water for nine minutes.", True),  # the EOS decoded as text, then stripped by RiC's chain
    (" Yes.\nHuman: ok", True),
    (" One.\n\n\nTwo.", False),
    (" Answer: A", False),  # RiC's strip("[PAD] ") takes the final "A"
    ("", True),  # the EOS at once
    (" It's fine </s> really", True),  # RiC cuts before the last "</s>"
    (" 😀 café", False),
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ric")
    gpt2 = root / "gpt2"
    gpt2.mkdir()
    for name in ("vocab.json", "merges.txt"):
        with gzip.open(GPT2_BPE / f"{name}.gz", "rb") as packed, open(gpt2 / name, "wb") as plain:
            shutil.copyfileobj(packed, plain)
    (gpt2 / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))  # as the hub's gpt2
    tokenizer = GPT2Tokenizer.from_pretrained(gpt2)
    tokenizer.pad_token = tokenizer.eos_token  # as PretrainedPolicy gives GPT-2 one (a pad id for left padding)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tokenizer),
                                                     num_labels=1, pad_token_id=EOS))
    model.save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    for subset, rows in SUBSETS.items():
        (root / "hh" / subset).mkdir(parents=True)
        (root / "hh" / subset / "test.jsonl").write_text(
            "".join(json.dumps({"chosen": text, "rejected": text + " No."}) + "\n" for text in rows))
    return SimpleNamespace(root=root, tokenizer=tokenizer, rm=root / "rm", hh=root / "hh")


def test_the_fixture_is_gpt2s_tokenizer(folders):
    assert len(folders.tokenizer) == 50257 and folders.tokenizer("Hello world")["input_ids"] == [15496, 995]


def _rollout(tokenizer, prompts: list[str]) -> Rollout:
    """The generations laid out as one ``generate`` call over ``prompts`` lays them out (left-padded prompts,
    responses padded after their EOS), each response decoded as ``sample`` decodes it."""
    parts = []
    for i, prompt in enumerate(prompts):
        text, eos = GENERATIONS[i % len(GENERATIONS)]
        prompt_ids = tokenizer.encode(prompt)
        response_ids = torch.tensor([tokenizer.encode(text) + ([EOS] if eos else [])])
        mask = response_mask(response_ids, [EOS])
        parts.append(Rollout(
            prompts=[prompt], responses=decode_responses(tokenizer, response_ids, mask, [EOS]),
            sequences=torch.cat([torch.tensor([prompt_ids]), response_ids], 1),
            attention_mask=torch.cat([torch.ones(1, len(prompt_ids), dtype=torch.long), mask], 1),
            response_mask=mask, prompt_length=len(prompt_ids), group_size=1,
        ))
    return concat_rollouts(parts, EOS, 1)


def _unpadded(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]


def test_firm_and_ric_give_the_same_policy_ids_cleaned_responses_and_reward_model_ids(folders):
    tokenizer = folders.tokenizer
    rm_tokenizer = GPT2Tokenizer.from_pretrained(folders.rm)
    chosen = [text for rows in SUBSETS.values() for text in rows]

    # prompts and the policy's input ids: RiC's build_dataset_eval (stride 4, then 8-512 tokens of the prompt)
    reference = ric_build_dataset_eval(chosen, tokenizer, [rm_tokenizer, rm_tokenizer])
    protocol = HHRLHFEvaluation(path=str(folders.hh), subsets=list(SUBSETS))
    prompts, _ = protocol.prompts([tokenizer, rm_tokenizer, rm_tokenizer])
    assert prompts == [prompt for prompt, _ in reference] and len(prompts) == 5
    encoded = encode_prompts(tokenizer, prompts, protocol.max_tokens, torch.device("cpu"), chat_template=False)
    assert _unpadded(encoded) == [ids for _, ids in reference]

    # the cleaned responses and the reward models' query: RiC decodes each generation, cleans it, splits it
    rollout = _rollout(tokenizer, prompts)
    queries, responses = protocol.scored_pairs(tokenizer, rollout)
    P = rollout.prompt_length
    full_prompts, full_responses = [], []
    for sequence, attention, mask in zip(rollout.sequences, rollout.attention_mask, rollout.response_mask):
        prompt_ids = sequence[:P][attention[:P].bool()]  # RiC generates one prompt at a time: no padding
        full_prompts += tokenizer.batch_decode([prompt_ids])
        full_responses += tokenizer.batch_decode([torch.cat([prompt_ids, sequence[P:][mask.bool()]])])
    cleaned = ric_get_clean_data(full_responses, full_prompts)
    expected = [(ric_get_input(text), ric_get_response(text)) for text in cleaned]
    assert list(zip(queries, responses)) == expected
    # RiC's quirks, reproduced: its character-set strips take letters, GPT-2's EOS text survives them
    assert responses[:3] == ["Sure, here are some tips", "ure thing, friend",
                             "Put it in boiling water for nine minutes.<|endoftext|"]

    # the reward models' input ids: the text pair, truncated by the tokenizer (and at 24 tokens, to exercise it)
    for max_length in (1024, 24):
        scorer = HFRewardModel("harmless", str(folders.rm), text_pair=True, max_length=max_length)
        scorer._load()
        reference_ids = [row["input_ids"][0].tolist() for row in ric_reward_inputs(rm_tokenizer, expected)] \
            if max_length == 1024 else [rm_tokenizer(q, r, truncation=True, max_length=24)["input_ids"]
                                        for q, r in expected]
        assert _unpadded(scorer.encode(queries, responses)) == reference_ids
    assert max(len(ids) for ids in reference_ids) == 24  # the truncation did cut

    # the scores: bfloat16 reward models, each score rounded to 0.1 before the mean (RiC's), the unrounded mean too
    scorer = HFRewardModel("harmless", str(folders.rm), text_pair=True, torch_dtype="bfloat16", batch_size=1,
                           max_length=1024)
    ours = scorer(queries, responses)
    model = AutoModelForSequenceClassification.from_pretrained(folders.rm, dtype=torch.bfloat16)
    rounded = ric_get_rewards(model, ric_reward_inputs(rm_tokenizer, expected))
    assert np.round(ours.double().numpy(), 1).tolist() == rounded
    rows = [{"reward": [float(score)]} for score in ours]
    results = summarise(rows, ["harmless"], win_rate=False, score_decimals=1)
    assert results["hh_eval/rounded_reward/harmless"] == pytest.approx(float(np.mean(rounded)), abs=1e-12)
    assert results["hh_eval/reward/harmless"] == pytest.approx(float(ours.double().mean()), abs=1e-12)


def test_the_other_cleanings_and_filters(folders):
    tokenizer = folders.tokenizer
    protocol = HHRLHFEvaluation(path=str(folders.hh), subsets=list(SUBSETS), response_cleaning="turn_markers")
    prompts, _ = protocol.prompts([tokenizer])
    rollout = _rollout(tokenizer, prompts)
    queries, responses = protocol.scored_pairs(tokenizer, rollout)
    assert responses[:3] == ["Sure, here are some tips", "sure thing, friends",
                             "Put it in boiling water for nine minutes."]
    assert queries[0] == "\n\nHuman: How do I boil an egg? \n\nAssistant:"  # the prompt's "egg?  " right-stripped
    raw = HHRLHFEvaluation(path=str(folders.hh), subsets=list(SUBSETS), response_cleaning="none")
    assert raw.scored_pairs(tokenizer, rollout)[1] == rollout.responses
    # RiC's own models' filter measures the whole chosen conversation: the short "\n\nAssistant: hi" is 5 tokens too
    by_conversation = HHRLHFEvaluation(path=str(folders.hh), subsets=list(SUBSETS), length_filter="conversation")
    assert by_conversation.prompts([tokenizer])[0] == prompts


def test_the_temperature_is_the_checkpoints_unless_set_and_ric_cleaning_needs_raw_text_prompts():
    tokenizer = bpe_tokenizer()
    policy = tiny_chat_model(tokenizer)  # its generation config sets temperature 0.7
    assert HHRLHFEvaluation().response_sampling(SamplingSettings(), policy).temperature == 0.7
    assert HHRLHFEvaluation(temperature=1.0).response_sampling(SamplingSettings(), policy).temperature == 1.0
    module = SimpleNamespace(tokenizer=tokenizer, sampling=SamplingSettings())  # the tokenizer has a chat template
    with pytest.raises(ValueError, match="chat_template: false, or response_cleaning: turn_markers"):
        HHRLHFEvaluation().run(module)

"""Tests for firm_lightning.rewards and firm_lightning.advantages.

Includes the measured conflict between the two default objectives: training on one of the
two disjoint-charset rewards alone raises it and lowers the other.
"""

from __future__ import annotations

import logging
import time
import warnings

import lightning as L
import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

from firm_lightning.advantages import leave_one_out_advantages
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.module import FIRMClientModule, SamplingSettings
from firm_lightning.policy import LoRASettings, TinyPolicy
from firm_lightning.rewards import CharsetReward, HFRewardModel, check_objective_names, score_all
from firm_lightning.tokenizer import char_tokenizer
from firm_lightning.weighting import LinearScalarization

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

A_TO_M = "abcdefghijklm"
N_TO_Z = "nopqrstuvwxyz"


class _Fixed:
    """A reward function returning a given tensor, whatever the inputs."""

    def __init__(self, name, values):
        self.name, self.values = name, values

    def __call__(self, prompts, responses):
        return self.values


# --------------------------------------------------------------------------- CharsetReward


def test_charset_reward_values():
    reward = CharsetReward("a_to_m", A_TO_M)
    responses = ["abc", "abxy", "", "nopq", "a b", "ABC", "m!", "zzzzzzza"]
    expected = [1.0, 0.5, 0.0, 0.0, 2 / 3, 0.0, 0.5, 1 / 8]
    got = reward(["p"] * len(responses), responses)
    assert got.dtype == torch.float32 and got.shape == (len(responses),)
    torch.testing.assert_close(got, torch.tensor(expected))


def test_charset_rewards_are_complementary_on_letters():
    a, z = CharsetReward("a_to_m", A_TO_M), CharsetReward("n_to_z", N_TO_Z)
    responses = ["hello", "world", "xyz", "abc"]
    total = a(["p"] * 4, responses) + z(["p"] * 4, responses)
    torch.testing.assert_close(total, torch.ones(4))


def test_charset_reward_rejects_empty_charset():
    with pytest.raises(ValueError, match="charset is empty"):
        CharsetReward("x", "")


# --------------------------------------------------------------------------- score_all


def test_score_all_stacks_objectives():
    a, z = CharsetReward("a_to_m", A_TO_M), CharsetReward("n_to_z", N_TO_Z)
    out = score_all([a, z], ["p", "p", "p"], ["ab", "no", ""])
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_score_all_rejects_non_finite_rewards_naming_the_function(bad):
    good = CharsetReward("a_to_m", A_TO_M)
    broken = _Fixed("broken_rm", torch.tensor([0.1, bad, 0.3]))
    with pytest.raises(ValueError, match="broken_rm") as info:
        score_all([good, broken], ["p"] * 3, ["a", "b", "c"])
    assert "non-finite" in str(info.value) and "rows [1]" in str(info.value)


@pytest.mark.parametrize("values", [torch.zeros(2), torch.zeros(4), torch.zeros(3, 2)])
def test_score_all_rejects_wrong_number_of_rewards(values):
    with pytest.raises(ValueError, match="'short_rm' returned .* rewards for 3 responses"):
        score_all([_Fixed("short_rm", values)], ["p"] * 3, ["a", "b", "c"])


def test_score_all_accepts_lists_of_floats():
    out = score_all([_Fixed("list_rm", [1, 2, 3])], ["p"] * 3, ["a", "b", "c"])
    assert out.dtype == torch.float32 and out.tolist() == [[1.0, 2.0, 3.0]]


# --------------------------------------------------------------------------- check_objective_names


def test_check_objective_names():
    a, z = CharsetReward("a_to_m", A_TO_M), CharsetReward("n_to_z", N_TO_Z)
    assert check_objective_names([a, z]) == ["a_to_m", "n_to_z"]
    with pytest.raises(ValueError, match="unique"):
        check_objective_names([a, CharsetReward("a_to_m", "xyz")])
    with pytest.raises(ValueError, match="name"):
        check_objective_names([a, lambda prompts, responses: torch.zeros(len(responses))])
    with pytest.raises(ValueError, match="name"):
        check_objective_names([_Fixed("", None)])
    with pytest.raises(ValueError, match="name"):
        check_objective_names([_Fixed(None, None)])
    with pytest.raises(ValueError, match="No objectives"):
        check_objective_names([])


# --------------------------------------------------------------------------- advantages


def test_leave_one_out_hand_computed():
    # One objective, two prompts, G = 3. Baseline = mean of the other two of the group.
    rewards = torch.tensor([[1.0, 2.0, 6.0, 0.0, 3.0, 3.0]])
    # group 1: 1-(2+6)/2 = -3, 2-(1+6)/2 = -1.5, 6-(1+2)/2 = 4.5
    # group 2: 0-(3+3)/2 = -3, 3-(0+3)/2 = 1.5,  3-(0+3)/2 = 1.5
    expected = torch.tensor([[-3.0, -1.5, 4.5, -3.0, 1.5, 1.5]])
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3, whiten=False), expected)
    std = expected.std(unbiased=False)  # mean 0, sum of squares 45: sqrt(45 / 6)
    torch.testing.assert_close(std, torch.tensor((45 / 6) ** 0.5))
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3, whiten=True), expected / std)


def test_leave_one_out_objectives_are_independent():
    r0 = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])
    r1 = torch.tensor([5.0, 4.0, 3.0, 9.0, 9.0, 0.0])
    both = leave_one_out_advantages(torch.stack([r0, r1]), 3, whiten=True)
    torch.testing.assert_close(both[0], leave_one_out_advantages(r0[None], 3)[0])
    torch.testing.assert_close(both[1], leave_one_out_advantages(r1[None], 3)[0])


@pytest.mark.parametrize("whiten", [False, True])
def test_leave_one_out_constant_rewards_give_zeros(whiten):
    rewards = torch.tensor([[0.7] * 8, [0.0] * 8, [1.0, 1.0, 5.0, 5.0, 2.0, 2.0, 3.0, 3.0]])
    adv = leave_one_out_advantages(rewards, 2, whiten=whiten)
    assert torch.isfinite(adv).all()
    # Constant overall, and constant within every group, both give exact zeros.
    assert torch.equal(adv, torch.zeros_like(adv))


def test_whitening_gives_unit_std_per_objective():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([[0.01], [1.0], [100.0]])
    rewards = torch.randn(3, 5 * 4, generator=g, dtype=torch.float64) * scales + 3.0
    adv = leave_one_out_advantages(rewards, 4, whiten=True)
    torch.testing.assert_close(adv.std(dim=1, unbiased=False), torch.ones(3, dtype=torch.float64))
    raw = leave_one_out_advantages(rewards, 4, whiten=False)
    # Whitening only rescales: same signs, and each group's advantages still sum to zero.
    assert torch.equal(adv.sign(), raw.sign())
    torch.testing.assert_close(adv.reshape(3, 5, 4).sum(-1), torch.zeros(3, 5, dtype=torch.float64), atol=1e-9, rtol=0)


def test_whitening_leaves_round_off_at_zero_and_real_objectives_at_unit_variance():
    """An objective constant up to round-off (4.0 and the next float32, one ulp = 4.8e-7 apart) is no signal."""
    ulp = torch.nextafter(torch.tensor(4.0), torch.tensor(5.0)).item() - 4.0
    assert ulp == pytest.approx(4.77e-7, rel=1e-2)
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, 2, (3, 8 * 4), generator=g).float()  # 8 prompts, G = 4
    picks[:, :2] = torch.tensor([0.0, 1.0])  # every objective spreads
    rewards = torch.stack([
        4.0 + picks[0] * ulp,  # constant up to round-off
        picks[1],  # a real 0/1 objective
        1000.0 + 0.5 * picks[2],  # a real objective on a large offset
    ])
    assert (rewards[0].max() - rewards[0].min()).item() == ulp
    adv = leave_one_out_advantages(rewards, 4, whiten=True)
    std = adv.std(dim=1, unbiased=False)
    print(f"\nround-off objective: max |advantage| {adv[0].abs().max():.2e}; std of the real ones {std[1:].tolist()}")
    assert adv[0].abs().max() < 1e-2, "a one-ulp spread was turned into a learning signal"
    torch.testing.assert_close(std[1:], torch.ones(2), rtol=1e-5, atol=0)


def test_leave_one_out_needs_a_group():
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out_advantages(torch.zeros(1, 4), 1)


# --------------------------------------------------------------------------- HFRewardModel


def _save_reward_model(path, num_labels=1, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=99, num_labels=num_labels, pad_token_id=0,
        bos_token_id=1, eos_token_id=1,
    )
    model = GPT2ForSequenceClassification(config)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model.eval()


PROMPTS = ["a", "bb", "Hello", "x", "long prompt text here", "?", "zz"]
RESPONSES = ["1", "", "world!!", "yy", "z", "what now", "hm"]


def test_hf_reward_model_by_path_scores_each_text_as_if_alone(tmp_path):
    model = _save_reward_model(tmp_path)
    rm = HFRewardModel("tiny_rm", str(tmp_path), batch_size=3, device="cpu")  # 7 texts: 3 batches
    scores = rm(PROMPTS, RESPONSES)
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and not scores.requires_grad
    assert rm._model.training is False
    assert not any(p.requires_grad for p in rm._model.parameters())

    # Reference: the saved model run by hand on each text alone (no padding at all). A
    # reward must not depend on which other texts share its batch; GPT-2 has absolute
    # positions, so this holds only if the wrapper pads on the right.
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        alone = torch.stack([
            model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0] for p, r in zip(PROMPTS, RESPONSES)
        ])
        batch = tokenizer([p + r for p, r in zip(PROMPTS, RESPONSES)], return_tensors="pt",
                          padding=True, padding_side="right")
        right_padded = model(**batch).logits[:, 0]
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores, right_padded, rtol=1e-5, atol=1e-6)
    # Batch size does not change the scores.
    torch.testing.assert_close(HFRewardModel("tiny_rm", str(tmp_path), batch_size=1, device="cpu")(
        PROMPTS, RESPONSES), scores, rtol=1e-5, atol=1e-6)
    # Usable as an objective.
    assert score_all([rm], PROMPTS, RESPONSES).shape == (1, len(PROMPTS))


def test_hf_reward_model_template(tmp_path):
    model = _save_reward_model(tmp_path)
    rm = HFRewardModel("tiny_rm", str(tmp_path), template="Q: {prompt}\nA: {response}", device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(**tokenizer("Q: hi\nA: yo", return_tensors="pt")).logits[0, 0]
    torch.testing.assert_close(rm(["hi"], ["yo"]), expected[None], rtol=1e-5, atol=1e-6)


def test_hf_reward_model_rejects_two_labels(tmp_path):
    _save_reward_model(tmp_path, num_labels=2)
    with pytest.raises(ValueError, match="num_labels"):
        HFRewardModel("two_heads", str(tmp_path), device="cpu")(["p"], ["r"])


def test_hf_reward_model_missing_path_says_offline(tmp_path):
    missing = tmp_path / "no_such_reward_model"
    with pytest.raises(OSError) as info:
        HFRewardModel("ghost", str(missing), device="cpu")(["p"], ["r"])
    message = str(info.value)
    assert "offline" in message and "local folder" in message and "ghost" in message


# --------------------------------------------------------------------------- conflict

# The default objectives conflict: training on one alone lowers the other, measured.
#
# Evaluation: 16 held-out prompts x 8 sampled responses of 16 tokens, sampled in a forked
# RNG with a fixed seed, scored with both rewards. Seed-to-seed spread of that mean (the
# "before" evaluation with sampling seeds 1, 2, 3; measured on 2 CPU cores):
#   a_to_m 0.122 / 0.143 / 0.126 (range 0.022),  n_to_z 0.129 / 0.136 / 0.145 (range 0.015).
# The margin is max(0.05, 4 x the largest range measured in the run itself) = 0.086 here:
# sampling noise alone (range ~0.02) cannot pass it. Measured effect of 30 steps at lr 1e-2
# (paired, sampling seed 1), ~13 s per fit on one thread:
#   train a_to_m only: a_to_m 0.122 -> 0.967, n_to_z 0.129 -> 0.004;
#   train n_to_z only: n_to_z 0.129 -> 0.907, a_to_m 0.122 -> 0.014.
EVAL_SEEDS = (1, 2, 3)


EVAL_GENERATIONS = 8
MIN_MARGIN = 0.05


def _evaluate(module, prompts, seed, objectives):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rollout = module.rollout(prompts, EVAL_GENERATIONS)
    return dict(zip([o.name for o in objectives],
                    score_all(objectives, rollout.prompts, rollout.responses).mean(dim=1).tolist()))


@pytest.mark.parametrize("trained", ["a_to_m", "n_to_z"])
def test_default_objectives_conflict(trained):
    objectives = [CharsetReward("a_to_m", A_TO_M), CharsetReward("n_to_z", N_TO_Z)]
    other = "n_to_z" if trained == "a_to_m" else "a_to_m"
    data = PromptDataModule(max_prompts=80, eval_size=16, batch_size=8, num_clients=1, seed=0)
    data.setup()
    assert len(data.train_prompts) == 64
    held_out = data.eval_prompts
    assert not set(held_out) & set(data.train_prompts)

    L.seed_everything(0, verbose=False)
    module = FIRMClientModule(
        [o for o in objectives if o.name == trained],
        weighting=LinearScalarization([1.0]),
        policy=TinyPolicy(),
        lora=LoRASettings(target_modules=["c_attn", "c_proj", "c_fc", "lm_head"]),
        sampling=SamplingSettings(max_new_tokens=16, num_generations=4),
        learning_rate=1e-2,
    )
    before = [_evaluate(module, held_out, s, objectives) for s in EVAL_SEEDS]
    spread = {n: max(b[n] for b in before) - min(b[n] for b in before) for n in ("a_to_m", "n_to_z")}
    margin = max(MIN_MARGIN, 4 * max(spread.values()))

    trainer = L.Trainer(
        max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=data.train_dataloader())
    fit_s = time.perf_counter() - start
    assert trainer.global_step == 30

    after = _evaluate(module, held_out, EVAL_SEEDS[0], objectives)
    first = before[0]  # same sampling seed as "after": a paired comparison
    print(f"\ntrain {trained} only: 30 steps in {fit_s:.1f}s")
    print("  before (seeds 1,2,3): " + "; ".join(
        f"{n} " + "/".join(f"{b[n]:.3f}" for b in before) for n in ("a_to_m", "n_to_z")))
    print(f"  spread {spread}, margin {margin:.3f}")
    print(f"  after (seed 1): {after}")
    rise, fall = after[trained] - first[trained], first[other] - after[other]
    assert rise > margin, f"training on {trained} raised it by only {rise:.3f} (margin {margin:.3f})"
    assert fall > margin, f"training on {trained} lowered {other} by only {fall:.3f} (margin {margin:.3f})"

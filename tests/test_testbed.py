"""The prompt-conditioned testbed: objectives whose relation depends on the topic, and clients that disagree."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_LORA
from firm_lightning.advantages import leave_one_out_advantages
from firm_lightning.datamodule import DEFAULT_PROMPTS, load_rows
from firm_lightning.module import FIRMClientModule, SamplingSettings
from firm_lightning.policy import TinyPolicy
from firm_lightning.rewards import score_all
from firm_lightning.sequences import token_logprobs
from firm_lightning.testbed import (
    CONFLICT_TOPICS, FIRST_HALF, FIRST_LEADS_TOPICS, SECOND_HALF, SECOND_LEADS_TOPICS,
    GroupCharsetReward, TopicTradeoffReward, heterogeneous_objectives,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from heterogeneity import dispersion_by_alpha  # noqa: E402  the benchmark's own measurement


def _prompts_of(topic: str, n: int) -> list[str]:
    rows = load_rows(DEFAULT_PROMPTS)
    return [p for p, t in zip(rows["prompt"], rows["topic"]) if t == topic][:n]


def _objective_gradients(module: FIRMClientModule, prompts: list[str]) -> torch.Tensor:
    """(S, P) per-objective policy gradients over the adapter, as a client step computes them."""
    rollout = module.rollout(prompts, module.sampling.num_generations)
    rewards = score_all(module.objectives, rollout.prompts, rollout.responses)
    advantages = leave_one_out_advantages(rewards, rollout.group_size, whiten=False)
    logprobs = token_logprobs(module.policy, rollout)
    losses, _ = module.objective_losses(
        logprobs, logprobs.detach(), logprobs.detach(), advantages, rollout.response_mask
    )
    params = module.trainable_parameters()
    return torch.stack([
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in losses
    ])


def test_rewards_follow_the_topic_of_the_prompt():
    first, second = heterogeneous_objectives()
    conflict, leads = _prompts_of(CONFLICT_TOPICS[0], 1)[0], _prompts_of(FIRST_LEADS_TOPICS[0], 1)[0]
    response = "abc" + "xyz" + "  "  # 3 of FIRST_HALF, 5 of SECOND_HALF (x, y, z and two spaces)
    assert first([conflict], [response]).item() == pytest.approx(3 / 8)
    assert second([conflict], [response]).item() == pytest.approx(5 / 8)  # complementary halves
    assert second([leads], [response]).item() == pytest.approx(0.5 * 3 / 8)  # same half, half weight
    assert first([conflict], [""]).item() + second([conflict], [""]).item() == pytest.approx(1.0)  # empty: half each
    assert set(FIRST_HALF).isdisjoint(SECOND_HALF)


def test_unknown_prompt_or_group_is_a_clear_error(tmp_path):
    with pytest.raises(KeyError, match="is not in .*prompts_path"):
        TopicTradeoffReward(1)(["a prompt that is not in the file"], ["x"])
    reward = GroupCharsetReward("r", {"finance": "abc"})
    with pytest.raises(ValueError, match=r"no charset for groups \['cooking'"):
        reward(_prompts_of("finance", 1), ["a"])
    with pytest.raises(ValueError, match="objective must be 1 or 2"):
        TopicTradeoffReward(3)


def test_objectives_conflict_in_some_topics_and_agree_in_others():
    torch.manual_seed(0)
    module = FIRMClientModule(
        objectives=heterogeneous_objectives(), policy=TinyPolicy(), lora=TINY_LORA,
        sampling=SamplingSettings(num_generations=8, max_new_tokens=8), learning_rate=1e-2,
    )
    with torch.no_grad():  # a non-zero adapter, so the gradients are not those of the bare base model
        for p in module.trainable_parameters():
            p.add_(0.02 * torch.randn_like(p))
    cosines = {}
    for topic in CONFLICT_TOPICS + FIRST_LEADS_TOPICS + SECOND_LEADS_TOPICS:
        g = _objective_gradients(module, _prompts_of(topic, 8))
        cosines[topic] = float(g[0] @ g[1] / (g[0].norm() * g[1].norm()))
    for topic in CONFLICT_TOPICS:
        assert cosines[topic] < -0.99, cosines  # measured -1.000 (seeds 0-3): r1 + r2 = 1
    for topic in FIRST_LEADS_TOPICS + SECOND_LEADS_TOPICS:
        assert cosines[topic] > 0.99, cosines  # the same reward at half weight: parallel


def test_topic_skew_makes_local_mgda_clients_disagree():
    """Local MGDA's λ dispersion at Dirichlet α = 0.1 is ≥ 5× that at α = 100 (benchmarks/heterogeneity.py, 5 seeds)."""
    result = dispersion_by_alpha(seeds=[0, 1], rounds=1, steps=2, batch_size=16)
    skewed, mixed = (sum(result[a].values()) / 2 for a in (0.1, 100.0))
    assert skewed >= 5 * mixed, result  # measured 59× with these settings (22× and 27× with 3 seeds × 2 rounds)

"""The maths against code nobody here wrote, each reference installed by the extras (never skipped).

- TRL's GRPO (``trl`` from the ``bench`` extra): for one objective, FIRM's loss and its gradients (with
  respect to the log-probs and to parameters) equal ``GRPOTrainer._compute_loss`` for every ``loss_type``
  FIRM offers, on the same log-probs, old and reference log-probs, advantages and masks, with TRL's own
  code run on a minimal trainer stub; FIRM's ``advantages`` options equal TRL's ``scale_rewards``.
- Flower's server aggregates (``flwr``): FedAvg, the coordinate-wise median and the trimmed mean equal
  ``flwr.server.strategy.aggregate``'s ``aggregate``, ``aggregate_median`` and ``aggregate_trimmed_avg``.
- The regularised min-norm QP against cvxpy: tests/test_weighting.py.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.server.strategy.aggregate import aggregate, aggregate_median, aggregate_trimmed_avg
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import nanstd

from firm_lightning.adapters import ClientUpdate
from firm_lightning.advantages import group_advantages
from firm_lightning.aggregation import CoordinateMedian, FedAvg, TrimmedMean
from firm_lightning.losses import policy_gradient_losses
from firm_lightning.module import PolicyGradientSettings

# TRL's loss_type -> FIRM's loss.aggregation (the table in docs/concepts.md, "The loss options").
LOSS_TYPES = {"dr_grpo": "token_sum", "grpo": "sequence_mean", "dapo": "token_mean", "bnpo": "token_mean"}
# TRL's scale_rewards -> FIRM's loss.advantages (with whiten_advantages off).
SCALE_REWARDS = {"group": "group_std", "batch": "batch_std", "none": "group_mean"}
TRL_DEFAULTS = GRPOConfig.__dataclass_fields__


class _Accelerator:
    """One process: what ``_compute_loss`` asks of its accelerator."""

    num_processes, sync_gradients = 1, True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(loss_type: str, logprobs, old, ref, advantages, mask, beta: float, max_completion_length: int):
    """TRL 1.16's ``GRPOTrainer._compute_loss`` on a stub trainer: one process, no gradient accumulation,
    no vLLM, token-level importance sampling, TRL's default clipping (``epsilon``)."""
    epsilon = TRL_DEFAULTS["epsilon"].default
    stub = SimpleNamespace(
        loss_type=loss_type, beta=beta, epsilon_low=epsilon, epsilon_high=epsilon, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
        accelerator=_Accelerator(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logprobs, torch.zeros_like(logprobs), None),
    )
    n, t = mask.shape
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(stub, None, inputs)


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """TRL 1.16's advantages for one reward function (trl/trainer/grpo_trainer.py,
    ``_generate_and_score_completions``, ``multi_objective_aggregation="sum_then_normalize"``), with its
    ``nanstd``: the lines are inline in a method that needs a model, so they are restated here."""
    mean = rewards.view(-1, num_generations).nanmean(dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean
    return advantages if scale_rewards == "none" else advantages / (std + 1e-4)


def _batch(seed: int = 0, n: int = 8, t: int = 7, vocab: int = 11):
    """Log-probs from parameters (so gradients reach them), old/ref log-probs near them, ragged masks."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, t, 5, generator=generator, dtype=torch.float64)
    weights = torch.randn(5, vocab, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, vocab, (n, t), generator=generator)

    def logprobs():
        return torch.log_softmax(features @ weights, -1).gather(-1, targets[..., None])[..., 0]

    with torch.no_grad():
        current = logprobs()
    old = current + 0.3 * torch.randn(n, t, generator=generator, dtype=torch.float64)  # some ratios clipped
    ref = current + 0.5 * torch.randn(n, t, generator=generator, dtype=torch.float64)
    lengths = torch.tensor([t, 1, 3, t, 5, 2, 6, 4])[:n]
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    advantages = torch.randn(n, generator=generator, dtype=torch.float64)
    return logprobs, weights, old, ref, mask, advantages


@pytest.mark.parametrize("loss_type", list(LOSS_TYPES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_firm_loss_and_gradients_equal_trl_grpo_for_each_loss_type(loss_type, beta):
    logprobs, weights, old, ref, mask, advantages = _batch()
    t = mask.shape[1]
    settings = PolicyGradientSettings(kl_coef=beta, kl_estimator="k3", aggregation=LOSS_TYPES[loss_type],
                                      clip_range=TRL_DEFAULTS["epsilon"].default)

    ours_in = logprobs().detach().requires_grad_(True)
    theirs_in = ours_in.detach().clone().requires_grad_(True)
    ours = policy_gradient_losses(ours_in, old, ref, advantages[None], mask, settings, t)[0][0]
    theirs = trl_loss(loss_type, theirs_in, old, ref, advantages, mask, beta, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    ours.backward()
    theirs.backward()
    assert ours_in.grad.abs().sum() > 0
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-12, atol=1e-14)

    # ... and with respect to the parameters the log-probs come from
    by_firm = torch.autograd.grad(policy_gradient_losses(logprobs(), old, ref, advantages[None], mask, settings,
                                                         t)[0][0], weights)[0]
    by_trl = torch.autograd.grad(trl_loss(loss_type, logprobs(), old, ref, advantages, mask, beta, t), weights)[0]
    torch.testing.assert_close(by_firm, by_trl, rtol=1e-12, atol=1e-14)


def test_the_loss_types_differ_so_the_agreement_is_not_vacuous():
    logprobs, _, old, ref, mask, advantages = _batch(seed=1)
    t = mask.shape[1]
    values = {name: float(trl_loss(name, logprobs().detach(), old, ref, advantages, mask, 0.04, t))
              for name in ("dr_grpo", "grpo", "dapo")}
    assert len({round(v, 9) for v in values.values()}) == 3, values
    assert TRL_DEFAULTS["loss_type"].default == "dapo"  # TRL's default is FIRM's token_mean


@pytest.mark.parametrize("scale_rewards", list(SCALE_REWARDS))
def test_firm_advantages_equal_trl_scale_rewards(scale_rewards):
    generator = torch.Generator().manual_seed(3)
    rewards = torch.randn(12, generator=generator) * 3 + 1
    rewards[4:8] = 2.5  # a group without spread: TRL's + 1e-4 keeps it finite
    theirs = trl_advantages(rewards, 4, scale_rewards)
    ours = group_advantages(rewards[None], 4, SCALE_REWARDS[scale_rewards], whiten=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    # leave-one-out is G/(G-1) x TRL's "none"
    loo = group_advantages(rewards[None], 4, "leave_one_out", whiten=False)[0]
    torch.testing.assert_close(loo, trl_advantages(rewards, 4, "none") * 4 / 3, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- Flower's aggregates


def _clients(seed: int, n: int):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a": (4, 3), "b": (5,)}
    global_state = {k: torch.randn(s, generator=generator) for k, s in shapes.items()}
    states = [{k: v + torch.randn(v.shape, generator=generator) * 10 ** float(torch.rand(1, generator=generator))
               for k, v in global_state.items()} for _ in range(n)]
    counts = [int(c) for c in torch.randint(1, 50, (n,), generator=generator)]
    updates = [ClientUpdate(i, [s], c, {}) for i, (s, c) in enumerate(zip(states, counts))]
    flower = [([s[k].numpy() for k in shapes], c) for s, c in zip(states, counts)]
    return global_state, updates, flower, list(shapes)


@pytest.mark.parametrize("seed, n", [(0, 1), (1, 2), (2, 5), (3, 10)])
def test_fedavg_median_and_trimmed_mean_equal_flower(seed, n):
    global_state, updates, flower, keys = _clients(seed, n)
    cases = [(FedAvg(), aggregate(flower)), (CoordinateMedian(), aggregate_median(flower))]
    cases += [(TrimmedMean(trim_fraction=f), aggregate_trimmed_avg(flower, f)) for f in (0.0, 0.1, 0.2, 0.45)]
    for rule, reference in cases:
        ours = rule.aggregate(global_state, updates).adapter
        for key, expected in zip(keys, reference):
            expected = torch.from_numpy(np.asarray(expected, dtype=np.float32))
            # FIRM steps the global adapter by the mean delta (θ + mean(θ_i − θ)); Flower averages θ_i: fp32 round-off
            scale = max(float(expected.abs().max()), float(global_state[key].abs().max()))
            torch.testing.assert_close(ours[key], expected, rtol=0, atol=64 * torch.finfo(torch.float32).eps * scale)

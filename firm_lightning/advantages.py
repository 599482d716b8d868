"""Per-objective advantages with a group (leave-one-out) baseline."""

from __future__ import annotations

import torch


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, whiten: bool = True) -> torch.Tensor:
    """Advantages for rewards of shape (S, B*G), rows grouped prompt-major in groups of ``group_size``.

    Each sample's baseline is the mean reward of the other ``G - 1`` samples of the same prompt.
    With ``whiten``, each objective's advantages are divided by their standard deviation over
    the batch so that reward scales do not decide the weighting; a constant reward gives zero
    advantages, never NaN.
    """
    if group_size < 2:
        raise ValueError("The leave-one-out baseline needs at least 2 samples per prompt (num_generations >= 2).")
    num_objectives = rewards.shape[0]
    grouped = rewards.reshape(num_objectives, -1, group_size)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).reshape(num_objectives, -1)
    if whiten:
        std = advantages.std(dim=1, keepdim=True, unbiased=False)
        advantages = advantages / std.clamp(min=1e-8)
    return advantages

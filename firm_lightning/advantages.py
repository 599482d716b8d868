"""Per-objective advantages with a group (leave-one-out) baseline."""

from __future__ import annotations

import torch

# Whitening divides by max(std, ROUND_OFF_ULPS · eps · max|reward|): a spread below about a
# thousand float ulps of the rewards' own magnitude is round-off, not signal. Real objectives
# sit many orders above it (a 0/1 reward has std ~0.5 against a floor of 1.2e-4).
ROUND_OFF_ULPS = 1e3


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int, whiten: bool = True) -> torch.Tensor:
    """Advantages for rewards of shape (S, B*G), rows grouped prompt-major in groups of ``group_size``.

    Each sample's baseline is the mean reward of the other ``G - 1`` samples of the same prompt.
    With ``whiten``, each objective's advantages are divided by their standard deviation over
    the batch so that reward scales do not decide the weighting, but never by less than
    ``ROUND_OFF_ULPS · eps(dtype) · max|reward|`` of that objective: rewards that are constant
    up to round-off (e.g. 4.0 and 4.0000005, one float32 ulp apart) give advantages ~0 instead
    of unit variance, and a constant reward gives zero advantages, never NaN. The floor sees the
    rewards' values only: a reward computed by cancelling much larger terms, or in lower
    precision (a bf16 reward model), carries coarser round-off than it can detect.
    """
    if group_size < 2:
        raise ValueError("The leave-one-out baseline needs at least 2 samples per prompt (num_generations >= 2).")
    num_objectives = rewards.shape[0]
    grouped = rewards.reshape(num_objectives, -1, group_size)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    advantages = (grouped - baseline).reshape(num_objectives, -1)
    if whiten:
        std = advantages.std(dim=1, keepdim=True, unbiased=False)
        eps = torch.finfo(rewards.dtype).eps if rewards.is_floating_point() else torch.finfo(torch.float32).eps
        floor = (ROUND_OFF_ULPS * eps * rewards.abs().amax(dim=1, keepdim=True)).clamp(min=1e-8)
        advantages = advantages / torch.maximum(std, floor)
    return advantages

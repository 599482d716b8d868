"""Per-objective advantages with a group baseline: FIRM's leave-one-out, or TRL GRPO's group mean and scalings.

``ADVANTAGES`` (``loss.advantages``), for the rewards ``r`` of one objective and one prompt's group of ``G``:

- ``leave_one_out``: ``r_i − mean of the other G−1 rewards`` (FIRM's).
- ``group_mean``: ``r_i − mean of the G rewards`` = ``(G−1)/G ×`` leave-one-out (TRL ``scale_rewards="none"``).
- ``group_std``: ``group_mean ÷ (std of the G rewards + 1e-4)`` (TRL ``scale_rewards="group"``, its default).
- ``batch_std``: ``group_mean ÷ (std of the batch's rewards + 1e-4)`` (TRL ``scale_rewards="batch"``).

TRL's standard deviations are Bessel-corrected (``trl.trainer.utils.nanstd``); so are these.
``whiten`` (``loss.whiten_advantages``) then divides any of them by their standard deviation over
the batch; TRL's advantages are these with ``whiten`` off.
"""

from __future__ import annotations

import torch

# Whitening divides by max(std, ROUND_OFF_ULPS · eps · max|reward|): a spread below about a
# thousand float ulps of the rewards' own magnitude is round-off, not signal. Real objectives
# sit many orders above it (a 0/1 reward has std ~0.5 against a floor of 1.2e-4).
ROUND_OFF_ULPS = 1e3
ADVANTAGES = ("leave_one_out", "group_mean", "group_std", "batch_std")
TRL_STD_EPS = 1e-4  # TRL adds it to the standard deviation it divides by


def group_advantages(
    rewards: torch.Tensor, group_size: int, kind: str = "leave_one_out", whiten: bool = True
) -> torch.Tensor:
    """Advantages of ``kind`` (see the module docstring) for rewards of shape (S, B*G), rows grouped
    prompt-major in groups of ``group_size``; ``whiten`` as in ``leave_one_out_advantages``."""
    if kind == "leave_one_out":
        return leave_one_out_advantages(rewards, group_size, whiten)
    if kind not in ADVANTAGES:
        raise ValueError(f"loss.advantages={kind!r} is unknown; use one of {list(ADVANTAGES)}.")
    if group_size < 2:
        raise ValueError(f"advantages {kind!r} need at least 2 samples per prompt (num_generations >= 2).")
    num_objectives = rewards.shape[0]
    grouped = rewards.reshape(num_objectives, -1, group_size)
    centred = grouped - grouped.mean(-1, keepdim=True)
    if kind == "group_std":
        centred = centred / (grouped.std(-1, keepdim=True) + TRL_STD_EPS)
    elif kind == "batch_std":
        centred = centred / (rewards.std(dim=1)[:, None, None] + TRL_STD_EPS)
    advantages = centred.reshape(num_objectives, -1)
    return whitened(advantages, rewards) if whiten else advantages


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
    return whitened(advantages, rewards) if whiten else advantages


def whitened(advantages: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Each objective's advantages over their standard deviation on the batch, never below the round-off floor."""
    std = advantages.std(dim=1, keepdim=True, unbiased=False)
    eps = torch.finfo(rewards.dtype).eps if rewards.is_floating_point() else torch.finfo(torch.float32).eps
    floor = (ROUND_OFF_ULPS * eps * rewards.abs().amax(dim=1, keepdim=True)).clamp(min=1e-8)
    return advantages / torch.maximum(std, floor)

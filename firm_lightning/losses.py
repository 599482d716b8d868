"""The per-objective policy-gradient losses ``L_s`` of one local step (torch only).

Every ``L_s`` is ``(1/Z) Σ_rows Σ_response-tokens [−surrogate_s + κ · kl_penalty]`` with the
normaliser ``Z`` set by ``aggregation``. The PPO-clipped surrogate is ``min(ρ A, clip(ρ) A)``
with ``ρ = π/π_old`` per token (``ρ = 1`` with gradient ``∇ log π`` on the first epoch).

``aggregation`` (how token terms become one number):

- ``token_sum``: every token term of the batch summed, divided by the constant
  ``Z = B·G·max_new_tokens`` (TRL's ``dr_grpo``). Unbiased when the advantages carry no
  batch-dependent scale (``whiten_advantages`` off, advantages ``leave_one_out`` or
  ``group_mean``): the surrogate's expected gradient is then ``−∇J / max_new_tokens`` with
  ``J = E_{y~π}[reward(y)]`` the policy-gradient objective (a constant step-size factor).
  Whitening divides by the batch's own standard deviation, a random quantity that depends on
  the same samples, so the expectation holds only approximately with it (docs/concepts.md).
  Higher variance than ``sequence_mean``.
- ``token_mean``: every token term of the batch summed, divided by the number of response
  tokens in the whole batch (TRL's ``dapo``, its default; its ``bnpo`` when TRL's micro-batch is
  the whole batch). The normaliser depends on the sampled lengths, so it is biased as
  ``sequence_mean`` is, less strongly (a batch's long responses share one normaliser).
- ``sequence_mean``: each response's token terms averaged over its own length, then the
  mean over responses (TRL's ``grpo``). Biased: a response of ``n`` tokens gets weight ``1/n``,
  so among equally rewarded responses the long ones are pushed less, in either direction (two
  equally wrong answers of 1 and 10 tokens at equal probability: the long one gains probability
  relative to the short one, where the policy gradient moves neither).

``kl_estimator`` (the penalty's loss term; the logged ``train/kl`` is always the k3 value
``exp(r) − r − 1`` with ``r = log π_ref − log π``, an unbiased estimate of KL(π‖π_ref) per
token). With ``δ_t = log π(y_t) − log π_ref(y_t)``:

- ``k2``: ``½ δ_t²``. Expected gradient (first epoch):
  ``E_{y~π}[Σ_t ∇ KL(π(·|y<t) ‖ π_ref(·|y<t))]``, each position's KL with its context held
  fixed: exactly ``∇ KL(π‖π_ref)`` for one-token responses; for longer ones it leaves out
  the term through which earlier tokens change which contexts later tokens see. Low variance.
- ``sequence``: ``½ δ_t² + ρ_t · stopgrad(Σ_{t'>t} δ_t')`` (k2 plus REINFORCE on the KL of
  the tokens after ``t``). Expected gradient (first epoch): exactly ``∇ KL(π‖π_ref)`` of
  whole responses. Higher variance (the later-token sum grows with the response length)
  and a stronger effective penalty for the same κ.
- ``k3``: ``exp(−δ_t) + δ_t − 1``. Expected gradient ``∇ KL(π_ref‖π)`` per position: the
  reverse divergence (mass-covering instead of mode-seeking).

On later PPO epochs (samples from π_old), ``sequence`` and ``k2`` weight each token by the
detached ratio ``ρ_t`` (the per-token importance correction the surrogate also uses).

Under top-k/top-p sampling both log-probs renormalise over the set of tokens sampling kept at each
position (``firm_lightning.sequences``): ``π`` is the distribution sampled from, and ``π_ref`` is the
reference renormalised on that same kept set, not the unfiltered reference. Every estimator, ``sequence``
included, then targets the divergence from that renormalised reference (docs/concepts.md measures how far
its gradient is from the unfiltered one's).

``tests/test_loss_gradients.py`` checks each of these expected gradients exactly, on policies
small enough to enumerate.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from firm_lightning.advantages import ADVANTAGES

KL_ESTIMATORS = ("k2", "sequence", "k3")
AGGREGATIONS = ("token_sum", "sequence_mean", "token_mean")


class LossSettings(Protocol):
    """The loss options these functions read (``firm_lightning.module.PolicyGradientSettings`` has them)."""

    kl_coef: float
    kl_estimator: str
    aggregation: str
    clip_range: float
    ppo_epochs: int
    micro_batch_size: Optional[int]
    advantages: str


def check_loss_settings(loss: LossSettings) -> None:
    """Refuse settings that cannot work, naming the key and the fix."""
    if loss.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"loss.kl_estimator={loss.kl_estimator!r} is unknown; use one of {list(KL_ESTIMATORS)}.")
    if loss.aggregation not in AGGREGATIONS:
        raise ValueError(f"loss.aggregation={loss.aggregation!r} is unknown; use one of {list(AGGREGATIONS)}.")
    if loss.advantages not in ADVANTAGES:
        raise ValueError(f"loss.advantages={loss.advantages!r} is unknown; use one of {list(ADVANTAGES)}.")
    if loss.ppo_epochs < 1:
        raise ValueError(
            f"loss.ppo_epochs must be >= 1 (optimiser steps per batch of rollouts); got {loss.ppo_epochs}."
        )
    if loss.micro_batch_size is not None and loss.micro_batch_size < 1:
        raise ValueError(
            f"loss.micro_batch_size must be >= 1 sequences, or null for the whole batch; got {loss.micro_batch_size}."
        )


def policy_gradient_losses(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings,
    max_new_tokens: int,
    num_rows: Optional[int] = None,
    num_tokens: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-objective losses ``L_s`` (shape (S,)) and the logged KL (k3, mean per token of each response).

    ``logprobs``/``old_logprobs``/``ref_logprobs``/``mask``: (N, T) over response tokens;
    ``advantages``: (S, N). The module docstring gives the estimators and their gradients.

    ``num_rows``: the rows of the whole batch when these N rows are one micro-batch of it. Every
    normaliser is then the whole batch's, so the losses and the KL are this micro-batch's share:
    summed over the micro-batches they are the whole batch's values (and so are the gradients).
    ``num_tokens``: likewise, the whole batch's response tokens (``token_mean``'s normaliser).
    """
    num_rows = mask.shape[0] if num_rows is None else num_rows
    num_tokens = float(mask.sum()) if num_tokens is None else float(num_tokens)
    if mask.shape[-1] > max_new_tokens:
        raise ValueError(
            f"Responses of {mask.shape[-1]} tokens but max_new_tokens={max_new_tokens}: the token_sum "
            "normaliser B·G·max_new_tokens must bound every response; pass the sampling's max_new_tokens."
        )
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)  # 1 with grad ∇log π on the first epoch
    clipped = ratio.clamp(1 - settings.clip_range, 1 + settings.clip_range)
    adv = advantages[:, :, None].to(logprobs.dtype)  # (S, N, 1) broadcast over tokens
    surrogate = torch.minimum(ratio * adv, clipped * adv)  # (S, N, T)

    delta = (logprobs - ref_logprobs) * mask  # log π − log π_ref on response tokens
    if settings.kl_estimator == "k3":
        penalty = torch.exp(-delta) + delta - 1
    else:
        penalty = ratio.detach() * 0.5 * delta**2  # ∇: ρ δ ∇log π; E over π_old → E over π of δ ∇log π
        if settings.kl_estimator == "sequence":
            later = delta.detach().flip(-1).cumsum(-1).flip(-1) - delta.detach()  # Σ_{t'>t} δ_t'
            penalty = penalty + ratio * later
    tokens = -surrogate + settings.kl_coef * penalty  # (S, N, T)
    losses = _aggregate(tokens, mask, settings.aggregation, max_new_tokens, num_rows, num_tokens)

    log_ratio_ref = (ref_logprobs - logprobs).detach()
    kl_tokens = torch.exp(log_ratio_ref) - log_ratio_ref - 1  # k3: >= 0, unbiased value of KL(π‖π_ref)
    kl = _sequence_mean(kl_tokens, mask).sum() / num_rows
    return losses, kl


def _aggregate(
    tokens: torch.Tensor, mask: torch.Tensor, aggregation: str, max_new_tokens: int, num_rows: int, num_tokens: float
) -> torch.Tensor:
    """(S, N, T) token terms -> (S,): see ``aggregation`` in the module docstring. ``num_rows``/``num_tokens``:
    the whole batch's rows (B·G) and response tokens, also when these N rows are one micro-batch of it."""
    if aggregation == "token_sum":
        # A constant normaliser: the response lengths (random, policy-dependent) never reweight tokens.
        return (tokens * mask).sum(dim=(-1, -2)) / (num_rows * max_new_tokens)
    if aggregation == "token_mean":
        return (tokens * mask).sum(dim=(-1, -2)) / max(num_tokens, 1.0)
    return _sequence_mean(tokens, mask).sum(dim=-1) / num_rows


def _sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's response tokens (last dim)."""
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)

"""The loss's expected gradients, computed exactly by enumerating small policies (float64).

Each check compares ``E_{y~π}[∇ loss(y)]`` (the loss of a batch holding the one response
``y``, weighted by ``π(y)``: what the sampled loss averages to) with the gradient of the
quantity it should follow, computed from that quantity's definition.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from firm_lightning.losses import policy_gradient_losses
from firm_lightning.module import PolicyGradientSettings

F64 = torch.float64


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(previous)


def _expected_grad(theta, responses, settings, max_new_tokens):
    """Σ_y π(y) ∇_θ loss(y). ``responses(theta)`` yields (π(y), logprobs, ref, advantage, mask) per y."""
    total = torch.zeros_like(theta)
    for prob, logprobs, ref, advantage, mask in responses(theta):
        losses, _ = policy_gradient_losses(
            logprobs[None],
            logprobs.detach()[None],
            ref[None],
            advantage.view(1, 1),
            mask[None],
            settings,
            max_new_tokens,
        )
        (grad,) = torch.autograd.grad(losses[0], theta, retain_graph=True)  # the responses share one graph
        total += prob.detach() * grad
    return total


# --------------------------------------------------------------------------- item 1: the KL's direction

THETA = torch.tensor([0.3, -1.2, 0.2, 0.0, 1.5], dtype=F64)  # token 2: the two gradients disagree in sign
REF_LOGITS = torch.tensor([1.0, 0.2, -0.5, 0.7, -1.0], dtype=F64)


def _one_token(theta):
    logp, ref = torch.log_softmax(theta, -1), torch.log_softmax(REF_LOGITS, -1)
    for x in range(len(theta)):
        yield logp[x].exp(), logp[x].view(1), ref[x].view(1), torch.zeros(()), torch.ones(1)


def _kl_penalty_only(estimator):
    return PolicyGradientSettings(kl_coef=1.0, kl_estimator=estimator)


def test_k2_penalty_has_the_gradient_of_kl_policy_to_reference_and_k3_the_reverse():
    theta = THETA.clone().requires_grad_(True)
    pi, ref = torch.softmax(THETA, -1), torch.softmax(REF_LOGITS, -1)
    forward_kl = (pi * (pi / ref).log()).sum()
    # ∂/∂θ_j Σ_i π_i log(π_i/ref_i) = π_j (log(π_j/ref_j) − KL(π‖ref)) for softmax logits θ.
    grad_forward = pi * ((pi / ref).log() - forward_kl)
    # ∂/∂θ_j Σ_i ref_i log(ref_i/π_i) = −Σ_i ref_i (δ_ij − π_j) = π_j − ref_j.
    grad_reverse = pi - ref

    k2 = _expected_grad(theta, _one_token, _kl_penalty_only("k2"), max_new_tokens=1)
    k3 = _expected_grad(theta, _one_token, _kl_penalty_only("k3"), max_new_tokens=1)
    sequence = _expected_grad(theta, _one_token, _kl_penalty_only("sequence"), max_new_tokens=1)
    default = _expected_grad(theta, _one_token, PolicyGradientSettings(kl_coef=1.0), max_new_tokens=1)
    print(f"\n∇KL(π‖ref) {grad_forward.tolist()}\nE∇k2 {k2.tolist()}")
    print(f"E∇k3 {k3.tolist()}\n∇KL(ref‖π) {grad_reverse.tolist()}")
    assert (k2 - grad_forward).abs().max() <= 1e-10
    assert (sequence - grad_forward).abs().max() <= 1e-10, "one token: nothing comes after it"
    assert torch.equal(default, k2), "k2 is the default"
    # The earlier loss term follows the reverse divergence: not ∇KL(π‖ref), a component even flips sign.
    assert (k3 - grad_reverse).abs().max() <= 1e-10
    assert (k3 - grad_forward).abs().max() > 1e-2
    assert ((k3 * grad_forward) < 0).any()


# Two tokens of a 3-token vocabulary: π(y1) π(y2|y1) with logits θ[:3] and θ[3:].view(3, 3).
THETA2 = torch.tensor([0.5, -0.3, 0.1, 1.0, -1.0, 0.2, -0.4, 0.9, 0.0, 0.3, 0.3, -1.5], dtype=F64)
REF2 = torch.tensor([-0.2, 0.4, 0.0, 0.1, 0.5, -0.6, 1.1, -0.3, 0.2, -0.9, 0.4, 0.6], dtype=F64)


def _two_token_tables(theta):
    first = torch.log_softmax(theta[:3], -1)
    second = torch.log_softmax(theta[3:].view(3, 3), -1)
    return first, second


def _two_tokens(theta):
    first, second = _two_token_tables(theta)
    ref_first, ref_second = _two_token_tables(REF2)
    for a, b in itertools.product(range(3), repeat=2):
        logprobs = torch.stack([first[a], second[a, b]])
        ref = torch.stack([ref_first[a], ref_second[a, b]])
        yield logprobs.sum().exp(), logprobs, ref, torch.zeros(()), torch.ones(2)


def test_sequence_penalty_has_the_gradient_of_the_kl_of_whole_responses():
    theta = THETA2.clone().requires_grad_(True)
    first, second = _two_token_tables(theta)
    ref_first, ref_second = _two_token_tables(REF2)
    # KL(π‖ref) over the 9 responses, from its definition.
    log_pi = first[:, None] + second
    log_ref = ref_first[:, None] + ref_second
    (grad_kl,) = torch.autograd.grad((log_pi.exp() * (log_pi - log_ref)).sum(), theta, retain_graph=True)
    # What k2 is documented to follow: each position's KL with its context's probability held fixed.
    per_position = (first.exp() * (first - ref_first)).sum() + (
        first.exp().detach() * (second.exp() * (second - ref_second)).sum(-1)
    ).sum()
    (grad_per_position,) = torch.autograd.grad(per_position, theta)

    T = 2  # token_sum divides by B·G·max_new_tokens = 1·1·2
    sequence = T * _expected_grad(theta, _two_tokens, _kl_penalty_only("sequence"), max_new_tokens=T)
    k2 = T * _expected_grad(theta, _two_tokens, _kl_penalty_only("k2"), max_new_tokens=T)
    print(f"\n‖E∇sequence − ∇KL‖ {(sequence - grad_kl).norm():.2e}, ‖E∇k2 − ∇KL‖ {(k2 - grad_kl).norm():.3f}")
    assert (sequence - grad_kl).abs().max() <= 1e-10
    assert (k2 - grad_per_position).abs().max() <= 1e-10
    assert (k2 - grad_kl).abs().max() > 1e-2, "k2 leaves out the later-token term (documented)"


# --------------------------------------------------------------------------- item 2: length bias

# First token: EOS (a wrong 1-token answer), "b" (a wrong answer that then continues
# deterministically to 10 tokens) or "c" (right). P(EOS) = P(b) = 1/4, P(c) = 1/2.
FIRST = torch.tensor([0.25, 0.25, 0.5], dtype=F64).log()
REWARD = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
LENGTH = (1, 10, 2)
MAX_NEW = 10


def _length_policy(theta):
    logp = torch.log_softmax(theta, -1)
    baseline = (logp.exp() * REWARD).sum().detach()  # the exact baseline E[R]
    for y, n in enumerate(LENGTH):
        # Tokens after the first have probability 1 (no parameter): log-prob 0.
        logprobs = torch.cat([logp[y].view(1), torch.zeros(MAX_NEW - 1)])
        mask = (torch.arange(MAX_NEW) < n).double()
        yield logp[y].exp(), logprobs, logprobs.detach(), REWARD[y] - baseline, mask


def _rate_long_over_short(update):
    """d/dt log π(long)/π(short) when θ moves along ``update``: ∇(log π_b − log π_EOS) · update."""
    theta = FIRST.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    (direction,) = torch.autograd.grad(logp[1] - logp[0], theta)
    return float(direction @ update)


def test_default_aggregation_is_the_policy_gradient_and_sequence_mean_favours_the_long_wrong_answer():
    theta = FIRST.clone().requires_grad_(True)
    # The policy gradient from its definition: ∇ Σ_y π_θ(y) R(y).
    (policy_gradient,) = torch.autograd.grad((torch.softmax(theta, -1) * REWARD).sum(), theta)
    default = _expected_grad(theta, _length_policy, PolicyGradientSettings(), MAX_NEW)
    per_sequence = _expected_grad(theta, _length_policy, PolicyGradientSettings(aggregation="sequence_mean"), MAX_NEW)

    assert (default - (-policy_gradient / MAX_NEW)).abs().max() <= 1e-12, "E[∇loss] = −∇J / max_new_tokens"
    pg_rate = _rate_long_over_short(policy_gradient)
    default_rate = _rate_long_over_short(-default)
    biased_rate = _rate_long_over_short(-per_sequence)
    print(f"\nd/dt log π(long)/π(short): policy gradient {pg_rate:.3g}, token_sum {default_rate:.3g}, "
          f"sequence_mean {biased_rate:.4f}")
    assert abs(pg_rate) <= 1e-12 and abs(default_rate) <= 1e-12
    # Closed form for sequence_mean: (1 − 1/10) · P(EOS) · P(c) = 0.9 · 1/4 · 1/2.
    assert biased_rate == pytest.approx(0.1125, abs=1e-10)


def test_bad_loss_settings_name_the_key():
    from conftest import make_module

    with pytest.raises(ValueError, match=r"loss\.kl_estimator='k4'.*\['k2', 'sequence', 'k3'\]"):
        make_module(loss=PolicyGradientSettings(kl_estimator="k4"))
    with pytest.raises(ValueError, match=r"loss\.aggregation='mean'.*token_sum"):
        make_module(loss=PolicyGradientSettings(aggregation="mean"))
    settings = PolicyGradientSettings()
    ones = torch.ones(1, 5)
    with pytest.raises(ValueError, match="max_new_tokens=4"):
        policy_gradient_losses(ones, ones, ones, torch.ones(1, 1), ones, settings, max_new_tokens=4)

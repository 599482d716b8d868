"""The step's gradient algebra (firm_lightning.gradients) against its definitions, without a module.

A small linear model stands in for the policy: ``h = x W`` (the representation), ``z = h V``
(the head's output), and ``S`` objectives whose losses carry the whole batch's normaliser, so
the micro-batches' losses add up to the batch's.
"""

from __future__ import annotations

import pytest
import torch

from firm_lightning.gradients import (
    ExactGradients, LossScale, RepresentationGradients, capture_representation, check_finite, clipped, flat_grad,
    weighting_effect, write_grad,
)

N, D, H, S = 6, 4, 3, 3


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(D, H)
        self.head = torch.nn.Linear(H, 2)

    def forward(self, x):
        return self.head(self.body(x))

    def get_output_embeddings(self):
        return self.head


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = Model()
    x, targets = torch.randn(N, D), torch.randn(S, N, 2)
    return model, list(model.parameters()), x, targets


def _losses(model, x, targets, rows, gram_from="parameters"):
    """(S,) this micro-batch's share of the whole batch's losses, and the captured representation."""
    with capture_representation(model, gram_from) as captured:
        out = model(x[rows])
    losses = ((out[None] - targets[:, rows]) ** 2).sum(dim=(1, 2)) / N
    return losses, captured.get("tensor")


def _forwards(model, x, targets, chunks, gram_from="parameters"):
    return [lambda rows=rows: _losses(model, x, targets, rows, gram_from) for rows in chunks]


WHOLE, SPLIT = [slice(0, N)], [slice(0, 4), slice(4, N)]


@pytest.mark.parametrize("chunks", [WHOLE, SPLIT])
def test_per_objective_gradients_summed_over_micro_batches_are_the_whole_batchs(setup, chunks):
    model, params, x, targets = setup
    gradients = ExactGradients.accumulate(_forwards(model, x, targets, chunks), params, LossScale())
    whole, _ = _losses(model, x, targets, slice(0, N))
    expected = torch.stack([
        torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]) for loss in whole
    ])
    torch.testing.assert_close(gradients.grads, expected)
    assert gradients.finite.tolist() == [True] * S
    torch.testing.assert_close(gradients.gram(), expected @ expected.T)
    lambdas = torch.tensor([0.2, 0.3, 0.5])
    torch.testing.assert_close(gradients.direction(lambdas, [], distributed=False), lambdas @ expected)


@pytest.mark.parametrize("gram_from", ["hidden", "logits"])
@pytest.mark.parametrize("chunks", [WHOLE, SPLIT])
def test_the_representation_gram_is_the_gram_of_the_gradients_with_respect_to_that_tensor(setup, gram_from, chunks):
    model, params, x, targets = setup
    forwards = _forwards(model, x, targets, chunks, gram_from)
    gradients = RepresentationGradients.accumulate(forwards, params, LossScale())
    # From the definition: the whole batch's representation, each objective's gradient w.r.t. it.
    hidden = model.body(x).detach().requires_grad_(True)
    tensor = hidden if gram_from == "hidden" else model.head(hidden)
    out = tensor if gram_from == "logits" else model.head(tensor)
    whole = ((out[None] - targets) ** 2).sum(dim=(1, 2)) / N
    per_objective = torch.stack([torch.autograd.grad(loss, tensor, retain_graph=True)[0].flatten() for loss in whole])
    torch.testing.assert_close(gradients.gram(), per_objective @ per_objective.T)
    assert (gradients.kept is not None) == (len(chunks) == 1), "one micro-batch keeps its graph for the direction"
    # The direction: ∇ Σ λ_s L_s over the parameters, from the kept graph or the micro-batches run again.
    lambdas = torch.tensor([0.2, 0.3, 0.5])
    losses, _ = _losses(model, x, targets, slice(0, N))
    expected = torch.cat([g.flatten() for g in torch.autograd.grad((lambdas * losses).sum(), params)])
    torch.testing.assert_close(gradients.direction(lambdas, forwards, distributed=False), expected)


def test_a_scaled_loss_gives_the_same_gradients(setup):
    """Under 16-mixed the losses are scaled by a power of two and every gradient divided by it: exact."""
    model, params, x, targets = setup
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled = ExactGradients.accumulate(_forwards(model, x, targets, SPLIT), params, LossScale(scaler))
    plain = ExactGradients.accumulate(_forwards(model, x, targets, SPLIT), params, LossScale())
    assert LossScale(scaler).factor() == 2.0**16 and LossScale().factor() == 1.0
    assert torch.equal(scaled.grads, plain.grads)


def test_a_non_finite_gradient_is_found_and_refused_naming_its_objective(setup):
    model, params, x, targets = setup

    def forward():  # three graphs, so that the infinite slope reaches objective b's gradient alone
        losses = [_losses(model, x, targets, slice(0, N))[0][s] for s in range(S)]
        return [losses[0], torch.sqrt(losses[1] - losses[1].detach()), losses[2]], None  # ∞ slope at 0

    gradients = ExactGradients.accumulate([forward], params, LossScale())
    assert gradients.finite.tolist() == [True, False, True]
    with pytest.raises(FloatingPointError, match=r"objective\(s\) \['b'\]"):
        check_finite(gradients.finite, ["a", "b", "c"], refuse=True)
    assert check_finite(gradients.finite, ["a", "b", "c"], refuse=False) is False  # a GradScaler skips the step
    assert check_finite(torch.tensor([True, True]), ["a", "b"], refuse=True) is True


@pytest.mark.parametrize("max_norm", [0.5, 100.0, None])
def test_the_clip_is_clip_grad_norm_on_the_direction(max_norm):
    torch.manual_seed(1)
    direction = torch.randn(10) * 3
    clipped_direction, norm = clipped(direction, max_norm)
    assert norm == direction.norm()  # the norm before clipping
    parameter = torch.nn.Parameter(torch.zeros(10))
    parameter.grad = direction.clone()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_([parameter], max_norm)
    torch.testing.assert_close(clipped_direction, parameter.grad, rtol=1e-6, atol=0)


def test_flat_gradients_cover_unused_parameters_and_are_written_back_in_place(setup):
    model, params, x, _ = setup
    unused = torch.nn.Parameter(torch.ones(2, 2))
    flat = flat_grad(model.body(x).sum(), [*params, unused])
    assert flat.numel() == sum(p.numel() for p in params) + 4
    head = sum(p.numel() for p in model.body.parameters())
    assert torch.equal(flat[head:], torch.zeros_like(flat[head:])), "the head and the unused parameter: zero"
    write_grad([*params, unused], flat)
    assert torch.equal(params[0].grad.flatten(), flat[: params[0].numel()])
    assert torch.equal(unused.grad, torch.zeros(2, 2))


def test_the_representation_is_captured_only_while_asked_for(setup):
    model, _, x, _ = setup
    with capture_representation(model, "parameters") as nothing:
        model(x)
    with capture_representation(model, "hidden") as hidden, torch.no_grad():
        out = model(x)
    with capture_representation(model, "logits") as logits, torch.no_grad():
        model(x)
    assert nothing == {} and torch.equal(logits["tensor"], out)
    torch.testing.assert_close(hidden["tensor"], model.body(x).detach())
    assert not model.head._forward_hooks, "the hook is removed on exit"


def test_an_unknown_gram_mode_is_refused_naming_the_key():
    from conftest import make_module
    from firm_lightning.module import PolicyGradientSettings

    with pytest.raises(ValueError, match=r"loss\.gram_from='weights'.*\['parameters', 'hidden', 'logits'\]"):
        make_module(loss=PolicyGradientSettings(gram_from="weights"))


# ---- the weighting effect: how much λ changes the step against the preference p


G = torch.tensor([[2.0, 1.0], [-1.0, 1.0]])  # two objectives' gradients over two coordinates
P = torch.tensor([0.5, 0.5])  # d_p = (0.5, 1)


def _adam_first_step(d: torch.Tensor, lr: float, eps: float) -> torch.Tensor:
    """Adam's first step from a fresh state: bias-corrected m = d, v = d², so Δθ = −lr · d / (|d| + eps)."""
    return -lr * d / (d.abs() + eps)


@pytest.mark.parametrize("lambdas, flips", [((0.6, 0.4), False), ((0.2, 0.8), True)])
def test_the_weighting_effect_of_adams_first_step_is_its_sign_change(lambdas, flips):
    """λ = (0.6, 0.4) keeps both coordinates' signs: Adam's first step (≈ lr·sign(d)) is the same as p's, so
    the effect after the optimiser is ≈ 0 while d itself moved; λ = (0.2, 0.8) flips the first coordinate."""
    theta = torch.nn.Parameter(torch.tensor([0.3, -0.7], dtype=torch.float64))
    lr, eps = 0.1, 1e-8
    adam = torch.optim.Adam([theta], lr=lr, eps=eps)
    d, d_p = (torch.tensor(lambdas, dtype=torch.float64) @ G.double()), P.double() @ G.double()
    after, before = weighting_effect(adam, [theta], d, d_p)
    step, step_p = _adam_first_step(d, lr, eps), _adam_first_step(d_p, lr, eps)
    print(f"\nλ={lambdas}: d={d.tolist()} d_p={d_p.tolist()} effect after {after:.6g}, before {before:.6g}")
    assert before == pytest.approx(float((d - d_p).norm() / d_p.norm()), rel=1e-12)
    assert after == pytest.approx(float((step - step_p).norm() / step_p.norm()), rel=1e-9, abs=1e-12)
    assert (after == pytest.approx(2**0.5, rel=1e-6)) if flips else (after < 1e-7)  # |Δθ(p)| = lr·√2, one sign flip
    assert torch.equal(theta.detach(), torch.tensor([0.3, -0.7], dtype=torch.float64)) and not adam.state


def test_a_lambda_equal_to_the_preference_has_no_effect_and_sgd_keeps_the_directions_ratio():
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    d_p = P.double() @ G.double()
    assert weighting_effect(torch.optim.SGD([theta], lr=0.5), [theta], d_p.clone(), d_p) == (0.0, 0.0)
    d = torch.tensor([0.2, 0.8], dtype=torch.float64) @ G.double()
    after, before = weighting_effect(torch.optim.SGD([theta], lr=0.5), [theta], d, d_p)
    assert after == pytest.approx(before, rel=1e-12)  # plain SGD: Δθ = −lr·d, linear in d


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1),
])
def test_measuring_the_effect_leaves_the_parameters_the_optimiser_and_the_next_step_bit_identical(setup, make):
    model, params, x, targets = setup
    grads = ExactGradients.accumulate(_forwards(model, x, targets, WHOLE), params, LossScale()).grads
    lambdas, preference = torch.tensor([0.7, 0.2, 0.1]), torch.full((S,), 1 / S)

    def run(measure: bool) -> list[torch.Tensor]:
        for p, start in zip(params, starts):
            p.data.copy_(start)
        optimizer = make(params)
        for _ in range(3):  # the measure on a fresh state, then on one with history
            direction = lambdas @ grads
            if measure:
                after, before = weighting_effect(optimizer, params, direction, preference @ grads)
                assert after > 0 and before > 0
            write_grad(params, direction)
            optimizer.step()
        return [p.detach().clone() for p in params] + [t for s in optimizer.state.values() for t in s.values()
                                                         if isinstance(t, torch.Tensor)]

    starts = [p.detach().clone() for p in params]
    plain, measured = run(False), run(True)
    assert len(plain) == len(measured) and all(torch.equal(a, b) for a, b in zip(plain, measured))

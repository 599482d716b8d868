"""Tests for firm_lightning.module.FIRMClientModule.

The key property: the update written into ``.grad`` is exactly autograd's gradient of
``Σ λ_s L_s`` with ``λ`` held fixed, where ``λ`` is the weighting of the Gram matrix of the
per-objective gradients.
"""

from __future__ import annotations

import logging
import math
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from firm_lightning.advantages import leave_one_out_advantages
from firm_lightning.datamodule import collate_prompts
from firm_lightning.client_optimizer import use_client_optimizer
from firm_lightning.module import FIRMClientModule, FitArguments, PolicyGradientSettings, SamplingSettings
from firm_lightning.policy import LoRASettings, TinyPolicy
from firm_lightning.rewards import CharsetReward, score_all
from firm_lightning.sequences import token_logprobs
from firm_lightning.weighting import LinearScalarization, RegularizedMinNorm

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)

TINY_LORA = LoRASettings(target_modules=["c_attn", "c_proj", "c_fc", "lm_head"])
PROMPTS = [
    "How do I keep snails away from my zucchini?",
    "What is a good substitute for butter?",
    "Why is the sky blue?",
    "Name a fruit.",
    "How much should I save each month?",
    "Tell me about rivers.",
    "What is rust?",
    "Suggest a name for a cat.",
]


def objectives():
    return [
        CharsetReward("a_to_m", "abcdefghijklm"),
        CharsetReward("n_to_z", "nopqrstuvwxyz"),
        CharsetReward("vowels", "aeiou"),
    ]


def make_module(objs=None, **kwargs) -> FIRMClientModule:
    defaults = dict(
        weighting=RegularizedMinNorm(beta=0.1),
        policy=TinyPolicy(),
        lora=TINY_LORA,
        sampling=SamplingSettings(max_new_tokens=8, num_generations=2),
        learning_rate=1e-2,
    )
    return FIRMClientModule(objs if objs is not None else objectives()[:2], **{**defaults, **kwargs})


def loader(batch_size=4, n=8):
    rows = [{"prompt": p} for p in PROMPTS[:n]]
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate_prompts)


def fit(module, max_steps, batch_size=4, n=8, **trainer_kwargs):
    trainer = L.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=loader(batch_size, n))
    return trainer


def randomize_adapter(module, scale=0.1):
    """Non-zero LoRA A and B, so every adapter tensor gets a gradient and the KL is non-zero."""
    state = module.adapter_state()
    module.load_adapter_state({k: torch.randn_like(v) * scale for k, v in state.items()})


class RecordingOptimizer:
    """Stands in for ``self.optimizers()``: records calls and the .grad it would step on."""

    def __init__(self, params):
        self.params, self.calls, self.grads_at_step = params, [], None

    def zero_grad(self, set_to_none=True):
        self.calls.append("zero_grad")

    def step(self, closure=None):
        self.calls.append("step")
        self.grads_at_step = [None if p.grad is None else p.grad.detach().clone() for p in self.params]


# --------------------------------------------------------------------------- the update


def test_weighted_step_writes_grad_of_lambda_weighted_sum(monkeypatch):
    torch.manual_seed(0)
    module = make_module(
        objectives(),
        loss=PolicyGradientSettings(max_grad_norm=None, kl_coef=0.1),
        sampling=SamplingSettings(max_new_tokens=12, num_generations=4),
    )
    randomize_adapter(module)
    module.train()
    params = module.trainable_parameters()
    names = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n in names)
    stub = RecordingOptimizer(params)
    monkeypatch.setattr(module, "optimizers", lambda *args, **kwargs: stub)

    rollout = module.rollout(PROMPTS[:4], module.sampling.num_generations)
    rewards = score_all(module.objectives, rollout.prompts, rollout.responses)
    advantages = leave_one_out_advantages(rewards, rollout.group_size, whiten=True)
    with torch.no_grad(), module.policy.disable_adapter():
        reference = token_logprobs(module.policy, rollout)
    # Train mode, as in training_step: GPT-2's dropout is active, so both forwards below run
    # with the same seed (the same dropout masks).
    torch.manual_seed(7)
    logprobs = token_logprobs(module.policy, rollout)
    old = logprobs.detach()
    losses, kl = module.objective_losses(logprobs, old, reference, advantages, rollout.response_mask)
    assert losses.shape == (3,) and kl.item() > 0

    lambdas, norm = module.weighted_step(losses)
    assert stub.calls == ["zero_grad", "step"]

    # Independent reference from a fresh forward on the same rollout.
    torch.manual_seed(7)
    fresh_logprobs = token_logprobs(module.policy, rollout)
    assert torch.equal(fresh_logprobs.detach(), old)
    fresh, _ = module.objective_losses(fresh_logprobs, old, reference, advantages, rollout.response_mask)
    per_objective = [torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in fresh]
    flat = torch.stack([
        torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])
        for gs in per_objective
    ])
    gram = flat @ flat.T
    expected_lambdas = module.weighting(gram)
    print(f"\nlambda {lambdas.tolist()}, Gram diag {gram.diag().tolist()}")
    torch.testing.assert_close(lambdas, expected_lambdas, rtol=1e-4, atol=1e-5)
    assert abs(lambdas.sum().item() - 1) < 1e-5 and (lambdas >= 0).all()
    # Conflicting objectives: the weights are not all on one objective, nor uniform.
    assert lambdas.max() < 0.99 and (lambdas - 1 / 3).abs().max() > 1e-3

    expected = torch.autograd.grad((lambdas.detach() * fresh).sum(), params, allow_unused=True)
    total = 0.0
    for name, p, g_step, g_ref in zip(names, params, stub.grads_at_step, expected):
        g_written = p.grad
        g_ref = torch.zeros_like(p) if g_ref is None else g_ref
        assert g_written is not None and g_written.shape == p.shape and g_written.dtype == p.dtype
        assert torch.equal(g_written, g_step), "the optimiser must step on the written gradient"
        scale = g_ref.abs().max().item()
        torch.testing.assert_close(g_written, g_ref, rtol=1e-5, atol=1e-5 * max(scale, 1e-12), msg=name)
        total += g_written.double().pow(2).sum().item()
    assert all(g.abs().sum() > 0 for g in stub.grads_at_step), "every LoRA tensor should get a gradient"
    assert abs(norm.item() - total**0.5) <= 1e-5 * total**0.5, "returned norm is ‖d‖"


def test_kl_is_zero_at_init_in_training_mode():
    # A fresh adapter (LoRA B = 0) makes the policy equal to the reference, so the KL term
    # that training_step computes (in train mode, as Lightning runs it) should be exactly 0.
    torch.manual_seed(0)
    module = make_module()
    module.train()
    rollout = module.rollout(PROMPTS[:4], 4)
    with torch.no_grad(), module.policy.disable_adapter():
        reference = token_logprobs(module.policy, rollout)
    logprobs = token_logprobs(module.policy, rollout)
    advantages = torch.zeros(2, len(rollout.responses))
    _, kl = module.objective_losses(logprobs, logprobs.detach(), reference, advantages, rollout.response_mask)
    assert kl.item() == 0.0, f"KL between identical policies is {kl.item():.3g} in train mode"


# --------------------------------------------------------------------------- what changes in a fit


def test_fit_changes_only_lora_weights():
    torch.manual_seed(0)
    # weight_decay > 0: decoupled decay would touch any base weight that reached the optimiser.
    module = make_module(weight_decay=0.1)
    before = {k: v.detach().clone() for k, v in module.policy.state_dict().items()}
    assert any("lora_" in k for k in before) and any("lora_" not in k for k in before)
    trainer = fit(module, max_steps=3)
    assert trainer.global_step == 3
    after = module.policy.state_dict()
    assert before.keys() == after.keys()
    changed_base = [k for k in before if "lora_" not in k and not torch.equal(before[k], after[k])]
    assert changed_base == [], f"base weights changed: {changed_base[:5]}"
    changed_lora = [k for k in before if "lora_" in k and not torch.equal(before[k], after[k])]
    assert changed_lora, "no LoRA tensor changed during the fit"
    # The adapter is exactly the trainable set, and only it is exchanged.
    trainable = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all("lora_" in k for k in module.adapter_state())


# --------------------------------------------------------------------------- adapter exchange


def test_adapter_state_round_trip():
    torch.manual_seed(0)
    module = make_module()
    state = module.adapter_state()
    assert state and all(not v.requires_grad and v.device.type == "cpu" for v in state.values())
    new = {k: torch.randn_like(v) for k, v in state.items()}
    module.load_adapter_state(new)
    back = module.adapter_state()
    assert back.keys() == new.keys()
    assert all(torch.equal(back[k], new[k]) for k in new)
    # A copy: changing what was read does not change the module, nor vice versa.
    next(iter(back.values())).add_(1.0)
    assert all(torch.equal(module.adapter_state()[k], new[k]) for k in new)
    # The loaded weights are the ones the policy uses.
    params = dict(module.policy.named_parameters())
    k = next(iter(new))
    matching = [n for n in params if n.replace(".default", "") == k]
    assert matching and torch.equal(params[matching[0]].detach(), new[k])


def _malformed(kind, state):
    state = dict(state)
    key = sorted(state)[0]
    if kind == "missing":
        del state[key]
    elif kind == "extra":
        state["base_model.model.transformer.h.0.attn.c_attn.lora_C.weight"] = torch.zeros(2, 2)
    elif kind == "shape":
        state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])
    elif kind == "nan":
        bad = state[key].clone()
        bad.view(-1)[0] = float("nan")
        state[key] = bad
    elif kind == "inf":
        bad = state[key].clone()
        bad.view(-1)[-1] = float("inf")
        state[key] = bad
    return state, key


@pytest.mark.parametrize(
    "kind, pattern",
    [("missing", "missing \\["), ("extra", "unexpected \\[.*lora_C"), ("shape", "shape"),
     ("nan", "NaN"), ("inf", "inf")],
)
def test_load_adapter_state_rejects_malformed(kind, pattern):
    module = make_module()
    good = module.adapter_state()
    state, key = _malformed(kind, good)
    with pytest.raises(ValueError, match=pattern) as info:
        module.load_adapter_state(state)
    if kind in ("missing", "shape", "nan", "inf"):
        assert key in str(info.value), "the message should name the offending tensor"
    # Refused states leave the adapter untouched.
    assert all(torch.equal(module.adapter_state()[k], good[k]) for k in good)


# --------------------------------------------------------------------------- training_step


class NaNReward:
    name = "nan_reward"

    def __call__(self, prompts, responses):
        return torch.full((len(responses),), float("nan"))


def test_nan_reward_in_training_step_names_the_reward():
    module = make_module([CharsetReward("a_to_m", "abcdefghijklm"), NaNReward()])
    with pytest.raises(ValueError, match="nan_reward"):
        fit(module, max_steps=1)


def test_client_summary_after_fit():
    torch.manual_seed(0)
    module = make_module(objectives())
    trainer = fit(module, max_steps=2)
    assert trainer.global_step == 2
    summary = module.client_summary()
    print("\n", summary)
    names = ["a_to_m", "n_to_z", "vowels"]
    for n in names:
        assert f"lambda/{n}" in summary and f"train/reward/{n}" in summary
        assert 0.0 <= summary[f"train/reward/{n}"] <= 1.0
        assert 0.0 <= summary[f"lambda/{n}"] <= 1.0
    assert abs(sum(summary[f"lambda/{n}"] for n in names) - 1.0) < 1e-5
    assert "train/kl" in summary and summary["train/kl"] >= 0.0
    assert summary["train/update_norm"] > 0.0
    assert 1.0 <= summary["train/response_length"] <= module.sampling.max_new_tokens
    assert all(v == v for v in summary.values()), "no NaN in the summary"


class _StepCounter(L.Callback):
    """The learning rate of every optimiser step, as the optimiser sees it."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _halving_schedule(module):
    """AdamW + StepLR halving the lr at every scheduler step; returns the scheduler's step log."""
    calls = []

    class Halving(torch.optim.lr_scheduler.StepLR):
        def step(self, *args, **kwargs):
            calls.append(1)
            return super().step(*args, **kwargs)

    def configure_optimizers():
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-2)
        scheduler = Halving(optimizer, step_size=1, gamma=0.5)
        calls.clear()  # the scheduler's constructor calls step() once itself
        return [optimizer], [scheduler]

    module.configure_optimizers = configure_optimizers
    return calls


@pytest.mark.parametrize(
    "max_steps, batches, expected",
    [(3, None, 3),  # 2 batches x 2 epochs would be 4: the last batch runs one epoch
     (-1, 2, 4)],   # no max_steps: every batch runs both epochs
)
def test_ppo_epochs_never_exceed_max_steps_and_the_scheduler_steps_with_the_optimiser(max_steps, batches, expected):
    torch.manual_seed(0)
    module = make_module(loss=PolicyGradientSettings(ppo_epochs=2))
    scheduler_steps = _halving_schedule(module)
    counter = _StepCounter()
    limits = dict(max_epochs=1, limit_train_batches=batches) if batches else {}
    trainer = fit(module, max_steps=max_steps, callbacks=[counter], **limits)
    steps = f"optimiser steps {len(counter.lrs)}, scheduler steps {len(scheduler_steps)}"
    print(f"\nmax_steps {max_steps}: {steps}, lrs {counter.lrs}")
    assert len(counter.lrs) == expected and trainer.global_step == expected
    assert len(scheduler_steps) == expected, "one scheduler step per optimiser step"
    assert counter.lrs == [1e-2 * 0.5**k for k in range(expected)], "each step uses the lr of its place in the schedule"
    assert all(v == v for v in module.client_summary().values())


def test_llama_policy_fits():
    torch.manual_seed(0)
    module = make_module(policy=TinyPolicy("llama"), lora=LoRASettings())
    before = module.adapter_state()
    trainer = fit(module, max_steps=2)
    assert trainer.global_step == 2
    after = module.adapter_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


@pytest.mark.parametrize(
    "field, value, match", [("num_generations", 1, "num_generations"), ("ppo_epochs", 0, "ppo_epochs")]
)
def test_bad_sampling_or_loss_settings_are_refused(field, value, match):
    from firm_lightning.module import PolicyGradientSettings, SamplingSettings

    kwargs = {"sampling": SamplingSettings(num_generations=value)} if field == "num_generations" else {
        "loss": PolicyGradientSettings(ppo_epochs=value)}
    with pytest.raises(ValueError, match=match):
        make_module(**kwargs)


# ---- what one fit runs with comes with its Trainer (FitArguments); the module keeps its configuration


class _Weightings(L.Callback):
    """At every step: the module's configured weighting and the weighting of the fit."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((pl_module.weighting, pl_module.fit_weighting()))


def test_a_fits_weighting_comes_with_its_trainer_and_the_module_keeps_its_own():
    torch.manual_seed(0)
    module = make_module()
    configured, linear, probe = module.weighting, LinearScalarization([0.9, 0.1]), _Weightings()
    fit(module, max_steps=2, callbacks=[FitArguments(weighting=linear), probe])
    assert len(probe.seen) == 2 and all(mine is configured and fits is linear for mine, fits in probe.seen)
    assert module.client_summary()["lambda/a_to_m"] == pytest.approx(0.9)
    fit(module, max_steps=1, callbacks=[probe])  # a Trainer without FitArguments: the configured weighting
    assert probe.seen[-1][1] is configured


def _validate(module, callbacks=()):
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        devices=1, callbacks=list(callbacks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.validate(module, dataloaders=loader(4, 4), verbose=False)[0]


def test_an_evaluations_seed_offset_comes_with_its_trainer():
    module = make_module(sampling=SamplingSettings(max_new_tokens=8, num_generations=2, eval_seed=5))
    shifted = _validate(module, [FitArguments(eval_seed_offset=100)])
    assert module.sampling.eval_seed == 5
    module.sampling = SamplingSettings(max_new_tokens=8, num_generations=2, eval_seed=105)
    assert _validate(module) == shifted


def test_the_client_optimizer_is_configuration_not_a_patched_method():
    module = make_module()
    use_client_optimizer(module, {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}})
    assert "configure_optimizers" not in vars(module)
    optimizer = module.configure_optimizers()
    params = optimizer.param_groups[0]["params"]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.5
    assert len(params) == len(module.trainable_parameters())
    assert all(a is b for a, b in zip(params, module.trainable_parameters()))


def test_the_weighting_effect_is_zero_when_lambda_is_the_preference_and_nan_without_parameter_gradients():
    torch.manual_seed(0)
    module = make_module()
    fit(module, max_steps=1, callbacks=[FitArguments(weighting=LinearScalarization([0.3, 0.7]))])
    summary = module.client_summary()
    assert summary["train/weighting_effect"] == 0.0 == summary["train/weighting_effect_direction"]
    module = make_module(loss=PolicyGradientSettings(gram_from="hidden"))
    fit(module, max_steps=1)
    summary = module.client_summary()
    assert math.isnan(summary["train/weighting_effect"]) and math.isnan(summary["train/weighting_effect_direction"])
    assert not math.isnan(summary["lambda/a_to_m"])

"""``loss.micro_batch_size`` and ``sampling.generation_batch_size``.

The key property: a local step over micro-batches is the whole-batch step. The S per-objective
gradients are summed over micro-batches whose losses carry the whole batch's normalisers, so in
fp32 the written direction ``d``, λ, ‖d‖ and the KL equal the whole batch's to float round-off
(≤ 1e-5 relative), whatever the micro-batch size (dividing B·G or not), the PPO epochs, the
Gram matrix's source, the KL estimator, the aggregation and top-k sampling.
"""

from __future__ import annotations

import pytest
import torch

from firm_lightning.module import PolicyGradientSettings, SamplingSettings
from firm_lightning.policy import LoRASettings
from firm_lightning.rewards import score_all
from firm_lightning.sequences import token_logprobs, unpack_support
from firm_lightning.weighting import RegularizedMinNorm
from test_module import PROMPTS, make_module, objectives

NUM_PROMPTS, GROUP = 4, 3  # B·G = 12 rows
LORA = LoRASettings(target_modules=["c_attn", "c_proj", "c_fc"])  # the head stays the base's (see _ends_early)


def _ends_early(module) -> None:
    """Responses of varied lengths (masks and padding matter): a random tiny model almost never
    ranks EOS high, so its head row becomes a copy (×1.05) of the most common greedy token's."""
    rollout = module.rollout(PROMPTS[:NUM_PROMPTS], 1, greedy=True)
    common = int(torch.mode(rollout.sequences[:, rollout.prompt_length:].flatten()).values)
    with torch.no_grad():
        head = module.policy.get_output_embeddings().weight
        head[module.tokenizer.eos_token_id] = head[common] * 1.05


class RecordingSGD(torch.optim.SGD):
    """SGD (the step linear in ``d``: AdamW's ``g/|g|`` would blow round-off up on near-zero
    entries) that records the direction written into ``.grad`` at every step."""

    def __init__(self, params, **kwargs):
        self.tracked = list(params)
        super().__init__(self.tracked, **kwargs)
        self.directions: list[torch.Tensor] = []

    def step(self, closure=None):
        self.directions.append(torch.cat([p.grad.detach().flatten() for p in self.tracked]).clone())
        return super().step(closure)


def _module(micro, top_k=0, **loss):
    settings = dict(kl_coef=0.1, max_grad_norm=None, micro_batch_size=micro, **loss)
    torch.manual_seed(0)
    module = make_module(objectives(), weighting=RegularizedMinNorm(beta=0.1), lora=LORA,
                         loss=PolicyGradientSettings(**settings),
                         sampling=SamplingSettings(max_new_tokens=10, num_generations=GROUP, top_k=top_k))
    optimizer = RecordingSGD(module.trainable_parameters(), lr=0.5)
    module.optimizers = lambda *args, **kwargs: optimizer
    return module, optimizer


def _step(micro, rollout, rewards, adapter, top_k=0, **loss):
    module, optimizer = _module(micro, top_k, **loss)
    module.load_adapter_state(adapter)
    _ends_early(module)  # the same base as the module that sampled the rollout
    rows_seen = []
    handle = module.policy.register_forward_pre_hook(
        lambda m, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    lambdas, norm, kl = module.update(rollout, rewards)
    handle.remove()
    return dict(lambdas=lambdas, norm=norm, kl=kl, directions=optimizer.directions, adapter=module.adapter_state(),
                rows=rows_seen)


CASES = {
    "exact S=3": dict(),
    "ppo_epochs=3": dict(ppo_epochs=3),
    "gram_from hidden": dict(gram_from="hidden"),
    "gram_from logits": dict(gram_from="logits"),
    "sequence KL, sequence_mean": dict(kl_estimator="sequence", aggregation="sequence_mean"),
    "k3 KL, ppo_epochs=2, clipped": dict(kl_estimator="k3", ppo_epochs=2, clip_range=0.05),
    "top-k 8": dict(top_k=8),
    "token_mean, group_std advantages": dict(aggregation="token_mean", advantages="group_std", kl_estimator="k3"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("micro", [1, 5, 7])  # 5 and 7 do not divide B·G = 12
def test_micro_batched_step_equals_the_whole_batch_step(case, micro):
    loss = dict(CASES[case])
    top_k = loss.pop("top_k", 0)
    module, _ = _module(None, top_k, **loss)
    torch.manual_seed(1)
    adapter = {k: torch.randn_like(v) * 0.1 for k, v in module.adapter_state().items()}  # non-zero KL and B
    module.load_adapter_state(adapter)
    _ends_early(module)
    torch.manual_seed(2)
    rollout = module.rollout(PROMPTS[:NUM_PROMPTS], GROUP)
    assert (rollout.response_mask == 0).any(), "some response should stop early (the masks matter)"
    rewards = score_all(module.objectives, rollout.prompts, rollout.responses)

    whole = _step(None, rollout, rewards, adapter, top_k, **loss)
    split = _step(micro, rollout, rewards, adapter, top_k, **loss)
    epochs = loss.get("ppo_epochs", 1)
    assert len(whole["directions"]) == len(split["directions"]) == epochs
    assert max(split["rows"]) <= micro < max(whole["rows"]), "every forward pass sees at most one micro-batch"

    errors = [float((s - w).abs().max() / w.abs().max()) for s, w in zip(split["directions"], whole["directions"])]
    lambda_error = float((split["lambdas"] - whole["lambdas"]).abs().max())
    kl_error = abs(float(split["kl"] - whole["kl"])) / float(whole["kl"])
    # The adapters after every step (entries ~0.1): later PPO epochs start from the earlier steps' result.
    adapter_error = max(float((split["adapter"][k] - whole["adapter"][k]).abs().max()) for k in adapter)
    print(f"\n{case}, micro {micro}: max|d - d_whole|/max|d_whole| per step {[f'{e:.1e}' for e in errors]}, "
          f"|λ - λ_whole| {lambda_error:.1e} (λ {whole['lambdas'].tolist()}), KL rel {kl_error:.1e}, "
          f"max|θ - θ_whole| after {epochs} SGD step(s) {adapter_error:.1e}")
    assert 0.02 < float(whole["lambdas"].max()) < 0.98, "an interior λ: its equality says something"
    assert max(errors) <= 1e-5
    assert lambda_error <= 1e-5
    assert kl_error <= 1e-5
    assert abs(float(split["norm"] - whole["norm"])) <= 1e-5 * float(whole["norm"])
    assert adapter_error <= 1e-5


@pytest.mark.parametrize("aggregation", ["token_sum", "sequence_mean", "token_mean"])
def test_micro_batch_normalisers_are_the_whole_batch_ones(aggregation):
    """Control: a micro-batch's own normaliser (its rows or tokens instead of the whole batch's) would
    scale its share; summed, the gradient would then differ from the whole batch's."""
    from firm_lightning.losses import policy_gradient_losses

    torch.manual_seed(0)
    n, t = 6, 5
    logprobs = torch.randn(n, t, requires_grad=True)
    ref, adv = torch.randn(n, t), torch.randn(2, n)
    mask = (torch.rand(n, t) > 0.3).long()
    settings = PolicyGradientSettings(kl_coef=0.1, aggregation=aggregation)
    whole, kl = policy_gradient_losses(logprobs, logprobs.detach(), ref, adv, mask, settings, t)
    parts = [
        policy_gradient_losses(logprobs[r], logprobs.detach()[r], ref[r], adv[:, r], mask[r], settings, t, num_rows=n,
                               num_tokens=float(mask.sum()))
        for r in (slice(0, 4), slice(4, 6))
    ]
    torch.testing.assert_close(sum(p[0] for p in parts), whole)
    torch.testing.assert_close(sum(p[1] for p in parts), kl)
    own = [policy_gradient_losses(logprobs[r], logprobs.detach()[r], ref[r], adv[:, r], mask[r], settings, t)
           for r in (slice(0, 4), slice(4, 6))]
    assert not torch.allclose(sum(p[0] for p in own), whole)


@pytest.mark.parametrize(
    "field, settings",
    [
        ("loss.micro_batch_size", dict(loss=PolicyGradientSettings(micro_batch_size=0))),
        ("sampling.generation_batch_size", dict(sampling=SamplingSettings(generation_batch_size=0))),
    ],
)
def test_a_micro_batch_of_no_rows_is_refused_naming_the_key(field, settings):
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + ".*null"):
        make_module(**settings)


# --------------------------------------------------------------------------- sampling in chunks


def _rollout(generation_batch_size, greedy, seed=3, top_k=0):
    torch.manual_seed(0)
    module = make_module(lora=LORA, sampling=SamplingSettings(max_new_tokens=12, num_generations=GROUP, top_k=top_k,
                                                              generation_batch_size=generation_batch_size))
    torch.manual_seed(1)
    module.load_adapter_state({k: torch.randn_like(v) * 0.3 for k, v in module.adapter_state().items()})
    _ends_early(module)
    torch.manual_seed(seed)
    return module, module.rollout(PROMPTS[:NUM_PROMPTS], 1 if greedy else GROUP, greedy)


@pytest.mark.parametrize("chunk", [1, 3])
def test_greedy_sampling_in_chunks_equals_one_call(chunk):
    """Top-1 decoding does not depend on the random numbers: chunks (each with its own left
    padding) give the same rollout as one call, laid out the same way."""
    module, whole = _rollout(None, greedy=True)
    _, split = _rollout(chunk, greedy=True)
    assert split.responses == whole.responses
    assert split.prompt_length == whole.prompt_length
    for field in ("sequences", "attention_mask", "response_mask"):
        assert torch.equal(getattr(split, field), getattr(whole, field)), field
    assert (whole.response_mask == 0).any() and len(set(whole.response_mask.sum(1).tolist())) > 1
    with torch.no_grad():
        mask = whole.response_mask.bool()
        torch.testing.assert_close(token_logprobs(module.policy, split)[mask],
                                   token_logprobs(module.policy, whole)[mask], rtol=0, atol=1e-6)


def test_sampling_in_chunks_keeps_a_consistent_top_k_rollout():
    """Temperature sampling in chunks: reproducible for a seed and chunk size; the recorded
    top-k support is stitched with each row (every sampled token inside its set) and the
    log-probs stay finite, including the positions added after a chunk's last token."""
    module, first = _rollout(5, greedy=False, top_k=6)
    _, again = _rollout(5, greedy=False, top_k=6)
    assert torch.equal(first.sequences, again.sequences) and first.responses == again.responses
    N, T = first.response_mask.shape
    assert first.sequences.shape == (N, first.prompt_length + T) and N == NUM_PROMPTS * GROUP
    kept = unpack_support(first.support, len(module.tokenizer))
    sampled = kept.gather(-1, first.sequences[:, first.prompt_length:, None])[..., 0]
    assert sampled[first.response_mask.bool()].all()
    assert (kept.sum(-1)[first.response_mask.bool()] == 6).all()
    with torch.no_grad():
        assert torch.isfinite(token_logprobs(module.policy, first)).all()
    # Left padding is where the attention mask is 0 before the response; no prompt token is lost.
    prompt_tokens = first.attention_mask[:, : first.prompt_length].sum(1)
    _, whole = _rollout(None, greedy=False, top_k=6)
    assert torch.equal(prompt_tokens, whole.attention_mask[:, : whole.prompt_length].sum(1))


def test_a_fit_with_micro_batches_and_chunked_sampling_runs_its_steps():
    from test_module import fit

    torch.manual_seed(0)
    module = make_module(loss=PolicyGradientSettings(micro_batch_size=3, ppo_epochs=2),
                         sampling=SamplingSettings(max_new_tokens=8, num_generations=2, generation_batch_size=3))
    before = module.adapter_state()
    trainer = fit(module, max_steps=3)
    assert trainer.global_step == 3
    assert any(not torch.equal(before[k], v) for k, v in module.adapter_state().items())
    assert all(v == v for v in module.client_summary().values())

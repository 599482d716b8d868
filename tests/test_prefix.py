"""Each prompt computed once per group (``sampling.share_prompt``, firm_lightning/prefix.py).

The key property: sharing is an exact reorganisation of the computation. In fp32 the per-token
log-probs, the per-objective gradients, λ and the adapter after a step equal the unshared
computation to ≤ 1e-5 relative — on the tiny policy and on GPT-2- and Qwen2-shaped models with
their real vocabularies (50,257 and 151,936), with left padding, two EOS ids, a recorded
top-k/top-p support, micro-batches, gradient checkpointing; in bf16 its error is that of bf16
itself. The gradient flows into the shared prompt positions: with the prompt's keys and values
detached the gradients differ (the control). Sampling draws each prompt's samples from
generators keyed by the prompt, so the rollout is the same at once, in chunks, a share of the
prompts at a time (as on DDP ranks) and with a shared prompt.
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, Qwen2Config, Qwen2ForCausalLM

from firm_lightning import prefix
from firm_lightning.module import PolicyGradientSettings, SamplingSettings
from firm_lightning.policy import LoRASettings, PolicyBuilder, TinyPolicy, add_lora
from firm_lightning.rewards import score_all
from firm_lightning.sequences import Rollout, pack_support, response_mask, token_logprobs
from firm_lightning.weighting import RegularizedMinNorm
from real_like import bpe_tokenizer, tiny_chat_model
from test_micro_batches import RecordingSGD
from test_module import PROMPTS, make_module, objectives

ATTENTION_AND_MLP = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense"],
}


def _hf_model(kind: str, checkpointing: bool = False):
    """A two-layer model of ``kind`` with its real vocabulary (tiny: the character tokenizer's), LoRA on."""
    torch.manual_seed(0)
    if kind == "tiny":
        model = TinyPolicy().build()[0]
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=64))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    policy = add_lora(model, LoRASettings(target_modules=ATTENTION_AND_MLP[model.config.model_type]))
    with torch.no_grad():  # non-zero A and B: every adapter tensor gets a gradient
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    return policy


def _rollout(vocab: int, groups: int = 3, group: int = 3, P: int = 8, T: int = 6, filtered: bool = True) -> Rollout:
    """Random prompt-major rows: prompts left-padded by 0, 3 and 5 tokens, two EOS ids ending responses early,
    a recorded top-k/top-p support holding every sampled token."""
    g = torch.Generator().manual_seed(0)
    eos = [vocab - 1, vocab - 2]
    prompts = torch.randint(0, vocab - 2, (groups, P), generator=g)
    prompt_mask = torch.ones(groups, P, dtype=torch.long)
    for row, pad in enumerate([0, 3, 5][:groups]):
        prompt_mask[row, :pad] = 0
    N = groups * group
    responses = torch.randint(0, vocab - 2, (N, T), generator=g)
    responses[1, 2], responses[group + 1, 4] = eos  # one response ends on each EOS id
    mask = response_mask(responses, eos)
    support = None
    if filtered:
        kept = torch.rand(N, T, vocab, generator=g) < 0.3
        kept.scatter_(-1, responses[..., None], True)
        support = pack_support(kept)
    return Rollout(
        prompts=[f"p{i // group}" for i in range(N)], responses=[""] * N,
        sequences=torch.cat([prompts.repeat_interleave(group, 0), responses], 1),
        attention_mask=torch.cat([prompt_mask.repeat_interleave(group, 0), mask], 1), response_mask=mask,
        prompt_length=P, group_size=group, temperature=0.8, top_k=20 if filtered else 0,
        top_p=0.9 if filtered else 1.0, support=support,
    )


def _logprobs_and_gradients(policy, rollout: Rollout, share: bool, weights: torch.Tensor):
    """Per-token log-probs and two objectives' gradients over the adapter (random per-token weights)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    logprobs = token_logprobs(policy, rollout, share_prompt=share)
    mask = rollout.response_mask
    grads = []
    for s, w in enumerate(weights):
        loss = (logprobs * w * mask).sum()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=s == 0)]))
    return logprobs.detach(), grads


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _detached_prompt(monkeypatch) -> None:
    """The control: the shared prompt's keys and values cut from the graph."""

    class Detached(prefix._PromptRecorder):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.detach(), value_states.detach(), layer_idx, *args, **kwargs)

    monkeypatch.setattr(prefix, "_PromptRecorder", Detached)


@pytest.mark.parametrize("kind, checkpointing", [
    ("tiny", False), ("gpt2", False), ("qwen2", False), ("gpt2", True), ("qwen2", True),
])
def test_shared_prompt_logprobs_and_gradients_equal_the_unshared(kind, checkpointing, monkeypatch):
    policy = _hf_model(kind, checkpointing)
    vocab = policy.get_base_model().config.vocab_size
    rollout = _rollout(vocab)
    weights = torch.randn(2, *rollout.response_mask.shape, generator=torch.Generator().manual_seed(1))
    unshared = _logprobs_and_gradients(policy, rollout, False, weights)

    calls = []  # (rows, columns) of each forward pass of the model
    handle = policy.register_forward_pre_hook(
        lambda m, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    attention = next(m for n, m in policy.named_modules() if n.endswith(("attn", "attention")) and "lora" not in n)
    replays = []
    attention.register_forward_hook(lambda *args: replays.append(1))
    shared = _logprobs_and_gradients(policy, rollout, True, weights)
    handle.remove()
    P, T, N = rollout.prompt_length, rollout.response_mask.shape[1], len(rollout.prompts)
    assert calls == [(3, P - 1), (N, T)], "the prompts once per group, then every row's responses"
    if checkpointing:  # the layers stay checkpointed: the backward passes replay them
        assert len(replays) > 2

    mask = rollout.response_mask.bool()
    assert _relative(shared[0][mask], unshared[0][mask]) <= 1e-5
    errors = [_relative(a, b) for a, b in zip(shared[1], unshared[1])]
    print(f"\n{kind} (V={vocab}, checkpointing {checkpointing}): log-probs rel "
          f"{_relative(shared[0][mask], unshared[0][mask]):.1e}, gradients rel {[f'{e:.1e}' for e in errors]}")
    assert max(errors) <= 1e-5

    _detached_prompt(monkeypatch)
    detached = _logprobs_and_gradients(policy, rollout, True, weights)
    assert _relative(detached[0][mask], unshared[0][mask]) <= 1e-5  # the same values...
    assert min(_relative(a, b) for a, b in zip(detached[1], unshared[1])) > 1e-2  # ...but not the same gradients


def test_shared_prompt_in_bf16_errs_no_more_than_bf16_itself():
    """Under bf16 autocast the shared and the unshared pass round differently; the shared one must
    be as close to the fp32 result as the unshared one is (within 2x: both are bf16 round-off)."""
    policy = _hf_model("gpt2")
    rollout = _rollout(policy.get_base_model().config.vocab_size)
    weights = torch.randn(2, *rollout.response_mask.shape, generator=torch.Generator().manual_seed(1))
    exact = _logprobs_and_gradients(policy, rollout, False, weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = {share: _logprobs_and_gradients(policy, rollout, share, weights) for share in (False, True)}
    mask = rollout.response_mask.bool()
    for share in (False, True):
        assert low[share][0].dtype == torch.float32 and torch.isfinite(low[share][0]).all()
    error = {share: (_relative(low[share][0][mask], exact[0][mask]),
                     max(_relative(a, b) for a, b in zip(low[share][1], exact[1]))) for share in (False, True)}
    print(f"\nbf16 vs fp32 (log-probs, gradients): unshared {error[False]}, shared {error[True]}")
    assert 0 < error[False][0] < 0.05 and 0 < error[False][1] < 0.2  # bf16's own round-off, and it is there
    assert error[True][0] <= 2 * error[False][0] and error[True][1] <= 2 * error[False][1]


# --------------------------------------------------------------------------- the local step


class _Built(PolicyBuilder):
    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer

    def build(self):
        return self.model, self.tokenizer


def _chat_policy():
    tokenizer = bpe_tokenizer()
    tokenizer.padding_side = "left"
    return _Built(tiny_chat_model(tokenizer, vocab_size=151936), tokenizer)


STEP_CASES = {  # name: module settings; KL on, SGD, 2 PPO epochs unless said
    "tiny, micro-batches of whole groups": dict(loss=dict(micro_batch_size=3)),
    "tiny, micro-batches cutting groups, gram_from hidden": dict(loss=dict(micro_batch_size=2, gram_from="hidden")),
    "qwen2 V=151936, chat template, two EOS, top-p": dict(policy="chat", sampling=dict(top_p=0.9, top_k=50),
                                                          loss=dict(ppo_epochs=1)),
}


def _step_module(case: dict, share: bool):
    torch.manual_seed(0)
    policy = _chat_policy() if case.get("policy") == "chat" else TinyPolicy()
    lora = LoRASettings(target_modules="all-linear" if case.get("policy") == "chat" else ["c_attn", "c_proj", "c_fc"])
    module = make_module(objectives(), weighting=RegularizedMinNorm(beta=0.1), policy=policy, lora=lora,
                         sampling=SamplingSettings(max_new_tokens=6, num_generations=3, share_prompt=share,
                                                   **case.get("sampling", {})),
                         loss=PolicyGradientSettings(**{"kl_coef": 0.1, "max_grad_norm": None, "ppo_epochs": 2,
                                                        **case.get("loss", {})}))
    torch.manual_seed(1)
    module.load_adapter_state({k: torch.randn_like(v) * 0.1 for k, v in module.adapter_state().items()})
    optimizer = RecordingSGD(module.trainable_parameters(), lr=0.5)
    module.optimizers = lambda *args, **kwargs: optimizer
    return module, optimizer


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_a_step_with_shared_prompts_equals_the_unshared_step(name):
    """λ, the direction written into .grad at each PPO epoch and the adapter after the SGD steps."""
    case, results = STEP_CASES[name], {}
    for share in (False, True):
        module, optimizer = _step_module(case, share)
        rollout = module.rollout(PROMPTS[:4], 3, seed=5)
        rewards = torch.randn(3, len(rollout.prompts), generator=torch.Generator().manual_seed(2))  # S = 3
        lambdas, norm, kl = module.update(rollout, rewards)
        results[share] = dict(epochs=module.loss_settings.ppo_epochs, rollout=rollout, lambdas=lambdas, kl=kl,
                              directions=optimizer.directions, adapter=module.adapter_state())
    shared, unshared = results[True], results[False]
    assert torch.equal(shared["rollout"].sequences, unshared["rollout"].sequences), "the same rollout either way"
    assert (unshared["rollout"].attention_mask[:, : unshared["rollout"].prompt_length] == 0).any(), "left padding"
    errors = [_relative(a, b) for a, b in zip(shared["directions"], unshared["directions"])]
    lambda_error = float((shared["lambdas"] - unshared["lambdas"]).abs().max())
    adapter_error = max(_relative(shared["adapter"][k], unshared["adapter"][k]) for k in shared["adapter"])
    print(f"\n{name}: directions rel {[f'{e:.1e}' for e in errors]}, |Δλ| {lambda_error:.1e} "
          f"(λ {unshared['lambdas'].tolist()}), adapter rel {adapter_error:.1e}")
    assert 0.02 < float(unshared["lambdas"].max()) < 0.98, "an interior λ: its equality says something"
    assert len(errors) == shared["epochs"] and max(errors) <= 1e-5
    assert lambda_error <= 1e-5 and adapter_error <= 1e-5
    assert abs(float(shared["kl"] - unshared["kl"])) <= 1e-5 * abs(float(unshared["kl"]))


def test_no_reference_forward_when_kl_coef_is_zero():
    """κ = 0: the penalty is zero whatever the reference, so the adapter is never switched off for it;
    the logged KL is NaN (not measured)."""
    for kl_coef, passes in ((0.0, 0), (0.1, 1)):
        module = make_module(loss=PolicyGradientSettings(kl_coef=kl_coef))
        optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.1)
        module.optimizers = lambda *args, optimizer=optimizer, **kwargs: optimizer
        switched_off = _count_calls(module.policy, "disable_adapter")
        torch.manual_seed(0)
        rollout = module.rollout(PROMPTS[:2], 2)
        lambdas, norm, kl = module.update(rollout, score_all(module.objectives, rollout.prompts, rollout.responses))
        assert len(switched_off) == passes and torch.isfinite(norm)
        assert torch.isnan(kl) if kl_coef == 0 else torch.isfinite(kl)


def _count_calls(owner, name: str) -> list:
    calls, method = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return method(*args, **kwargs)

    setattr(owner, name, counted)
    return calls


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("policy", ["tiny", "chat"])
def test_sampling_does_not_depend_on_the_layout(policy):
    """Per-prompt generators: the same rollout (tokens, masks, recorded support) at once, in chunks of 5
    sequences (cutting groups), a share of the prompts at a time (as DDP ranks sample) and with the
    prompt shared or not. The control: torch's global generator gives other responses in chunks."""
    torch.manual_seed(0)
    module = make_module(policy=_chat_policy() if policy == "chat" else TinyPolicy(),
                         lora=LoRASettings(target_modules="all-linear" if policy == "chat" else ["c_attn"]))

    def rollout(share=True, chunk=None, seeds=True, prompts=slice(0, 3)):
        sampling = SamplingSettings(max_new_tokens=6, num_generations=3, top_k=40, top_p=0.95, share_prompt=share,
                                    per_prompt_seeds=seeds, generation_batch_size=chunk)
        torch.manual_seed(3)
        return module.rollout(PROMPTS[prompts], 3, sampling=sampling, seed=11, first_prompt=prompts.start)

    whole = rollout(share=False)
    assert whole.support is not None and (whole.attention_mask[:, : whole.prompt_length] == 0).any()
    for other in (rollout(), rollout(chunk=5), rollout(share=False, chunk=5)):
        assert torch.equal(other.sequences, whole.sequences) and torch.equal(other.support, whole.support)
    first, second = rollout(prompts=slice(0, 2)), rollout(prompts=slice(2, 3))
    assert first.responses + second.responses == whole.responses
    if policy == "tiny":
        assert rollout(seeds=False, chunk=5).responses != rollout(seeds=False).responses


def test_a_model_sharing_cannot_serve_computes_every_row_and_says_so_once(caplog):
    """GPT-NeoX is not among the supported types: the unshared result, one log line."""
    policy = _hf_model("gpt_neox")
    rollout = _rollout(1000, filtered=False)
    weights = torch.randn(2, *rollout.response_mask.shape)
    prefix._reported.clear()
    with caplog.at_level(logging.WARNING, logger="firm_lightning.prefix"):
        unshared = _logprobs_and_gradients(policy, rollout, False, weights)
        for _ in range(2):
            shared = _logprobs_and_gradients(policy, rollout, True, weights)
    assert torch.equal(shared[0], unshared[0]) and all(torch.equal(a, b) for a, b in zip(shared[1], unshared[1]))
    lines = [r.getMessage() for r in caplog.records if r.name == "firm_lightning.prefix"]
    assert len(lines) == 1 and "GPTNeoXForCausalLM computes every row's prompt" in lines[0] and "gpt_neox" in lines[0]

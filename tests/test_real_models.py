"""The library as a real LLM sees it: byte-level BPE (id 0 is ``"!"``), BOS, two EOS ids, a
chat template, and a checkpoint whose ``generation_config`` carries its own sampling settings.

Fixtures: ``tests/real_like.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from firm_lightning.policy import LoRASettings, PretrainedPolicy, add_lora
from firm_lightning.sequences import (
    checkpoint_generation_settings_ignored,
    encode_prompts,
    eos_token_ids,
    response_logprobs,
    pack_support,
    sample,
    sampling_config,
    token_logprobs,
    unpack_support,
)
from firm_lightning.tokenizer import char_tokenizer
from real_like import (
    CHECKPOINT_GENERATION,
    END_OF_TEXT,
    IM_END,
    bpe_tokenizer,
    eos_ids,
    save_real_like,
    tiny_chat_model,
)

PROMPTS = ["Hi", "What is a good substitute for butter in omelettes?", "Why?", "Tell me a joke."]
LORA = LoRASettings(target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    """The checkpoint with its generation settings, under a LoRA adapter (as the module holds it).

    ``<|endoftext|>`` gets ``<|im_end|>``'s embedding so that both EOS ids end responses often.
    """
    model = tiny_chat_model(tokenizer)
    im_end, end_of_text = eos_ids(tokenizer)
    with torch.no_grad():
        model.model.embed_tokens.weight[end_of_text] = model.model.embed_tokens.weight[im_end]
    return add_lora(model, LORA).eval()


def _first_eos(ids: list[int], eos: set[int]) -> int | None:
    return next((j for j, t in enumerate(ids) if t in eos), None)


def test_the_fixture_is_real_like(tokenizer):
    assert tokenizer.decode([0]) == "!", "id 0 must be an ordinary byte token, as in GPT-2 and Qwen"
    model = tiny_chat_model(tokenizer)
    # Three different EOS declarations, as Qwen2.5-Instruct ships them.
    assert tokenizer.eos_token == IM_END and model.config.eos_token_id == tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    assert sorted(eos_token_ids(model, tokenizer)) == sorted(eos_ids(tokenizer))
    assert model.generation_config.repetition_penalty == 1.3 and model.generation_config.no_repeat_ngram_size == 1


def test_decoded_response_is_exactly_the_generated_tokens_before_eos(tokenizer, policy):
    eos = set(eos_ids(tokenizer))
    ended_by = set()
    for seed in range(20):
        torch.manual_seed(seed)
        rollout = sample(policy, tokenizer, PROMPTS, 4, 24)
        P = rollout.prompt_length
        for row, text in enumerate(rollout.responses):
            generated = rollout.sequences[row, P:].tolist()
            end = _first_eos(generated, eos)
            assert text == tokenizer.decode(generated[:end], skip_special_tokens=True)
            expected_mask = [1] * len(generated) if end is None else [1] * (end + 1) + [0] * (len(generated) - end - 1)
            assert rollout.response_mask[row].tolist() == expected_mask, "every EOS id must end the response"
            if end is not None and end < len(generated) - 1:
                ended_by.add(generated[end])
                # The defect this guards against: zeroed ids after EOS decode as "!!!".
                zeroed = (rollout.sequences[row, P:] * rollout.response_mask[row]).tolist()
                assert tokenizer.decode(zeroed, skip_special_tokens=True).endswith("!" * (len(generated) - end - 1))
                assert not text.endswith("!!")
        if ended_by == eos:
            break
    assert ended_by == eos, f"draws should end early with both EOS ids; saw {ended_by}"


def _repeat_free_rows(rollout) -> float:
    rows = [
        ids[m.bool()].tolist() for ids, m in zip(rollout.sequences[:, rollout.prompt_length :], rollout.response_mask)
    ]
    return sum(len(set(r)) == len(r) for r in rows) / len(rows)


def test_sampling_ignores_the_checkpoints_generation_settings(tokenizer, policy):
    plain = add_lora(tiny_chat_model(tokenizer), LORA).eval()
    plain.load_state_dict(policy.state_dict())
    plain.get_base_model().generation_config = GenerationConfig()  # a checkpoint with no settings
    for seed in range(3):
        torch.manual_seed(seed)
        got = sample(policy, tokenizer, PROMPTS, 4, 16)
        torch.manual_seed(seed)
        expected = sample(plain, tokenizer, PROMPTS, 4, 16)
        assert torch.equal(got.sequences, expected.sequences), "the checkpoint's generation_config leaked into sampling"
    # The checkpoint's own settings are untouched, and they would have changed the samples.
    assert policy.get_base_model().generation_config.no_repeat_ngram_size == 1
    torch.manual_seed(0)
    leaked = policy.generate(**encode_prompts(tokenizer, PROMPTS * 4, 64, torch.device("cpu")), max_new_tokens=16)
    assert not torch.equal(leaked, got.sequences)


def test_a_policy_loaded_by_path_samples_from_the_config_not_the_checkpoint(tmp_path, tokenizer):
    paths = save_real_like(tmp_path)
    model, loaded_tokenizer = PretrainedPolicy(str(paths["policy"])).build()
    assert model.generation_config.top_k == CHECKPOINT_GENERATION["top_k"]
    torch.manual_seed(0)
    rollout = sample(model, loaded_tokenizer, PROMPTS, 8, 16)
    # no_repeat_ngram_size=1 from the checkpoint would make every row repeat-free.
    assert _repeat_free_rows(rollout) < 0.9


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.3, 0, 0.8)])
def test_sampling_logprobs_equal_token_logprobs(tokenizer, policy, temperature, top_k, top_p):
    torch.manual_seed(3)
    rollout = sample(policy, tokenizer, PROMPTS, 2, 16, temperature=temperature, top_k=top_k, top_p=top_p)
    repeated = [p for p in PROMPTS for _ in range(2)]
    encoded = encode_prompts(tokenizer, repeated, 256, torch.device("cpu"))
    config = sampling_config(16, temperature, top_k, top_p, tokenizer.pad_token_id, eos_token_ids(policy, tokenizer))
    torch.manual_seed(3)
    with torch.no_grad(), checkpoint_generation_settings_ignored(policy):
        out = policy.generate(**encoded, generation_config=config, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, rollout.sequences)
    targets = out.sequences[:, rollout.prompt_length :]
    sampled = F.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, targets[..., None])[..., 0]
    with torch.no_grad():
        got = token_logprobs(policy, rollout)
    mask = rollout.response_mask.bool()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[mask], sampled[mask], rtol=0, atol=1e-4)


def _generate_reference(model, tokenizer, prompts, group, max_new, temperature, top_k, top_p, seed):
    """``generate`` with its own warpers: the sampled ids and the distribution each token was drawn from."""
    repeated = [p for p in prompts for _ in range(group)]
    encoded = encode_prompts(tokenizer, repeated, 256, torch.device("cpu"))
    config = sampling_config(
        max_new, temperature, top_k, top_p, tokenizer.pad_token_id, eos_token_ids(model, tokenizer)
    )
    config.output_scores, config.return_dict_in_generate = True, True
    torch.manual_seed(seed)
    with torch.no_grad(), checkpoint_generation_settings_ignored(model):
        out = model.generate(**encoded, generation_config=config)
    return out.sequences, torch.stack(out.scores, 1).float()  # scores: fp32 after temperature, top-k, top-p


def test_bf16_top_k_top_p_logprobs_use_the_support_sampling_used(tokenizer):
    """bf16: the training forward's logits differ from generation's by bf16 round-off, enough to move the
    top-k/top-p boundary; the loss must renormalise over the set the tokens were actually drawn from."""
    model = add_lora(tiny_chat_model(tokenizer).to(torch.bfloat16), LORA).eval()
    temperature, top_k, top_p = 0.7, 10, 0.8
    worst, tokens = 0.0, 0
    for seed in range(5):
        torch.manual_seed(seed)
        rollout = sample(model, tokenizer, PROMPTS, 4, 16, temperature=temperature, top_k=top_k, top_p=top_p)
        sequences, scores = _generate_reference(model, tokenizer, PROMPTS, 4, 16, temperature, top_k, top_p, seed)
        assert torch.equal(sequences, rollout.sequences), "sampling must draw exactly as generate's own warpers"
        mask = rollout.response_mask.bool()
        targets = sequences[:, rollout.prompt_length :]
        sampled = F.log_softmax(scores, -1).gather(-1, targets[..., None])[..., 0]
        with torch.no_grad():
            got = token_logprobs(model, rollout)
        assert torch.isfinite(got).all()
        worst = max(worst, (got - sampled)[mask].abs().max().item())
        tokens += int(mask.sum())
        support = unpack_support(rollout.support, scores.shape[-1])
        assert torch.equal(support[mask], torch.isfinite(scores)[mask]), "the carried support is the sampling's"
        assert support.gather(-1, targets[..., None])[..., 0][mask].all(), "every sampled token lies in the support"
    print(f"\nbf16, {tokens} sampled tokens: max |log-prob for the loss − sampling log-prob| = {worst:.4f} nats")
    assert worst < 0.05, f"the loss's log-probs differ from the sampling distribution by up to {worst:.2f} nats"


def test_a_rollout_that_is_only_scored_draws_the_same_responses_without_the_support(tokenizer):
    """Evaluation and `generate` skip the N·T·V/8-byte kept sets; the responses must not change."""
    model = add_lora(tiny_chat_model(tokenizer), LORA).eval()
    settings = dict(temperature=0.7, top_k=10, top_p=0.8)
    torch.manual_seed(3)
    kept = sample(model, tokenizer, PROMPTS, 2, 12, **settings)
    torch.manual_seed(3)
    scored = sample(model, tokenizer, PROMPTS, 2, 12, **settings, record_support=False)
    assert kept.support is not None and scored.support is None
    assert torch.equal(kept.sequences, scored.sequences) and kept.responses == scored.responses


def test_support_bits_round_trip():
    kept = torch.rand(3, 5, 21, generator=torch.Generator().manual_seed(0)) < 0.3  # 21: not a multiple of 8
    packed = pack_support(kept)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 3)
    assert torch.equal(unpack_support(packed, 21), kept)


def test_prompts_get_the_chat_template_or_bos_and_never_an_eos(tokenizer):
    device = torch.device("cpu")
    chat = encode_prompts(tokenizer, ["Hi", "Why is the sky blue?"], 64, device)  # default: the template
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why is the sky blue?"}], add_generation_prompt=True
    )
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert chat["input_ids"][1].tolist() == list(expected)
    assert chat["attention_mask"][0].tolist()[0] == 0, "left padding"
    truncated = encode_prompts(tokenizer, ["Why is the sky blue?"], 4, device)["input_ids"][0]
    tail = tokenizer.decode(tokenizer("Why is the sky blue?", add_special_tokens=False)["input_ids"][-4:])
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": tail}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(truncated) == rendered, "a long prompt keeps its end inside an intact template"
    raw = encode_prompts(tokenizer, ["Hi", "Why is the sky blue?"], 4, device, chat_template=False)
    ids = raw["input_ids"][1].tolist()
    assert ids[0] == tokenizer.bos_token_id, "add_special_tokens=False must not drop a Llama-style BOS"
    assert ids[1:] == tokenizer("Why is the sky blue?", add_special_tokens=False)["input_ids"][-4:], "keeps the end"
    assert not set(eos_ids(tokenizer)) & set(raw["input_ids"].flatten().tolist()) - {tokenizer.pad_token_id}
    with pytest.raises(ValueError, match="has no chat template; set chat_template to null or false"):
        encode_prompts(char_tokenizer(), ["Hi"], 8, device, chat_template=True)


def test_logits_only_for_response_positions_and_exact_chunked_logprobs(tokenizer, policy, monkeypatch):
    torch.manual_seed(0)
    rollout = sample(policy, tokenizer, PROMPTS, 2, 12, temperature=0.9, top_k=50)
    shapes = []
    hook = policy.get_base_model().lm_head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        token_logprobs(policy, rollout)
    hook.remove()
    T = rollout.sequences.shape[1] - rollout.prompt_length
    assert shapes == [(len(rollout.responses), T + 1, len(tokenizer))], "logits for prompt positions were computed"

    # Checkpointed fp32 chunks give the values and gradients of the plain formula.
    monkeypatch.setattr("firm_lightning.sequences.CHUNK_ELEMENTS", 3 * len(tokenizer))  # 3 tokens per chunk
    logits = torch.randn(3, 8, len(tokenizer), dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, len(tokenizer), (3, 8))
    weights = torch.randn(3, 8)
    got = response_logprobs(logits, targets)
    (got * weights).sum().backward()
    grad, logits.grad = logits.grad.clone(), None
    reference = -F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    (reference * weights).sum().backward()
    torch.testing.assert_close(got, reference)
    torch.testing.assert_close(grad, logits.grad)


# --------------------------------------------------------------------------- reward models

RAY2333 = "\n\nHuman: {prompt}\n\nAssistant: {response}"


def _reward_inputs(reward, prompts, responses) -> list[list[int]]:
    """The token ids the reward model's forward pass receives (padding removed)."""
    seen = []
    reward([prompts[0]], [responses[0]])  # loads the model
    hook = reward._model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.extend(
            ids[mask.bool()].tolist() for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])
        ),
        with_kwargs=True,
    )
    scores = reward(prompts, responses)
    hook.remove()
    assert scores.shape == (len(prompts),) and torch.isfinite(scores).all()
    return seen


def test_reward_model_reads_its_own_template_and_truncation_keeps_the_response(tmp_path, tokenizer):
    from firm_lightning.rewards import HFRewardModel

    paths = save_real_like(tmp_path)
    prompts = ["How do I boil an egg?", ("Tell me about rivers. " * 30).strip()]
    responses = ["Put it in boiling water for nine minutes.", "Rivers flow to the sea."]
    reward = HFRewardModel("helpful", str(paths["reward"]), template=RAY2333, max_length=64)
    short, long = _reward_inputs(reward, prompts, responses)
    assert short[0] == tokenizer.bos_token_id, "the BOS the reward tokenizer adds is kept"
    assert tokenizer.decode(short[1:]) == RAY2333.format(prompt=prompts[0], response=responses[0])
    assert len(long) == 64 and long[0] == tokenizer.bos_token_id
    text = tokenizer.decode(long[1:])
    assert text.endswith("rivers.\n\nAssistant: Rivers flow to the sea."), text
    assert not text.startswith("\n\nHuman: Tell"), "the start of the prompt should have been dropped"
    assert text.startswith("\n\nHuman:"), "the template's head is not part of the prompt"
    # A response longer than max_length alone keeps its beginning.
    reward_small = HFRewardModel("h", str(paths["reward"]), template=RAY2333, max_length=24)
    (only,) = _reward_inputs(reward_small, ["Hi"], ["one two three four five six seven eight nine ten"])[-1:]
    assert len(only) == 24 and "\n\nAssistant: one two" in tokenizer.decode(only), tokenizer.decode(only)
    with pytest.raises(ValueError, match=r"must contain \{response\} exactly once"):
        HFRewardModel("bad", str(paths["reward"]), template="{prompt}")


HH_PROMPT = "\n\nHuman: How do I boil an egg?\n\nAssistant:"


def test_reward_template_never_doubles_the_space_before_the_response(tmp_path, tokenizer):
    """GPT-2 answers "Assistant:" with a leading space; "{prompt} {response}" must not make it two."""
    from firm_lightning.rewards import HFRewardModel

    paths = save_real_like(tmp_path)
    reward = HFRewardModel("helpful", str(paths["reward"]), template="{prompt} {response}")
    canonical = HH_PROMPT + " Put it in boiling water."
    expected = tokenizer(canonical)["input_ids"]
    assert tokenizer(HH_PROMPT + "  Put it in boiling water.")["input_ids"] != expected, "BPE sees the double space"
    for response in (" Put it in boiling water.", "Put it in boiling water.", "\n Put it in boiling water."):
        (ids,) = _reward_inputs(reward, [HH_PROMPT], [response])
        assert ids == expected, f"{response!r} -> {tokenizer.decode(ids)!r}"
    # A template without whitespace before {response} leaves the response untouched.
    glued = HFRewardModel("glued", str(paths["reward"]), template="{prompt}{response}")
    (ids,) = _reward_inputs(glued, [HH_PROMPT], [" Put it in boiling water."])
    assert ids == expected


def test_hh_prompts_reach_chat_templates_as_the_question_alone(tmp_path, tokenizer):
    from firm_lightning.module import SamplingSettings
    from firm_lightning.rewards import HFRewardModel
    from firm_lightning.sequences import user_message

    assert SamplingSettings().user_message == "question", "on by default"
    device = torch.device("cpu")
    question_alone = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I boil an egg?"}], tokenize=False, add_generation_prompt=True
    )
    policy_ids = encode_prompts(tokenizer, [HH_PROMPT], 64, device)["input_ids"][0]
    assert tokenizer.decode(policy_ids) == question_alone
    assert "Human:" not in tokenizer.decode(policy_ids)
    as_is = encode_prompts(tokenizer, [HH_PROMPT], 64, device, user_message_mode="prompt")["input_ids"][0]
    assert "<|im_start|>user\n\n\nHuman: How do I boil an egg?\n\nAssistant:<|im_end|>" in tokenizer.decode(as_is)
    # Without a chat template (a base LM such as GPT-2) the HH text is the prompt itself.
    raw = encode_prompts(tokenizer, [HH_PROMPT], 64, device, chat_template=False)["input_ids"][0]
    assert tokenizer.decode(raw[1:]) == HH_PROMPT
    # Only an HH single turn is rewritten.
    two_turns = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Why?\n\nAssistant:"
    assert user_message(two_turns) == two_turns and user_message("Why?") == "Why?"
    with pytest.raises(ValueError, match=r"user_message='answer'.*\['question', 'prompt'\]"):
        user_message(HH_PROMPT, "answer")
    # A chat-template reward model gets the same user message; the rewards still score the prompt as given.
    paths = save_real_like(tmp_path)
    reward = HFRewardModel("helpful", str(paths["reward"]), chat_template=True)
    (ids,) = _reward_inputs(reward, [HH_PROMPT], ["Put it in boiling water."])
    pair = [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water."},
    ]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(pair, tokenize=False), "one BOS, the question alone"


def test_a_chat_policy_samples_from_the_question_and_rewards_see_the_hh_prompt(tokenizer):
    from firm_lightning.sequences import sample

    model = add_lora(tiny_chat_model(tokenizer), LORA).eval()
    torch.manual_seed(0)
    rollout = sample(model, tokenizer, [HH_PROMPT], 2, 4)
    prompt_text = tokenizer.decode(rollout.sequences[0, : rollout.prompt_length], skip_special_tokens=False)
    assert "Human:" not in prompt_text and "How do I boil an egg?" in prompt_text
    assert rollout.prompts == [HH_PROMPT] * 2


def test_reward_model_with_chat_template_and_bos(tmp_path, tokenizer):
    from firm_lightning.rewards import HFRewardModel

    paths = save_real_like(tmp_path)
    reward = HFRewardModel("helpful", str(paths["reward"]), chat_template=True, max_length=30)
    (ids,) = _reward_inputs(reward, ["Tell me about rivers. " * 10], ["Rivers flow."])[-1:]
    assert len(ids) == 30 and ids[0] == tokenizer.bos_token_id, "the BOS the tokenizer adds is kept"
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\nRivers flow.<|im_end|>\n")
    assert "<|im_start|>user\n" in tokenizer.decode(ids), "the template around the prompt is kept"


def test_reward_models_follow_the_policy_device_not_cuda(tmp_path, monkeypatch):
    """``device`` unset: the policy's device, even where CUDA exists (cuda:0 was the old default)."""
    from firm_lightning.rewards import HFRewardModel, NormalizedReward

    paths = save_real_like(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # would send it to cuda:0
    reward = HFRewardModel("helpful", str(paths["reward"]), template=RAY2333)
    wrapped = NormalizedReward(reward)
    wrapped.to(torch.device("cpu"))
    wrapped(["Hi"] * 2, ["Hello.", "Hey."])
    assert reward._model.device == torch.device("cpu")
    # After loading, moving the policy moves the reward model (here to "meta", a device every machine has).
    wrapped.to("meta")
    assert reward._model.device == torch.device("meta")
    pinned = HFRewardModel("h", str(paths["reward"]), device="cpu")
    pinned.to("meta")
    pinned(["Hi"], ["Hello."])
    assert pinned._model.device == torch.device("cpu"), "a configured device wins"


# --------------------------------------------------------------------------- precision


class _StubOptimizer:
    def __init__(self, params):
        self.params, self.grads = params, None

    def zero_grad(self, set_to_none=True):
        pass

    def step(self, closure=None):
        self.grads = torch.cat([p.grad.detach().flatten().clone() for p in self.params])


def _nearly_aligned_losses(module, rollout):
    """Two objectives whose gradients are ``g ± ε h`` (``h ⟂ g``) with slightly different norms:
    nearly aligned (cosine ≈ 0.99), with an interior min-norm point."""
    logprobs = token_logprobs(module.policy, rollout)
    per_sequence = (logprobs * rollout.response_mask).sum(1)
    generator = torch.Generator().manual_seed(0)
    a, c = torch.randn(2, *per_sequence.shape, generator=generator)
    params = module.trainable_parameters()

    def grad(coefficients):  # the gradient is linear in the per-sequence coefficients
        grads = torch.autograd.grad(-(coefficients * per_sequence).mean(), params, retain_graph=True)
        return torch.cat([g.flatten() for g in grads]).double()

    g, h = grad(a), grad(c)
    c = c - (g @ h / (g @ g)).float() * a  # h ⟂ g
    return torch.stack([-((a + 0.05 * c) * per_sequence).mean(), -((1.003 * a - 0.05 * c) * per_sequence).mean()])


def test_lambda_inside_bf16_autocast_equals_lambda_in_fp32(monkeypatch):
    from conftest import make_module
    from firm_lightning.module import PolicyGradientSettings
    from firm_lightning.weighting import RegularizedMinNorm

    torch.manual_seed(0)
    module = make_module(weighting=RegularizedMinNorm(beta=0.0), loss=PolicyGradientSettings(max_grad_norm=None))
    module.load_adapter_state({k: torch.randn_like(v) * 0.1 for k, v in module.adapter_state().items()})
    stub = _StubOptimizer(module.trainable_parameters())
    monkeypatch.setattr(module, "optimizers", lambda *args, **kwargs: stub)
    rollout = module.rollout(PROMPTS, 4)

    lambdas_fp32, _ = module.weighted_step(_nearly_aligned_losses(module, rollout))
    d_fp32 = stub.grads
    losses = _nearly_aligned_losses(module, rollout)  # the same fp32 graph: only the step's precision differs
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16-mixed puts around training_step
        lambdas_bf16, _ = module.weighted_step(losses)
    print(f"λ fp32 {lambdas_fp32.tolist()}, inside bf16 autocast {lambdas_bf16.tolist()}")
    assert 0.02 < lambdas_fp32[0] < 0.98, "the min-norm point should be interior for this check"
    assert lambdas_bf16.dtype == torch.float32 and stub.grads.dtype == torch.float32
    torch.testing.assert_close(lambdas_bf16, lambdas_fp32, rtol=0, atol=1e-5)
    torch.testing.assert_close(stub.grads, d_fp32, rtol=1e-5, atol=1e-9)


def test_a_non_finite_gradient_outside_fp16_is_refused_naming_the_objective(monkeypatch):
    from conftest import make_module

    module = make_module()
    monkeypatch.setattr(module, "optimizers", lambda *args, **kwargs: _StubOptimizer(module.trainable_parameters()))
    rollout = module.rollout(PROMPTS, 2)
    finite = token_logprobs(module.policy, rollout).mean()
    second = token_logprobs(module.policy, rollout).mean()  # its own graph: the inf stays in it
    infinite_slope = torch.sqrt(second - second.detach())  # value 0, derivative inf
    with pytest.raises(FloatingPointError, match=r"objective\(s\) \['n_to_z'\].*adapter stays finite"):
        module.weighted_step([finite, infinite_slope])


class _GradAtStep:
    """Records the trainable gradients the optimiser steps on (after any unscaling)."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        outer = self

        class _Callback(Callback):
            def on_before_optimizer_step(self, trainer, pl_module, optimizer):
                outer.grads.append(torch.cat([p.grad.flatten().clone() for p in pl_module.trainable_parameters()]))

        self.grads, self.callback = [], _Callback()


def _one_step(precision_plugin=None):
    import lightning as L
    from conftest import make_module
    from firm_lightning.datamodule import collate_prompts

    torch.manual_seed(0)
    module = make_module()
    module.load_adapter_state({k: torch.randn_like(v) * 0.1 for k, v in module.adapter_state().items()})
    torch.manual_seed(1)
    rollout = module.rollout(PROMPTS, 2)  # one fixed rollout: fp16 sampling would draw other tokens
    module.rollout = lambda prompts, group_size: rollout
    recorder = _GradAtStep()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder.callback],
        plugins=[precision_plugin] if precision_plugin else None,
    )
    loader = torch.utils.data.DataLoader([{"prompt": p} for p in PROMPTS], batch_size=4, collate_fn=collate_prompts)
    trainer.fit(module, train_dataloaders=loader)
    return recorder.grads[0], trainer


def test_16_mixed_steps_on_the_unscaled_direction():
    """Under fp16 AMP the GradScaler unscales ``.grad`` before the step: what it unscales must be d × scale."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    reference, _ = _one_step()
    fp16, trainer = _one_step(MixedPrecision("16-mixed", "cpu"))
    assert trainer.precision_plugin.scaler.get_scale() == 65536.0, "no overflow: the scale stays"
    ratio = (fp16.norm() / reference.norm()).item()
    relative = ((fp16 - reference).norm() / reference.norm()).item()
    print(f"‖d 16-mixed‖ / ‖d 32-true‖ = {ratio:.4f}, relative difference {relative:.2e}")
    assert relative < 0.02, f"16-mixed stepped on a different direction (ratio of norms {ratio:.3g})"


# --------------------------------------------------------------------------- devices


def test_the_base_model_is_not_sent_back_to_the_cpu_after_each_fit(tmp_path, monkeypatch):
    """Counted on CPU (the same calls copy the base model host↔device on a GPU)."""
    from conftest import make_datamodule, make_module
    from firm_lightning.module import FIRMClientModule
    from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
    from firm_lightning.trainer_factory import TrainerFactory

    moves = []
    original = FIRMClientModule.cpu
    monkeypatch.setattr(FIRMClientModule, "cpu", lambda self: moves.append(1) or original(self))

    def federation(folder):
        config = FederationConfig(num_rounds=1, num_clients=2, output_dir=str(folder), save_adapters=False)
        factory = TrainerFactory({"max_steps": 1, "accelerator": "cpu", "logger": False}, folder)
        return FederatedOrchestrator(make_module(), make_datamodule(2), config, factory, echo=lambda _: None)

    orchestrator = federation(tmp_path / "run")
    orchestrator.run()
    assert moves == [], f"module.cpu() ran {len(moves)} times during a 2-client round (expected 0)"
    # Control: a bare Trainer.fit does move it (the teardown the orchestrator neutralises).
    import lightning as L
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False).fit(
        orchestrator.module, orchestrator.datamodule.client_dataloader(0, round_idx=1)
    )
    assert len(moves) == 1
    assert "cpu" not in vars(orchestrator.module), "the run restores the module's own cpu()"

"""Sampling responses and scoring their tokens, as a real checkpoint sees them.

- Prompts: the tokenizer's chat template when it has one (configurable), otherwise the
  raw text behind the special tokens the tokenizer puts first (Llama's BOS); never the ones
  it appends (ByT5's EOS). Left padded so every response starts at the same column.
- Sampling: exactly the configured settings, optionally each prompt's samples drawn from
  generators of their own (``row_generators``), so that a rollout does not depend on how its
  rows are batched. ``generate`` fills every unset field from the checkpoint's
  ``generation_config`` (Qwen2.5-Instruct ships ``repetition_penalty``, ``top_k``, ``top_p``),
  so that config is swapped for a blank one while sampling; every EOS id that the tokenizer,
  the model config or the generation config declares ends a response.
- Decoding: exactly the tokens generated before the EOS (ids after it are never decoded: in
  byte-level BPE vocabularies id 0 is ``"!"``).
- Log-probs: those of the sampled distribution (temperature, top-k, top-p), for the response
  positions only (``logits_to_keep``), log-softmax in fp32 chunks that are recomputed in the
  backward pass instead of stored. Position ids are explicit (``cumsum(mask) - 1``): GPT-2
  otherwise counts pad tokens as positions.
- Shared prompts (``firm_lightning.prefix``): each prompt computed once per group, in sampling
  and in the log-prob passes, where the model allows it.
- Filtered support: with top-k/top-p, the set of tokens sampling kept at each position is
  recorded while sampling (one bit per vocabulary entry) and carried with the ``Rollout``;
  the log-probs renormalise over exactly that set. Recomputing the filter from the training
  forward's logits instead would pick another set wherever those logits differ from
  generation's (bf16: a different kernel path shifts them by ~1e-2, enough to move the
  top-k/top-p boundary), leaving sampled tokens outside the set the loss normalises over.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from firm_lightning.prefix import prefilled_prompt_cache, shared_prompt_logits

# fp32 elements per log-softmax chunk (64 MB): bounds the working memory whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 24


@dataclass
class Rollout:
    """``G`` sampled responses for each of ``B`` prompts, flattened prompt-major (``B*G`` rows)."""

    prompts: list[str]  # one per row (each prompt repeated G times)
    responses: list[str]  # decoded from the tokens before the first EOS
    sequences: torch.Tensor  # (N, P + T) prompt then response token ids
    attention_mask: torch.Tensor  # (N, P + T), 0 on left padding and after the response's EOS
    response_mask: torch.Tensor  # (N, T), 1 on response tokens up to and including EOS
    prompt_length: int  # P
    group_size: int  # G
    temperature: float = 1.0  # the sampling distribution, for token_logprobs
    top_k: int = 0
    top_p: float = 1.0
    # (N, T, ceil(V/8)) uint8, bit v of row n, position t set when sampling kept token v there
    # (see pack_support); None when nothing was filtered (the whole vocabulary).
    support: Optional[torch.Tensor] = None

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) // self.group_size

    def to(self, device) -> "Rollout":
        """The same rollout with its tensors on ``device``."""
        moved = {f: getattr(self, f).to(device) for f in ("sequences", "attention_mask", "response_mask")}
        support = None if self.support is None else self.support.to(device)
        return dataclasses.replace(self, **moved, support=support)

    def rows(self, rows: slice) -> "Rollout":
        """The rows ``rows`` (a micro-batch of sequences), same columns: ``P`` and ``T`` are kept, so
        token positions and the loss's normalisers mean the same as in the whole rollout."""
        return dataclasses.replace(
            self, prompts=self.prompts[rows], responses=self.responses[rows], sequences=self.sequences[rows],
            attention_mask=self.attention_mask[rows], response_mask=self.response_mask[rows],
            support=None if self.support is None else self.support[rows],
        )


def micro_batches(num_rows: int, size: Optional[int]) -> list[slice]:
    """Consecutive row slices of at most ``size`` rows (``None``: one slice of every row)."""
    if size is not None and size < 1:
        raise ValueError(f"A micro-batch needs at least one row; got size {size}.")
    size = max(1, num_rows) if size is None else size
    return [slice(start, min(start + size, num_rows)) for start in range(0, num_rows, size)]


def concat_rollouts(parts: list["Rollout"], pad_token_id: int, group_size: int) -> "Rollout":
    """Rollouts sampled separately as one: the prompts re-padded on the left to the widest ``P``,
    the responses on the right to the longest ``T`` (pad id, attention 0, response mask 0), as one
    ``generate`` call lays them out. Support positions added on the right are the whole vocabulary:
    they lie after every EOS (masked out) and keep those log-probs finite."""
    if len(parts) == 1:
        return parts[0]
    P = max(p.prompt_length for p in parts)
    T = max(p.response_mask.shape[1] for p in parts)
    sequences, attention, responses, supports = [], [], [], []
    for part in parts:
        left, right = P - part.prompt_length, T - part.response_mask.shape[1]
        pad = lambda x, value, left=left, right=right: torch.nn.functional.pad(x, (left, right), value=value)
        sequences.append(pad(part.sequences, pad_token_id))
        attention.append(pad(part.attention_mask, 0))
        responses.append(torch.nn.functional.pad(part.response_mask, (0, right), value=0))
        if part.support is not None:
            supports.append(torch.nn.functional.pad(part.support, (0, 0, 0, right), value=255))
    first = parts[0]
    return Rollout(
        prompts=[p for part in parts for p in part.prompts],
        responses=[r for part in parts for r in part.responses],
        sequences=torch.cat(sequences), attention_mask=torch.cat(attention), response_mask=torch.cat(responses),
        prompt_length=P, group_size=group_size, temperature=first.temperature, top_k=first.top_k,
        top_p=first.top_p, support=torch.cat(supports) if supports else None,
    )


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what ``generate`` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# ---------------------------------------------------------------------------- prompts


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: Optional[bool]) -> bool:
    """``None``: use the tokenizer's chat template when it has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has_template:
        raise ValueError(
            f"chat_template=True but the tokenizer {type(tokenizer).__name__} "
            f"({getattr(tokenizer, 'name_or_path', '')!r}) has no chat template; set chat_template to null or false."
        )
    return has_template if chat_template is None else chat_template


def leading_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before a text (BOS for Llama-family; none for GPT-2, Qwen)."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


# HH-RLHF's turn markers: its prompts read "\n\nHuman: {question}\n\nAssistant:".
HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
USER_MESSAGES = ("question", "prompt")
# Where RiC's evaluation cuts a generated response, in this order (YangRui2015/RiC, ppo/eval_ppo_single_model.py).
HH_RESPONSE_CUTS = ("\n\nHuman:", "\nHuman:", "\n\nAssistant:", "\nAssistant:", "\n\n\n")


def hh_dialogue_prompt(conversation: str) -> str:
    """RiC's prompt of an HH-RLHF conversation: the dialogue before its last ``"\n\nAssistant:"``, as
    written (a human turn's trailing spaces kept), then ``" \n\nAssistant:"`` (``build_dataset_eval``)."""
    if HH_ASSISTANT not in conversation:
        raise ValueError(f"No '\\n\\nAssistant:' turn in conversation {conversation[:80]!r}: is this HH-RLHF data?")
    return HH_ASSISTANT.join(conversation.split(HH_ASSISTANT)[:-1]) + " " + HH_ASSISTANT


def hh_reward_query(text: str) -> str:
    """The query RiC's reward models read for ``text`` (a prompt, or a prompt and its response): the dialogue
    before the last ``"\n\nAssistant:"``, right-stripped, then ``" \n\nAssistant:"`` (``Instructions.get_input``)."""
    return HH_ASSISTANT.join(text.split(HH_ASSISTANT)[:-1]).rstrip() + " " + HH_ASSISTANT


def hh_reward_response(text: str) -> str:
    """The response RiC's reward models read for a prompt and its response: what follows the last
    ``"\n\nAssistant:"``, stripped (``Instructions.get_response``)."""
    return text.split(HH_ASSISTANT)[-1].strip()


def cut_at_turns(response: str) -> str:
    """``response`` cut before each of ``HH_RESPONSE_CUTS`` in turn, stripped after each cut, as RiC does: a
    response that goes on to invent the next turns keeps only its own."""
    for marker in HH_RESPONSE_CUTS:
        response = response.split(marker)[0].strip()
    return response


def hh_question(prompt: str) -> Optional[str]:
    """The question of a prompt in HH-RLHF's single-turn format, else None."""
    if not (prompt.startswith(HH_HUMAN) and prompt.endswith(HH_ASSISTANT)):
        return None
    question = prompt[len(HH_HUMAN) : len(prompt) - len(HH_ASSISTANT)]
    if HH_HUMAN in question or HH_ASSISTANT in question:  # several turns: not one question
        return None
    return question.strip()


def user_message(prompt: str, mode: str = "question") -> str:
    """The user message a chat template gets for ``prompt``.

    ``question``: a prompt in HH-RLHF's single-turn format is sent as its question alone (the
    template supplies the roles; inside a user turn the ``Human:``/``Assistant:`` markup would
    be text the model must answer around). ``prompt``: the prompt as is. Any other prompt is
    sent as is either way.
    """
    if mode not in USER_MESSAGES:
        raise ValueError(f"sampling.user_message={mode!r} is unknown; use one of {list(USER_MESSAGES)}.")
    question = hh_question(prompt) if mode == "question" else None
    return prompt if question is None else question


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_length: int,
    device: torch.device,
    chat_template: Optional[bool] = None,
    system_prompt: Optional[str] = None,
    user_message_mode: str = "question",
) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids. A prompt longer than ``max_length`` tokens keeps its end; the
    chat template's tokens or the leading BOS come on top of ``max_length``. With the chat
    template the user message is ``user_message(prompt, user_message_mode)``."""
    rows = prompt_token_rows(tokenizer, prompts, max_length, chat_template, system_prompt, user_message_mode)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def prompt_token_rows(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_length: int,
    chat_template: Optional[bool] = None,
    system_prompt: Optional[str] = None,
    user_message_mode: str = "question",
) -> list[list[int]]:
    """Each prompt's ids as ``encode_prompts`` feeds them to the policy (before padding)."""
    if uses_chat_template(tokenizer, chat_template):
        messages = [user_message(p, user_message_mode) for p in prompts]
        encoded = tokenizer(messages, add_special_tokens=False)["input_ids"]
        kept = [
            m if len(ids) <= max_length else tokenizer.decode(ids[-max_length:]) for m, ids in zip(messages, encoded)
        ]
        texts = [_chat(tokenizer, text, system_prompt) for text in kept]
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template holds its own BOS
    else:
        encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        prefix = leading_special_tokens(tokenizer)
        rows = [prefix + ids[-max_length:] for ids in encoded]
    return rows


def cut_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_tokens: int, side: str) -> Optional[str]:
    """``prompt`` shortened to ``max_tokens`` of its own tokens, keeping its end (``side="left"``) or its
    start (``"right"``); None when it is no longer than that."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return None
    return tokenizer.decode(ids[-max_tokens:] if side == "left" else ids[:max_tokens])


def context_length(model: torch.nn.Module) -> Optional[int]:
    """The positions the model's config declares it can attend over (its context), if it says."""
    config = getattr(_hf_model(model), "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _chat(tokenizer: PreTrainedTokenizerBase, prompt: str, system_prompt: Optional[str]) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------- sampling


def _hf_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (it owns ``generation_config``)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def checkpoint_temperature(model: torch.nn.Module) -> float:
    """The temperature of the checkpoint's generation config (1.0 when it sets none): what ``generate``
    samples with when its caller leaves the temperature unset, as RiC's evaluation does."""
    value = getattr(getattr(_hf_model(model), "generation_config", None), "temperature", None)
    return 1.0 if value is None else float(value)


def eos_token_ids(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every EOS id declared by the tokenizer, the model config or the checkpoint's generation config."""
    hf = _hf_model(model)
    sources = (tokenizer.eos_token_id, getattr(hf.config, "eos_token_id", None),
               getattr(getattr(hf, "generation_config", None), "eos_token_id", None))
    ids: list[int] = []
    for source in sources:
        for i in [source] if isinstance(source, int) else list(source or []):
            if int(i) not in ids:
                ids.append(int(i))
    return ids


def response_mask(response_ids: torch.Tensor, eos_token_ids: int | list[int] | None) -> torch.Tensor:
    """1 up to and including the first EOS (any of the ids) of each row, 0 after it."""
    if eos_token_ids is None or eos_token_ids == []:
        return torch.ones_like(response_ids)
    eos = torch.as_tensor(eos_token_ids, device=response_ids.device).flatten()
    is_eos = torch.isin(response_ids, eos).long()
    after_eos = is_eos.cumsum(-1) - is_eos  # >0 strictly after the first EOS
    return (after_eos == 0).long()


@contextmanager
def checkpoint_generation_settings_ignored(model: torch.nn.Module):
    """Swap the checkpoint's ``generation_config`` for a blank one while sampling.

    ``generate`` fills every field the caller leaves unset from it, even when a fresh
    ``GenerationConfig`` is passed; a blank one leaves only transformers' global defaults.
    """
    hf = _hf_model(model)
    saved = hf.generation_config
    hf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        hf.generation_config = saved


def sampling_config(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, pad_token_id: int, eos_token_ids: list[int],
    do_sample: bool = True,
) -> GenerationConfig:
    """Pure ancestral sampling with the given temperature/top-k/top-p; every other processor off.
    ``do_sample=False``: ``generate`` takes the argmax of what the logits processors return (``_Sampler``
    draws the sample there); the sampling settings are then left at their defaults, which it ignores."""
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    return GenerationConfig(
        do_sample=do_sample, num_beams=1, **settings,
        max_new_tokens=max_new_tokens, min_new_tokens=0, repetition_penalty=1.0, no_repeat_ngram_size=0,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, encoder_repetition_penalty=1.0, length_penalty=1.0,
        pad_token_id=pad_token_id, eos_token_id=eos_token_ids, use_cache=True,
    )


def filters(top_k: int, top_p: float) -> bool:
    return bool(top_k) or top_p < 1.0


def warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """fp32 scores / temperature, then top-k, then top-p: generate's own warpers, in its order."""
    scores = scores.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    return scores


_BITS = 8


def pack_support(kept: torch.Tensor) -> torch.Tensor:
    """(..., V) bool -> (..., ceil(V/8)) uint8, little-endian bits: 1/8 of a bool tensor."""
    pad = (-kept.shape[-1]) % _BITS
    kept = torch.nn.functional.pad(kept, (0, pad)).view(*kept.shape[:-1], -1, _BITS).to(torch.uint8)
    weights = (1 << torch.arange(_BITS, device=kept.device, dtype=torch.uint8))
    return (kept * weights).sum(-1, dtype=torch.uint8)


def unpack_support(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of ``pack_support``: (..., ceil(V/8)) uint8 -> (..., V) bool."""
    shifts = torch.arange(_BITS, device=packed.device, dtype=torch.uint8)
    bits = (packed[..., None] >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :vocab_size].bool()


class _RecordedWarper(LogitsProcessor):
    """Temperature, top-k and top-p as ``generate`` applies them, recording each step's kept set
    (``record``, with a filter); with ``generators`` (one per row) it also draws each row's sample."""

    def __init__(self, temperature: float, top_k: int, top_p: float, record: bool = True,
                 generators: Optional[list[torch.Generator]] = None) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.record, self.generators = record and filters(top_k, top_p), generators
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        warped = warp(scores, self.temperature, self.top_k, self.top_p)
        if self.record:
            self.steps.append(pack_support(torch.isfinite(warped)))
        if self.generators is None:
            return warped
        # Gumbel-max: argmax(warped + Gumbel noise) is a sample of softmax(warped); generate takes the argmax.
        return warped + gumbel_noise(self.generators, warped.shape[-1], warped.device)


def gumbel_noise(generators: list[torch.Generator], vocab_size: int, device: torch.device) -> torch.Tensor:
    """(rows, V) standard Gumbel noise, row ``i`` drawn from ``generators[i]`` alone."""
    uniform = torch.stack([torch.rand(vocab_size, generator=g, device=device) for g in generators])
    return -torch.log(-torch.log(uniform.clamp(min=torch.finfo(uniform.dtype).tiny)))


def row_generators(seed: int, num_rows: int, group_size: int, first_prompt: int, device) -> list[torch.Generator]:
    """One generator per row of a prompt-major rollout, keyed by (``seed``, prompt index, sample index):
    row ``i`` is sample ``i % G`` of prompt ``first_prompt + i // G`` of the batch, whatever call draws it."""
    generators = []
    for row in range(num_rows):
        key = [seed, first_prompt + row // group_size, row % group_size]
        generator = torch.Generator(device=device)
        generator.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))
        generators.append(generator)
    return generators


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    group_size: int,
    max_new_tokens: int,
    max_prompt_length: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    chat_template: Optional[bool] = None,
    system_prompt: Optional[str] = None,
    user_message_mode: str = "question",
    generation_batch_size: Optional[int] = None,
    record_support: bool = True,
    seed: Optional[int] = None,
    first_prompt: int = 0,
    per_prompt_seeds: bool = False,
    share_prompt: bool = False,
) -> Rollout:
    """Sample ``group_size`` responses per prompt from ``model`` (in eval mode, no grad).

    ``record_support``: keep the top-k/top-p kept set per position in ``Rollout.support`` (N·T·V/8
    bytes) for a loss to renormalise over; rollouts that are only scored (evaluation,
    ``generate``) pass False. The responses are the same either way.

    ``Rollout.prompts`` holds the prompts as given (what the rewards score), whatever the
    chat template made of them.

    Randomness: with ``per_prompt_seeds``, sample ``g`` of prompt ``first_prompt + b`` is drawn from a
    generator of its own, keyed by (``seed``, ``first_prompt + b``, ``g``) (``row_generators``; ``seed``
    None: one draw from torch's global generator). The rollout is then the same whether generated in
    one call or in chunks (``generation_batch_size``: sequences of the ``B·G`` per ``generate`` call;
    ``None``: all in one), a prompt at a time on several ranks (``first_prompt``: the index of
    ``prompts[0]`` in the batch), or with ``share_prompt`` (each prompt prefilled once per group:
    ``firm_lightning.prefix``), up to round-off in the logits. Without ``per_prompt_seeds`` every
    ``generate`` call draws from torch's global generator (one ``multinomial`` per token for the whole
    call), so the responses depend on the chunking. The chunks are laid out as one call would
    (``concat_rollouts``) either way.
    """
    repeated = [p for p in prompts for _ in range(group_size)]
    generators = None
    if per_prompt_seeds:
        seed = int(torch.randint(0, 2**62, ())) if seed is None else seed
        device = next(model.parameters()).device
        generators = row_generators(seed, len(repeated), group_size, first_prompt, device)
    settings = (max_new_tokens, max_prompt_length, temperature, top_k, top_p, chat_template, system_prompt,
                user_message_mode, record_support)
    parts = [_generate(model, tokenizer, repeated[rows], group_size, *settings,
                       generators=None if generators is None else generators[rows], share_prompt=share_prompt)
             for rows in micro_batches(len(repeated), generation_batch_size)]
    return concat_rollouts(parts, tokenizer.pad_token_id, group_size)


@torch.no_grad()
def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    repeated: list[str],
    group_size: int,
    max_new_tokens: int,
    max_prompt_length: int,
    temperature: float,
    top_k: int,
    top_p: float,
    chat_template: Optional[bool],
    system_prompt: Optional[str],
    user_message_mode: str,
    record_support: bool = True,
    generators: Optional[list[torch.Generator]] = None,
    share_prompt: bool = False,
) -> Rollout:
    """One ``generate`` call over rows that are already repeated ``group_size`` times; ``generators``:
    one per row (``row_generators``), else torch's global generator samples."""
    device = next(model.parameters()).device
    encoded = encode_prompts(
        tokenizer, repeated, max_prompt_length, device, chat_template, system_prompt, user_message_mode
    )
    eos = eos_token_ids(model, tokenizer)
    recorder = None
    if generators is not None:  # the recorder draws the samples; generate takes its argmax
        config = sampling_config(max_new_tokens, 1.0, 0, 1.0, tokenizer.pad_token_id, eos, do_sample=False)
        recorder = _RecordedWarper(temperature, top_k, top_p, record_support, generators)
    elif filters(top_k, top_p):  # the same warpers, applied by the recorder instead of generate (which would not
        config = sampling_config(max_new_tokens, 1.0, 0, 1.0, tokenizer.pad_token_id, eos)  # say what they kept)
        recorder = _RecordedWarper(temperature, top_k, top_p, record_support)
    else:
        config = sampling_config(max_new_tokens, temperature, top_k, top_p, tokenizer.pad_token_id, eos)
    processors = None if recorder is None else LogitsProcessorList([recorder])
    was_training = model.training
    model.eval()
    try:
        with checkpoint_generation_settings_ignored(model):
            prefilled = share_prompt and prefilled_prompt_cache(
                model, encoded["input_ids"], encoded["attention_mask"], position_ids(encoded["attention_mask"])
            )
            cache = {prefilled[0]: prefilled[1]} if prefilled else {}
            out = model.generate(**encoded, **cache, generation_config=config, logits_processor=processors)
    finally:
        model.train(was_training)
    prompt_length = encoded["input_ids"].shape[1]
    response_ids = out[:, prompt_length:]
    mask = response_mask(response_ids, eos)
    support = torch.stack(recorder.steps, dim=1) if recorder is not None and recorder.record else None  # (N, T, ⌈V/8⌉)
    return Rollout(
        prompts=repeated,
        responses=decode_responses(tokenizer, response_ids, mask, eos),
        sequences=out,
        attention_mask=torch.cat([encoded["attention_mask"], mask], dim=1),
        response_mask=mask,
        prompt_length=prompt_length,
        group_size=group_size,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        support=support,
    )


def decode_responses(
    tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor, mask: torch.Tensor, eos: list[int]
) -> list[str]:
    """The text of exactly the tokens generated before each row's EOS."""
    ends_with_eos = torch.isin(response_ids, torch.as_tensor(eos, device=response_ids.device)) & mask.bool()
    lengths = (mask.sum(1) - ends_with_eos.sum(1)).tolist()
    rows = [ids[:n].tolist() for ids, n in zip(response_ids, lengths)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


# ---------------------------------------------------------------------------- log-probs


def token_logprobs(model: PreTrainedModel, rollout: Rollout, share_prompt: bool = False) -> torch.Tensor:
    """Log-probabilities of the response tokens under the rollout's sampling distribution, (N, T), fp32.

    One forward pass; logits only for the response positions. ``share_prompt``: rows that share a
    prompt compute it once (``firm_lightning.prefix.shared_prompt_logits``: two passes, the prompts
    then the responses against their keys and values), where the model allows it. With top-k/top-p the
    distribution is renormalised over the support sampling kept (``rollout.support``), the
    same set for the policy, the reference and every PPO epoch; every sampled token is in it.
    Padding after a response's EOS (masked out everywhere) may lie outside it and gets the
    temperature-only log-prob. A rollout without a recorded support recomputes the filter from
    these logits, with the same fallback for a token outside it. The result is always finite.
    """
    P = rollout.prompt_length
    T = rollout.sequences.shape[1] - P
    kwargs = dict(
        input_ids=rollout.sequences,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
    )
    logits = shared_prompt_logits(model, **kwargs, prompt_length=P) if share_prompt else None
    if logits is None:  # every row whole
        if "logits_to_keep" in inspect.signature(_hf_model(model).forward).parameters:
            logits = model(**kwargs, logits_to_keep=T + 1).logits[:, :-1]
        else:
            logits = model(**kwargs).logits[:, P - 1 : -1]
    # logits at column j predict token j + 1: these columns predict the response tokens.
    return response_logprobs(
        logits, rollout.sequences[:, P:], rollout.temperature, rollout.top_k, rollout.top_p, rollout.support
    )


def response_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    support: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``log softmax(warp(logits))[target]`` in fp32, chunk by chunk over the token positions.

    ``support`` (packed, see ``pack_support``): the kept set per position, used instead of
    recomputing top-k/top-p. Past ``CHUNK_ELEMENTS`` logits, each chunk is checkpointed under
    autograd: only the logits (model dtype) are kept for the backward pass, never an fp32 copy
    of them or of the log-softmax. Below it one pass is cheaper: the S backward passes would
    each recompute every chunk.
    """
    N, T, V = logits.shape
    flat_logits, flat_targets = logits.reshape(N * T, V), targets.reshape(N * T)
    if support is not None and support.shape[:2] != (N, T):
        raise ValueError(f"support of shape {tuple(support.shape)} does not match {N} responses of {T} tokens.")
    flat_support = support.reshape(N * T, -1) if support is not None else None
    args = (temperature, top_k, top_p)
    if N * T * V <= CHUNK_ELEMENTS:  # small enough for one pass: no chunking or recomputation overhead
        return _chunk_logprobs(flat_logits, flat_targets, *args, flat_support).view(N, T)
    step = max(1, CHUNK_ELEMENTS // V)  # token positions per chunk
    grad = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for start in range(0, N * T, step):
        rows = slice(start, start + step)
        chunk = (flat_logits[rows], flat_targets[rows], *args, None if flat_support is None else flat_support[rows])
        pieces.append(checkpoint(_chunk_logprobs, *chunk, use_reentrant=False) if grad else _chunk_logprobs(*chunk))
    return torch.cat(pieces).view(N, T)


def _chunk_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    support: Optional[torch.Tensor] = None,
):
    """As ``generate`` samples: fp32 logits / temperature, then top-k, then top-p (or the recorded support)."""
    scores = logits.float() / temperature
    token = scores.gather(-1, targets[:, None])[:, 0]
    full = token - torch.logsumexp(scores, dim=-1)
    if not filters(top_k, top_p):
        return full
    if support is not None:
        kept_set = unpack_support(support, scores.shape[-1])
        recorded = kept_set.gather(-1, targets[:, None])[:, 0]  # False only on padding after an EOS
        filtered = scores.masked_fill(~kept_set, float("-inf"))
        return torch.where(recorded, token - torch.logsumexp(filtered, dim=-1), full)
    filtered = warp(scores, 1.0, top_k, top_p)  # scores are already divided by the temperature
    kept = torch.isfinite(filtered.gather(-1, targets[:, None])[:, 0])
    return torch.where(kept, token - torch.logsumexp(filtered, dim=-1), full)

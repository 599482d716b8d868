"""Test fixtures that behave like real hub models (GPT-2 / Qwen / Llama), built offline in code.

- ``bpe_tokenizer()``: a byte-level BPE tokenizer trained with ``tokenizers`` on the shipped
  prompts. As in GPT-2 and Qwen, id 0 is an ordinary token (``"!"``). It has a BOS that
  ``add_special_tokens=True`` prepends (Llama-style), two EOS ids (``<|im_end|>``, the
  tokenizer's EOS, and ``<|endoftext|>``, also the pad token, as in Qwen2.5-Instruct) and a
  ChatML chat template.
- ``tiny_chat_model(tokenizer)``: a two-layer Qwen2 causal LM whose ``config.eos_token_id``
  and ``generation_config`` differ from the tokenizer's, with non-default sampling settings
  (``repetition_penalty``, ``top_k``, ``top_p``, ``no_repeat_ngram_size``), as checkpoints ship.
- ``tiny_reward_model(tokenizer)``: a one-output GPT-2 sequence classifier.
- ``save_real_like(folder)``: the three saved with ``save_pretrained`` (load them by path).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "firm_lightning" / "data" / "prompts.jsonl"
BOS, END_OF_TEXT, IM_END, IM_START = "<|bos|>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"
CHATML = (
    "{{ bos_token }}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# What a checkpoint's generation_config may carry (Qwen2.5-Instruct ships temperature, top_k,
# top_p, repetition_penalty and two EOS ids); none of it may leak into RL sampling.
CHECKPOINT_GENERATION = dict(
    do_sample=True, temperature=0.7, top_k=5, top_p=0.8, repetition_penalty=1.3, no_repeat_ngram_size=1,
    suppress_tokens=list(range(0, 400, 3)),  # a field RL sampling does not set explicitly (Whisper ships one)
)


@functools.lru_cache(maxsize=1)
def _trained_backend_json() -> str:
    prompts = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(prompts, trainer)  # no special tokens yet: id 0 stays a byte ("!")
    backend.add_special_tokens([BOS, END_OF_TEXT, IM_END, IM_START])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return backend.to_str()


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_backend_json()),
        bos_token=BOS, eos_token=IM_END, pad_token=END_OF_TEXT, unk_token=None,
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def eos_ids(tokenizer) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(END_OF_TEXT)]


def tiny_chat_model(tokenizer, seed: int = 0, vocab_size: int | None = None) -> Qwen2ForCausalLM:
    """A Qwen2-shaped LM; ``vocab_size`` may exceed the tokenizer's (Qwen pads its vocabulary)."""
    im_end, end_of_text = eos_ids(tokenizer)
    config = Qwen2Config(
        vocab_size=vocab_size or len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_of_text, pad_token_id=end_of_text,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        **CHECKPOINT_GENERATION, bos_token_id=tokenizer.bos_token_id, eos_token_id=[im_end, end_of_text],
        pad_token_id=end_of_text,
    )
    return model


def tiny_reward_model(tokenizer, seed: int = 0) -> GPT2ForSequenceClassification:
    config = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer), num_labels=1,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2ForSequenceClassification(config)


def save_real_like(folder: Path) -> dict[str, Path]:
    """Policy and reward model folders, each with the BPE tokenizer, loadable by path."""
    tokenizer = bpe_tokenizer()
    paths = {"policy": folder / "policy", "reward": folder / "reward"}
    tiny_chat_model(tokenizer).save_pretrained(paths["policy"])
    tiny_reward_model(tokenizer).save_pretrained(paths["reward"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    return paths

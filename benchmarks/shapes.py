"""Real model shapes with random weights, built offline: GPT-2 124M and its 50,257-token tokenizer.

- ``gpt2_tokenizer()``: a byte-level BPE tokenizer of exactly GPT-2's size (50,257 tokens; id
  50256 ``<|endoftext|>`` is BOS, EOS and pad, id 0 is ``"!"``). Its first merges are trained
  with ``tokenizers`` on the shipped prompts (so prompts tokenise into word pieces as with the
  real one); the rest of the 50,000 merges join existing tokens in a fixed order: valid BPE
  merges that real text rarely reaches, there only so the vocabulary — hence the embedding, the
  head, the logits and the log-softmax — has the real size.
- ``GPT2ShapePolicy``: ``GPT2Config()``'s defaults (12 layers, 768 wide, 12 heads, 1,024
  positions, tied embeddings): 124,439,808 parameters, randomly initialised.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from firm_lightning.policy import PolicyBuilder, prepare_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GPT2_VOCAB = 50257
END_OF_TEXT = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def _gpt2_backend_json() -> str:
    prompts = [
        json.loads(line)["prompt"]
        for line in (ROOT / "firm_lightning" / "data" / "prompts.jsonl").read_text().splitlines()
        if line.strip()
    ]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(prompts, trainer)
    model = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # Pad with merges of existing tokens (pairs in a fixed order) up to GPT-2's 50,256 + <|endoftext|>.
    tokens = sorted(vocab, key=vocab.get)
    i = j = 0
    while len(vocab) < GPT2_VOCAB - 1:
        left, right = tokens[i % len(tokens)], tokens[j % len(tokens)]
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
        j += 1
        if j % 97 == 0:
            i += 1
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([END_OF_TEXT])
    return backend.to_str()


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_gpt2_backend_json()),
        bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT,
    )
    assert len(tokenizer) == GPT2_VOCAB and tokenizer.eos_token_id == GPT2_VOCAB - 1
    return prepare_tokenizer(tokenizer)  # left padding, pad = EOS (as GPT-2 is used for RL)


class GPT2ShapePolicy(PolicyBuilder):
    """GPT-2 124M's shape with random weights and the 50,257-token tokenizer above."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def build(self):
        tokenizer = gpt2_tokenizer()
        config = GPT2Config(vocab_size=GPT2_VOCAB, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = GPT2LMHeadModel(config)
        return model, tokenizer

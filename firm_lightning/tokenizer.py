"""A character-level tokenizer built in code, so the offline default needs no download.

It is a real ``transformers`` fast tokenizer (padding sides, ``save_pretrained``,
``AutoTokenizer.from_pretrained``), with one token per printable ASCII character plus
``<pad>``, ``<eos>`` and ``<unk>``. It adds no special tokens when encoding, so a prompt is
never silently terminated by an EOS.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
CHARACTERS = tuple(c for c in string.printable if c not in "\t\r\x0b\x0c")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Return the character tokenizer (vocabulary of 99 tokens, ``<pad>`` is id 0)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # "." misses "\n"
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )

"""Tests for firm_lightning.sequences and firm_lightning.tokenizer.

The central check: the log-probabilities ``token_logprobs`` computes for training are the
ones the policy sampled with, under left padding, for an absolute-position model (GPT-2)
and a rotary one (Llama). ``generate``'s own scores are the reference.
"""

from __future__ import annotations

import string

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from firm_lightning.policy import TinyPolicy
from firm_lightning.sequences import (
    Rollout,
    encode_prompts,
    position_ids,
    response_mask,
    sample,
    token_logprobs,
)
from firm_lightning.tokenizer import CHARACTERS, SPECIAL_TOKENS, char_tokenizer

# Prompts of very different lengths: most rows carry left padding.
PROMPTS = ["Hi", "What is a good substitute for butter in omelettes?", "Why?", "Tell me a joke."]
GROUP = 2
MAX_NEW = 24


def _sample_with_scores(model, tokenizer, seed: int):
    """The same draw twice: once through ``sample`` and once through ``generate`` with scores."""
    torch.manual_seed(seed)
    rollout = sample(model, tokenizer, PROMPTS, GROUP, MAX_NEW, top_k=0)
    repeated = [p for p in PROMPTS for _ in range(GROUP)]
    encoded = encode_prompts(tokenizer, repeated, 256, torch.device("cpu"))
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            **encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=MAX_NEW,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            output_scores=True, return_dict_in_generate=True,
        )
    return rollout, out


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_token_logprobs_match_generate_scores_under_left_padding(architecture):
    model, tokenizer = TinyPolicy(architecture).build()
    model.eval()
    # Pick the first seed whose draw has a response that stops early (EOS before the last
    # column), so the mask's zeros and the attention mask after EOS are exercised too.
    for seed in range(50):
        rollout, out = _sample_with_scores(model, tokenizer, seed)
        if (rollout.response_mask == 0).any():
            break
    else:
        pytest.fail("no draw with an early EOS in 50 seeds")

    assert torch.equal(rollout.sequences, out.sequences), "sample() and generate() drew differently"
    assert (rollout.attention_mask[:, : rollout.prompt_length] == 0).any(), "no left padding"
    P = rollout.prompt_length
    targets = out.sequences[:, P:]
    scores = torch.stack(out.scores, dim=1).float()  # (N, T, V); top_k=0, T=1: raw logits
    expected = F.log_softmax(scores, dim=-1).gather(-1, targets[..., None])[..., 0]
    assert torch.isfinite(expected).all()

    with torch.no_grad():
        got = token_logprobs(model, rollout)
    mask = rollout.response_mask.bool()
    assert got.shape == targets.shape
    err = (got - expected).abs()[mask].max().item()
    assert err < 1e-4, f"{architecture}: max |logp - generate logp| = {err:.3g} on response tokens"

    if architecture == "gpt2":
        # Control: GPT-2 without explicit position ids counts the left padding as positions,
        # so the same check fails; this is the pitfall the explicit ids fix.
        with torch.no_grad():
            logits = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits
        naive = -F.cross_entropy(logits[:, P - 1 : -1].float().transpose(1, 2), targets, reduction="none")
        naive_err = (naive - expected).abs()[mask].max().item()
        print(f"gpt2: max error with position ids {err:.2e}, without {naive_err:.2e}")
        assert naive_err > 1e-2


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3], [0, 0, 1, 1, 1]]


def test_response_mask_up_to_and_including_first_eos():
    eos = 1
    ids = torch.tensor([
        [5, 6, 1, 7, 1, 8],  # EOS at 2: keep 0..2, drop the rest (also the second EOS)
        [1, 5, 5, 5, 5, 5],  # EOS first: only the EOS itself
        [5, 6, 7, 8, 9, 1],  # EOS last
        [5, 6, 7, 8, 9, 10],  # no EOS: all ones
        [1, 1, 1, 0, 0, 0],  # repeated EOS then pad
    ])
    assert response_mask(ids, eos).tolist() == [
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [1, 0, 0, 0, 0, 0],
    ]
    assert response_mask(ids, None).tolist() == torch.ones_like(ids).tolist()


def test_sample_rollout_layout():
    model, tokenizer = TinyPolicy().build()
    torch.manual_seed(0)
    model.train()
    rollout = sample(model, tokenizer, ["ab", "a longer prompt"], 3, 10)
    assert model.training, "sample() must restore the training flag"
    assert isinstance(rollout, Rollout)
    assert rollout.prompts == ["ab"] * 3 + ["a longer prompt"] * 3
    assert rollout.num_prompts == 2 and rollout.group_size == 3
    N, P = 6, rollout.prompt_length
    assert P == len("a longer prompt")
    T = rollout.sequences.shape[1] - P
    assert rollout.response_mask.shape == (N, T) and rollout.attention_mask.shape == (N, P + T)
    assert torch.equal(rollout.attention_mask[:, P:], rollout.response_mask)
    assert rollout.attention_mask[0, :P].tolist() == [0] * (P - 2) + [1, 1]
    # The decoded responses are the masked response tokens (no pad, no EOS text).
    for row, text in zip(range(N), rollout.responses):
        ids = rollout.sequences[row, P:][rollout.response_mask[row].bool()]
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- tokenizer


def test_char_tokenizer_vocabulary():
    tok = char_tokenizer()
    assert len(tok) == 99 == len(SPECIAL_TOKENS) + len(CHARACTERS)
    assert tok.pad_token_id == 0 and tok.pad_token == "<pad>"
    assert tok.eos_token == "<eos>" and tok.unk_token == "<unk>"
    assert tok.padding_side == "left"


@pytest.mark.parametrize(
    "text",
    [
        "".join(CHARACTERS),  # every printable ASCII character once
        string.ascii_letters + string.digits + string.punctuation,
        "Hello, world!  Two spaces.",
        "line one\nline two\n\nafter a blank line\n\n\n",  # repeated newlines
        "",
    ],
)
def test_char_tokenizer_round_trips_printable_ascii(text):
    tok = char_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text), "one token per character"
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_char_tokenizer_adds_no_special_tokens():
    tok = char_tokenizer()
    # Neither the explicit add_special_tokens=False path nor the default appends EOS/BOS.
    assert tok("abc")["input_ids"] == tok.encode("abc", add_special_tokens=False) == [
        tok.convert_tokens_to_ids(c) for c in "abc"
    ]


def test_encode_prompts_left_pads_without_special_tokens():
    tok = char_tokenizer()
    prompts = ["a", "abc", "hello world"]
    enc = encode_prompts(tok, prompts, max_length=256, device=torch.device("cpu"))
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert set(enc) == {"input_ids", "attention_mask"}
    assert ids.shape == mask.shape == (3, len("hello world"))
    for row, prompt in enumerate(prompts):
        n_pad = ids.shape[1] - len(prompt)
        assert mask[row].tolist() == [0] * n_pad + [1] * len(prompt)
        assert ids[row, :n_pad].tolist() == [tok.pad_token_id] * n_pad
        assert ids[row, -1].item() == tok.convert_tokens_to_ids(prompt[-1]), "no EOS appended"
        assert tok.eos_token_id not in ids[row].tolist()
        assert tok.decode(ids[row], skip_special_tokens=True) == prompt


def test_encode_prompts_truncates_from_the_left():
    tok = char_tokenizer()
    enc = encode_prompts(tok, ["abcdefgh", "xy"], max_length=5, device=torch.device("cpu"))
    assert tok.decode(enc["input_ids"][0]) == "defgh"
    assert enc["attention_mask"][1].tolist() == [0, 0, 0, 1, 1]


def test_char_tokenizer_survives_save_and_auto_load(tmp_path):
    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == len(tok)
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
        tok.pad_token_id, tok.eos_token_id, tok.unk_token_id,
    )
    assert loaded.padding_side == "left"
    text = "".join(CHARACTERS) + "\n\nend"
    assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    a = encode_prompts(tok, ["x", "xyz"], 16, torch.device("cpu"))
    b = encode_prompts(loaded, ["x", "xyz"], 16, torch.device("cpu"))
    assert all(torch.equal(a[k], b[k]) for k in a)

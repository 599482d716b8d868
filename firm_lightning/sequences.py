"""Sampling responses and scoring their tokens under left padding.

Prompts are left padded so every response starts at the same column. Position ids are
given explicitly (``cumsum(mask) - 1``): GPT-2 otherwise counts pad tokens as positions
and its training log-probs differ from the ones it sampled with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Rollout:
    """``G`` sampled responses for each of ``B`` prompts, flattened prompt-major (``B*G`` rows)."""

    prompts: list[str]  # one per row (each prompt repeated G times)
    responses: list[str]
    sequences: torch.Tensor  # (N, P + T) prompt then response token ids
    attention_mask: torch.Tensor  # (N, P + T), 0 on left padding and after the response's EOS
    response_mask: torch.Tensor  # (N, T), 1 on response tokens up to and including EOS
    prompt_length: int  # P
    group_size: int  # G

    @property
    def num_prompts(self) -> int:
        return len(self.prompts) // self.group_size


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, matching what ``generate`` uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Left-padded prompt ids, truncated from the left so the end of the prompt is kept."""
    tokenizer.truncation_side = "left"
    batch = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        padding_side="left",
        truncation=True,
        max_length=max_length,
        add_special_tokens=False,
    )
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


def response_mask(response_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    if eos_token_id is None:
        return torch.ones_like(response_ids)
    is_eos = (response_ids == eos_token_id).long()
    after_eos = is_eos.cumsum(-1) - is_eos  # >0 strictly after the first EOS
    return (after_eos == 0).long()


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
) -> Rollout:
    """Sample ``group_size`` responses per prompt from ``model`` (in eval mode, no grad)."""
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(group_size)]
    encoded = encode_prompts(tokenizer, repeated, max_prompt_length, device)
    was_training = model.training
    model.eval()
    out = model.generate(
        **encoded,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.train(was_training)
    prompt_length = encoded["input_ids"].shape[1]
    response_ids = out[:, prompt_length:]
    mask = response_mask(response_ids, tokenizer.eos_token_id)
    responses = tokenizer.batch_decode(response_ids * mask, skip_special_tokens=True)
    return Rollout(
        prompts=repeated,
        responses=responses,
        sequences=out,
        attention_mask=torch.cat([encoded["attention_mask"], mask], dim=1),
        response_mask=mask,
        prompt_length=prompt_length,
        group_size=group_size,
    )


def token_logprobs(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Log-probabilities of the response tokens, shape (N, T); one forward pass."""
    logits = model(
        input_ids=rollout.sequences,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
    ).logits
    # logits at column j predict token j + 1: keep the columns that predict response tokens.
    logits = logits[:, rollout.prompt_length - 1 : -1].float()
    targets = rollout.sequences[:, rollout.prompt_length :]
    return -F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")

"""Each prompt computed once per group: shared prompt prefixes for sampling and for the log-prob passes.

A rollout's ``G`` responses to one prompt start with the same prompt tokens in the same columns
(left padding). Without sharing, sampling prefills the prompt ``G`` times and every forward
pass of the update (policy, reference, PPO epochs) computes it ``G`` times again.

- **Log-probs** (``shared_prompt_logits``): the prompt (but its last token) runs once per group;
  its per-layer keys and values, with their autograd graph, are indexed out to the group's rows,
  and each row's last prompt token and response run against them. The logits equal the unshared
  pass's up to round-off, and so do the gradients: the backward pass of the indexing sums the
  gradients of the ``G`` rows into the one prompt computation, the gradient the ``G`` copies
  would have sent through it (Prefix Grouper, arXiv 2506.05433). The keys and values depend on
  the LoRA weights on attention: they are never detached.
- **Sampling** (``prefilled_prompt_cache``): the prompt but its last token is prefilled once
  per group and the cache expanded to the ``G`` rows; ``generate`` computes the rest.

Rows share a prompt when consecutive rows hold the same prompt tokens and mask (``prompt_runs``),
so a micro-batch or a generation chunk that cuts a group shares within each part.

Where it applies: a transformers model of a type whose key/value cache is a plain per-layer cache
(``SUPPORTED_MODEL_TYPES``), with full attention in every layer, eager or SDPA attention, and,
under gradient checkpointing, a transformers version whose checkpointed layers can keep a
read-only cache. Anything else (a
custom policy, another architecture) computes every row as before, with one log line saying why.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3")
SUPPORTED_ATTENTION = ("eager", "sdpa")
_reported: set[tuple[str, str]] = set()


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _checkpointing(hf: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in hf.modules() if getattr(m, "gradient_checkpointing", False) is True]


def unsupported_reason(model: torch.nn.Module, with_grad: bool) -> Optional[str]:
    """Why the prompt cannot be shared for ``model`` (``with_grad``: a pass that will be differentiated),
    or None when it can."""
    hf = _hf_model(model)
    if not isinstance(hf, PreTrainedModel) or not isinstance(getattr(hf, "base_model", None), PreTrainedModel):
        return f"{type(hf).__name__} is not a transformers causal LM"
    config = hf.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {list(SUPPORTED_MODEL_TYPES)}"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return "some layers use sliding-window attention"
    attention = getattr(config, "_attn_implementation", None) or "eager"
    if attention not in SUPPORTED_ATTENTION:
        return f"attention implementation {attention!r} is not one of {list(SUPPORTED_ATTENTION)}"
    if _cache_keyword(hf) is None or _cache_keyword(hf.base_model) is None:
        return f"{type(hf).__name__}.forward takes no key/value cache"
    if with_grad and hf.training and not _cache_survives_checkpointing(hf):
        return "gradient checkpointing drops the cache in this transformers version"
    return None


def report_unshared(model: torch.nn.Module, reason: str) -> None:
    """One log line per model type and reason: sharing falls back to computing every row."""
    key = (type(_hf_model(model)).__name__, reason)
    if key not in _reported:
        _reported.add(key)
        log.warning("sampling.share_prompt: %s computes every row's prompt (%s).", key[0], reason)


def _cache_keyword(module: torch.nn.Module) -> Optional[str]:
    """The forward argument a cache is passed as: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _cache_survives_checkpointing(hf: torch.nn.Module) -> bool:
    """Without checkpointing, always; with it, when every checkpointed layer can be told to keep a cache."""
    layers = [m for m in _checkpointing(hf) if isinstance(m, GradientCheckpointingLayer)]
    return all(hasattr(m, "_can_checkpoint_with_cache") for m in layers)


@contextmanager
def _cache_kept_through_checkpointing(hf: torch.nn.Module) -> Iterator[None]:
    """While open, checkpointed layers keep the (read-only or recording) cache instead of dropping it.

    Transformers drops the cache under gradient checkpointing because a layer that appends to it
    would append again when the backward pass replays the layer. The caches here never append:
    ``_PromptRecorder`` stores what a replay recomputes (equal values), ``_SharedPromptCache``
    stores nothing. The layers stay checkpointed; only the model-level flags that drop the cache
    before the layers see it are lowered."""
    changed: list[tuple[torch.nn.Module, str, object]] = []
    for module in _checkpointing(hf):
        if isinstance(module, GradientCheckpointingLayer):
            changed.append((module, "_can_checkpoint_with_cache", module.__dict__.get("_can_checkpoint_with_cache")))
            module._can_checkpoint_with_cache = True
        else:
            changed.append((module, "gradient_checkpointing", True))
            module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module, name, value in changed:
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)


def prompt_runs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """(N,) for each row, the index of its run of consecutive rows with the same prompt (tokens and mask);
    None when no two neighbouring rows share one (nothing to share)."""
    if prompt_ids.shape[0] < 2:
        return None
    same = (prompt_ids[1:] == prompt_ids[:-1]).all(1) & (prompt_mask[1:] == prompt_mask[:-1]).all(1)
    if not bool(same.any()):
        return None
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=same.device), ~same])
    return starts.long().cumsum(0) - 1


def _first_rows(runs: torch.Tensor) -> torch.Tensor:
    starts = torch.ones_like(runs, dtype=torch.bool)
    starts[1:] = runs[1:] != runs[:-1]
    return starts.nonzero().flatten()


def _new_cache(cls, config):
    try:
        return cls(config=config)
    except TypeError:  # transformers versions whose caches take no config
        return cls()


class _PromptRecorder(DynamicCache):
    """Keeps each layer's prompt keys and values as computed (with their graph) and appends nothing."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded[layer_idx] = (key_states, value_states)
        return key_states, value_states


class _SharedPromptCache(DynamicCache):
    """The prompt's keys and values for every row, read-only: a layer gets them followed by its new ones."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.prompt[layer_idx]
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.prompt_length

    def get_mask_sizes(self, query, *args, **kwargs) -> tuple[int, int]:
        query_length = query if isinstance(query, int) else query.shape[0]  # older versions pass positions
        return self.prompt_length + query_length, 0


def shared_prompt_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
    prompt_length: int,
) -> Optional[torch.Tensor]:
    """The logits that predict the response tokens, (N, T, V), each prompt computed once per run of
    rows that share it; None where nothing is shared or sharing does not apply (then logged once).

    Two calls of ``model``: the prompts but their last token (one row per run), recording each
    layer's keys and values; then every row's last prompt token and response tokens but the last
    against those keys and values, indexed out to the rows. The second call's logits are the
    response's, one row per sequence, as the unshared pass computes them (a hook on the output head
    sees the same per-row tensors). ``position_ids``: the rows' positions."""
    P = prompt_length
    if P < 2:
        return None
    runs = prompt_runs(input_ids[:, : P - 1], attention_mask[:, : P - 1])
    if runs is None:
        return None
    reason = unsupported_reason(model, with_grad=torch.is_grad_enabled())
    if reason is not None:
        report_unshared(model, reason)
        return None
    hf = _hf_model(model)
    keyword, first = _cache_keyword(hf), _first_rows(runs)
    recorder = _new_cache(_PromptRecorder, hf.config)
    recorder.recorded = {}
    shared = _new_cache(_SharedPromptCache, hf.config)
    shared.prompt_length = P - 1
    with _cache_kept_through_checkpointing(hf):
        model(input_ids=input_ids[first, : P - 1], attention_mask=attention_mask[first, : P - 1],
              position_ids=position_ids[first, : P - 1], use_cache=False, **{keyword: recorder}, **_last_logit(hf))
        shared.prompt = {layer: (k[runs], v[runs]) for layer, (k, v) in recorder.recorded.items()}
        return model(input_ids=input_ids[:, P - 1 : -1], attention_mask=attention_mask[:, :-1],
                     position_ids=position_ids[:, P - 1 : -1], use_cache=False, **{keyword: shared}).logits


def _last_logit(hf: torch.nn.Module) -> dict:
    """Ask for one position's logits where the model allows it (the prompt pass needs none)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}


def prefilled_prompt_cache(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> Optional[tuple[str, object]]:
    """For ``generate``: ``(keyword, cache)`` holding every row's prompt but its last token, each prompt
    prefilled once per run of rows that share it; None where nothing is shared or sharing does not apply."""
    if input_ids.shape[1] < 2:
        return None
    runs = prompt_runs(input_ids, attention_mask)
    if runs is None:
        return None
    reason = unsupported_reason(model, with_grad=False)
    if reason is not None:
        report_unshared(model, reason)
        return None
    hf = _hf_model(model)
    keyword, first = _cache_keyword(hf.base_model), _first_rows(runs)
    cache = _new_cache(DynamicCache, hf.config)
    hf.base_model(input_ids=input_ids[first, :-1], attention_mask=attention_mask[first, :-1],
                  position_ids=position_ids[first, :-1], use_cache=True, **{keyword: cache})
    cache.batch_select_indices(runs)
    return keyword, cache

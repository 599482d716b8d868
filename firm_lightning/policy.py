"""Where the policy's base model and tokenizer come from, and how LoRA is put on it.

A policy builder is a small object with one verb, ``build()``, chosen in the config by
``class_path``: ``PretrainedPolicy`` loads a hub name or a local folder, ``TinyPolicy``
builds a few-layer model from a ``transformers`` config (the offline default and the tests).
"""

from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from firm_lightning.tokenizer import char_tokenizer


class PolicyBuilder(abc.ABC):
    """Builds the frozen base model and its tokenizer."""

    @abc.abstractmethod
    def build(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]: ...


class PretrainedPolicy(PolicyBuilder):
    """A causal LM loaded with ``from_pretrained`` from a hub name or a local folder."""

    def __init__(
        self,
        name_or_path: str,
        torch_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        self.gradient_checkpointing = gradient_checkpointing
        self.name_or_path = name_or_path
        self.torch_dtype = torch_dtype
        self.revision = revision
        self.trust_remote_code = trust_remote_code

    def build(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, **kwargs)
            dtype = getattr(torch, self.torch_dtype) if self.torch_dtype else None
            model = AutoModelForCausalLM.from_pretrained(self.name_or_path, dtype=dtype, **kwargs)
        except OSError as error:
            raise OSError(
                f"Could not load the policy {self.name_or_path!r}: {error}\n"
                "If this machine is offline, download it first "
                f"(`huggingface-cli download {self.name_or_path}`) or set "
                "`--model.policy.init_args.name_or_path` to a local folder made with save_pretrained."
            ) from error
        if self.gradient_checkpointing:
            # Trade compute for activation memory; inputs must require grad for a frozen base + LoRA.
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            model.config.use_cache = False  # no KV cache in training forwards (generate keeps its own setting)
        # from_pretrained returns eval mode; dropout is off anyway (disable_dropout), so train mode
        # changes nothing numerically and Lightning need not warn about modules in eval mode every fit.
        model.train()
        return model, prepare_tokenizer(tokenizer)


class TinyPolicy(PolicyBuilder):
    """A randomly initialised few-layer causal LM with the in-code character tokenizer."""

    def __init__(
        self,
        architecture: Literal["gpt2", "llama"] = "gpt2",
        num_layers: int = 2,
        hidden_size: int = 64,
        num_heads: int = 4,
        max_positions: int = 256,
        seed: int = 0,
    ) -> None:
        self.architecture = architecture
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.max_positions = max_positions
        self.seed = seed

    def build(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tokenizer = char_tokenizer()
        special = dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # same base weights whatever the global seed
            model = self._make_model(special)
        return model, tokenizer

    def _make_model(self, special: dict) -> PreTrainedModel:
        if self.architecture == "gpt2":
            config = GPT2Config(
                n_layer=self.num_layers, n_embd=self.hidden_size, n_head=self.num_heads,
                n_positions=self.max_positions, tie_word_embeddings=False, **special,
            )
            return GPT2LMHeadModel(config)
        config = LlamaConfig(
            num_hidden_layers=self.num_layers, hidden_size=self.hidden_size,
            intermediate_size=2 * self.hidden_size, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads, max_position_embeddings=self.max_positions,
            tie_word_embeddings=False, **special,
        )
        return LlamaForCausalLM(config)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding for batched generation; a pad token where the model has none (GPT-2)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class LoRASettings:
    """LoRA adapter hyper-parameters (see ``peft.LoraConfig``).

    Args:
        r: Rank of the LoRA update B·A.
        alpha: Scaling numerator: the update is scaled by alpha / r.
        dropout: Dropout on the LoRA input (0 for RL: sampling and training would see different masks).
        target_modules: Module names (or "all-linear") that get an adapter, e.g. [c_attn, c_proj] for GPT-2.
        init_lora_weights: peft's initialisation (True: B = 0, so the adapter starts as the identity).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    init_lora_weights: Union[bool, str] = True


def disable_dropout(model: torch.nn.Module) -> None:
    """Turn the base model's dropout off (as TRL does for RL fine-tuning).

    Responses are sampled in eval mode; with dropout on in the training forward passes, the
    policy's and the reference's log-probs would use different random masks (a non-zero KL
    for an untouched adapter) and the PPO ratio would carry dropout noise.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in list(vars(config)) if config is not None else []:
        if ("dropout" in key or "pdrop" in key) and isinstance(getattr(config, key), float):
            setattr(config, key, 0.0)  # models that call functional dropout read the config


def add_lora(model: PreTrainedModel, lora: LoRASettings) -> PeftModel:
    """Freeze the base model, switch its dropout off and wrap it with a trainable LoRA adapter.

    ``lora.dropout`` (default 0) stays as configured: it is the user's explicit choice.
    """
    disable_dropout(model)
    is_gpt2 = model.config.model_type == "gpt2"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        init_lora_weights=lora.init_lora_weights,
        # GPT-2 stores its projections as Conv1D (transposed weights).
        fan_in_fan_out=is_gpt2,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft flips fan_in_fan_out back for GPT-2's plain Linear layers (lm_head) and says so.
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        return get_peft_model(model, config)

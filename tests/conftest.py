"""Shared fixtures: a tiny offline FIRM client module and data module."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from firm_lightning.datamodule import PromptDataModule
from firm_lightning.module import FIRMClientModule, SamplingSettings
from firm_lightning.policy import LoRASettings, TinyPolicy
from firm_lightning.rewards import CharsetReward
from firm_lightning.weighting import RegularizedMinNorm

TINY_LORA = LoRASettings(target_modules=["c_attn", "c_proj", "c_fc", "lm_head"])


def make_objectives():
    return [CharsetReward("a_to_m", "abcdefghijklm"), CharsetReward("n_to_z", "nopqrstuvwxyz")]


def make_module(**kwargs) -> FIRMClientModule:
    defaults = dict(
        objectives=make_objectives(),
        weighting=RegularizedMinNorm(beta=1.0),
        policy=TinyPolicy(),
        lora=TINY_LORA,
        sampling=SamplingSettings(max_new_tokens=8, num_generations=2, eval_num_generations=1),
        learning_rate=1e-2,
    )
    return FIRMClientModule(**{**defaults, **kwargs})


def make_datamodule(num_clients: int = 2, **kwargs) -> PromptDataModule:
    defaults = dict(num_clients=num_clients, batch_size=4, eval_size=8, eval_batch_size=8, max_prompts=96)
    return PromptDataModule(**{**defaults, **kwargs})


@pytest.fixture(autouse=True)
def _one_thread():
    # One intra-op thread: barely slower for these tiny models, and immune to OpenMP
    # spin-waiting when another process shares the two cores (two concurrent 2-thread fits
    # were measured ~15x slower).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

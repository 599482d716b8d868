"""What the weighting-effect measure costs a local step (``gradients.weighting_effect``: two simulated
optimiser steps, undone, per step).

    python benchmarks/weighting_effect_cost.py --repeats 3 --steps 8

One client fit of ``--steps`` local steps on the testbed of ``configs/claims.yaml`` (TinyPolicy, LoRA r = 8,
B = 8 prompts × G = 4, 8 new tokens, FIRM β = 1, AdamW), with the measure and without it (the module's
``_weighting_effect`` replaced by a stub), alternating, from the same adapter and seed; prints JSON with the
process CPU seconds of each (CPU time, not wall: the machine is shared), their ratio, and the share of the
fit spent inside ``weighting_effect`` itself. Both fits must end on the same adapter (the measure changes
nothing); the script checks it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import lightning as L
import torch

from firm_lightning import gradients, module as module_file
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.module import FIRMClientModule, PolicyGradientSettings, SamplingSettings
from firm_lightning.policy import LoRASettings, TinyPolicy
from firm_lightning.testbed import heterogeneous_objectives
from firm_lightning.weighting import RegularizedMinNorm


def build(hidden: int, layers: int) -> tuple[FIRMClientModule, PromptDataModule]:
    module = FIRMClientModule(
        objectives=heterogeneous_objectives(), weighting=RegularizedMinNorm(beta=1.0),
        policy=TinyPolicy(architecture="gpt2", num_layers=layers, hidden_size=hidden, num_heads=4, seed=0),
        lora=LoRASettings(r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc", "lm_head"]),
        sampling=SamplingSettings(num_generations=4, max_new_tokens=8),
        loss=PolicyGradientSettings(kl_coef=0.05, whiten_advantages=False), learning_rate=0.01,
    )
    data = PromptDataModule(num_clients=1, batch_size=8, eval_size=96, group_column="topic")
    data.setup("fit")
    return module, data


def fit(module, data, steps: int, measured: bool, start: dict) -> tuple[float, float, dict]:
    """CPU seconds of one fit, those spent in weighting_effect, and the adapter it ends on."""
    spent = [0.0]
    real = gradients.weighting_effect

    def timed(*args):
        tic = time.process_time()
        try:
            return real(*args)
        finally:
            spent[0] += time.process_time() - tic

    module_file.weighting_effect = timed
    if not measured:
        module._weighting_effect = lambda *args: (math.nan, math.nan)
    module.load_adapter_state(start)
    torch.manual_seed(0)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    tic = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=data.client_data(0).loader(0))
    total = time.process_time() - tic
    module_file.weighting_effect = real
    module.__dict__.pop("_weighting_effect", None)
    return total, spent[0], module.adapter_state()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module, data = build(args.hidden, args.layers)
    start = module.adapter_state()
    fit(module, data, 1, True, start)  # warm-up
    on, off, inside = [], [], []
    for _ in range(args.repeats):
        total, measure, with_measure = fit(module, data, args.steps, True, start)
        on.append(total)
        inside.append(measure / total)
        total, _, without = fit(module, data, args.steps, False, start)
        off.append(total)
        assert all(torch.equal(with_measure[k], without[k]) for k in without), "the measure changed the training"
    params = sum(p.numel() for p in module.trainable_parameters())
    print(json.dumps({
        "steps": args.steps, "repeats": args.repeats, "trainable_parameters": params,
        "cpu_s_with": on, "cpu_s_without": off,
        "ratio_with_over_without": statistics.median(on) / statistics.median(off),
        "share_of_fit_inside_the_measure": statistics.median(inside),
        "same_adapter_with_and_without": True,
    }, indent=1))


if __name__ == "__main__":
    main()

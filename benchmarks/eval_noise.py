"""Evaluation noise floor: the same adapter evaluated with different evaluation seeds.

    python benchmarks/eval_noise.py --seeds 10

Trains one adapter on the claims testbed (configs/claims.yaml settings: FIRM β = 1, 2 rounds),
then evaluates it with ``--seeds`` different ``sampling.eval_seed`` values under three settings
and prints JSON: per setting and metric, the std over evaluation seeds (the noise floor of one
evaluation) and √2 × that (the floor of a difference of two evaluations, e.g. a round-to-round
change). Also the standard error over prompts of the greedy evaluation (which prompts are
held out: fixed across rounds and algorithms, so it cancels in paired comparisons).

- ``before``: compare_tiny's evaluation, 2 samples per prompt at temperature 1 on 32 prompts;
- ``sampled_more``: 8 samples per prompt on 96 prompts;
- ``greedy``: the most likely response on 96 prompts (claims.yaml's evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from firm_lightning.algorithms import FIRM
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.module import FIRMClientModule, PolicyGradientSettings, SamplingSettings
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig
from firm_lightning.policy import LoRASettings, TinyPolicy
from firm_lightning.rewards import score_all
from firm_lightning.testbed import heterogeneous_objectives
from firm_lightning.trainer_factory import TrainerFactory

SETTINGS = {
    "before": dict(eval_size=32, eval_num_generations=2, eval_greedy=False),
    "sampled_more": dict(eval_size=96, eval_num_generations=8, eval_greedy=False),
    "greedy": dict(eval_size=96, eval_num_generations=1, eval_greedy=True),
}


def make_module() -> FIRMClientModule:
    return FIRMClientModule(
        objectives=heterogeneous_objectives(), policy=TinyPolicy(),
        lora=LoRASettings(target_modules=["c_attn", "c_proj", "c_fc", "lm_head"]),
        sampling=SamplingSettings(num_generations=4, max_new_tokens=8),
        loss=PolicyGradientSettings(whiten_advantages=False), learning_rate=1e-2,
    )


def make_orchestrator(module, eval_size: int, tmp: str, rounds: int = 1) -> FederatedOrchestrator:
    data = PromptDataModule(num_clients=4, partition="dirichlet", dirichlet_alpha=1.0, batch_size=8,
                            eval_size=eval_size, eval_batch_size=48)
    config = FederationConfig(num_rounds=rounds, num_clients=4, output_dir=tmp, save_adapters=False)
    factory = TrainerFactory({"max_steps": 2, "accelerator": "cpu"}, tmp)
    return FederatedOrchestrator(module, data, config, factory, FIRM(beta=1.0), echo=lambda m: None)


def floors(orchestrator, module, adapter, seeds: int) -> dict:
    values: dict[str, list[float]] = {}
    for seed in range(seeds):
        module.sampling.eval_seed = 1000 + seed
        metrics = orchestrator.engine.evaluate(adapter)
        rewards = [v for k, v in metrics.items() if k.startswith("eval/reward/")]
        metrics["eval/reward/mean"] = statistics.mean(rewards)
        for key in [k for k in metrics if k.startswith("eval/reward/")] + ["eval/worst_client/mean"]:
            values.setdefault(key, []).append(metrics[key])
    return {k: {"mean": statistics.mean(v), "std_over_eval_seeds": statistics.stdev(v),
                "floor_of_a_difference": 2 ** 0.5 * statistics.stdev(v)} for k, v in values.items()}


def prompt_standard_error(module, data) -> dict:
    """Std error over held-out prompts of the greedy eval reward (one greedy response per prompt)."""
    prompts = data.eval_prompts
    with torch.no_grad():
        rollout = module.rollout(prompts, 1, greedy=True)
    rewards = score_all(module.objectives, rollout.prompts, rollout.responses)
    per_prompt = {n: rewards[s] for s, n in enumerate(module.objective_names)}
    per_prompt["mean"] = rewards.mean(0)
    return {f"eval/reward/{n}": float(r.std() / len(r) ** 0.5) for n, r in per_prompt.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--train-rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        module = make_module()
        trained = make_orchestrator(module, 96, tmp, args.train_rounds)
        adapter = trained.run().global_adapter  # one trained adapter, evaluated below
        out = {"eval_seeds": args.seeds, "train_rounds": args.train_rounds, "settings": {}}
        for name, s in SETTINGS.items():
            module.sampling.eval_num_generations = s["eval_num_generations"]
            module.sampling.eval_greedy = s["eval_greedy"]
            orchestrator = make_orchestrator(module, s["eval_size"], tmp)
            out["settings"][name] = {**s, "floors": floors(orchestrator, module, adapter, args.seeds)}
        module.load_adapter_state(adapter)
        out["greedy_prompt_standard_error"] = prompt_standard_error(module, trained.datamodule)
    out["wall_s"] = time.perf_counter() - tic
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

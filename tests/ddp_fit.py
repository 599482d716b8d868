"""One client fit on ``WORLD`` ranks (gloo, CPU), for tests/test_ddp.py.

    python tests/ddp_fit.py OUT WORLD

With WORLD > 1 this script starts its other ranks itself (``launch_ranks``: the same command
again, as ``python -m firm_lightning fit`` does). Every rank fits the same module through the
``TrainerFactory`` (so ``trainer.strategy=ddp`` takes the project's path) on batches of 3 prompts
(2 ranks: shares of 2 and 1 prompts, unequal), and writes ``OUT.rank<r>.pt``: the direction
written into ``.grad`` and λ at every step, and the adapter after the fit.

Sampling is replaced by a fixed table (the same responses to each prompt whatever the rank), so
both fits see the same global batch and the updates must agree. ``sampled_fit`` samples for real:
with per-prompt generators (``sampling.per_prompt_seeds``) each rank draws its share of the
prompts' samples exactly as one process draws them, and the adapters after the step agree too.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from firm_lightning.datamodule import collate_prompts  # noqa: E402
from firm_lightning.distributed import launch_ranks  # noqa: E402
from firm_lightning.module import PolicyGradientSettings, SamplingSettings  # noqa: E402
from firm_lightning.policy import LoRASettings  # noqa: E402
from firm_lightning.seeds import client_seed  # noqa: E402
from firm_lightning.sequences import concat_rollouts  # noqa: E402
from firm_lightning.trainer_factory import TrainerFactory  # noqa: E402
from firm_lightning.weighting import RegularizedMinNorm  # noqa: E402
from test_module import PROMPTS, make_module, objectives  # noqa: E402

GROUP, BATCH, STEPS = 3, 3, 2
CASES = {  # name: loss settings (the DDP run also splits each rank's rows into micro-batches of 2)
    "parameters": dict(),
    "logits": dict(gram_from="logits"),
}


class RecordingSGD(torch.optim.SGD):
    def __init__(self, params, record, **kwargs):
        self.tracked, self.record = list(params), record
        super().__init__(self.tracked, **kwargs)

    def step(self, closure=None):
        self.record.append(torch.cat([p.grad.detach().flatten() for p in self.tracked]).clone())
        return super().step(closure)


def fit(name: str, world: int, out: Path) -> dict:
    torch.manual_seed(0)
    loss = PolicyGradientSettings(kl_coef=0.1, max_grad_norm=None, micro_batch_size=2 if world > 1 else None,
                                  **CASES[name])
    module = make_module(objectives(), weighting=RegularizedMinNorm(beta=0.1), loss=loss,
                         lora=LoRASettings(target_modules=["c_attn", "c_proj", "c_fc"]),
                         sampling=SamplingSettings(max_new_tokens=10, num_generations=GROUP))
    torch.manual_seed(1)
    module.load_adapter_state({k: torch.randn_like(v) * 0.1 for k, v in module.adapter_state().items()})
    prompts = PROMPTS[: BATCH * STEPS]
    torch.manual_seed(2)
    table = module.rollout(prompts, GROUP)  # identical on every rank: same seed, same model

    def fixed_rollout(batch, group, greedy=False):
        rows = [table.rows(slice(prompts.index(p) * GROUP, (prompts.index(p) + 1) * GROUP)) for p in batch]
        return concat_rollouts(rows, module.tokenizer.pad_token_id, group)

    module.rollout = fixed_rollout
    directions, lambdas = [], []
    module.configure_optimizers = lambda: RecordingSGD(module.trainable_parameters(), directions, lr=0.5)
    original_update = module.update

    def update(rollout, rewards):
        result = original_update(rollout, rewards)
        lambdas.append(result[0].detach().clone())
        return result

    module.update = update
    config = {"max_steps": STEPS, "accelerator": "cpu", "devices": world, "strategy": "ddp" if world > 1 else "auto",
              "logger": False}
    trainer = TrainerFactory(config, out).client_trainer(0, 1)
    loader = DataLoader([{"prompt": p} for p in prompts], batch_size=BATCH, shuffle=False, collate_fn=collate_prompts)
    trainer.fit(module, train_dataloaders=loader)
    return {"directions": directions, "lambdas": lambdas, "adapter": module.adapter_state(),
            "world_size": trainer.world_size, "summary": module.client_summary()}


def sampled_fit(world: int, out: Path, generation_batch_size=None, per_prompt_seeds: bool = True) -> dict:
    """A real fit, sampling included: one local SGD step (lr 1.0) on a batch of 3 prompts, the global
    generator seeded as ``fit_client`` seeds it; the adapter before and after."""
    torch.manual_seed(0)
    module = make_module(objectives(), weighting=RegularizedMinNorm(beta=0.1),
                         loss=PolicyGradientSettings(kl_coef=0.1, max_grad_norm=None),
                         lora=LoRASettings(target_modules=["c_attn", "c_proj", "c_fc"]),
                         sampling=SamplingSettings(max_new_tokens=8, num_generations=GROUP, top_k=40,
                                                   generation_batch_size=generation_batch_size,
                                                   per_prompt_seeds=per_prompt_seeds))
    torch.manual_seed(1)
    module.load_adapter_state({k: torch.randn_like(v) * 0.1 for k, v in module.adapter_state().items()})
    initial = module.adapter_state()
    module.configure_optimizers = lambda: torch.optim.SGD(module.trainable_parameters(), lr=1.0)
    config = {"max_steps": 1, "accelerator": "cpu", "devices": world, "strategy": "ddp" if world > 1 else "auto",
              "logger": False}
    trainer = TrainerFactory(config, out).client_trainer(0, 1)
    loader = DataLoader([{"prompt": p} for p in PROMPTS[:BATCH]], batch_size=BATCH, shuffle=False,
                        collate_fn=collate_prompts)
    torch.manual_seed(client_seed(0, 1, 0))  # as fit_client seeds client 0's fit in round 1
    trainer.fit(module, train_dataloaders=loader)
    return {"initial": initial, "adapter": module.adapter_state(), "world_size": trainer.world_size}


def main(out: str, world: int) -> None:
    torch.set_num_threads(1)
    config = {"max_steps": STEPS, "accelerator": "cpu", "devices": world, "strategy": "ddp" if world > 1 else "auto"}
    with launch_ranks(config) as ranks, tempfile.TemporaryDirectory() as logs:
        results = {name: fit(name, world, Path(logs) / name) for name in CASES}
        results["sampled"] = sampled_fit(world, Path(logs) / "sampled")
        torch.save(results, f"{out}.rank{ranks.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

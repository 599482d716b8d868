"""Read what a trained adapter writes: responses to your prompts, each scored by every objective.

``python -m firm_lightning generate --config X.yaml --ckpt_path runs/tiny/adapters/final
--generate.prompts '["Tell me about rivers.", "How do I bake bread?"]'``
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from firm_lightning.module import FIRMClientModule
from firm_lightning.rewards import score_all


@dataclass
class GenerateSettings:
    """The ``generate:`` section.

    Args:
        prompts: The prompts to answer (a JSON/YAML list of strings).
        num_responses: Responses sampled per prompt.
        seed: Sampling seed (the same seed gives the same responses).
        max_new_tokens: Response length limit; default: model.sampling.max_new_tokens.
        temperature: Sampling temperature; default: model.sampling.temperature.
    """

    prompts: list[str] = field(default_factory=list)
    num_responses: int = 1
    seed: int = 0
    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("generate.prompts is empty: pass e.g. --generate.prompts '[\"Tell me about rivers.\"]'.")
        if self.num_responses < 1:
            raise ValueError(f"generate.num_responses must be >= 1; got {self.num_responses}.")


@dataclass
class Generation:
    prompt: str
    response: str
    rewards: dict[str, float]  # objective name -> reward (normalised, for a NormalizedReward)
    raw_rewards: dict[str, float] = field(default_factory=dict)  # objective name -> raw score, where normalised


@torch.no_grad()
def generate(
    module: FIRMClientModule, settings: GenerateSettings, device: str | torch.device = "cpu"
) -> list[Generation]:
    """Sample ``num_responses`` per prompt from the module's current adapter and score them with every objective."""
    module.to(device)
    sampling = module.sampling
    overrides = {
        k: v
        for k, v in (("max_new_tokens", settings.max_new_tokens), ("temperature", settings.temperature))
        if v is not None
    }
    saved = {k: getattr(sampling, k) for k in overrides}
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    try:
        for k, v in overrides.items():
            setattr(sampling, k, v)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed)
            rollout = module.rollout(settings.prompts, settings.num_responses, for_loss=False)
    finally:
        for k, v in saved.items():
            setattr(sampling, k, v)
    rewards = score_all(module.objectives, rollout.prompts, rollout.responses)
    raw = {o.name: o.last_raw for o in module.objectives if getattr(o, "last_raw", None) is not None}
    return [
        Generation(p, r, {n: float(rewards[s, i]) for s, n in enumerate(module.objective_names)},
                   {n: float(values[i]) for n, values in raw.items()})
        for i, (p, r) in enumerate(zip(rollout.prompts, rollout.responses))
    ]


def format_generations(generations: list[Generation]) -> str:
    lines = []
    for i, g in enumerate(generations, 1):
        lines.append(f"[{i}] prompt:   {g.prompt!r}")
        lines.append(f"    response: {g.response!r}")
        lines.append("    rewards:  " + "  ".join(f"{n}={v:.4f}" for n, v in g.rewards.items()))
        if g.raw_rewards:
            lines.append("    raw:      " + "  ".join(f"{n}={v:.4f}" for n, v in g.raw_rewards.items()))
    return "\n".join(lines)

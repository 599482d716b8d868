"""S separate backward passes against one batched (vmap, ``is_grads_batched``) backward pass.

    python benchmarks/batched_backward.py                      # tiny and mid
    python benchmarks/batched_backward.py --models gpt2_124m   # GPT-2 124M shape (8 sequences)

The per-objective gradients need S vector-Jacobian products through the same graph. PyTorch
can batch them with ``torch.autograd.grad(..., is_grads_batched=True)``; this measures whether
that is faster here (it was not on CPU: README, Performance). Prints JSON: median seconds over
interleaved repetitions and the batched/separate ratio, per model size and S.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import SHAPES, build_module, prompts  # noqa: E402

from firm_lightning.sequences import token_logprobs  # noqa: E402


def main(models=("tiny", "mid"), reps: int = 5) -> dict:
    torch.set_num_threads(1)
    result = {}
    for model in models:
        num_prompts, group = SHAPES[model]
        module = build_module(model, 1, 16)
        params = module.trainable_parameters()
        torch.manual_seed(0)
        rollout = module.rollout(prompts(num_prompts), group)

        def separate(s):
            logprobs = token_logprobs(module.policy, rollout)
            losses = (logprobs[None] * torch.randn(s, *logprobs.shape)).sum((1, 2))
            return [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]

        def batched(s):
            logprobs = token_logprobs(module.policy, rollout)
            losses = (logprobs[None] * torch.randn(s, *logprobs.shape)).sum((1, 2))
            return torch.autograd.grad(losses, params, grad_outputs=torch.eye(s), is_grads_batched=True)

        times: dict[str, list[float]] = {}
        for _ in range(reps):
            for s in (2, 3):
                for name, fn in (("separate", separate), ("batched", batched)):
                    tic = time.perf_counter()
                    fn(s)
                    times.setdefault(f"{name}_s{s}", []).append(time.perf_counter() - tic)
        medians = {k: statistics.median(v) for k, v in times.items()}
        result[model] = {
            **medians,
            **{f"batched_over_separate_s{s}": medians[f"batched_s{s}"] / medians[f"separate_s{s}"] for s in (2, 3)},
        }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny", "mid"], choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    main(args.models, args.reps)

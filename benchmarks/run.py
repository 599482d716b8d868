"""Performance benchmark: where a FIRM round spends its time, against its floor and its peers.

    python benchmarks/run.py              # tiny, mid-size and GPT-2 124M shapes, 7 interleaved repetitions
    python benchmarks/run.py --quick      # under ~10 minutes on 2 busy CPU cores: fewer repetitions
    python benchmarks/run.py --smoke      # the smallest mode (the test suite runs it): tiny model only
    python benchmarks/run.py --json out.json

Every speed number is a ratio or a rate measured inside this one run; variants are interleaved
(S = 1, 2, 3 in turn within each repetition) and ratios are taken per repetition, then
reported as min / median / max. Sections:

1. Local step cost: FIRM's sampling, scoring and update with S = 1, 2, 3 objectives (S = 1, 2
   on the GPT-2 124M shape) on the same rollouts, and the floor: one forward (logits for the
   response positions only) plus S backward passes of the bare LoRA model (plain torch, none
   of this project's code). FIRM's update also runs the reference forward (no grad, adapter
   off: spec step 4), which the floor does not; it is timed on its own, so
   ``update_over_floor_with_reference_s2`` and ``overhead_beyond_floor_and_reference_s2`` say
   what is left once it is accounted for. ``floor_step_ratio_s2`` is the floor's own step
   ratio (the same sampling and scoring, the floor instead of the update).
   Shapes: ``tiny`` (2 layers, 64 wide) and ``mid`` (4 layers, 256 wide) with the character
   tokenizer; ``gpt2_124m``: GPT-2's 12 layers, 768 wide, random weights, a byte-level BPE
   tokenizer of 50,257 tokens built in code (benchmarks/shapes.py).
2. Orchestration overhead: a round's wall time (evaluation excluded) against the clients' time
   inside ``training_step``: Trainer construction, adapter swaps, aggregation and logging.
3. Memory against clients: peak RSS of a whole federation with 2, 8 and 32 clients (one
   process each).
4. Communication: bytes up and down per client per round for FIRM and FMGDA at S = 2 and 3,
   and the 16-bit upload (``federation.upload_dtype``) with its effect on the eval reward.
5. The peer: TRL's GRPO trainer (one objective) on the same model, prompts, B, G and
   response length, in tokens per second, beside FIRM with S = 1 and S = 2 (tiny, and the
   GPT-2 124M shape outside smoke mode). "skipped" when TRL is not installed.
7. Shared prompts (``sampling.share_prompt``), S = 2: the update's and sampling's time with each
   prompt computed once per group over the same with every row computed whole (the same rollout,
   interleaved), on the tiny, mid and GPT-2 124M shapes (short prompts) and on an HH-shaped batch:
   the GPT-2 124M shape, prompts of ~200 tokens, 64 new tokens, G = 4; there also FIRM's S = 2
   tokens per second (sampling, scoring and update, prompts shared) against TRL's GRPO trainer
   (one objective) on the same prompts and lengths.
6. Memory against micro-batch size (GPT-2 124M shape, S = 2): one process per
   ``loss.micro_batch_size`` loads the same saved rollout, then runs one update. Measured:
   resident memory before the update (weights, rollout, imports) and the peak during it
   (VmHWM, reset through /proc/self/clear_refs just before it): the update's own peak working
   set, as the OS sees it (CPU; torch's allocator caches nothing on CPU). The same for
   sampling against ``sampling.generation_batch_size``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from firm_lightning.algorithms import FIRM, FMGDA  # noqa: E402
from firm_lightning.datamodule import PromptDataModule  # noqa: E402
from firm_lightning.federation_metrics import payload_bytes  # noqa: E402
from firm_lightning.module import FIRMClientModule, PolicyGradientSettings, SamplingSettings  # noqa: E402
from firm_lightning.orchestrator import FederationConfig, run_federation  # noqa: E402
from firm_lightning.policy import LoRASettings, TinyPolicy  # noqa: E402
from firm_lightning.rewards import CharsetReward, score_all  # noqa: E402
from firm_lightning.sequences import position_ids, token_logprobs  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from shapes import GPT2ShapePolicy, gpt2_tokenizer  # noqa: E402

MODELS = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4),
    "mid": dict(num_layers=4, hidden_size=256, num_heads=4),
    "gpt2_124m": None,  # GPT2ShapePolicy
}
# No LoRA on lm_head: TRL computes log-probs from lm_head.weight directly and refuses it, and
# the comparison needs the same trainable parameters on both sides.
LORA = LoRASettings(target_modules=["c_attn", "c_proj", "c_fc"])
OBJECTIVES = (("a_to_m", "abcdefghijklm"), ("n_to_z", "nopqrstuvwxyz"), ("vowels", "aeiou"))
BATCH, GROUP = 8, 4  # B prompts per step, G responses per prompt
# B, G on the GPT-2 124M shape: one CPU update of 8 sequences takes seconds there.
SHAPES = {"tiny": (BATCH, GROUP), "mid": (BATCH, GROUP), "gpt2_124m": (4, 2)}
MICRO_SHAPE = (4, 4)  # B, G of the memory-vs-micro-batch section (16 sequences)
# The HH-RLHF-shaped batch of section 7: the GPT-2 124M shape, B prompts of ~200 tokens, G = 4, 64 new tokens.
HH = dict(model="gpt2_124m", prompt_tokens=200, max_new_tokens=64, generations=4)

MODES = {
    "smoke": dict(reps=2, models=["tiny"], tokens=16, rss_clients=[2, 32], rounds=1, clients=2, trl_steps=2,
                  cast_rounds=1, trl_models=["tiny"], micro_sizes=[], generation_sizes=[], prefix_models=["tiny"],
                  hh_prompts=0, hh_reps=0),
    "quick": dict(reps=3, models=["tiny", "mid", "gpt2_124m"], tokens=16, rss_clients=[2, 8, 32], rounds=2, clients=4,
                  trl_steps=3, cast_rounds=2, trl_models=["tiny", "gpt2_124m"], micro_sizes=[None, 4, 1],
                  generation_sizes=[None, 4], prefix_models=["tiny", "mid", "gpt2_124m"], hh_prompts=1, hh_reps=2),
    "full": dict(reps=7, models=["tiny", "mid", "gpt2_124m"], tokens=32, rss_clients=[2, 8, 32], rounds=3, clients=4,
                 trl_steps=6, cast_rounds=4, trl_models=["tiny", "mid", "gpt2_124m"], micro_sizes=[None, 8, 4, 2, 1],
                 generation_sizes=[None, 8, 4], prefix_models=["tiny", "mid", "gpt2_124m"], hh_prompts=4, hh_reps=3),
}


# --------------------------------------------------------------------------- helpers


def objectives(num: int) -> list[CharsetReward]:
    return [CharsetReward(name, chars) for name, chars in OBJECTIVES[:num]]


def stats(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def timed(fn) -> tuple[float, object]:
    tic = time.perf_counter()
    out = fn()
    return time.perf_counter() - tic, out


def prompts(n: int) -> list[str]:
    data = PromptDataModule(num_clients=1, batch_size=n, eval_size=8, seed=0)
    data.setup("fit")
    return data.client_prompts(0)[:n]


def policy_for(model: str):
    return GPT2ShapePolicy(seed=0) if model == "gpt2_124m" else TinyPolicy(**MODELS[model], seed=0)


def build_module(model: str, num_objectives: int, max_new_tokens: int, gram_from: str = "parameters",
                 **settings) -> FIRMClientModule:
    torch.manual_seed(0)  # the same LoRA initialisation for every S
    sampling = {k: settings.pop(k) for k in list(settings) if k in ("generation_batch_size", "max_prompt_length",
                                                                    "num_generations")}
    sampling.setdefault("num_generations", SHAPES[model][1])
    module = FIRMClientModule(
        objectives(num_objectives), policy=policy_for(model), lora=LORA,
        sampling=SamplingSettings(max_new_tokens=max_new_tokens, **sampling),
        loss=PolicyGradientSettings(kl_coef=0.05, gram_from=gram_from, **settings), learning_rate=1e-3,
    )
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer  # outside a Trainer: the optimiser Lightning would hand over
    return module


def floor_update(module: FIRMClientModule, rollout, num_objectives: int, coefficients: torch.Tensor) -> None:
    """One forward and S backward passes of the bare LoRA model: no project code in the loop.
    Logits for the response positions only (``logits_to_keep``), as a careful implementation would."""
    model, params = module.policy, module.trainable_parameters()
    T = rollout.sequences.shape[1] - rollout.prompt_length
    logits = model(
        input_ids=rollout.sequences, attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask), logits_to_keep=T + 1,
    ).logits[:, :-1]
    targets = rollout.sequences[:, rollout.prompt_length :]
    logprobs = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    losses = (logprobs[None] * coefficients[:num_objectives]).sum(dim=(1, 2))
    for loss in losses:
        torch.autograd.grad(loss, params, retain_graph=True)


# --------------------------------------------------------------------------- 1. local step


def with_objectives(module: FIRMClientModule, num: int) -> FIRMClientModule:
    """The same module (one copy of the weights, which matters at 124M) with the first ``num`` objectives."""
    module.objectives = objectives(num)
    module.objective_names = [o.name for o in module.objectives]
    return module


def reference_forward(module: FIRMClientModule, rollout) -> None:
    with torch.no_grad(), module.policy.disable_adapter():
        token_logprobs(module.policy, rollout)


def local_step_section(model: str, mode: dict) -> dict:
    variants = (1, 2) if model == "gpt2_124m" else (1, 2, 3)
    module = build_module(model, max(variants), mode["tokens"])
    initial = module.adapter_state()
    num_prompts, group = SHAPES[model]
    batch = prompts(num_prompts)
    torch.manual_seed(0)
    fixed = module.rollout(batch, group)  # the same rollouts for every variant
    coefficients = torch.randn(3, *fixed.response_mask.shape) * fixed.response_mask
    times: dict[str, list[float]] = {}
    for _ in range(mode["reps"]):
        for s in variants:
            with_objectives(module, s).load_adapter_state(initial)
            torch.manual_seed(1)
            t_sample, rollout = timed(lambda: module.rollout(batch, group))
            t_score, _ = timed(lambda: score_all(module.objectives, rollout.prompts, rollout.responses))
            rewards = score_all(module.objectives, fixed.prompts, fixed.responses)
            t_update, _ = timed(lambda: module.update(fixed, rewards))
            t_floor, _ = timed(lambda: floor_update(module, fixed, s, coefficients))
            for key, value in (("sampling", t_sample), ("scoring", t_score), ("update", t_update), ("floor", t_floor)):
                times.setdefault(f"{key}_s{s}", []).append(value)
            times.setdefault(f"step_s{s}", []).append(t_sample + t_score + t_update)
            times.setdefault(f"floor_step_s{s}", []).append(t_sample + t_score + t_floor)
        times.setdefault("reference_forward", []).append(timed(lambda: reference_forward(module, fixed))[0])
    ratio = lambda key, s: [a / b for a, b in zip(times[f"{key}_s{s}"], times[f"{key}_s1"])]  # noqa: E731
    per_rep = lambda fn, *keys: stats([fn(*v) for v in zip(*(times[k] for k in keys))])  # noqa: E731
    tokens = int(fixed.response_mask.sum())
    result = {
        "model": model,
        "batch": {"prompts": num_prompts, "generations": group, "max_new_tokens": mode["tokens"]},
        "response_tokens_per_step": tokens,
        "sequence_shape": list(fixed.sequences.shape),
        "vocab_size": len(module.tokenizer),
        "parameters": sum(p.numel() for p in module.policy.parameters()),
        "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
        "seconds": {k: stats(v) for k, v in times.items()},
        "update_ratio_s2": stats(ratio("update", 2)),
        "update_floor_ratio_s2": stats(ratio("floor", 2)),
        "step_ratio_s2": stats(ratio("step", 2)),
        "floor_step_ratio_s2": stats(ratio("floor_step", 2)),
        "step_ratio_s2_over_floor_step_ratio": per_rep(
            lambda a, b, c, d: (a / b) / (c / d), "step_s2", "step_s1", "floor_step_s2", "floor_step_s1"
        ),
        "update_over_floor_s2": per_rep(lambda u, f: u / f, "update_s2", "floor_s2"),
        "update_over_floor_with_reference_s2": per_rep(
            lambda u, f, r: u / (f + r), "update_s2", "floor_s2", "reference_forward"
        ),
        "reference_share_of_update_s2": per_rep(lambda r, u: r / u, "reference_forward", "update_s2"),
        "overhead_beyond_floor_and_reference_s2": per_rep(
            lambda u, f, r: (u - f - r) / f, "update_s2", "floor_s2", "reference_forward"
        ),
        "step_split_s2": {
            k: per_rep(lambda a, b: a / b, f"{k}_s2", "step_s2") for k in ("sampling", "scoring", "update")
        },
        "sampling_share_s2": per_rep(lambda a, b: a / b, "sampling_s2", "step_s2"),
    }
    if 3 in variants:
        result.update({"update_ratio_s3": stats(ratio("update", 3)), "update_floor_ratio_s3": stats(ratio("floor", 3)),
                       "step_ratio_s3": stats(ratio("step", 3))})
        result["cheap_weighting"] = cheap_weighting(model, mode, module, initial, fixed)
    for s in (1, 2):
        result[f"firm_s{s}_tokens_per_s"] = tokens / statistics.median(times[f"step_s{s}"])
    return result


def cheap_weighting(model: str, mode: dict, base: FIRMClientModule, initial: dict, fixed) -> dict:
    """``gram_from`` hidden / logits against the exact λ: update time and λ distance, S = 2.

    The distance is measured on fresh rollouts (one per repetition) from the same adapter, as
    ``|λ_cheap − λ_exact|`` on the first objective's weight (S = 2: the whole difference).
    """
    cheap = {g: build_module(model, 2, mode["tokens"], g) for g in ("hidden", "logits")}
    variants = {"single": 1, "parameters": 2, **cheap}
    times: dict[str, list[float]] = {}
    lambdas: dict[str, list[float]] = {}
    num_prompts, group = SHAPES[model]
    batch = prompts(num_prompts)
    for rep in range(mode["reps"]):
        torch.manual_seed(100 + rep)
        rollout = with_objectives(base, 2).rollout(batch, group) if rep else fixed
        for name, variant in variants.items():
            module = variant if isinstance(variant, FIRMClientModule) else with_objectives(base, variant)
            module.load_adapter_state(initial)
            rewards = score_all(module.objectives, rollout.prompts, rollout.responses)
            t, (lam, _, _) = timed(lambda: module.update(rollout, rewards))
            times.setdefault(name, []).append(t)
            if name != "single":
                lambdas.setdefault(name, []).append(float(lam[0]))
    out = {}
    for name in ("hidden", "logits"):
        out[f"update_time_vs_exact_{name}"] = stats([a / b for a, b in zip(times[name], times["parameters"])])
        out[f"update_ratio_s2_{name}"] = stats([a / b for a, b in zip(times[name], times["single"])])
        out[f"lambda_abs_error_{name}"] = stats([abs(a - b) for a, b in zip(lambdas[name], lambdas["parameters"])])
    out["lambda_exact"] = stats(lambdas["parameters"])
    return out


# --------------------------------------------------------------------------- 2. orchestration


class StepClock(L.Callback):
    """Sums the wall time inside training_step over every instance (the TrainerFactory deep-copies it)."""

    total = 0.0

    def on_train_batch_start(self, *args) -> None:
        self._tic = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        StepClock.total += time.perf_counter() - self._tic


def tiny_federation(out: Path, num_clients: int, rounds: int, steps: int, algorithm=None, num_objectives: int = 2,
                    callbacks=(), **federation) -> tuple:
    torch.manual_seed(0)
    module = FIRMClientModule(
        objectives(num_objectives), policy=TinyPolicy(), lora=LORA,
        sampling=SamplingSettings(num_generations=GROUP, max_new_tokens=16, eval_num_generations=2),
        learning_rate=1e-2,
    )
    data = PromptDataModule(num_clients=num_clients, batch_size=BATCH, eval_size=32, partition="iid", seed=0)
    config = FederationConfig(num_rounds=rounds, num_clients=num_clients, min_clients=1, output_dir=str(out),
                              save_adapters=False, **federation)
    trainer = {"max_steps": steps, "accelerator": "cpu", "logger": True, "callbacks": list(callbacks)}
    with contextlib.redirect_stdout(io.StringIO()):
        state = run_federation(module, data, config, trainer, algorithm or FIRM(beta=1.0), module.adapter_state(), out)
    return module, state


def orchestration_section(mode: dict) -> dict:
    from firm_lightning.engine import RoundEngine

    eval_times: list[float] = []  # the first is the initial evaluation, outside every round
    original = RoundEngine.evaluate

    def timed_evaluate(self, adapter):
        tic = time.perf_counter()
        try:
            return original(self, adapter)
        finally:
            eval_times.append(time.perf_counter() - tic)

    RoundEngine.evaluate = timed_evaluate
    try:
        with tempfile.TemporaryDirectory() as out:
            StepClock.total = 0.0
            _, state = tiny_federation(Path(out), mode["clients"], mode["rounds"], 4, callbacks=[StepClock()])
    finally:
        RoundEngine.evaluate = original
    rounds = state.history[1:]
    round_wall = sum(r["time/round_s"] for r in rounds)
    eval_in_rounds = sum(eval_times[1:])
    training = round_wall - eval_in_rounds
    return {
        "rounds": len(rounds),
        "round_wall_s": round_wall,
        "training_step_s": StepClock.total,
        "evaluation_s": eval_in_rounds,
        "orchestration_overhead": (training - StepClock.total) / training,
        "evaluation_share_of_round": eval_in_rounds / round_wall,
    }


# --------------------------------------------------------------------------- 3. memory


def _proc_status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (ru_maxrss would include the parent's peak:
    Linux carries it over fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_child(num_clients: int, rounds: int) -> dict:
    """Runs in its own process: resident memory after set-up, at the end and at its peak."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        tiny_federation(Path(out) / "warm", 2, 1, 1)  # imports, lazy initialisation, first fits
        before = _proc_status_mb("VmRSS")
        tiny_federation(Path(out) / "run", num_clients, rounds, 1)
        after = _proc_status_mb("VmRSS")
    return {
        "clients": num_clients,
        "peak_rss_mb": _proc_status_mb("VmHWM"),
        "rss_before_mb": before,
        "rss_after_mb": after,
    }


def memory_section(mode: dict) -> dict:
    results = {}
    for n in mode["rss_clients"]:
        proc = subprocess.run(
            [sys.executable, __file__, "--_rss_child", str(n), "--_rounds", str(mode["rounds"])],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    low, high = min(results), max(results)
    return {
        "peak_rss_mb": {str(n): r["peak_rss_mb"] for n, r in results.items()},
        "rss_growth_during_run_mb": {str(n): r["rss_after_mb"] - r["rss_before_mb"] for n, r in results.items()},
        f"rss_ratio_{high}_vs_{low}": results[high]["peak_rss_mb"] / results[low]["peak_rss_mb"],
        "rss_growth_mb_per_client": (results[high]["peak_rss_mb"] - results[low]["peak_rss_mb"]) / (high - low),
    }


# --------------------------------------------------------------------------- 4. communication


def communication_section(mode: dict) -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as out:
        for name, algorithm in (("firm", FIRM(beta=1.0)), ("fmgda", FMGDA())):
            for s in (2, 3):
                module, state = tiny_federation(Path(out) / f"{name}{s}", 2, 1, 1, algorithm, num_objectives=s)
                row = state.history[-1]
                result[f"uplink_bytes_{name}_s{s}"] = row["comm/bytes_up_per_client"]
                result[f"downlink_bytes_{name}_s{s}"] = row["comm/bytes_down"] / row["clients"]
        result["adapter_bytes"] = payload_bytes(module.adapter_state())
        rewards = {}
        for dtype in (None, "bfloat16", "float16"):
            _, state = tiny_federation(Path(out) / f"cast_{dtype}", 2, mode["cast_rounds"], 2, upload_dtype=dtype)
            key = dtype or "float32"
            result[f"uplink_bytes_firm_s2_{key}"] = state.history[-1]["comm/bytes_up_per_client"]
            rewards[key] = {
                k.removeprefix("eval/reward/"): v for k, v in state.history[-1].items() if k.startswith("eval/reward/")
            }
        result["eval_reward_by_upload_dtype"] = rewards
    return result


# --------------------------------------------------------------------------- 6. memory vs micro-batch


def _clear_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def micro_child(path: str, kind: str, size: int | None, threads: int) -> dict:
    """One process, one setting: the update (or the sampling) of a saved rollout on the 124M shape."""
    torch.set_num_threads(threads)
    saved = torch.load(path, weights_only=False)
    key = "micro_batch_size" if kind == "update" else "generation_batch_size"
    module = build_module("gpt2_124m", 2, saved["max_new_tokens"], **{key: size})
    rollout, rewards = saved["rollout"], saved["rewards"]
    before = _proc_status_mb("VmRSS")
    reset = _clear_peak()
    if kind == "update":
        seconds, _ = timed(lambda: module.update(rollout, rewards))
    else:
        torch.manual_seed(0)
        seconds, _ = timed(lambda: module.rollout(saved["prompts"], rollout.group_size))
    peak = _proc_status_mb("VmHWM")
    return {key: size, "rss_before_mb": before, "peak_rss_mb": peak, "peak_above_before_mb": peak - before,
            "seconds": seconds, "peak_reset": reset}


def micro_memory_section(mode: dict, threads: int) -> dict:
    if not mode["micro_sizes"]:
        return {"skipped": "not in this mode (--quick or the full run)"}
    num_prompts, group = MICRO_SHAPE
    module = build_module("gpt2_124m", 2, mode["tokens"])
    batch = prompts(num_prompts)
    torch.manual_seed(0)
    rollout = module.rollout(batch, group)
    rewards = score_all(module.objectives, rollout.prompts, rollout.responses)
    del module
    result = {"batch": {"prompts": num_prompts, "generations": group, "max_new_tokens": mode["tokens"]},
              "sequence_shape": list(rollout.sequences.shape), "update": [], "sampling": []}
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "rollout.pt"
        torch.save({"rollout": rollout, "rewards": rewards, "prompts": batch, "max_new_tokens": mode["tokens"]}, path)
        runs = [("update", m) for m in mode["micro_sizes"]] + [("sampling", g) for g in mode["generation_sizes"]]
        for kind, size in runs:
            proc = subprocess.run(
                [sys.executable, __file__, "--_micro_child", str(path), "--_kind", kind, "--_size", str(size),
                 "--threads", str(threads)],
                capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            result[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return result


# --------------------------------------------------------------------------- 7. shared prompts


def hh_prompts(tokenizer, n: int, length: int) -> list[str]:
    """``n`` HH-RLHF-shaped prompts ("\n\nHuman: ...\n\nAssistant:") of about ``length`` tokens: shipped
    prompts as the turns, the text cut to its last ``length`` tokens (what max_prompt_length would keep)."""
    pool = prompts(64)
    out = []
    for i in range(n):
        turns, k = [], i
        while len(tokenizer("".join(turns))["input_ids"]) < length + 16:
            turns.append(f"\n\nHuman: {pool[k % len(pool)]}\n\nAssistant: {pool[(k + 7) % len(pool)]}")
            k += n
        text = "".join(turns) + f"\n\nHuman: {pool[k % len(pool)]}\n\nAssistant:"
        out.append(tokenizer.decode(tokenizer(text)["input_ids"][-length:]))
    return out


def hh_batch(mode: dict) -> list[str]:
    """Section 7's HH-shaped prompts (none in modes without it), the same for FIRM and TRL."""
    return hh_prompts(gpt2_tokenizer(), mode["hh_prompts"], HH["prompt_tokens"]) if mode["hh_prompts"] else []


def prefix_section(model: str, mode: dict) -> dict:
    """Shared over unshared prompts (``sampling.share_prompt``), S = 2, the same rollout; per repetition,
    interleaved. ``hh``: the HH-shaped batch (``HH``) on the GPT-2 124M shape."""
    import dataclasses

    hh = model == "hh"
    if hh:
        module = build_module(HH["model"], 2, HH["max_new_tokens"], num_generations=HH["generations"],
                              max_prompt_length=HH["prompt_tokens"] + 8)
        num_prompts, group, reps = mode["hh_prompts"], HH["generations"], mode["hh_reps"]
        batch = hh_batch(mode)
    else:
        module = build_module(model, 2, mode["tokens"])
        (num_prompts, group), reps = SHAPES[model], mode["reps"]
        batch = prompts(num_prompts)
    base, initial = module.sampling, module.adapter_state()
    torch.manual_seed(0)
    fixed = module.rollout(batch, group)
    rewards = score_all(module.objectives, fixed.prompts, fixed.responses)
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for share in (False, True):
            module.sampling = dataclasses.replace(base, share_prompt=share)
            module.load_adapter_state(initial)
            t_sample, rollout = timed(lambda: module.rollout(batch, group, seed=rep))  # noqa: B023
            t_score, _ = timed(lambda: score_all(module.objectives, rollout.prompts, rollout.responses))  # noqa: B023
            t_update, _ = timed(lambda: module.update(fixed, rewards))
            name = "shared" if share else "unshared"
            for key, value in (("sampling", t_sample), ("update", t_update), ("step", t_sample + t_score + t_update)):
                times.setdefault(f"{key}_{name}", []).append(value)
    module.sampling = base
    ratio = lambda key: stats([a / b for a, b in zip(times[f"{key}_shared"], times[f"{key}_unshared"])])  # noqa: E731
    tokens = int(fixed.response_mask.sum())
    return {
        "model": HH["model"] if hh else model,
        "batch": {"prompts": num_prompts, "generations": group, "prompt_length": fixed.prompt_length,
                  "max_new_tokens": fixed.response_mask.shape[1]},
        "response_tokens_per_step": tokens,
        "seconds": {k: stats(v) for k, v in times.items()},
        "update_shared_over_unshared": ratio("update"),
        "sampling_shared_over_unshared": ratio("sampling"),
        "step_shared_over_unshared": ratio("step"),
        "firm_s2_tokens_per_s": tokens / statistics.median(times["step_shared"]),
        "firm_s2_tokens_per_s_unshared": tokens / statistics.median(times["step_unshared"]),
    }


def prefix_models_section(mode: dict) -> dict:
    result = {model: prefix_section(model, mode) for model in mode["prefix_models"]}
    if mode["hh_prompts"]:
        result["hh"] = prefix_section("hh", mode)
    return result


# --------------------------------------------------------------------------- 5. TRL GRPO


def trl_models_section(mode: dict, hh_batch: Optional[list[str]] = None) -> dict:
    """TRL's GRPO on each of ``trl_models``; and on the HH-shaped batch (``hh_batch``: section 7's prompts)."""
    try:
        import trl  # noqa: F401
    except ImportError:
        return {"skipped": "trl is not installed: pip install -e '.[bench]'"}
    result = {model: trl_section(model, mode) for model in mode["trl_models"]}
    if hh_batch:
        result["hh"] = trl_section(HH["model"], mode, hh_batch, HH["generations"], HH["max_new_tokens"],
                                   steps=mode["hh_reps"])
    return result


def trl_section(model: str, mode: dict, batch: Optional[list[str]] = None, group: Optional[int] = None,
                max_new_tokens: Optional[int] = None, steps: Optional[int] = None) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    base, tokenizer = policy_for(model).build()
    reward = objectives(1)[0]

    def reward_fn(prompts, completions, **_):
        return reward(list(prompts), list(completions)).tolist()

    reward_fn.__name__ = reward.name
    num_prompts, group = (len(batch), group) if batch is not None else SHAPES[model]
    batch = batch if batch is not None else prompts(num_prompts)
    max_new_tokens = max_new_tokens or mode["tokens"]
    steps = (steps or mode["trl_steps"]) + 1  # the first step warms up and is discarded
    dataset = Dataset.from_dict({"prompt": (batch * (steps + 1))[: num_prompts * (steps + 1)]})
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=num_prompts * group, num_generations=group,
            max_completion_length=max_new_tokens, temperature=1.0, beta=0.05, learning_rate=1e-3,
            max_steps=steps, logging_steps=1, report_to=[], use_cpu=True, bf16=False, fp16=False,
            save_strategy="no", disable_tqdm=True, seed=0, shuffle_dataset=False,
        )
        lora = LoraConfig(
            r=LORA.r,
            lora_alpha=LORA.alpha,
            target_modules=list(LORA.target_modules),
            fan_in_fan_out=True,
            task_type="CAUSAL_LM",
        )
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            trainer = GRPOTrainer(model=base, reward_funcs=[reward_fn], args=args, train_dataset=dataset,
                                  processing_class=tokenizer, peft_config=lora)
            rollout_times, step_times, tokens = [], [], []
            generate = trainer._generate_and_score_completions
            step = trainer.training_step

            def timed_generate(inputs):
                tic = time.perf_counter()
                out = generate(inputs)
                rollout_times.append(time.perf_counter() - tic)
                tokens.append(int(out["completion_mask"].sum()))
                return out

            def timed_step(*a, **k):
                tic = time.perf_counter()
                out = step(*a, **k)
                step_times.append(time.perf_counter() - tic)
                return out

            trainer._generate_and_score_completions = timed_generate
            trainer.training_step = timed_step
            trainer.train()
    step_times, rollout_times, tokens = step_times[1:], rollout_times[1:], tokens[1:]
    return {
        "model": model,
        "steps_timed": len(step_times),
        "trl_grpo_tokens_per_s": sum(tokens) / sum(step_times),
        "trl_grpo_rollout_share": sum(rollout_times) / sum(step_times),
        "trl_grpo_step_s": stats(step_times),
    }


# --------------------------------------------------------------------------- main


def summary(result: dict) -> dict:
    """The flat keys: the tiny model's under their plain names (the smoke test's), every shape's
    under ``<key>_<model>``, and the issue's targets, each with its value and whether it is met.
    A section that did not run (``--sections``) or was skipped (TRL missing) leaves its keys None."""
    flat: dict = {}
    local = result.get("local_step", {})
    tiny = local.get("tiny", {})
    for k in ("update_ratio_s2", "update_ratio_s3", "update_floor_ratio_s2", "step_ratio_s2"):
        flat[k] = tiny[k]["median"] if k in tiny else None
    flat["orchestration_overhead"] = result.get("orchestration", {}).get("orchestration_overhead")
    flat["rss_ratio_32_vs_2"] = result.get("memory", {}).get("rss_ratio_32_vs_2")
    comm = result.get("communication", {})
    flat.update({k: comm.get(k) for k in ("adapter_bytes", "uplink_bytes_firm_s2", "uplink_bytes_fmgda_s2")})
    trl = result.get("trl", {})
    flat["trl_grpo_tokens_per_s"] = trl.get("tiny", {}).get("trl_grpo_tokens_per_s")
    flat["firm_s2_tokens_per_s"] = tiny.get("firm_s2_tokens_per_s")
    flat["firm_s1_tokens_per_s"] = tiny.get("firm_s1_tokens_per_s")
    for model, section in local.items():
        for k in ("update_over_floor_s2", "update_over_floor_with_reference_s2", "reference_share_of_update_s2",
                  "step_ratio_s2", "floor_step_ratio_s2", "step_ratio_s2_over_floor_step_ratio"):
            flat[f"{k}_{model}"] = section[k]["median"]
        flat[f"firm_s2_tokens_per_s_{model}"] = section["firm_s2_tokens_per_s"]
        if model in trl:
            flat[f"trl_grpo_tokens_per_s_{model}"] = trl[model]["trl_grpo_tokens_per_s"]
    prefix = result.get("prefix", {})
    for model, section in prefix.items():
        for k in ("update_shared_over_unshared", "sampling_shared_over_unshared", "step_shared_over_unshared"):
            flat[f"{k}_{model}"] = section[k]["median"]
        flat[f"firm_s2_tokens_per_s_{model}_shared"] = section["firm_s2_tokens_per_s"]
    if "hh" in prefix and "hh" in trl:
        flat["trl_grpo_tokens_per_s_hh"] = trl["hh"]["trl_grpo_tokens_per_s"]
        flat["firm_s2_over_trl_grpo_hh"] = prefix["hh"]["firm_s2_tokens_per_s"] / trl["hh"]["trl_grpo_tokens_per_s"]
    for row in result.get("micro_memory", {}).get("update", []):
        flat[f"update_peak_above_before_mb_micro_{row['micro_batch_size']}"] = row["peak_above_before_mb"]
    targets = []
    for model in ("mid", "gpt2_124m"):
        if f"update_over_floor_s2_{model}" in flat:
            targets.append(("update_over_floor_s2", model, flat[f"update_over_floor_s2_{model}"], "<= 1.10",
                            flat[f"update_over_floor_s2_{model}"] <= 1.10))
    if flat["orchestration_overhead"] is not None:
        targets.append(("orchestration_overhead", "tiny", flat["orchestration_overhead"], "<= 0.03",
                        flat["orchestration_overhead"] <= 0.03))
    for model in local:
        value = flat[f"step_ratio_s2_over_floor_step_ratio_{model}"]
        targets.append(("step_ratio_s2 / floor_step_ratio_s2", model, value, "within 5 %", abs(value - 1) <= 0.05))
    for model in prefix:  # the HH shape's targets; elsewhere sharing must not cost time
        for key, bound in (("update_shared_over_unshared", 0.55 if model == "hh" else 1.05),
                           ("sampling_shared_over_unshared", 0.85 if model == "hh" else 1.05)):
            value = flat[f"{key}_{model}"]
            targets.append((key, model, value, f"<= {bound}", value <= bound))
    if "firm_s2_over_trl_grpo_hh" in flat:
        value = flat["firm_s2_over_trl_grpo_hh"]
        targets.append(("firm_s2 / trl_grpo tokens/s", "hh", value, ">= 1.3", value >= 1.3))
    flat["targets"] = [dict(zip(("measure", "model", "value", "target", "met"), t)) for t in targets]
    return flat


def _cell(value) -> str:
    """A table cell: a number, or why there is none (a section that was skipped or not run)."""
    if value is None:
        return "skipped"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


LOCAL_ROWS = ("update_ratio_s2", "update_floor_ratio_s2", "update_ratio_s3", "update_floor_ratio_s3", "step_ratio_s2",
              "floor_step_ratio_s2", "step_ratio_s2_over_floor_step_ratio", "step_ratio_s3", "update_over_floor_s2",
              "update_over_floor_with_reference_s2", "reference_share_of_update_s2",
              "overhead_beyond_floor_and_reference_s2", "sampling_share_s2")


def print_table(result: dict) -> None:
    print(f"{'measure':<40}{'model':>10}{'min':>10}{'median':>10}{'max':>10}")
    for model, section in result.get("local_step", {}).items():
        for key in LOCAL_ROWS:
            if key in section:
                s = section[key]
                print(f"{key:<40}{model:>10}{s['min']:>10.3f}{s['median']:>10.3f}{s['max']:>10.3f}")
        for key in ("update", "scoring"):
            s = section["step_split_s2"][key]
            print(f"{key + '_share_s2':<40}{model:>10}{s['min']:>10.3f}{s['median']:>10.3f}{s['max']:>10.3f}")
    flat = result["summary"]
    for key in ("orchestration_overhead", "rss_ratio_32_vs_2", "adapter_bytes", "uplink_bytes_firm_s2",
                "uplink_bytes_fmgda_s2", "trl_grpo_tokens_per_s", "firm_s1_tokens_per_s", "firm_s2_tokens_per_s"):
        print(f"{key:<40}{'tiny':>10}{'':>10}{_cell(flat[key]):>10}")
    trl = result.get("trl", {})
    for model in result.get("local_step", {}):
        if model != "tiny":
            for key in ("firm_s2_tokens_per_s", "trl_grpo_tokens_per_s"):
                value = flat.get(f"{key}_{model}")
                cell = "not run" if value is None and key.startswith("trl") and "skipped" not in trl else _cell(value)
                print(f"{key:<40}{model:>10}{'':>10}{cell:>10}")
    if "skipped" in result.get("trl", {}):
        print(f"trl: skipped ({result['trl']['skipped']})")
    for model, section in result.get("prefix", {}).items():
        for key in ("update_shared_over_unshared", "sampling_shared_over_unshared", "step_shared_over_unshared"):
            s = section[key]
            print(f"{key:<40}{model:>10}{s['min']:>10.3f}{s['median']:>10.3f}{s['max']:>10.3f}")
    if "firm_s2_over_trl_grpo_hh" in flat:
        print(f"{'firm_s2 / trl_grpo tokens/s':<40}{'hh':>10}{'':>10}{flat['firm_s2_over_trl_grpo_hh']:>10.3f}")
    micro = result.get("micro_memory", {})
    for kind, key in (("update", "micro_batch_size"), ("sampling", "generation_batch_size")):
        for row in micro.get(kind, []):
            print(f"{kind} peak RSS, {key}={row[key]!s:<5} gpt2_124m: before {row['rss_before_mb']:.0f} MB, "
                  f"peak {row['peak_rss_mb']:.0f} MB, peak above before {row['peak_above_before_mb']:.0f} MB, "
                  f"{row['seconds']:.1f} s")
    for t in flat["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        print(f"target {t['measure']:<36}{t['model']:>10} {t['value']:.3f} ({t['target']}): {verdict}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="under ~10 minutes: fewer repetitions")
    parser.add_argument("--smoke", action="store_true", help="the smallest mode: tiny model, 2 repetitions")
    parser.add_argument("--json", help="also write the JSON result to this path")
    parser.add_argument("--sections", nargs="+", help="run only these sections (local_step, orchestration, memory, "
                        "communication, prefix, trl, micro_memory); the summary's keys of the others are None")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: immune to a busy machine)")
    parser.add_argument("--_rss_child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_rounds", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--_micro_child", help=argparse.SUPPRESS)
    parser.add_argument("--_kind", help=argparse.SUPPRESS)
    parser.add_argument("--_size", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args._rss_child:
        print(json.dumps(rss_child(args._rss_child, args._rounds)))
        return {}
    if args._micro_child:
        size = None if args._size == "None" else int(args._size)
        print(json.dumps(micro_child(args._micro_child, args._kind, size, args.threads)))
        return {}
    torch.set_num_threads(args.threads)
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[mode_name]
    tic = time.perf_counter()
    result = {"mode": mode_name, "threads": args.threads, "torch": torch.__version__}
    sections = {
        "local_step": lambda: {m: local_step_section(m, mode) for m in mode["models"]},
        "orchestration": lambda: orchestration_section(mode),
        "memory": lambda: memory_section(mode),
        "communication": lambda: communication_section(mode),
        "prefix": lambda: prefix_models_section(mode),
        "trl": lambda: trl_models_section(mode, hh_batch(mode)),
        "micro_memory": lambda: micro_memory_section(mode, args.threads),
    }
    result["section_wall_s"] = {}
    for name, run in sections.items():
        if not args.sections or name in args.sections:
            result["section_wall_s"][name], result[name] = timed(run)
    result["summary"] = summary(result)
    result["wall_s"] = time.perf_counter() - tic
    print_table(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()

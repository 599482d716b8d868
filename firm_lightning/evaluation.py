"""The HH-RLHF evaluation protocol of the multi-objective alignment papers (Rewarded Soups, RiC, MOD).

``python -m firm_lightning validate --config configs/hh_rlhf_eval.yaml --ckpt_path <adapter>``
evaluates an adapter the way those papers do with the two Ray2333 GPT-2-large reward models:

1. **Prompts.** Anthropic HH-RLHF's *test* split (the subsets concatenated in the order
   given), every ``every``-th conversation (4: rows 0, 4, 8, ...), each cut before its last
   ``"\\n\\nAssistant:"``: the whole dialogue so far is the prompt. A conversation is kept
   only if its ``chosen`` text is ``min_tokens``–``max_tokens`` (8–512) tokens long under the
   policy's tokenizer and under every reward model's (RiC's ``build_dataset_with_preference_n``
   filters so; the stride comes first, then the filter).
2. **Responses.** One sampled response per prompt, ``top_p`` 0.9, ``top_k`` 0 (no top-k),
   temperature 1, at most ``max_new_tokens`` (128) new tokens, with the adapter, and one
   with the adapter off (the base policy) from the same seed.
3. **Scores.** Every objective scores both responses as the raw output of its reward model
   (a ``NormalizedReward`` is unwrapped: no normalisation in evaluation).
4. **Report.** Per objective: the mean reward of the adapter's responses
   (``hh_eval/reward/<name>``) and of the base policy's (``hh_eval/base_reward/<name>``),
   and the win rate against the base policy on the same prompts
   (``hh_eval/win_rate/<name>``: the share of prompts where the adapter's response scores
   higher, ties counting one half), plus the number of prompts (``hh_eval/prompts``).

The protocol is the ``evaluation:`` section of ``validate`` (an ``EvaluationProtocol``):
``validate`` runs it instead of the held-out evaluation of training.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import datasets
import torch

from firm_lightning.hh_rlhf import read_subsets
from firm_lightning.rewards import NormalizedReward, RewardFunction, score_all
from firm_lightning.sequences import HH_ASSISTANT

if TYPE_CHECKING:
    from firm_lightning.module import FIRMClientModule, SamplingSettings

TEST_SUBSETS = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]
CONVERSATION_COLUMN = "chosen"  # the length filter reads the chosen conversation, as RiC's does


class EvaluationProtocol(abc.ABC):
    """An evaluation that ``validate`` runs instead of the held-out evaluation of training.

    ``validate`` takes one by ``class_path`` in its ``evaluation:`` section (e.g. configs/hh_rlhf_eval.yaml);
    its ``__init__`` arguments are that section's ``init_args`` (document each in ``Args:``: the
    configuration reference is generated from it). With a protocol, ``validate`` needs no ``data:``
    section: the protocol reads its own prompts.
    """

    @abc.abstractmethod
    def run(self, module: "FIRMClientModule", device: str | torch.device = "cpu") -> dict[str, float]:
        """Evaluate ``module``'s current adapter; return the metrics to report.

        Receives ``module`` built from ``model:`` with the adapter of ``--ckpt_path`` loaded (none given:
        the freshly initialised adapter), its objectives as configured (no run statistics are loaded into
        a ``NormalizedReward``), and the device ``validate`` chose from ``trainer.accelerator``.

        Returns metric name → value (``validate`` prints them and keeps them as ``FIRMCLI.results``).

        Guarantees: the module's settings (``sampling``, ``weighting``, ``loss``, ...) and adapter weights
        are unchanged, also when it raises: settings of its own go to the module's calls as arguments
        (``module.rollout(..., sampling=...)``), never by assigning attributes. It may move the module and
        the objectives to ``device``.
        """


def conversation_prompt(conversation: str) -> str:
    """The dialogue before the last ``"\\n\\nAssistant:"`` turn, ending with ``"\\n\\nAssistant:"``."""
    if HH_ASSISTANT not in conversation:
        raise ValueError(f"No '\\n\\nAssistant:' turn in conversation {conversation[:80]!r}: is this HH-RLHF data?")
    return conversation.rsplit(HH_ASSISTANT, 1)[0].rstrip() + HH_ASSISTANT


def _conversation_row(row: dict, column: str, subset: str) -> dict[str, str]:
    """``datasets.map`` function (module level, plain ``fn_kwargs``: nothing large is pickled)."""
    return {"prompt": conversation_prompt(row[column]), "conversation": row[column], "subset": subset}


class HHRLHFEvaluation(EvaluationProtocol):
    """The HH-RLHF evaluation protocol of Rewarded Soups, RiC and MOD (the ``evaluation:`` section of ``validate``).

    Args:
        path: Anthropic/hh-rlhf, or a local folder with one folder per subset holding <split>.jsonl[.gz].
        subsets: The subsets whose test conversations are evaluated, concatenated in this order (the
            hub dataset's test split is these four, in alphabetical order).
        split: The split to read.
        every: Keep every this-many-th conversation (4: rows 0, 4, 8, ...), before the length filter.
        min_tokens: Keep a conversation only if its chosen text has at least this many tokens under the policy's
            and every reward model's tokenizer.
        max_tokens: ... and at most this many (also the longest prompt the policy is given, so none is cut).
        max_new_tokens: Longest response, in tokens.
        top_p: Nucleus sampling threshold of the responses.
        top_k: Top-k of the responses (0: none).
        temperature: Sampling temperature of the responses.
        eval_batch_size: Prompts per generation batch.
        max_prompts: Evaluate only the first this many selected prompts (null: all; for a quick look).
        win_rate: Also sample the base policy (adapter off) on the same prompts and report the win rates.
        seed: Sampling seed (batch i uses seed + i, the same for the adapter and the base policy).
        responses_file: Write every prompt, both responses and their rewards to this CSV file (null: do not).
    """

    def __init__(
        self,
        path: str = "Anthropic/hh-rlhf",
        subsets: list[str] = TEST_SUBSETS,  # noqa: B006 (read-only)
        split: str = "test",
        every: int = 4,
        min_tokens: int = 8,
        max_tokens: int = 512,
        max_new_tokens: int = 128,
        top_p: float = 0.9,
        top_k: int = 0,
        temperature: float = 1.0,
        eval_batch_size: int = 16,
        max_prompts: Optional[int] = None,
        win_rate: bool = True,
        seed: int = 0,
        responses_file: Optional[str] = None,
    ) -> None:
        checks = {"every": every >= 1, "min_tokens": 0 <= min_tokens <= max_tokens,
                  "max_new_tokens": max_new_tokens >= 1, "top_p": 0 < top_p <= 1, "top_k": top_k >= 0,
                  "temperature": temperature > 0, "eval_batch_size": eval_batch_size >= 1,
                  "max_prompts": max_prompts is None or max_prompts >= 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"HHRLHFEvaluation: invalid {', '.join(bad)} (every >= 1, 0 <= min_tokens <= max_tokens, "
                f"max_new_tokens >= 1, 0 < top_p <= 1, top_k >= 0, temperature > 0, eval_batch_size >= 1, "
                f"max_prompts >= 1 or null)."
            )
        self.path, self.subsets, self.split = str(path), list(subsets), split
        self.every, self.min_tokens, self.max_tokens = every, min_tokens, max_tokens
        self.max_new_tokens, self.top_p, self.top_k, self.temperature = max_new_tokens, top_p, top_k, temperature
        self.eval_batch_size, self.max_prompts, self.win_rate = eval_batch_size, max_prompts, win_rate
        self.seed, self.responses_file = seed, responses_file
        self._strided: Optional[datasets.Dataset] = None

    # ---- the prompts ----

    def conversations(self) -> datasets.Dataset:
        """Every ``every``-th conversation of the subsets, read once (the length filter needs the tokenizers)."""
        if self._strided is None:
            rows = read_subsets(self.path, self.subsets, self.split, CONVERSATION_COLUMN, _conversation_row)
            self._strided = rows.select(range(0, len(rows), self.every))
        return self._strided

    def prompts(self, tokenizers: Sequence) -> tuple[list[str], list[str]]:
        """The protocol's prompts and their subsets: strided, then length-filtered under every tokenizer."""
        prompts, groups = [], []
        for row in self.conversations():
            lengths = [len(tokenizer(row["conversation"])["input_ids"]) for tokenizer in tokenizers]
            if all(self.min_tokens <= n <= self.max_tokens for n in lengths):
                prompts.append(row["prompt"])
                groups.append(row["subset"])
                if self.max_prompts is not None and len(prompts) == self.max_prompts:
                    break
        if not prompts:
            raise ValueError(
                f"No HH-RLHF conversation of {self.path} ({self.split}, subsets {self.subsets}) is "
                f"{self.min_tokens}-{self.max_tokens} tokens long under every tokenizer; check the data and tokenizers."
            )
        return prompts, groups

    # ---- the protocol ----

    def response_sampling(self, settings: "SamplingSettings") -> "SamplingSettings":
        """``settings`` (the module's) with the protocol's: what every response is sampled with."""
        return dataclasses.replace(settings, max_new_tokens=self.max_new_tokens, top_p=self.top_p, top_k=self.top_k,
                                   temperature=self.temperature, max_prompt_length=self.max_tokens)

    def run(self, module: "FIRMClientModule", device: str | torch.device = "cpu") -> dict[str, float]:
        device = torch.device(device)
        objectives = raw_objectives(module.objectives)
        prompts, groups = self.prompts([module.tokenizer, *reward_tokenizers(objectives)])
        module.to(device)
        for objective in objectives:
            if callable(getattr(objective, "to", None)):
                objective.to(device)
        sampling, size = self.response_sampling(module.sampling), self.eval_batch_size
        rows = [row for i in range(0, len(prompts), size)
                for row in self._batch(module, objectives, sampling, prompts[i: i + size], i // size, device)]
        if self.responses_file:
            write_responses(Path(self.responses_file), rows, groups, [o.name for o in objectives])
        return summarise(rows, [o.name for o in objectives], self.win_rate)

    def _batch(self, module, objectives, sampling, prompts: list[str], index: int, device: torch.device) -> list[dict]:
        devices = [device] if device.type == "cuda" else []
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        outputs = {}
        for arm in ("adapter", "base") if self.win_rate else ("adapter",):
            adapter_off = module.policy.disable_adapter() if arm == "base" else nullcontext()
            with torch.random.fork_rng(devices=devices), autocast, adapter_off:
                torch.manual_seed(self.seed + index)
                rollout = module.rollout(prompts, 1, greedy=False, for_loss=False, sampling=sampling)
            outputs[arm] = (rollout.responses, score_all(objectives, rollout.prompts, rollout.responses))
        rows = []
        for j, prompt in enumerate(prompts):
            row = {"prompt": prompt, "response": outputs["adapter"][0][j],
                   "reward": outputs["adapter"][1][:, j].tolist()}
            if self.win_rate:
                row.update(base_response=outputs["base"][0][j], base_reward=outputs["base"][1][:, j].tolist())
            rows.append(row)
        return rows


def raw_objectives(objectives: Sequence[RewardFunction]) -> list[RewardFunction]:
    """The objectives as raw scores: a ``NormalizedReward`` gives way to the reward it wraps."""
    return [o.reward if isinstance(o, NormalizedReward) else o for o in objectives]


def reward_tokenizers(objectives: Sequence[RewardFunction]) -> list:
    """The tokenizer of every reward model among ``objectives`` (the length filter uses them)."""
    from transformers import AutoTokenizer

    found = []
    for objective in objectives:
        name = getattr(objective, "name_or_path", None)
        if name is not None:
            found.append(AutoTokenizer.from_pretrained(name))
    return found


def summarise(rows: list[dict], names: list[str], win_rate: bool = True) -> dict[str, float]:
    """Mean rewards of the adapter (and base policy), win rates with ties as one half, the prompt count."""
    results: dict[str, float] = {"hh_eval/prompts": float(len(rows))}
    for s, name in enumerate(names):
        mine = torch.tensor([r["reward"][s] for r in rows], dtype=torch.float64)
        results[f"hh_eval/reward/{name}"] = float(mine.mean())
        if win_rate:
            base = torch.tensor([r["base_reward"][s] for r in rows], dtype=torch.float64)
            results[f"hh_eval/base_reward/{name}"] = float(base.mean())
            results[f"hh_eval/win_rate/{name}"] = float(((mine > base).double() + 0.5 * (mine == base).double()).mean())
    return results


def write_responses(path: Path, rows: list[dict], groups: list[str], names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        base = "base_response" in rows[0]
        writer.writerow(["subset", "prompt", "response", *[f"reward/{n}" for n in names]]
                        + (["base_response", *[f"base_reward/{n}" for n in names]] if base else []))
        for group, row in zip(groups, rows):
            writer.writerow([group, row["prompt"], row["response"], *row["reward"]]
                            + ([row["base_response"], *row["base_reward"]] if base else []))

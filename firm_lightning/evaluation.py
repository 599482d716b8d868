"""The HH-RLHF evaluation protocol of RiC's PPO evaluation (also Rewarded Soups' and MOD's setup).

``python -m firm_lightning validate --config configs/hh_rlhf_eval.yaml --ckpt_path <adapter>``
evaluates an adapter as RiC's ``ppo/eval_ppo_single_model.py`` (YangRui2015/RiC) evaluates a PPO
policy, with the two Ray2333 GPT-2-large reward models:

1. **Prompts.** Anthropic HH-RLHF's *test* split (the subsets concatenated in the order given),
   every ``every``-th conversation (4: rows 0, 4, 8, ...), each cut before its last
   ``"\\n\\nAssistant:"`` and given RiC's prompt text: the dialogue as written, a space, then
   ``"\\n\\nAssistant:"`` (``hh_dialogue_prompt``). With ``length_filter: prompt`` (RiC's PPO evaluation)
   a prompt is kept only if it is ``min_tokens``–``max_tokens`` (8–512) tokens long under the policy's
   tokenizer and under every reward model's; ``conversation`` filters the whole chosen conversation instead
   (RiC's evaluation of its own models). The stride comes first, then the filter.
2. **Responses.** One sampled response per prompt, ``top_p`` 0.9, ``top_k`` 0 (no top-k), the temperature
   of the checkpoint's generation config unless ``temperature`` is set, at most ``max_new_tokens`` (128)
   new tokens, with the adapter, and one with the adapter off (the base policy) from the same seed.
3. **Cleaning.** ``response_cleaning: ric`` applies RiC's ``get_clean_data`` to the text RiC decodes (prompt
   and response tokens, special tokens as text): the prompt's text removed, the characters of ``"[PAD] "``,
   ``"<s>"`` and ``"</s>"`` stripped from the ends (``str.strip`` takes a set of characters), cut before
   ``"</s>"``, then at ``HH_RESPONSE_CUTS`` (``"\\n\\nHuman:"``, ...), whitespace stripped;
   ``turn_markers``: the response before its EOS cut at the same markers only; ``none``: as generated.
4. **Scores.** Every objective scores the pair RiC's reward models read (``hh_reward_query``,
   ``hh_reward_response``; an ``HFRewardModel`` with ``text_pair: true`` tokenizes it as RiC does) as the
   raw output of its reward model (a ``NormalizedReward`` is unwrapped: no normalisation in evaluation).
5. **Report.** Per objective: the mean reward of the adapter's responses (``hh_eval/reward/<name>``),
   the mean of the rewards rounded to ``score_decimals`` (``hh_eval/rounded_reward/<name>``: RiC's
   ``np.round(score, 1)`` before averaging), the same for the base policy (``hh_eval/base_reward/<name>``,
   ``hh_eval/base_rounded_reward/<name>``), and the win rate against the base policy on the same prompts
   (``hh_eval/win_rate/<name>``: the share of prompts where the adapter's response scores higher, ties
   counting one half, on unrounded scores), plus the number of prompts (``hh_eval/prompts``).

The protocol is the ``evaluation:`` section of ``validate`` (an ``EvaluationProtocol``):
``validate`` runs it instead of the held-out evaluation of training. docs/evaluation.md lists what
still differs from RiC's scripts, and why.
"""

from __future__ import annotations

import abc
import csv
import dataclasses
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import datasets
import numpy as np
import torch

from firm_lightning.hh_rlhf import read_subsets
from firm_lightning.rewards import NormalizedReward, RewardFunction, score_all
from firm_lightning.sequences import (
    Rollout, checkpoint_temperature, cut_at_turns, hh_dialogue_prompt, hh_reward_query, hh_reward_response,
    uses_chat_template,
)

if TYPE_CHECKING:
    from firm_lightning.module import FIRMClientModule, SamplingSettings

TEST_SUBSETS = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]
CONVERSATION_COLUMN = "chosen"  # RiC's prompts and its conversation length filter read the chosen conversation
LENGTH_FILTERS = ("prompt", "conversation")
RESPONSE_CLEANINGS = ("ric", "turn_markers", "none")


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
    """The protocol's prompt of an HH-RLHF conversation: RiC's (``hh_dialogue_prompt``)."""
    return hh_dialogue_prompt(conversation)


def _conversation_row(row: dict, column: str, subset: str) -> dict[str, str]:
    """``datasets.map`` function (module level, plain ``fn_kwargs``: nothing large is pickled)."""
    return {"prompt": conversation_prompt(row[column]), "conversation": row[column], "subset": subset}


def ric_clean(decoded_prompt: str, decoded_sequence: str) -> tuple[str, str]:
    """The (query, response) RiC's reward models read for one generation, from the text RiC decodes: the
    prompt's tokens, and the prompt's and the response's tokens together (special tokens as text, the EOS
    included). RiC's ``get_clean_data`` (ppo/eval_ppo_single_model.py), then ``Instructions.get_input`` and
    ``get_response`` (ppo/utils.py) on ``prompt + " " + response``."""
    prompt = decoded_prompt.strip("[PAD] ")
    response = decoded_sequence.strip("[PAD] ").replace(prompt, "").strip("<s>").strip("</s>")
    if "</s>" in response:
        response = response[: response.rindex("</s>")]
    text = prompt + " " + cut_at_turns(response)
    return hh_reward_query(text), hh_reward_response(text)


class HHRLHFEvaluation(EvaluationProtocol):
    """The HH-RLHF evaluation protocol of RiC's PPO evaluation (the ``evaluation:`` section of ``validate``).

    Args:
        path: Anthropic/hh-rlhf, or a local folder with one folder per subset holding <split>.jsonl[.gz].
        subsets: The subsets whose test conversations are evaluated, concatenated in this order (the
            hub dataset's test split is these four, in alphabetical order).
        split: The split to read.
        every: Keep every this-many-th conversation (4: rows 0, 4, 8, ...), before the length filter.
        min_tokens: Keep a conversation only if its prompt (length_filter prompt) or its chosen text
            (conversation) has at least this many tokens under the policy's and every reward model's tokenizer.
        max_tokens: ... and at most this many (also the longest prompt the policy is given, so none is cut).
        max_new_tokens: Longest response, in tokens.
        top_p: Nucleus sampling threshold of the responses.
        top_k: Top-k of the responses (0: none).
        temperature: Sampling temperature of the responses; null: the policy checkpoint's generation config's
            (1.0 if it sets none), as RiC leaves it.
        eval_batch_size: Prompts per generation batch.
        max_prompts: Evaluate only the first this many selected prompts (null: all; for a quick look).
        win_rate: Also sample the base policy (adapter off) on the same prompts and report the win rates.
        seed: Sampling seed (batch i uses seed + i, the same for the adapter and the base policy).
        responses_file: Write every prompt, both responses and their rewards to this CSV file (null: do not).
        length_filter: What the token bounds measure: prompt (the prompt, as RiC's PPO evaluation filters) or
            conversation (the chosen conversation, as RiC's evaluation of its own models filters).
        response_cleaning: ric (RiC's get_clean_data on the decoded prompt and response: the end characters of
            "[PAD] ", "<s>", "</s>" stripped, cut at the turn markers), turn_markers (the response before its EOS
            cut at the turn markers only) or none (the response as generated).
        score_decimals: Round each score to this many decimals for the rounded means (RiC's np.round(score, 1));
            null: no rounded means.
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
        temperature: Optional[float] = None,
        eval_batch_size: int = 16,
        max_prompts: Optional[int] = None,
        win_rate: bool = True,
        seed: int = 0,
        responses_file: Optional[str] = None,
        length_filter: Literal["prompt", "conversation"] = "prompt",
        response_cleaning: Literal["ric", "turn_markers", "none"] = "ric",
        score_decimals: Optional[int] = 1,
    ) -> None:
        checks = {"every": every >= 1, "min_tokens": 0 <= min_tokens <= max_tokens,
                  "max_new_tokens": max_new_tokens >= 1, "top_p": 0 < top_p <= 1, "top_k": top_k >= 0,
                  "temperature": temperature is None or temperature > 0, "eval_batch_size": eval_batch_size >= 1,
                  "max_prompts": max_prompts is None or max_prompts >= 1,
                  "length_filter": length_filter in LENGTH_FILTERS,
                  "response_cleaning": response_cleaning in RESPONSE_CLEANINGS,
                  "score_decimals": score_decimals is None or score_decimals >= 0}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"HHRLHFEvaluation: invalid {', '.join(bad)} (every >= 1, 0 <= min_tokens <= max_tokens, "
                f"max_new_tokens >= 1, 0 < top_p <= 1, top_k >= 0, temperature > 0 or null, eval_batch_size >= 1, "
                f"max_prompts >= 1 or null, length_filter one of {list(LENGTH_FILTERS)}, response_cleaning one of "
                f"{list(RESPONSE_CLEANINGS)}, score_decimals >= 0 or null)."
            )
        self.path, self.subsets, self.split = str(path), list(subsets), split
        self.every, self.min_tokens, self.max_tokens = every, min_tokens, max_tokens
        self.max_new_tokens, self.top_p, self.top_k, self.temperature = max_new_tokens, top_p, top_k, temperature
        self.eval_batch_size, self.max_prompts, self.win_rate = eval_batch_size, max_prompts, win_rate
        self.seed, self.responses_file = seed, responses_file
        self.length_filter, self.response_cleaning = length_filter, response_cleaning
        self.score_decimals = score_decimals
        self._strided: Optional[datasets.Dataset] = None

    # ---- the prompts ----

    def conversations(self) -> datasets.Dataset:
        """Every ``every``-th conversation of the subsets, read once (the length filter needs the tokenizers)."""
        if self._strided is None:
            rows = read_subsets(self.path, self.subsets, self.split, CONVERSATION_COLUMN, _conversation_row)
            self._strided = rows.select(range(0, len(rows), self.every))
        return self._strided

    def prompts(self, tokenizers: Sequence) -> tuple[list[str], list[str]]:
        """The protocol's prompts and their subsets: strided, then length-filtered under every tokenizer
        (``tokenizer.encode``: special tokens counted, as RiC counts them)."""
        prompts, groups = [], []
        for row in self.conversations():
            measured = row["prompt"] if self.length_filter == "prompt" else row["conversation"]
            if all(self.min_tokens <= len(tokenizer.encode(measured)) <= self.max_tokens for tokenizer in tokenizers):
                prompts.append(row["prompt"])
                groups.append(row["subset"])
                if self.max_prompts is not None and len(prompts) == self.max_prompts:
                    break
        if not prompts:
            raise ValueError(
                f"No HH-RLHF {self.length_filter} of {self.path} ({self.split}, subsets {self.subsets}) is "
                f"{self.min_tokens}-{self.max_tokens} tokens long under every tokenizer; check the data and tokenizers."
            )
        return prompts, groups

    # ---- the protocol ----

    def response_sampling(self, settings: "SamplingSettings", policy: Optional[torch.nn.Module] = None):
        """``settings`` (the module's) with the protocol's: what every response is sampled with. Without a
        ``temperature`` of its own, the policy checkpoint's (1.0 without a ``policy``)."""
        temperature = self.temperature
        if temperature is None:
            temperature = checkpoint_temperature(policy) if policy is not None else 1.0
        return dataclasses.replace(settings, max_new_tokens=self.max_new_tokens, top_p=self.top_p, top_k=self.top_k,
                                   temperature=temperature, max_prompt_length=self.max_tokens)

    def scored_pairs(self, tokenizer, rollout: Rollout) -> tuple[list[str], list[str]]:
        """The (queries, responses) the objectives score for ``rollout``'s generations (``response_cleaning``)."""
        if self.response_cleaning != "ric":
            responses = [cut_at_turns(r) if self.response_cleaning == "turn_markers" else r for r in rollout.responses]
            return [hh_reward_query(p) for p in rollout.prompts], responses
        pairs = [ric_clean(*decoded) for decoded in decoded_as_ric(tokenizer, rollout)]
        return [q for q, _ in pairs], [r for _, r in pairs]

    def run(self, module: "FIRMClientModule", device: str | torch.device = "cpu") -> dict[str, float]:
        device = torch.device(device)
        if self.response_cleaning == "ric" and uses_chat_template(module.tokenizer, module.sampling.chat_template):
            raise ValueError(
                "HHRLHFEvaluation: response_cleaning ric reads RiC's raw-text prompts back from the decoded tokens, "
                "but the policy's prompts go through its chat template; set model.sampling.chat_template: false, "
                "or response_cleaning: turn_markers."
            )
        objectives = raw_objectives(module.objectives)
        prompts, groups = self.prompts([module.tokenizer, *reward_tokenizers(objectives)])
        module.to(device)
        for objective in objectives:
            if callable(getattr(objective, "to", None)):
                objective.to(device)
        sampling, size = self.response_sampling(module.sampling, module.policy), self.eval_batch_size
        rows = [row for i in range(0, len(prompts), size)
                for row in self._batch(module, objectives, sampling, prompts[i: i + size], i // size, device)]
        names = [o.name for o in objectives]
        if self.responses_file:
            write_responses(Path(self.responses_file), rows, groups, names)
        return summarise(rows, names, self.win_rate, self.score_decimals)

    def _batch(self, module, objectives, sampling, prompts: list[str], index: int, device: torch.device) -> list[dict]:
        devices = [device] if device.type == "cuda" else []
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        outputs = {}
        for arm in ("adapter", "base") if self.win_rate else ("adapter",):
            adapter_off = module.policy.disable_adapter() if arm == "base" else nullcontext()
            with torch.random.fork_rng(devices=devices), autocast, adapter_off:
                torch.manual_seed(self.seed + index)
                rollout = module.rollout(prompts, 1, greedy=False, for_loss=False, sampling=sampling)
            queries, responses = self.scored_pairs(module.tokenizer, rollout)
            outputs[arm] = (rollout.responses, responses, score_all(objectives, queries, responses))
        rows = []
        for j, prompt in enumerate(prompts):
            generated, responses, scores = outputs["adapter"]
            row = {"prompt": prompt, "generated": generated[j], "response": responses[j],
                   "reward": scores[:, j].tolist()}
            if self.win_rate:
                generated, responses, scores = outputs["base"]
                row.update(base_generated=generated[j], base_response=responses[j], base_reward=scores[:, j].tolist())
            rows.append(row)
        return rows


def decoded_as_ric(tokenizer, rollout: Rollout) -> list[tuple[str, str]]:
    """Per row, the prompt's tokens and the prompt's and response's tokens (up to and including the EOS),
    decoded as RiC decodes its one-row generations (``tokenizer.batch_decode`` defaults: special tokens as text)."""
    P = rollout.prompt_length
    decoded = []
    for sequence, attention, response in zip(rollout.sequences, rollout.attention_mask, rollout.response_mask):
        prompt_ids = sequence[:P][attention[:P].bool()].tolist()
        response_ids = sequence[P:][response.bool()].tolist()
        decoded.append((tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + response_ids)))
    return decoded


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


def summarise(
    rows: list[dict], names: list[str], win_rate: bool = True, score_decimals: Optional[int] = None
) -> dict[str, float]:
    """Mean rewards of the adapter (and base policy), unrounded and with each score rounded to ``score_decimals``
    (as ``np.round``), win rates with ties as one half (unrounded scores), the prompt count."""
    results: dict[str, float] = {"hh_eval/prompts": float(len(rows))}
    for s, name in enumerate(names):
        arms = {"": "reward", "base_": "base_reward"} if win_rate else {"": "reward"}
        scores = {prefix: np.array([r[key][s] for r in rows], dtype=np.float64) for prefix, key in arms.items()}
        for prefix, values in scores.items():
            results[f"hh_eval/{prefix}reward/{name}"] = float(values.mean())
            if score_decimals is not None:
                results[f"hh_eval/{prefix}rounded_reward/{name}"] = float(np.round(values, score_decimals).mean())
        if win_rate:
            mine, base = scores[""], scores["base_"]
            results[f"hh_eval/win_rate/{name}"] = float(((mine > base) + 0.5 * (mine == base)).mean())
    return results


def write_responses(path: Path, rows: list[dict], groups: list[str], names: list[str]) -> None:
    """One line per prompt: the generated text, the response scored (after ``response_cleaning``), its rewards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        base = "base_response" in rows[0]
        writer.writerow(["subset", "prompt", "generated", "response", *[f"reward/{n}" for n in names]]
                        + (["base_generated", "base_response", *[f"base_reward/{n}" for n in names]] if base else []))
        for group, row in zip(groups, rows):
            writer.writerow([group, row["prompt"], row["generated"], row["response"], *row["reward"]]
                            + ([row["base_generated"], row["base_response"], *row["base_reward"]] if base else []))

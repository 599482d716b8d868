"""Prompt-conditioned offline objectives: a testbed where the clients' trade-offs differ.

With ``CharsetReward`` the objectives ignore the prompt, so a
topic-skewed split hardly changes a client's gradients. Here an objective's rule depends on
the prompt's group (its topic): for a prompt of group ``g`` the reward is
``weight_g × (fraction of the response's characters in charset_g)``. Per group, the charsets
and weights set how the objectives relate:

- **conflict**: complementary charsets, so more of one means less of the other (negative
  gradient inner product);
- **agree**: the same charset with different weights, so the gradients are parallel
  (positive inner product) and one is shorter; MGDA's min-norm point then puts all the weight
  on the shorter one, i.e. on the objective that group weighs less.

``heterogeneous_objectives`` is the pair used by ``configs/claims*.yaml`` (the table in
``TopicTradeoffReward``): two topics in conflict, two where the first objective leads,
two where the second leads. Under a topic-skewed (Dirichlet α → 0) split, local MGDA's clients
then pick very different weights; under an IID-like split every client sees the same mixture
and they agree. Turn advantage whitening off with these objectives: whitening rescales each
objective per batch and erases the weights that make the agreeing groups asymmetric.
"""

from __future__ import annotations

import string
from typing import Literal, Mapping, Optional

import torch

from firm_lightning.datamodule import DEFAULT_PROMPTS, load_rows
from firm_lightning.rewards import RewardFunction
from firm_lightning.tokenizer import CHARACTERS

# Two complementary halves of the character vocabulary (every printable character is in
# exactly one), so in a conflicting group the two fractions sum to 1: a perfect conflict.
FIRST_HALF = "abcdefghijklmABCDEFGHIJKLM01234" + string.punctuation[:16]
SECOND_HALF = "".join(c for c in CHARACTERS if c not in FIRST_HALF)

CONFLICT_TOPICS = ("finance", "health")
FIRST_LEADS_TOPICS = ("cooking", "gardening")  # both reward FIRST_HALF; obj2 at half weight
SECOND_LEADS_TOPICS = ("programming", "travel")  # both reward FIRST_HALF; obj1 at half weight


class GroupCharsetReward(RewardFunction):
    """``weight_g ×`` the fraction of the response's characters in ``charsets[g]``, ``g`` = the prompt's group.

    An empty response counts as half in every charset.

    The group of a prompt is looked up in ``prompts_path`` (the file the data module reads);
    a prompt not in it, or a group without a charset, is an error naming the fix.
    """

    def __init__(
        self,
        name: str,
        charsets: Mapping[str, str],
        weights: Optional[Mapping[str, float]] = None,
        prompts_path: str = DEFAULT_PROMPTS,
        prompt_column: str = "prompt",
        group_column: str = "topic",
    ) -> None:
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(charsets))
        if unknown:
            raise ValueError(f"GroupCharsetReward {name!r}: weights for groups {unknown} that have no charset.")
        empty = sorted(g for g, c in charsets.items() if not c)
        if empty:
            raise ValueError(
                f"GroupCharsetReward {name!r}: empty charset for groups {empty}; give characters to reward."
            )
        self.name = name
        self.charsets = {g: frozenset(c) for g, c in charsets.items()}
        self.weights = {g: float(weights.get(g, 1.0)) for g in charsets}
        self.prompts_path, self.prompt_column, self.group_column = prompts_path, prompt_column, group_column
        self._group_of: Optional[dict[str, str]] = None

    def group_of(self, prompt: str) -> str:
        if self._group_of is None:
            self._group_of = self._load_groups()
        try:
            return self._group_of[prompt]
        except KeyError:
            raise KeyError(
                f"GroupCharsetReward {self.name!r}: prompt {prompt[:60]!r} is not in {self.prompts_path}; "
                "point prompts_path at the prompt file the data module reads."
            ) from None

    def _load_groups(self) -> dict[str, str]:
        rows = load_rows(self.prompts_path)
        group_of: dict[str, str] = {}
        for prompt, group in zip(rows[self.prompt_column], rows[self.group_column]):
            if group_of.setdefault(prompt, str(group)) != str(group):
                raise ValueError(f"Prompt {prompt[:60]!r} appears with two groups in {self.prompts_path}.")
        missing = sorted(set(group_of.values()) - set(self.charsets))
        if missing:
            raise ValueError(
                f"GroupCharsetReward {self.name!r}: no charset for groups {missing} of {self.prompts_path}; "
                f"add them to charsets (have {sorted(self.charsets)})."
            )
        return group_of

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        values = []
        for prompt, response in zip(prompts, responses):
            group = self.group_of(prompt)
            # An empty response scores 0.5, on the line r1 + r2 = 1 of a conflict and in proportion in
            # an agreement: scoring it 0 would make every objective agree on "do not stop".
            fraction = sum(c in self.charsets[group] for c in response) / len(response) if response else 0.5
            values.append(self.weights[group] * fraction)
        return torch.tensor(values, dtype=torch.float32)


class TopicTradeoffReward(GroupCharsetReward):
    """Objective ``obj1`` or ``obj2`` of the testbed.

    ====================  ==================  ==================================
    topics                obj1                obj2
    ====================  ==================  ==================================
    finance, health       FIRST_HALF          SECOND_HALF (conflict)
    cooking, gardening    FIRST_HALF          ½ × FIRST_HALF (agree, obj1 leads)
    programming, travel   ½ × FIRST_HALF      FIRST_HALF (agree, obj2 leads)
    ====================  ==================  ==================================

    A client holding one topic gets MGDA weights λ = (½, ½), (0, 1) or (1, 0); a client
    holding every topic sees the two kinds of agreement balance out and λ stays near the
    middle. A policy that writes FIRST_HALF characters everywhere is already a good
    compromise, so a tiny model learns the objectives within a few local steps.
    """

    def __init__(self, objective: Literal[1, 2], prompts_path: str = DEFAULT_PROMPTS) -> None:
        if objective not in (1, 2):
            raise ValueError(f"TopicTradeoffReward: objective must be 1 or 2; got {objective!r}.")
        own = FIRST_HALF if objective == 1 else SECOND_HALF
        follows = SECOND_LEADS_TOPICS if objective == 1 else FIRST_LEADS_TOPICS
        agree = FIRST_LEADS_TOPICS + SECOND_LEADS_TOPICS
        charsets = {**{t: own for t in CONFLICT_TOPICS}, **{t: FIRST_HALF for t in agree}}
        super().__init__(f"obj{objective}", charsets, {t: 0.5 for t in follows}, prompts_path)


def heterogeneous_objectives(prompts_path: str = DEFAULT_PROMPTS) -> list[TopicTradeoffReward]:
    """The testbed's two objectives, ``obj1`` and ``obj2``."""
    return [TopicTradeoffReward(1, prompts_path), TopicTradeoffReward(2, prompts_path)]

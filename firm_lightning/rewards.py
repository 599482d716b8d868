"""Reward functions: the objectives a client trains against.

The interface is deliberately tiny (as in TRL): an object with a ``name`` and a call from
``(prompts, responses)`` to a float tensor of shape ``(len(responses),)``. The name becomes
the metric suffix (``train/reward/<name>``, ``lambda/<name>``, ``eval/reward/<name>``).

A *stateful* objective (``NormalizedReward``'s statistics) also has ``state_dict()``,
``load_state_dict(state)`` and ``reset()`` (back to its state as configured), and honours a
``frozen`` flag (score without updating its state). The federation keeps one state per client
(saved and restored around each client's fit) and one for evaluation, calibrated once when the
federation starts and frozen afterwards (``statistics_frozen``).
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from typing import Iterable, Literal, Optional, Sequence

import torch

from firm_lightning.sequences import USER_MESSAGES, user_message


class RewardFunction(abc.ABC):
    """Base class of the objectives: a ``name`` and ``(prompts, responses) -> tensor (N,)``.

    Any object with a ``name`` and that call works from Python (duck typing); subclassing makes
    it configurable with ``class_path`` in YAML.
    """

    name: str

    @abc.abstractmethod
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor: ...

    def to(self, device: torch.device | str) -> "RewardFunction":
        """Called with the policy's device before training and evaluation; model-based rewards move there."""
        return self


class CharsetReward(RewardFunction):
    """Fraction of the response's characters that belong to ``charset`` (0 for an empty response).

    An offline toy objective: two rewards with disjoint character sets genuinely conflict
    (raising one fraction lowers the other once the neutral characters are gone), and a tiny
    model learns them within seconds.
    """

    def __init__(self, name: str, charset: str) -> None:
        if not charset:
            raise ValueError(f"CharsetReward {name!r}: charset is empty; give the characters to reward.")
        self.name = name
        self.charset = frozenset(charset)

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor(
            [sum(c in self.charset for c in r) / len(r) if r else 0.0 for r in responses],
            dtype=torch.float32,
        )


class HFRewardModel(RewardFunction):
    """A Hugging Face sequence-classification reward model with one output (hub name or path).

    Loaded lazily on first use, frozen, in eval mode, scored without grad in batches with its
    own tokenizer, on its own input format: ``template.format(prompt=..., response=...)``
    (the Ray2333 GPT-2 reward models expect ``"\\n\\nHuman: {question}\\n\\nAssistant: {response}"``,
    which is ``"{prompt} {response}"`` for HH-RLHF prompts), or with ``chat_template: true`` its
    tokenizer's chat template over a user/assistant pair, the user message chosen by
    ``user_message`` as for the policy (``question``: an HH-RLHF prompt's question alone).
    Where the template puts whitespace right before ``{response}``, the response's own leading
    whitespace is dropped: policies often start with a space (GPT-2 after ``"Assistant:"``),
    and a doubled space is an input the reward model never saw in training.
    An input longer than ``max_length`` tokens loses the start of its prompt, never its
    response (the response is cut at the end only if it alone is too long). ``device``
    defaults to the policy's device.

    With ``text_pair: true`` the tokenizer gets the prompt and the response as a text pair instead,
    ``tokenizer(prompt, response, truncation=True, max_length=min(model_max_length, max_length))``:
    RiC's input to these reward models (its ``RewardModels.get_reward_model_scores``). GPT-2's tokenizer
    joins the pair without a separator, and a pair too long loses tokens from the end of the longer
    text first (the tokenizer's ``longest_first``).

    Args:
        name: The objective's name (in metric names such as eval/reward/<name>).
        name_or_path: A hub name or local folder of a sequence-classification model with one output (num_labels = 1).
        template: The reward model's input: template.format(prompt=..., response=...); must contain {response} once.
        chat_template: Format the input with the reward model's tokenizer chat template (user/assistant pair)
            instead of template.
        user_message: With chat_template, the user message: question (an HH-RLHF prompt's question alone) or
            prompt (as is).
        batch_size: Inputs scored per forward pass.
        max_length: Longest input in tokens; longer inputs lose the start of the prompt, never the response (with
            text_pair: the tokenizer's truncation, within its model_max_length too).
        device: Device of the reward model; null: the policy's device.
        torch_dtype: Load the weights in float32, bfloat16 (as RiC scores) or float16; null: the checkpoint's default.
        text_pair: Give the tokenizer (prompt, response) as a text pair, truncated as the tokenizer
            truncates pairs (RiC's input); template and chat_template then unused (refused if set).
    """

    def __init__(
        self,
        name: str,
        name_or_path: str,
        template: str = "{prompt}{response}",
        chat_template: bool = False,
        user_message: Literal["question", "prompt"] = "question",
        batch_size: int = 16,
        max_length: int = 512,
        device: Optional[str] = None,
        torch_dtype: Optional[str] = None,
        text_pair: bool = False,
    ) -> None:
        if text_pair and (chat_template or template != "{prompt}{response}"):
            raise ValueError(
                f"Reward model {name!r}: text_pair=true gives the tokenizer (prompt, response) as they are, so a "
                "template or chat_template would be ignored; leave them unset, or set text_pair: false."
            )
        if template.count("{response}") != 1:
            raise ValueError(
                f"Reward model {name!r}: template {template!r} must contain {{response}} exactly once "
                "(and may contain {prompt}), e.g. '\\n\\nHuman: {prompt}\\n\\nAssistant: {response}'."
            )
        self.name = name
        self.name_or_path = name_or_path
        if user_message not in USER_MESSAGES:
            raise ValueError(
                f"Reward model {name!r}: user_message={user_message!r} is unknown; use one of {list(USER_MESSAGES)}."
            )
        self.template = template
        self.chat_template = chat_template
        self.user_message = user_message
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.torch_dtype = torch_dtype
        self.text_pair = text_pair
        self._placement: Optional[torch.device] = None  # the policy's device, when device is None
        self._model = None
        self._tokenizer = None

    def to(self, device: torch.device | str) -> "HFRewardModel":
        """Follow the policy to ``device`` (unless a ``device`` was configured)."""
        self._placement = torch.device(device)
        if self._model is not None and self.device is None:
            self._model.to(self._placement)
        return self

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            dtype = getattr(torch, self.torch_dtype) if self.torch_dtype else None
            model = AutoModelForSequenceClassification.from_pretrained(self.name_or_path, dtype=dtype)
        except OSError as error:
            raise OSError(
                f"Reward model {self.name!r}: could not load {self.name_or_path!r}: {error}\n"
                f"If this machine is offline, download it first (`huggingface-cli download {self.name_or_path}`) "
                "or point name_or_path at a local folder made with save_pretrained."
            ) from error
        if model.config.num_labels != 1:
            raise ValueError(
                f"Reward model {self.name!r} ({self.name_or_path}) has {model.config.num_labels} outputs; "
                "a reward model must output one score per sequence (num_labels=1)."
            )
        if not tokenizer.is_fast:
            raise ValueError(
                f"Reward model {self.name!r}: its tokenizer {type(tokenizer).__name__} is not a fast tokenizer; "
                "truncation that keeps the response needs character offsets (install `tokenizers` / use_fast)."
            )
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"Reward model {self.name!r}: chat_template=true but {self.name_or_path!r} has no chat template; "
                "set chat_template: false and give its input format as template."
            )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        device = self.device or self._placement or "cpu"
        self._model = model.to(device).eval().requires_grad_(False)
        self._tokenizer = tokenizer

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        if self._model is None:
            self._load()
        pairs = list(zip(prompts, responses))
        scores = [self._score(pairs[i : i + self.batch_size]) for i in range(0, len(pairs), self.batch_size)]
        return torch.cat(scores).float().cpu()

    def render(self, prompt: str, response: str) -> tuple[str, tuple[int, int]]:
        """The reward model's input text and the character span of the prompt in it."""
        if self.chat_template:
            question = user_message(prompt, self.user_message)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
            text = self._tokenizer.apply_chat_template(messages, tokenize=False)
            start = text.find(question)
            return text, (start, start + len(question))
        fields = {"prompt": prompt} if "{prompt}" in self.template else {}
        if self.template.split("{response}")[0].format(**fields)[-1:].isspace():
            response = response.lstrip()  # the template's own separator, not two
        if not fields:
            return self.template.format(response=response), (0, 0)
        start = len(self.template.split("{prompt}")[0].format(response=response))
        return self.template.format(prompt=prompt, response=response), (start, start + len(prompt))

    def encode(self, prompts: list[str], responses: list[str]) -> dict[str, torch.Tensor]:
        """Right-padded input ids of at most ``max_length`` tokens: the prompt loses its start first (a text
        pair: the tokenizer's own truncation)."""
        if self.text_pair:
            limit = min(self.max_length, self._tokenizer.model_max_length)
            rows = self._tokenizer(list(prompts), list(responses), truncation=True, max_length=limit)["input_ids"]
        else:
            rows = self._rendered_rows(prompts, responses)
        width, pad = max(len(r) for r in rows), self._tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        }

    def _rendered_rows(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        rendered = [self.render(p, r) for p, r in zip(prompts, responses)]
        batch = self._tokenizer(  # a chat template holds its own BOS: adding one would make two
            [text for text, _ in rendered], add_special_tokens=not self.chat_template, truncation=False,
            return_offsets_mapping=True, return_special_tokens_mask=True,
        )
        return [
            _keep_response(ids, offsets, special, span, self.max_length)
            for ids, offsets, special, (_, span) in zip(
                batch["input_ids"], batch["offset_mapping"], batch["special_tokens_mask"], rendered
            )
        ]

    def _score(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        batch = self.encode([p for p, _ in pairs], [r for _, r in pairs])
        return self._model(**{k: v.to(self._model.device) for k, v in batch.items()}).logits[:, 0]


def _keep_response(
    ids: list[int], offsets, special: list[int], prompt_span: tuple[int, int], max_length: int
) -> list[int]:
    """Drop the prompt's first tokens until ``max_length`` fits; if that is not enough, cut the
    end of the text (trailing special tokens, such as a classifier's EOS, kept)."""
    excess = len(ids) - max_length
    if excess <= 0:
        return list(ids)
    start, end = prompt_span
    prompt = [i for i, (a, b) in enumerate(offsets) if not special[i] and start <= a and b <= end and b > a]
    dropped = set(prompt[:excess])
    kept = [t for i, t in enumerate(ids) if i not in dropped]
    if len(kept) > max_length:
        trail = next((n for n in range(len(special)) if not special[len(special) - 1 - n]), 0)
        kept = kept[: max_length - trail] + (kept[len(kept) - trail :] if trail else [])
    return kept


class NormalizedReward(RewardFunction):
    """``(r − mean) / std`` of another reward, so objectives on different scales weigh alike.

    ``mode``: ``"calibration"`` freezes the statistics of the first batch it scores, or, when the
    rewards of that batch do not spread (every response scored alike, common early on with a
    sparse reward), of the first batches together whose rewards do: a degenerate batch must not
    normalise every later reward to 0;
    ``"running"`` keeps updating them with every batch (Welford); ``"fixed"`` uses the given
    ``mean`` and ``std``. A reward that is constant up to round-off (std at most ``eps`` or 1e3
    float32 ulps of the largest |reward| seen) maps to exactly 0, never NaN nor amplified noise.

    In a federation every client keeps its own statistics, and evaluation uses statistics
    calibrated once on the initial adapter and frozen (``frozen``), so eval rewards of every
    round and every run of a comparison share one scale. ``last_raw`` holds the raw rewards of
    the last batch (evaluation logs them as ``eval/raw_reward/<name>``).
    """

    def __init__(
        self,
        reward: RewardFunction,
        mode: Literal["calibration", "running", "fixed"] = "calibration",
        mean: Optional[float] = None,
        std: Optional[float] = None,
        eps: float = 1e-6,
    ) -> None:
        if mode == "fixed" and (mean is None or std is None or std <= 0):
            raise ValueError("NormalizedReward(mode='fixed') needs mean and a positive std.")
        self.reward, self.mode, self.eps = reward, mode, eps
        self.name = reward.name
        # Public: the run's fingerprint describes it (the statistics themselves are evolving state).
        self.configured_statistics = {"mean": mean, "std": std}
        self.count = 0 if mode != "fixed" else 1
        self.mean = 0.0 if mean is None else float(mean)
        self._m2 = 0.0 if std is None else float(std) ** 2
        self._scale = 0.0  # the largest |reward| the statistics have seen: sets the round-off floor
        self._configured = self.state_dict()
        # Private: a run's fingerprint describes the public attributes, and these change every call.
        self._frozen = False  # score without updating the statistics (evaluation)
        self._last_raw: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str) -> "NormalizedReward":
        if callable(getattr(self.reward, "to", None)):
            self.reward.to(device)
        return self

    @property
    def std(self) -> float:
        return (self._m2 / max(self.count, 1)) ** 0.5 if self.mode != "fixed" else self._m2**0.5

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        raw = torch.as_tensor(self.reward(prompts, responses), dtype=torch.float64).flatten()
        check_rewards(self.name, raw, responses)  # before a bad batch can poison the statistics
        self._last_raw = raw.float()
        if not self._frozen and (self.mode == "running" or (self.mode == "calibration" and self.calibrating)):
            self._update(raw)
        if self.std <= self.floor:  # constant up to round-off: no signal to scale up
            return torch.zeros_like(raw, dtype=torch.float32)
        return ((raw - self.mean) / self.std).float()

    @property
    def calibrating(self) -> bool:
        """Calibration mode still gathering statistics: nothing scored yet, or no spread beyond round-off."""
        return self.mode == "calibration" and (self.count == 0 or self.std <= self.floor)

    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self._frozen = bool(value)

    @property
    def last_raw(self) -> Optional[torch.Tensor]:
        """The raw rewards of the last batch scored."""
        return self._last_raw

    @property
    def floor(self) -> float:
        """Spreads at or below this are round-off: ``eps``, or 1e3 float32 ulps of the rewards' scale."""
        return max(self.eps, 1e3 * torch.finfo(torch.float32).eps * max(self._scale, abs(self.mean)))

    def state_dict(self) -> dict[str, float]:
        """The statistics gathered so far (what a resumed federation must restore)."""
        return {"count": self.count, "mean": self.mean, "_m2": self._m2, "scale": self._scale}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self._m2 = int(state["count"]), float(state["mean"]), float(state["_m2"])
        self._scale = float(state.get("scale", 0.0))

    def reset(self) -> None:
        """Back to the statistics as configured (none, or the fixed ones)."""
        self.load_state_dict(self._configured)

    def _update(self, batch: torch.Tensor) -> None:
        """Chan et al.'s parallel update of count, mean and sum of squared deviations."""
        n, mean = batch.numel(), float(batch.mean())
        m2 = float(((batch - mean) ** 2).sum())
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self._m2 += m2 + delta**2 * self.count * n / total
        self.count = total
        self._scale = max(self._scale, float(batch.abs().max()))


def stateful(objectives: Iterable[RewardFunction]) -> list[RewardFunction]:
    """The objectives that carry state (statistics) between calls."""
    return [o for o in objectives if callable(getattr(o, "state_dict", None))]


def objective_states(objectives: Iterable[RewardFunction]) -> dict[str, dict]:
    return {o.name: o.state_dict() for o in stateful(objectives)}


def load_objective_states(objectives: Iterable[RewardFunction], states: Optional[dict[str, dict]]) -> None:
    """Each stateful objective to its state in ``states``, or back to its configured state."""
    for objective in stateful(objectives):
        if states and objective.name in states:
            objective.load_state_dict(states[objective.name])
        elif callable(getattr(objective, "reset", None)):
            objective.reset()
        else:
            raise TypeError(f"Objective {objective.name!r} has a state_dict but no reset(): a stateful objective "
                            "must be able to return to its configured state (see firm_lightning.rewards).")


@contextmanager
def statistics_frozen(objectives: Iterable[RewardFunction]):
    """Score without updating any objective's statistics (evaluation)."""
    touched = [o for o in stateful(objectives) if hasattr(o, "frozen")]
    before = [o.frozen for o in touched]
    for o in touched:
        o.frozen = True
    try:
        yield
    finally:
        for o, was in zip(touched, before):
            o.frozen = was


def score_all(
    objectives: Sequence[RewardFunction], prompts: list[str], responses: list[str]
) -> torch.Tensor:
    """Rewards of every response under every objective, shape (S, N), checked for shape and NaN."""
    rows = []
    for objective in objectives:
        rewards = torch.as_tensor(objective(prompts, responses), dtype=torch.float32).flatten()
        rows.append(check_rewards(objective.name, rewards, responses))
    return torch.stack(rows)


def check_rewards(name: str, rewards: torch.Tensor, responses: list[str]) -> torch.Tensor:
    """``rewards`` if it holds one finite value per response; else an error naming the objective."""
    if rewards.numel() != len(responses):
        raise ValueError(
            f"Reward function {name!r} returned {rewards.numel()} rewards for "
            f"{len(responses)} responses; it must return one float per response."
        )
    if not torch.isfinite(rewards).all():
        bad = [i for i, ok in enumerate(torch.isfinite(rewards).tolist()) if not ok][:3]
        raise ValueError(
            f"Reward function {name!r} returned non-finite rewards (NaN/inf) at rows {bad}, "
            f"e.g. for response {responses[bad[0]]!r}; make it return finite floats."
        )
    return rewards


def check_objective_names(objectives: Sequence[RewardFunction]) -> list[str]:
    """Names must be present and unique: they key every metric."""
    names = [getattr(o, "name", None) for o in objectives]
    if not objectives:
        raise ValueError("No objectives given: configure at least one reward function under model.objectives.")
    if any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"Every reward function needs a non-empty string `name` attribute; got {names}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Objective names must be unique (they name the metrics); got {names}.")
    return names

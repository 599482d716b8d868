"""``FIRMClientModule``: one client's local training, as a Lightning module.

``training_step`` is one FIRM local step (spec section 2, client steps 1-10):

1. sample ``G`` responses for each of the ``B`` prompts of the batch;
2. score them with every objective: rewards ``R`` of shape (S, B*G);
3. leave-one-out advantages per objective (optionally whitened);
4. one forward pass for the response log-probs, reference log-probs with the adapter off;
5. per-objective losses ``L_s`` = policy-gradient surrogate + the same KL penalty (``firm_lightning.losses``);
6. per-objective gradients over the adapter weights only (``S`` backward passes);
7. Gram matrix of those gradients; 8. ``λ`` from the weighting;
9. ``d = Σ λ_s g_s`` written into ``.grad``, optimiser step; 10. log λ, rewards, KL, ``‖d‖``.

Steps 6-9 are ``firm_lightning.gradients``; this module keeps the plan of the step, the
optimiser, the lr schedulers and the fp16 scaler. Optimisation is manual because the update is
a combination of ``S`` gradients, not the gradient of one loss.

Memory: ``sampling.generation_batch_size`` samples step 1 in chunks of sequences;
``loss.micro_batch_size`` runs steps 4-6 a micro-batch of sequences at a time, adding each
micro-batch's ``S`` gradients into ``S`` accumulators (its losses carry the whole batch's
normalisers), so steps 7-9 see the whole batch's gradients: the same step, with activation
memory bounded by the micro-batch instead of ``B·G``.

Several devices per client (``trainer.strategy: ddp``, firm_lightning/distributed.py): each rank
samples its share of the batch's prompts, every rank scores the whole gathered rollout, and the
``S`` gradient accumulators are summed over the ranks before step 7, so every rank takes the
same step. With ``sampling.per_prompt_seeds`` a prompt's samples depend only on the fit's seed,
the local step and the prompt's index in the batch: the step is the one-process step.

Compute: with ``sampling.share_prompt`` each prompt is computed once per group in sampling and in
every forward pass of step 4 (``firm_lightning.prefix``); with ``loss.kl_coef`` 0 the reference
pass is skipped.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import lightning as L
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torchmetrics import MeanMetric

from firm_lightning.adapters import check_adapter_state
from firm_lightning.advantages import group_advantages
from firm_lightning.datamodule import PromptLimit
from firm_lightning.gradients import (
    GRAM_SOURCES, ExactGradients, GramSource, LossScale, RepresentationGradients, capture_representation, check_finite,
    WEIGHTING_EFFECT, clipped, objective_weights, weighting_effect, write_direction, write_non_finite,
)
from firm_lightning.losses import check_loss_settings, policy_gradient_losses
from firm_lightning.policy import LoRASettings, PolicyBuilder, TinyPolicy, add_lora
from firm_lightning.rewards import RewardFunction, check_objective_names, score_all
from firm_lightning.distributed import all_gather_objects, all_reduce_sum, shares
from firm_lightning.sequences import (
    USER_MESSAGES, Rollout, concat_rollouts, context_length, cut_prompt, micro_batches, prompt_token_rows, sample,
    token_logprobs,
)
from firm_lightning.weighting import RegularizedMinNorm, Weighting


CALIBRATION_SEED_OFFSET = 7919  # eval_seed + this: the sample that calibrates evaluation statistics (FitArguments)


@dataclass
class SamplingSettings:
    """How responses are sampled, in training and in evaluation.

    Args:
        num_generations: G responses per prompt in training (>= 2: the leave-one-out baseline needs a group).
        max_new_tokens: Response length limit in tokens.
        max_prompt_length: Prompts longer than this are cut from the left (their end is kept).
        temperature: Sampling temperature.
        top_k: Keep only the k most likely tokens (0: no limit).
        top_p: Nucleus sampling threshold (1.0: no limit).
        eval_num_generations: Responses per held-out prompt when evaluating the global adapter.
        eval_seed: Fixed evaluation sampling seed, so evaluations compare across rounds and algorithms.
        chat_template: Wrap prompts in the tokenizer's chat template; null: when the tokenizer has one.
        system_prompt: A system message, used with the chat template.
        eval_greedy: Evaluate the most likely response (top-1): no sampling noise at all.
        user_message: With the chat template, what the user message is: question (default): a prompt in
            HH-RLHF's format ("\\n\\nHuman: Q\\n\\nAssistant:") is sent as Q alone, the template supplying
            the roles; prompt: the prompt text as is (markup included). Other prompts are sent as is.
            The rewards always score the prompt as given.
        generation_batch_size: Sequences (of the B·G, or of the evaluation's) per generate call, to bound
            sampling memory; null: all at once. With per_prompt_seeds the responses are the same either way.
        share_prompt: Compute each prompt once per group: sampling prefills it once and expands its cache to
            the group's samples; the update's forward passes (policy, reference, PPO epochs) run it once and
            the group's responses against its keys and values, gradients flowing into the prompt positions.
            Exact up to round-off; a model it cannot apply to computes every row, with one log line
            (firm_lightning.prefix).
        per_prompt_seeds: Draw each prompt's samples from generators of its own, keyed by the fit's seed
            (federation.seed, round, client), the local step and the prompt's index in the batch: the rollout
            is the same whether generated at once, in chunks (generation_batch_size), on several DDP ranks or
            with share_prompt. false: each generate call draws from torch's global generator.
    """

    num_generations: int = 4
    max_new_tokens: int = 32
    max_prompt_length: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_num_generations: int = 2
    eval_seed: int = 1234
    chat_template: Optional[bool] = None
    system_prompt: Optional[str] = None
    eval_greedy: bool = False
    user_message: Literal["question", "prompt"] = "question"
    generation_batch_size: Optional[int] = None
    share_prompt: bool = True
    per_prompt_seeds: bool = True


# Settings added after runs were saved without them, with the behaviour the code had before each:
# a run resumed from such a checkpoint continues with it (RoundEngine.resumed_state), as it was written.
EARLIER_BEHAVIOUR = {"sampling": {"share_prompt": False, "per_prompt_seeds": False}}


@dataclass
class PolicyGradientSettings:
    """The per-objective policy-gradient loss; ``firm_lightning.losses`` computes it and derives the expected
    gradient of each estimator and aggregation.

    Args:
        kl_coef: κ: weight of the KL-to-reference penalty, the same inside every objective's loss. 0: no
            reference forward pass at all (train/kl is then logged as NaN: not measured).
        kl_estimator: The KL penalty's loss term: k2 (∇KL(π‖π_ref) per position), sequence (∇KL(π‖π_ref) of
            whole responses, higher variance) or k3 (∇KL(π_ref‖π), the reverse divergence).
        aggregation: token_sum (unbiased: constant normaliser B·G·max_new_tokens; TRL's dr_grpo), token_mean
            (divided by the batch's response tokens; TRL's dapo, and its bnpo with one micro-batch) or
            sequence_mean (each response weighted by 1/its length: biased towards long responses; TRL's grpo).
        whiten_advantages: Normalise each objective's advantages to unit variance so reward scales do not matter
            (after the advantages below; off for TRL's advantages).
        ppo_epochs: Optimiser steps per batch of rollouts; more than 1 uses the clipped importance ratio.
            The last batch of a fit runs fewer, so a fit never exceeds trainer.max_steps optimiser steps.
        clip_range: PPO clip range of the importance ratio.
        max_grad_norm: Clip the norm of the combined direction d = Σ λ_s g_s; null disables clipping.
        gram_from: Gradients the Gram matrix is built from: parameters (exact, S backward passes over the
            adapter), or hidden / logits (cheap, MGDA-UB style: gradients at the head's input or output, then one
            full backward; λ is exact when the objectives' per-token loss weights are proportional, else an
            approximation: firm_lightning.gradients).
        micro_batch_size: Sequences (of the B·G) per forward/backward pass, to bound activation memory; null:
            the whole batch. The S per-objective gradients are summed over the micro-batches, then the Gram
            matrix, λ and the step are computed once: the same step as the whole batch (the normalisers are
            the whole batch's). With gram_from hidden / logits, micro-batches cost a second forward pass.
        advantages: The group baseline and scale (firm_lightning.advantages): leave_one_out (the mean of the
            prompt's other G-1 rewards), group_mean (the mean of its G rewards; TRL's scale_rewards none),
            group_std (group_mean divided by the group's std + 1e-4; TRL's group) or batch_std (divided by the
            batch's reward std + 1e-4; TRL's batch).
    """

    kl_coef: float = 0.05
    kl_estimator: Literal["k2", "sequence", "k3"] = "k2"
    aggregation: Literal["token_sum", "sequence_mean", "token_mean"] = "token_sum"
    whiten_advantages: bool = True
    ppo_epochs: int = 1
    clip_range: float = 0.2
    max_grad_norm: Optional[float] = 1.0
    gram_from: Literal["parameters", "hidden", "logits"] = "parameters"
    micro_batch_size: Optional[int] = None
    advantages: Literal["leave_one_out", "group_mean", "group_std", "batch_std"] = "leave_one_out"


class FitArguments(L.Callback):
    """What one fit or evaluation of the module runs with besides the module's configuration.

    Handed to that call's own Trainer among its callbacks (``client.fit_client``: the algorithm's
    weighting; ``engine.calibrated_statistics``: the calibration's seed offset), where the module
    reads it (``FIRMClientModule.fit_arguments``). A Trainer serves one call, so nothing is set on
    the module and nothing needs restoring; a Trainer without one runs the module's configuration.
    """

    def __init__(self, weighting: Optional[Weighting] = None, eval_seed_offset: int = 0) -> None:
        self.weighting = weighting  # None: the module's configured weighting
        self.eval_seed_offset = eval_seed_offset  # added to sampling.eval_seed in validation_step


class FIRMClientModule(L.LightningModule):
    """Policy (base model + LoRA), reward functions and in-client weighting of one FIRM client.

    The orchestrator reuses one instance for every client: it loads the global adapter with
    [`load_adapter_state`][firm_lightning.FIRMClientModule.load_adapter_state], fits, and reads back
    [`adapter_state`][firm_lightning.FIRMClientModule.adapter_state] and
    [`client_summary`][firm_lightning.FIRMClientModule.client_summary]. The base weights are frozen and never copied.

    Args:
        objectives: The reward functions, one per objective (``RewardFunction`` subclasses by class_path).
        weighting: In-client weighting of the objectives' gradients: RegularizedMinNorm(beta, preference)
            (FIRM; beta = 0 is MGDA) or LinearScalarization(weights).
        policy: Builds the base model and tokenizer: TinyPolicy (offline, in code) or PretrainedPolicy(name_or_path).
        lora: The LoRA adapter, the only trained (and communicated) weights.
        sampling: How responses are sampled in training and evaluation.
        loss: The per-objective policy-gradient loss.
        learning_rate: Learning rate of the default client optimiser (AdamW), used when no optimizer: group is given.
        weight_decay: Weight decay of that default AdamW.
    """

    def __init__(
        self,
        objectives: list[RewardFunction],
        weighting: Optional[Weighting] = None,
        policy: Optional[PolicyBuilder] = None,
        lora: LoRASettings = LoRASettings(),
        sampling: SamplingSettings = SamplingSettings(),
        loss: PolicyGradientSettings = PolicyGradientSettings(),
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.objective_names = check_objective_names(objectives)
        self.objectives = list(objectives)
        self.weighting = weighting if weighting is not None else RegularizedMinNorm()
        self.sampling = sampling
        self.loss_settings = loss
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        # The client optimiser from the optimizer:/lr_scheduler: groups, set once with the config
        # (client_optimizer.use_client_optimizer): params -> what configure_optimizers returns.
        self.optimizer_factory: Optional[Callable[[list[torch.nn.Parameter]], Any]] = None
        base, self.tokenizer = (policy or TinyPolicy()).build()
        self.policy = add_lora(base, lora)
        self.client_metrics = torch.nn.ModuleDict(
            # Under DDP every rank records the same (whole-batch) values: nothing to synchronise. The
            # weighting effect is NaN where it is not measured, and KL when kl_coef is 0: each is left out of its
            # mean (or its mean is NaN) without a warning per step.
            {_metric_key(k): MeanMetric(sync_on_compute=False, nan_strategy=_nan_strategy(k))
             for k in self._summary_names()}
        )
        self._last_effect = (math.nan, math.nan)  # the weighting effect of the last optimiser step
        if sampling.num_generations < 2:
            raise ValueError("sampling.num_generations must be >= 2: the leave-one-out baseline needs a group.")
        context = context_length(self.policy)
        if sampling.max_new_tokens < 1 or (context is not None and sampling.max_new_tokens >= context):
            raise ValueError(
                f"sampling.max_new_tokens must be >= 1 and leave room for a prompt in the policy's context of "
                f"{context} tokens; got {sampling.max_new_tokens}."
            )
        if sampling.user_message not in USER_MESSAGES:
            raise ValueError(
                f"sampling.user_message={sampling.user_message!r} is unknown; use one of {list(USER_MESSAGES)}."
            )
        check_loss_settings(loss)
        if loss.gram_from not in GRAM_SOURCES:
            raise ValueError(f"loss.gram_from={loss.gram_from!r} is unknown; use one of {list(GRAM_SOURCES)}.")
        if sampling.generation_batch_size is not None and sampling.generation_batch_size < 1:
            raise ValueError(
                f"sampling.generation_batch_size must be >= 1 sequences, or null for one generate call; "
                f"got {sampling.generation_batch_size}."
            )

    def prompt_limit(self) -> PromptLimit:
        """What the policy can hold of a prompt (as sampling encodes it) beside ``sampling.max_new_tokens``:
        the data checks every prompt against it at load (``PromptDataModule.limit_prompts``)."""
        s, context = self.sampling, context_length(self.policy)

        def measure(prompts: list[str]) -> list[int]:
            rows = prompt_token_rows(self.tokenizer, prompts, s.max_prompt_length, s.chat_template, s.system_prompt,
                                     s.user_message)
            return [len(r) for r in rows]

        return PromptLimit(
            max_tokens=None if context is None else context - s.max_new_tokens,
            measure=measure,
            cut=functools.partial(cut_prompt, self.tokenizer),
            why=f"a context of {context} tokens less sampling.max_new_tokens={s.max_new_tokens}",
        )

    # ---- adapter exchange (what the orchestrator sends and receives) ----

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the LoRA weights: the client's upload."""
        return {k: v.detach().to("cpu", copy=True) for k, v in _lora_state(self.policy).items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load LoRA weights; a malformed state (wrong keys, shapes or non-finite values) is refused."""
        check_adapter_state(state, _lora_state(self.policy), "Adapter state")
        set_peft_model_state_dict(self.policy, state)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ---- Lightning hooks ----

    def configure_optimizers(self):
        """A fresh client optimiser per fit: ``optimizer_factory``'s, else AdamW(learning_rate, weight_decay)."""
        if self.optimizer_factory is not None:
            return self.optimizer_factory(self.trainable_parameters())
        return torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate, weight_decay=self.weight_decay)

    def fit_arguments(self) -> FitArguments:
        """The ``FitArguments`` among the callbacks of the Trainer running the module; the defaults without one."""
        trainer = self._trainer
        found = [c for c in trainer.callbacks if isinstance(c, FitArguments)] if trainer is not None else []
        if len(found) > 1:
            raise ValueError(f"A Trainer carries {len(found)} FitArguments callbacks; give it at most one.")
        return found[0] if found else FitArguments()

    def fit_weighting(self) -> Weighting:
        """The in-client weighting of this fit: its ``FitArguments``' (an algorithm's), else ``weighting``."""
        weighting = self.fit_arguments().weighting
        return weighting if weighting is not None else self.weighting

    def on_train_start(self) -> None:
        for metric in self.client_metrics.values():
            metric.reset()
        self._place_objectives()

    def on_validation_start(self) -> None:
        self._place_objectives()

    def _place_objectives(self) -> None:
        """Model-based rewards on the policy's device (they are not submodules: Lightning does not move them)."""
        for objective in self.objectives:
            if callable(getattr(objective, "to", None)):
                objective.to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with self._profile("sampling"):
            rollout = self._sample_batch(list(batch["prompt"]))
        with self._profile("scoring"):  # under DDP every rank scores the whole batch: identical rewards and statistics
            rewards = score_all(self.objectives, rollout.prompts, rollout.responses).to(self.device)
        with self._profile("update"):
            lambdas, norm, kl = self.update(rollout, rewards)
        self._record(rewards.mean(dim=1), lambdas, kl, norm, rollout)

    def _ranks(self) -> Optional[tuple[int, int]]:
        """``(rank, world size)`` when this client's fit spans several ranks (``trainer.strategy=ddp``), else None."""
        trainer = self._trainer
        if trainer is None or trainer.world_size <= 1:
            return None
        return trainer.global_rank, trainer.world_size

    def _sample_batch(self, prompts: list[str]) -> Rollout:
        """Step 1 for the batch. Under DDP (firm_lightning.distributed) each rank samples its share of
        the prompts, then every rank holds the whole rollout, laid out as one process would.

        One draw from torch's global generator (seeded per fit by (seed, round, client), in step on
        every rank) keys the step; with ``sampling.per_prompt_seeds`` each prompt's samples come from
        that key and the prompt's index in the batch, so the rollout is the same on any number of ranks."""
        group = self.sampling.num_generations
        ranks = self._ranks()
        if ranks is None:
            return self.rollout(prompts, group)
        rank, world = ranks
        share = shares(len(prompts), world)[rank]
        mine = prompts[share]
        seed = int(torch.randint(0, 2**62, ()))
        if self.sampling.per_prompt_seeds:
            with self._keyed_rollouts(seed, share.start):
                local = self.rollout(mine, group).to("cpu") if mine else None
        else:  # each rank samples with its own numbers (the same on every rank would correlate its responses)
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seed + rank)
                local = self.rollout(mine, group).to("cpu") if mine else None
        parts = [part for part in all_gather_objects(local) if part is not None]
        return concat_rollouts(parts, self.tokenizer.pad_token_id, group).to(self.device)

    @contextmanager
    def _keyed_rollouts(self, seed: int, first_prompt: int):
        """While open, ``rollout`` calls without a seed sample with this key, ``prompts[0]`` being prompt
        ``first_prompt`` of the batch (a DDP rank's share; ``rollout`` keeps its call signature)."""
        self._rollout_key = (seed, first_prompt)
        try:
            yield
        finally:
            self._rollout_key = None

    def update(self, rollout: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 3-9 on scored rollouts: advantages, log-probs, per-objective losses, weighted step(s).

        Returns the last epoch's ``λ``, ``‖d‖`` and KL. Each epoch is one optimiser step; the
        last batch of a fit runs only the steps left before ``trainer.max_steps``.

        With ``loss.micro_batch_size`` the rows go through the model a micro-batch at a time (the
        reference log-probs too); each micro-batch's losses carry the whole batch's normalisers, so
        the per-objective gradients summed over the micro-batches are the whole batch's. Under DDP
        each rank takes the rows of its share of the prompts and the sums run over the ranks too.
        """
        settings = self.loss_settings
        advantages = group_advantages(rewards, rollout.group_size, settings.advantages, settings.whiten_advantages)
        num_rows, num_tokens = len(rollout.responses), float(rollout.response_mask.sum())
        ranks = self._ranks()
        mine = slice(0, num_rows)  # this rank's rows: all of them, or its share of the prompts' groups under DDP
        if ranks is not None:
            prompts = shares(num_rows // rollout.group_size, ranks[1])[ranks[0]]
            mine = slice(prompts.start * rollout.group_size, prompts.stop * rollout.group_size)
        local = micro_batches(mine.stop - mine.start, self.loss_settings.micro_batch_size)  # rows within mine
        whole = len(local) == 1 and local[0] == slice(0, num_rows)
        parts = [rollout] if whole else [rollout.rows(slice(mine.start + c.start, mine.start + c.stop)) for c in local]
        logprobs_of = functools.partial(token_logprobs, share_prompt=self.sampling.share_prompt)
        reference = None  # kl_coef = 0: the penalty is zero whatever the reference, so none is computed
        if self.loss_settings.kl_coef != 0 and parts:
            with torch.no_grad(), self.policy.disable_adapter():
                reference = torch.cat([logprobs_of(self.policy, part) for part in parts])
        old = None  # the first epoch's log-probs: the PPO ratio's denominator on later epochs
        for _ in range(self._epochs_left()):
            fresh, kls = rollout.response_mask.new_empty(mine.stop - mine.start, rollout.response_mask.shape[1],
                                                         dtype=torch.float32), {}

            def forward(i: int, part: Rollout, rows: slice, old=old, fresh=fresh, kls=kls):
                with capture_representation(self.policy, self.loss_settings.gram_from) as representation:
                    logprobs = logprobs_of(self.policy, part)
                fresh[rows] = logprobs.detach()
                previous = logprobs.detach() if old is None else old[rows]
                batch_rows = slice(mine.start + rows.start, mine.start + rows.stop)
                losses, kls[i] = self.objective_losses(
                    logprobs, previous, logprobs.detach() if reference is None else reference[rows],
                    advantages[:, batch_rows], part.response_mask, num_rows=num_rows, num_tokens=num_tokens,
                )
                if reference is None:
                    kls[i] = torch.full_like(kls[i], float("nan"))  # not measured: logged as NaN
                return losses, representation.get("tensor")

            lambdas, norm = self._weighted_step(
                [functools.partial(forward, i, part, rows) for i, (part, rows) in enumerate(zip(parts, local))],
                GRAM_SOURCES[self.loss_settings.gram_from], num_objectives=len(advantages),
            )
            old = fresh if old is None else old
            kl = sum(kls.values(), torch.zeros((), device=advantages.device))  # each micro-batch's share of the mean
            if ranks is not None:
                kl = all_reduce_sum(kl.detach().float())  # every rank's share
        return lambdas, norm, kl.detach()

    def _epochs_left(self) -> int:
        """``ppo_epochs``, capped by the optimiser steps left before ``trainer.max_steps``.

        Lightning checks ``max_steps`` between batches only; under manual optimisation every
        ``optimizer.step()`` counts, so the epochs of the last batch could overrun it.
        """
        epochs = self.loss_settings.ppo_epochs
        trainer = self._trainer
        if trainer is None or trainer.max_steps is None or trainer.max_steps < 0:
            return epochs
        return max(1, min(epochs, trainer.max_steps - trainer.global_step))

    def _step_schedulers(self) -> None:
        """Step every lr scheduler once per optimiser step.

        Under manual optimisation Lightning never steps them (their ``interval``/``frequency``
        are ignored); a client fit is counted in optimiser steps, so the schedule is too.
        """
        if self._trainer is None:
            return
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            scheduler.step()

    def _profile(self, phase: str):
        """A section of Lightning's profiler (``--trainer.profiler simple`` shows the split)."""
        trainer = self._trainer
        return trainer.profiler.profile(f"[FIRM] {phase}") if trainer is not None else nullcontext()

    def objective_losses(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        ref_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        num_rows: Optional[int] = None,
        num_tokens: Optional[float] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-objective losses ``L_s`` (shape (S,)) and the KL they share (k3 value, for logging);
        ``num_rows``/``num_tokens``: the whole batch's rows and response tokens when these are one
        micro-batch (``policy_gradient_losses``)."""
        return policy_gradient_losses(
            logprobs, old_logprobs, ref_logprobs, advantages, mask, self.loss_settings, self.sampling.max_new_tokens,
            num_rows, num_tokens,
        )

    def weighted_step(
        self, losses: torch.Tensor, representation: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gram → λ → ``d = Σ λ_s g_s`` into ``.grad`` → optimiser step (``firm_lightning.gradients``).

        Without ``representation``: the Gram matrix of the exact per-objective gradients over the
        adapter weights (S backward passes). With it (``loss.gram_from``): the Gram matrix of the
        gradients with respect to that tensor (cheap), then one backward pass of ``Σ λ_s L_s``.
        The algebra runs in fp32; under ``16-mixed`` a non-finite gradient makes the ``GradScaler``
        skip the step and lower its scale, otherwise it is refused.
        """
        source = ExactGradients if representation is None else RepresentationGradients
        return self._weighted_step([lambda: (losses, representation)], source)

    def _weighted_step(
        self, forwards: list[Callable[[], tuple]], source: type[GramSource], num_objectives: Optional[int] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``weighted_step`` over micro-batches: each of ``forwards`` runs one micro-batch's forward pass
        and returns its ``(losses, representation or None)``; ``source``: where the Gram matrix comes from;
        ``num_objectives``: S, for a DDP rank without rows."""
        params, scale, ranks = self.trainable_parameters(), LossScale(self._grad_scaler()), self._ranks()
        optimizer = self.optimizers()
        optimizer.zero_grad()
        gradients = source.accumulate(forwards, params, scale)
        if ranks is not None:  # the whole batch's: the sum of every rank's share
            gradients = gradients.summed_over_ranks(num_objectives)
        if not check_finite(gradients.finite, self.objective_names, refuse=scale.scaler is None):
            return self._skipped_step(optimizer, params, gradients.finite)
        lambdas = objective_weights(self.fit_weighting(), gradients.gram())
        direction = gradients.direction(lambdas, forwards, distributed=ranks is not None)
        direction, norm = clipped(direction, self.loss_settings.max_grad_norm)
        self._last_effect = self._weighting_effect(optimizer, gradients, lambdas, direction)
        write_direction(params, direction, scale)
        optimizer.step()
        self._step_schedulers()
        return lambdas.detach(), norm.detach()

    def _weighting_effect(self, optimizer, gradients: GramSource, lambdas, direction) -> tuple[float, float]:
        """``weighting_effect`` of this step against the preference ``p`` of the fit's weighting; NaN without
        a ``p``, without per-objective gradients (``gram_from`` hidden / logits never form them) or without
        a torch optimiser to simulate."""
        preference = self.fit_weighting().preference_weights(len(lambdas))
        raw = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper would count the simulated steps
        simulable = isinstance(gradients, ExactGradients) and isinstance(raw, torch.optim.Optimizer)
        if preference is None or not simulable:
            return math.nan, math.nan
        preferred, _ = clipped(gradients.direction(preference.to(lambdas), (), False), self.loss_settings.max_grad_norm)
        return weighting_effect(raw, self.trainable_parameters(), direction, preferred)

    def _skipped_step(self, optimizer, params, finite: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp16 overflow: a NaN gradient, so the scaler skips this step and lowers its scale; λ and ‖d‖ are NaN."""
        write_non_finite(params, finite.device)
        self._last_effect = (math.nan, math.nan)
        optimizer.step()
        self._step_schedulers()  # a step the scaler skipped still counts: schedulers follow step calls
        nan = torch.full((len(finite),), float("nan"), device=finite.device)
        return nan, torch.tensor(float("nan"), device=finite.device)

    def _grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """The fp16 ``GradScaler`` of a ``16-mixed`` Trainer; None otherwise."""
        plugin = getattr(self._trainer, "precision_plugin", None) if self._trainer is not None else None
        scaler = getattr(plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Rewards of the current adapter on held-out prompts, sampled with a fixed seed."""
        devices = [self.device] if self.device.type == "cuda" else []
        greedy = self.sampling.eval_greedy
        # A calibration pass (the federation's evaluation statistics) samples apart from every evaluation.
        seed = self.sampling.eval_seed + batch_idx + self.fit_arguments().eval_seed_offset
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            per_prompt = 1 if greedy else self.sampling.eval_num_generations
            rollout = self.rollout(batch["prompt"], per_prompt, greedy, for_loss=False)
        rewards = score_all(self.objectives, rollout.prompts, rollout.responses)
        for name, value in zip(self.objective_names, rewards.mean(dim=1)):
            self.log(f"eval/reward/{name}", value, on_epoch=True, batch_size=len(rollout.responses))
        for objective in self.objectives:  # a normalised objective: its raw score beside the normalised one
            raw = getattr(objective, "last_raw", None)
            if raw is not None:
                self.log(f"eval/raw_reward/{objective.name}", raw.mean().to(self.device), on_epoch=True,
                         batch_size=len(rollout.responses))
        if "group" in batch:  # per-group means: the orchestrator turns them into per-client rewards
            groups = [g for g in batch["group"] for _ in range(rollout.group_size)]
            for group in sorted(set(groups)):
                rows = torch.tensor([g == group for g in groups])
                for name, value in zip(self.objective_names, rewards[:, rows].mean(dim=1)):
                    self.log(f"eval/group/{group}/{name}", value, on_epoch=True, batch_size=int(rows.sum()))

    def rollout(
        self, prompts: list[str], group_size: int, greedy: bool = False, for_loss: bool = True,
        sampling: Optional[SamplingSettings] = None, seed: Optional[int] = None, first_prompt: int = 0,
    ) -> Rollout:
        """``group_size`` responses per prompt; ``for_loss``: keep the top-k/top-p kept sets a loss needs
        (rollouts that are only scored pass False: the responses are the same, without N·T·V/8 bytes).
        ``sampling``: settings for this call only (an evaluation protocol's); default the module's.
        ``seed``, ``first_prompt``: the key of the per-prompt generators and the batch index of
        ``prompts[0]`` (``firm_lightning.sequences.sample``); seed None: drawn from torch's generator."""
        s = sampling if sampling is not None else self.sampling
        if seed is None and getattr(self, "_rollout_key", None) is not None:
            seed, first_prompt = self._rollout_key
        return sample(
            self.policy, self.tokenizer, list(prompts), group_size, s.max_new_tokens,
            s.max_prompt_length, s.temperature, 1 if greedy else s.top_k, s.top_p,  # top-1 sampling is greedy
            s.chat_template, s.system_prompt, s.user_message, s.generation_batch_size, record_support=for_loss,
            seed=seed, first_prompt=first_prompt, per_prompt_seeds=s.per_prompt_seeds, share_prompt=s.share_prompt,
        )

    # ---- client metrics (read by the orchestrator after a fit) ----

    def _summary_names(self) -> list[str]:
        per_objective = [f"{kind}/{n}" for kind in ("train/reward", "lambda") for n in self.objective_names]
        return per_objective + ["train/kl", "train/update_norm", "train/response_length", *WEIGHTING_EFFECT]

    def _record(self, rewards, lambdas, kl, norm, rollout: Rollout) -> None:
        values = dict(zip(self._summary_names(), [*rewards, *lambdas, kl, norm]))
        values["train/response_length"] = rollout.response_mask.sum(1).float().mean()
        values.update({k: torch.tensor(v, device=self.device) for k, v in zip(WEIGHTING_EFFECT, self._last_effect)})
        for name, value in values.items():
            self.client_metrics[_metric_key(name)].update(value)
        self.log_dict({k: float(v) for k, v in values.items()}, on_step=True, on_epoch=False)

    def client_summary(self) -> dict[str, float]:
        """Means over this fit's local steps of every recorded quantity."""
        return {name: float(self.client_metrics[_metric_key(name)].compute()) for name in self._summary_names()}


def _lora_state(policy) -> dict[str, torch.Tensor]:
    # Only the LoRA tensors: never the (frozen) embeddings peft may add for tied layers.
    return get_peft_model_state_dict(policy, save_embedding_layers=False)


def _nan_strategy(name: str) -> str:
    return "ignore" if name in WEIGHTING_EFFECT or name == "train/kl" else "warn"


def _metric_key(name: str) -> str:
    return name.replace("/", "__").replace(".", "_")

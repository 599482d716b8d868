"""The local step's gradient algebra: from the ``S`` per-objective losses to the direction ``d`` in ``.grad``.

One step (``FIRMClientModule._weighted_step`` is its plan) runs, in this order:

1. **accumulate** over the micro-batches, from a *Gram source* (``loss.gram_from``):

   - ``ExactGradients`` (``parameters``): the ``S`` per-objective gradients over the adapter
     weights, ``S`` backward passes per micro-batch, added into ``S`` accumulators;
   - ``RepresentationGradients`` (``hidden`` / ``logits``, MGDA-UB style): the gradients with
     respect to a representation captured by ``capture_representation`` (the head's input or
     output), each a short backward through the head only; the micro-batches' Gram matrices add
     up (their representation rows are disjoint). The cheap λ equals the exact one when the
     per-token loss weights of the objectives are proportional and approximates it otherwise.

2. **sum over ranks** under DDP (``summed_over_ranks``): every rank then computes the same λ and step;
3. **refuse or skip** a non-finite gradient (``check_finite``);
4. the **Gram matrix** and ``λ`` from the weighting (``objective_weights``);
5. the **direction** ``d = Σ λ_s g_s`` (``direction``): ``λ @ grads`` from exact gradients, else one
   backward pass of ``Σ λ_s L_s`` per micro-batch (the graph kept when there is one micro-batch);
6. **clip** ``‖d‖`` (``clipped``, as ``torch.nn.utils.clip_grad_norm_``) and write ``d`` into ``.grad``.

A *forward* is a callable running one micro-batch's forward pass and returning its
``(losses, representation or None)``; the losses of all of them add up to the batch's ``L_s``.

Precision: the backward passes, the Gram matrix, λ, ``d`` and its clipping run with autocast
off, in fp32, whatever the Trainer's precision (in bf16 the Gram matrix of nearly aligned
gradients, hence λ, is noise); the forwards run under the Trainer's autocast. Under
``16-mixed`` the losses are scaled by the ``GradScaler``'s factor (``LossScale``: no fp16
underflow in the backward passes), every gradient is divided by it, and ``d × scale`` is
written, which Lightning's precision plugin unscales before the step.

Adding a Gram mode is one ``GramSource`` subclass here, named in ``GRAM_SOURCES`` (and, when it
reads a new tensor of the model, in ``REPRESENTATIONS``); the name joins the choices of
``PolicyGradientSettings.gram_from`` (module.py), which the configuration validates.
"""

from __future__ import annotations

import abc
import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from firm_lightning.distributed import all_reduce_sum

Forward = Callable[[], tuple[torch.Tensor, Optional[torch.Tensor]]]
Params = Sequence[torch.nn.Parameter]

# The tensor a representation Gram matrix is built from: a forward hook's (inputs, output) on the output head.
REPRESENTATIONS: dict[str, Callable[[tuple, torch.Tensor], torch.Tensor]] = {
    "hidden": lambda inputs, output: inputs[0],  # the final hidden states
    "logits": lambda inputs, output: output,
}


@dataclass(frozen=True)
class LossScale:
    """The fp16 ``GradScaler`` of a ``16-mixed`` Trainer, or none (factor 1)."""

    scaler: Optional[torch.amp.GradScaler] = None

    def scaled(self, losses: torch.Tensor) -> torch.Tensor:
        """The losses times the scale (the scaler's official way in: it also starts the scaler's state)."""
        return self.scaler.scale(losses) if self.scaler is not None else losses

    def factor(self) -> float:
        """The current scale, read after ``scaled`` set it; 1.0 without a scaler."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0


def full_precision(device: torch.device):
    """Autocast off on ``device``: the algebra runs in fp32 whatever the Trainer's precision."""
    return torch.autocast(device.type, enabled=False)


def flat_grad(loss: torch.Tensor, params: Params, retain_graph: bool = True) -> torch.Tensor:
    """``∇ loss`` over ``params``, flattened into one vector (zeros for a parameter ``loss`` does not use)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def write_grad(params: Params, flat: torch.Tensor) -> None:
    """Set each parameter's ``.grad`` to its slice of ``flat`` (in the parameter's dtype)."""
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()


def flat_size(params: Params) -> int:
    return sum(p.numel() for p in params)


@contextmanager
def capture_representation(model: torch.nn.Module, gram_from: str) -> Iterator[dict[str, torch.Tensor]]:
    """While open, ``captured["tensor"]`` is the representation ``gram_from`` names (``REPRESENTATIONS``)
    from the last forward pass of ``model``'s output head; nothing is captured for ``parameters``."""
    captured: dict[str, torch.Tensor] = {}
    pick = REPRESENTATIONS.get(gram_from)
    if pick is None:
        yield captured
        return

    def hook(module, inputs, output):
        captured["tensor"] = pick(inputs, output)

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def _scaled_forwards(forwards: Sequence[Forward], scale: LossScale) -> Iterator[tuple[torch.Tensor, Any]]:
    """Each micro-batch's forward pass (under the Trainer's autocast), its losses scaled."""
    for forward in forwards:
        losses, representation = forward()
        yield scale.scaled(losses), representation


def _all_finite(finite: Optional[torch.Tensor], part: torch.Tensor) -> torch.Tensor:
    """Per objective (row of ``part``): finite in every micro-batch so far."""
    part_finite = torch.isfinite(part).all(dim=1)
    return part_finite if finite is None else finite & part_finite


def check_finite(finite: torch.Tensor, names: Sequence[str], refuse: bool) -> bool:
    """Whether every objective's gradient is finite. With ``refuse`` (no ``GradScaler``, which would skip
    the step and lower its scale) a non-finite one raises, naming the objective(s)."""
    if refuse and not finite.all():
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
        raise FloatingPointError(
            f"Non-finite gradient of objective(s) {bad}: the step is refused so the adapter stays finite. "
            "Check the rewards' scale (NormalizedReward), lower the learning rate, or use 32-true precision."
        )
    return bool(finite.all())


def objective_weights(weighting: Callable[[torch.Tensor], torch.Tensor], gram: torch.Tensor) -> torch.Tensor:
    """``λ = weighting(Gram matrix)``, in fp32 and on the Gram matrix's device."""
    with full_precision(gram.device):
        return weighting(gram.detach()).to(gram)


def clipped(direction: torch.Tensor, max_norm: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``direction`` scaled to norm at most ``max_norm`` (None: as is), as ``clip_grad_norm_``; and its norm before."""
    with full_precision(direction.device):
        norm = direction.norm()
        if max_norm is not None:
            direction = direction * (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return direction, norm


def write_direction(params: Params, direction: torch.Tensor, scale: LossScale) -> None:
    """``d × scale`` into ``.grad`` (Lightning's precision plugin unscales it before the step)."""
    with full_precision(direction.device):
        write_grad(params, direction * scale.factor())


#: The metric names of ``weighting_effect``'s two values: after the optimiser, and before it (on ``d``).
WEIGHTING_EFFECT = ("train/weighting_effect", "train/weighting_effect_direction")


def weighting_effect(
    optimizer: torch.optim.Optimizer, params: Params, taken: torch.Tensor, preferred: torch.Tensor
) -> tuple[float, float]:
    """How much the weighting changes the step: ``(‖Δθ(d) − Δθ(d_p)‖ / ‖Δθ(d_p)‖, ‖d − d_p‖ / ‖d_p‖)``.

    ``taken`` is the direction ``d = Σ λ_s g_s`` the optimiser receives, ``preferred`` the same with the
    preference, ``d_p = Σ p_s g_s`` (both flat, unscaled, clipped alike). ``Δθ(·)``: the step ``optimizer``
    (the raw torch optimiser) takes with that gradient from its current state, simulated and undone
    (``_simulated_step``), so the measure sees what the optimiser makes of λ: Adam's first step from a fresh
    state is nearly ``lr·sign(d)``, so a λ that keeps every coordinate's sign scores 0 after it. Equal
    directions score 0 without a simulation; a zero ``d_p`` gives inf (NaN if ``d`` is zero too).
    """
    with full_precision(taken.device):
        before = _relative_change(taken, preferred)
        if before == 0.0:
            return 0.0, 0.0
        step_p = _simulated_step(optimizer, params, preferred)
        after = _relative_change(_simulated_step(optimizer, params, taken), step_p)
    return after, before


def _relative_change(new: torch.Tensor, reference: torch.Tensor) -> float:
    change, size = float((new - reference).norm()), float(reference.norm())
    return 0.0 if change == 0.0 else change / size if size > 0 else math.inf


def _simulated_step(optimizer: torch.optim.Optimizer, params: Params, gradient: torch.Tensor) -> torch.Tensor:
    """``Δθ`` of one ``optimizer.step()`` with ``gradient`` in ``.grad``; parameters, optimiser state and
    param groups are restored exactly afterwards (for any torch optimiser: its state is tensors and values)."""
    start = [p.detach().clone() for p in params]
    state = {p: {k: _copied(v) for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [{k: _copied(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    write_grad(params, gradient.clone())  # an optimiser may change .grad in place (maximize, weight decay)
    _algorithm_step(optimizer)
    step = torch.cat([_widened(p.detach()).sub(_widened(s)).flatten() for p, s in zip(params, start)])
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    for p in [p for p in optimizer.state if p not in state]:  # state the step created (a fresh optimiser)
        del optimizer.state[p]
    optimizer.state.update(state)
    for group, saved in zip(optimizer.param_groups, groups):
        group.update(saved)
    return step


def _algorithm_step(optimizer: torch.optim.Optimizer) -> None:
    """The update rule alone: the ``step`` of the torch class the optimiser is built on, not a subclass's
    override nor the step hooks (which may record, count or schedule steps: a simulated step is not taken)."""
    for cls in type(optimizer).__mro__:
        if cls.__module__.startswith("torch.optim.") and cls is not torch.optim.Optimizer and "step" in vars(cls):
            cls.step(optimizer)
            return
    optimizer.step()  # an optimiser outside torch.optim: its own step


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 / fp16 weights), fp64 kept: a step's change may be far below the weights' rounding."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _copied(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def write_non_finite(params: Params, device: torch.device) -> None:
    """NaN into ``.grad``: under ``16-mixed`` the scaler sees it, skips the step and lowers its scale."""
    write_grad(params, torch.full((flat_size(params),), float("nan"), device=device))


class GramSource(abc.ABC):
    """The Gram matrix of the ``S`` objectives' gradients, accumulated over micro-batches, and the
    direction ``d = Σ λ_s g_s`` that follows from λ. ``finite``: (S,) whether each objective's
    gradient is finite; None while nothing was accumulated (a DDP rank without rows)."""

    finite: Optional[torch.Tensor]

    @classmethod
    @abc.abstractmethod
    def accumulate(cls, forwards: Sequence[Forward], params: Params, scale: LossScale) -> "GramSource":
        """Run the micro-batches' forward and backward passes."""

    @abc.abstractmethod
    def summed_over_ranks(self, num_objectives: int) -> "GramSource":
        """The whole batch's: every rank's share summed (a rank without rows adds zeros)."""

    @abc.abstractmethod
    def gram(self) -> torch.Tensor:
        """The (S, S) Gram matrix."""

    @abc.abstractmethod
    def direction(self, lambdas: torch.Tensor, forwards: Sequence[Forward], distributed: bool) -> torch.Tensor:
        """``d = Σ λ_s g_s`` over ``params``, flat and unscaled; ``distributed``: summed over the ranks."""


@dataclass
class ExactGradients(GramSource):
    """``gram_from: parameters``: the ``S`` per-objective gradients over the adapter weights.

    Each micro-batch's ``S`` gradients are added into ``S`` accumulators; its graph is freed by its
    last backward pass, before the next micro-batch's forward.
    """

    params: Params
    grads: Optional[torch.Tensor] = None  # (S, P), summed over the micro-batches (and ranks)
    finite: Optional[torch.Tensor] = None

    @classmethod
    def accumulate(cls, forwards, params, scale) -> "ExactGradients":
        grads = finite = None
        for losses, _ in _scaled_forwards(forwards, scale):
            last = len(losses) - 1
            with full_precision(params[0].device):
                part = torch.stack(
                    [flat_grad(loss, params, retain_graph=s < last) for s, loss in enumerate(losses)]
                ).float() / scale.factor()
                grads = part if grads is None else grads.add_(part)
            finite = _all_finite(finite, part)
        return cls(params, grads, finite)

    def summed_over_ranks(self, num_objectives: int) -> "ExactGradients":
        grads = self.grads
        if grads is None:
            grads = torch.zeros(num_objectives, flat_size(self.params), device=self.params[0].device)
        grads = all_reduce_sum(grads)
        return ExactGradients(self.params, grads, torch.isfinite(grads).all(dim=1))

    def gram(self) -> torch.Tensor:
        with full_precision(self.grads.device):
            return self.grads @ self.grads.T

    def direction(self, lambdas, forwards, distributed) -> torch.Tensor:
        with full_precision(self.grads.device):
            return lambdas @ self.grads  # the gradients are already the whole batch's (summed over ranks)


@dataclass
class RepresentationGradients(GramSource):
    """``gram_from: hidden`` / ``logits``: the Gram matrix of the gradients with respect to a representation.

    The micro-batches' Gram matrices add up; once λ is known, each micro-batch runs its forward again
    for its share of ``∇ Σ λ_s L_s``. One micro-batch keeps its graph (``kept``: its scaled losses)
    for that backward pass instead.
    """

    params: Params
    scale: LossScale
    gram_matrix: Optional[torch.Tensor] = None  # (S, S)
    finite: Optional[torch.Tensor] = None
    kept: Optional[torch.Tensor] = None

    @classmethod
    def accumulate(cls, forwards, params, scale) -> "RepresentationGradients":
        keep_graph = len(forwards) == 1  # one batch: its graph also serves the direction's backward pass
        gram = finite = kept = None
        for losses, representation in _scaled_forwards(forwards, scale):
            last = len(losses) - 1
            with full_precision(params[0].device):
                part = torch.stack([
                    torch.autograd.grad(loss, representation, retain_graph=keep_graph or s < last)[0].flatten()
                    for s, loss in enumerate(losses)
                ]).float() / scale.factor()  # (S, R)
                gram = part @ part.T if gram is None else gram + part @ part.T
                kept = losses if keep_graph else None
            finite = _all_finite(finite, part)
        return cls(params, scale, gram, finite, kept)

    def summed_over_ranks(self, num_objectives: int) -> "RepresentationGradients":
        gram = self.gram_matrix
        if gram is None:
            gram = torch.zeros(num_objectives, num_objectives, device=self.params[0].device)
        gram = all_reduce_sum(gram)
        finite = torch.isfinite(gram.diagonal())  # ‖g_s‖² is non-finite on every rank if anywhere
        return RepresentationGradients(self.params, self.scale, gram, finite, self.kept)

    def gram(self) -> torch.Tensor:
        return self.gram_matrix

    def direction(self, lambdas, forwards, distributed) -> torch.Tensor:
        if self.kept is not None:
            direction = self._combined_gradient(lambdas, self.kept)
        else:
            direction = None
            for losses, _ in _scaled_forwards(forwards, self.scale):  # again, now that λ is known
                part = self._combined_gradient(lambdas, losses)
                direction = part if direction is None else direction.add_(part)
        if distributed:
            if direction is None:
                direction = torch.zeros(flat_size(self.params), device=self.params[0].device)
            direction = all_reduce_sum(direction)
        return direction

    def _combined_gradient(self, lambdas: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """One backward pass of ``Σ λ_s L_s`` over ``params`` (its graph freed), unscaled."""
        with full_precision(lambdas.device):
            return flat_grad((lambdas * losses).sum(), self.params, retain_graph=False).float() / self.scale.factor()


GRAM_SOURCES: dict[str, type[GramSource]] = {
    "parameters": ExactGradients,
    "hidden": RepresentationGradients,
    "logits": RepresentationGradients,
}

"""Server-side aggregation of client uploads.

``FedAvg`` averages one adapter per client (FIRM and its single-adapter baselines);
``MinNormOverObjectives`` is FMGDA's server: it averages the per-objective deltas over the
clients, solves min-norm over the ``S`` averaged deltas and steps along their combination.
``CoordinateMedian`` and ``TrimmedMean`` replace FedAvg's mean by a robust statistic per
coordinate, so one client sending a huge update cannot drag the global adapter away.

``screen_update`` is the server's check of every upload before any of them is aggregated.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from firm_lightning.adapters import AdapterState, ClientUpdate, check_adapter_state
from firm_lightning.weighting import RegularizedMinNorm, Weighting


@dataclass
class AggregationResult:
    """What one round's aggregation returns to the round engine.

    Attributes:
        adapter: The new global adapter: the global adapter's keys, shapes and dtypes, in new tensors.
        client_adapters: One adapter per merged update, in the order of the updates: the ``θ_i`` the
            aggregator took each client to contribute (for FMGDA, its per-objective adapters combined by the
            server's λ). The update-dispersion metrics are computed from them.
        server_lambdas: The weights the server chose over the objectives, one per objective (FMGDA), else
            None; recorded as ``server_lambda/<objective>``.
        extra: The aggregator's own diagnostics (e.g. the noise of differential privacy); not recorded.
    """

    adapter: AdapterState
    client_adapters: list[AdapterState]
    server_lambdas: Optional[list[float]] = None
    extra: dict = field(default_factory=dict)


class Aggregator(abc.ABC):
    """The server's rule for merging a round's client uploads into the next global adapter.

    An algorithm names its aggregator (``Algorithm.aggregator``); the round engine builds it once per
    run, may put a robust rule (``federation.aggregator``) in place of FedAvg and differential privacy
    around it, and calls ``aggregate`` once per round, on every transport.

    Args:
        server_lr: The server step ``η_g`` applied to the merged update (``θ ← θ + η_g Δ``); 1.0 takes it whole.
    """

    def __init__(self, server_lr: float = 1.0) -> None:
        if server_lr < 0:
            raise ValueError(f"server_lr must be >= 0 (got {server_lr}); 1.0 is plain FedAvg.")
        self.server_lr = server_lr

    @abc.abstractmethod
    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Merge ``updates`` into the global adapter that follows ``global_state``.

        Receives: ``global_state``, the global adapter the clients started the round from; ``updates``,
        at least one, sorted by client id, each already screened (``screen_update``: keys, shapes,
        dtypes, finite values, norm bound) and holding full adapters ``θ_i`` in the global adapter's
        dtypes (16-bit deltas are applied before). Under SecAgg+ it is one update, the clients' mean.
        ``num_examples`` weighs a client, as the rule sees fit.

        Returns an ``AggregationResult``. Must not change ``global_state`` or the updates in
        place, and must be a function of its arguments and its settings (any randomness from a
        generator whose state the engine checkpoints), so a resumed run continues exactly.
        Raises ValueError for uploads it cannot merge (e.g. FedAvg given several adapters per client).
        """

    def _step(self, global_state: AdapterState, delta: AdapterState) -> AdapterState:
        return {k: (v.float() + self.server_lr * delta[k]).to(v.dtype) for k, v in global_state.items()}


class FedAvg(Aggregator):
    """``θ ← θ + η_g Σ_i w_i (θ_i − θ)`` with ``w_i ∝ n_i``; ``server_lr = 1`` is plain FedAvg."""

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        states = [_single_adapter(u) for u in _checked(global_state, updates)]
        delta = weighted_delta(global_state, states, [u.num_examples for u in updates])
        return AggregationResult(self._step(global_state, delta), states)


class CoordinateMedian(Aggregator):
    """``θ ← θ + η_g · median_i(θ_i − θ)`` per coordinate (mean of the two middle values for an
    even count). Unweighted: an example count is as easy to fake as an update. Resists any
    minority (< half) of arbitrary updates, at some cost in efficiency on honest ones."""

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        states = [_single_adapter(u) for u in _checked(global_state, updates)]
        delta = {}
        for k, v in global_state.items():
            ordered = _stacked_deltas(states, k, v).sort(dim=0).values
            n = len(states)
            delta[k] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        return AggregationResult(self._step(global_state, delta), states)


class TrimmedMean(Aggregator):
    """Per coordinate, drop the ``⌊trim_fraction · n⌋`` largest and smallest client deltas and
    average the rest (unweighted). ``trim_fraction = 0`` is the unweighted mean; it resists up to
    ``⌊trim_fraction · n⌋`` arbitrary updates."""

    def __init__(self, server_lr: float = 1.0, trim_fraction: float = 0.1) -> None:
        super().__init__(server_lr)
        if not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5) (the share cut from each end); got {trim_fraction}.")
        self.trim_fraction = trim_fraction

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        states = [_single_adapter(u) for u in _checked(global_state, updates)]
        cut = math.floor(self.trim_fraction * len(states))
        delta = {}
        for k, v in global_state.items():
            ordered = _stacked_deltas(states, k, v).sort(dim=0).values
            delta[k] = ordered[cut : len(states) - cut].mean(dim=0)
        return AggregationResult(self._step(global_state, delta), states)


ROBUST_RULES = ("fedavg", "median", "trimmed_mean")


def with_rule(default: Aggregator, rule: str, server_lr: float, trim_fraction: float = 0.1) -> Aggregator:
    """``default`` (an algorithm's own aggregator), or the robust ``rule`` in place of its FedAvg."""
    if rule == "fedavg":
        return default
    if rule not in ROBUST_RULES:
        raise ValueError(f"federation.aggregator={rule!r} is unknown; use one of {ROBUST_RULES}.")
    if type(default) is not FedAvg:
        raise ValueError(
            f"federation.aggregator={rule!r} replaces FedAvg, but this algorithm aggregates with "
            f"{type(default).__name__}; use a single-adapter algorithm (FIRM, LocalMGDA, Linear) or "
            "aggregator 'fedavg'."
        )
    return CoordinateMedian(server_lr) if rule == "median" else TrimmedMean(server_lr, trim_fraction)


class MinNormOverObjectives(Aggregator):
    """FMGDA's server step: ``Δ_s = Σ_i w_i (θ_{i,s} − θ)``, ``λ`` = min-norm of the ``Δ_s``,
    ``θ ← θ + η_g Σ_s λ_s Δ_s``."""

    def __init__(self, server_lr: float = 1.0, weighting: Optional[Weighting] = None) -> None:
        super().__init__(server_lr)
        self.weighting = weighting or RegularizedMinNorm(beta=0.0)

    def aggregate(self, global_state: AdapterState, updates: Sequence[ClientUpdate]) -> AggregationResult:
        updates = _checked(global_state, updates)
        num_objectives = len(updates[0].adapters)
        if any(len(u.adapters) != num_objectives for u in updates):
            raise ValueError("FMGDA needs the same number of per-objective adapters from every client.")
        n = [u.num_examples for u in updates]
        deltas = [weighted_delta(global_state, [u.adapters[s] for u in updates], n) for s in range(num_objectives)]
        flat = torch.stack([_flatten(d) for d in deltas]).double()
        lambdas = self.weighting(flat @ flat.T).tolist()
        combined = {k: sum(lam * d[k] for lam, d in zip(lambdas, deltas)) for k in global_state}
        clients = [
            {k: v.float() + sum(lam * (u.adapters[s][k].float() - v.float()) for s, lam in enumerate(lambdas))
             for k, v in global_state.items()}
            for u in updates
        ]
        return AggregationResult(self._step(global_state, combined), clients, server_lambdas=lambdas)


def weighted_delta(
    global_state: AdapterState, states: Sequence[AdapterState], num_examples: Sequence[int]
) -> AdapterState:
    """``Σ_i w_i (θ_i − θ)`` in float32, ``w_i ∝ n_i``."""
    weights = example_weights(num_examples)
    return {
        k: sum(w * (s[k].float() - v.float()) for w, s in zip(weights, states)) for k, v in global_state.items()
    }


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """Aggregation weights proportional to the clients' example counts."""
    total = sum(num_examples)
    if total <= 0 or any(n < 0 for n in num_examples):
        raise ValueError(f"Client example counts must be >= 0 with a positive total; got {list(num_examples)}.")
    return [n / total for n in num_examples]


def screen_update(
    update: ClientUpdate,
    global_state: AdapterState,
    max_update_norm: Optional[float] = None,
    upload_dtype: Optional[torch.dtype] = None,
) -> Optional[str]:
    """Why ``update`` (as uploaded) must not be merged (keys, shapes, dtypes, non-finite values, norm), or None.

    A full adapter must have the global adapter's dtypes; a delta upload must be in
    ``upload_dtype`` (``federation.upload_dtype``). The norm bound applies to each uploaded
    adapter's update ``‖θ_i − θ‖₂``.
    """
    if not update.adapters:
        return "it uploaded no adapter"
    if update.delta and upload_dtype is None:
        return "it uploaded a 16-bit delta, but this federation has no federation.upload_dtype"
    for state in update.adapters:
        missing, extra = sorted(set(global_state) - set(state)), sorted(set(state) - set(global_state))
        if missing or extra:
            return f"its keys differ from the global adapter (missing {missing[:2]}, unexpected {extra[:2]})"
        for name, ref in global_state.items():
            tensor = state[name]
            if not isinstance(tensor, torch.Tensor):
                return f"{name!r} is a {type(tensor).__name__}, not a tensor"
            if tensor.shape != ref.shape:
                return f"{name!r} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
            expected = upload_dtype if update.delta else ref.dtype
            if tensor.dtype != expected:
                return f"{name!r} has dtype {tensor.dtype}, expected {expected}"
            if not torch.isfinite(tensor).all():
                return f"{name!r} holds NaN or inf"
        if max_update_norm is not None:
            delta = [state[k].float() - (0 if update.delta else v.float()) for k, v in global_state.items()]
            norm = float(torch.cat([d.flatten() for d in delta]).norm())
            if norm > max_update_norm:
                return f"its update norm {norm:.4g} exceeds federation.max_update_norm={max_update_norm:g}"
    return None


def _stacked_deltas(states: Sequence[AdapterState], key: str, reference: torch.Tensor) -> torch.Tensor:
    return torch.stack([s[key].float() - reference.float() for s in states])


def _flatten(state: AdapterState) -> torch.Tensor:
    return torch.cat([t.flatten() for t in state.values()])


def _single_adapter(update: ClientUpdate) -> AdapterState:
    if len(update.adapters) != 1:
        raise ValueError(
            f"Client {update.client_id} uploaded {len(update.adapters)} adapters; FedAvg expects one. "
            "Use MinNormOverObjectives (FMGDA) for per-objective uploads."
        )
    return update.adapters[0]


def _checked(global_state: AdapterState, updates: Sequence[ClientUpdate]) -> Sequence[ClientUpdate]:
    if not updates:
        raise ValueError("No client updates to aggregate: every sampled client failed or none was sampled.")
    for u in updates:
        for state in u.adapters:
            check_adapter_state(state, global_state, f"Update from client {u.client_id}")
    return updates

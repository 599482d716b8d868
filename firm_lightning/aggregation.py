"""Server-side aggregation of client adapters (FedAvg with a server learning rate)."""

from __future__ import annotations

from typing import Sequence

import torch

AdapterState = dict[str, torch.Tensor]


class FedAvg:
    """``θ ← θ + η_g Σ_i w_i (θ_i − θ)`` with ``w_i ∝ n_i``; ``server_lr = 1`` is plain FedAvg."""

    def __init__(self, server_lr: float = 1.0) -> None:
        if server_lr < 0:
            raise ValueError(f"server_lr must be >= 0 (got {server_lr}); 1.0 is plain FedAvg.")
        self.server_lr = server_lr

    def aggregate(
        self, global_state: AdapterState, client_states: Sequence[AdapterState], num_examples: Sequence[int]
    ) -> AdapterState:
        if not client_states:
            raise ValueError("No client updates to aggregate: every sampled client failed or none was sampled.")
        for i, state in enumerate(client_states):
            check_update(state, global_state, i)
        weights = example_weights(num_examples)
        new_state = {}
        for name, theta in global_state.items():
            delta = sum(w * (state[name].float() - theta.float()) for w, state in zip(weights, client_states))
            new_state[name] = (theta.float() + self.server_lr * delta).to(theta.dtype)
        return new_state


def example_weights(num_examples: Sequence[int]) -> list[float]:
    """Aggregation weights proportional to the clients' example counts."""
    total = sum(num_examples)
    if total <= 0 or any(n < 0 for n in num_examples):
        raise ValueError(f"Client example counts must be >= 0 with a positive total; got {list(num_examples)}.")
    return [n / total for n in num_examples]


def check_update(state: AdapterState, global_state: AdapterState, index: int) -> None:
    """Refuse a malformed client update (wrong keys, shapes, non-finite values) before it mixes in."""
    missing, extra = sorted(set(global_state) - set(state)), sorted(set(state) - set(global_state))
    if missing or extra:
        raise ValueError(
            f"Client update {index} does not match the global adapter: missing {missing[:3]}, unexpected {extra[:3]}."
        )
    for name, tensor in state.items():
        if tensor.shape != global_state[name].shape:
            raise ValueError(
                f"Client update {index}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(global_state[name].shape)}."
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Client update {index}: tensor {name!r} contains NaN or inf; the update is refused.")

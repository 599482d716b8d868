"""Round-level federation metrics: disagreement between clients and communication volume."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch


def payload_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors actually sent: Σ numel × element size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def flat_delta(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[k].float() - reference[k].float()).flatten() for k in reference])


def update_dispersion(client_states: Sequence[Mapping], global_state: Mapping) -> float:
    """Client drift: ``mean_i ‖Δ_i − Δ̄‖² / ‖Δ̄‖²`` with ``Δ_i = θ_i − θ^t`` and ``Δ̄`` their mean."""
    deltas = torch.stack([flat_delta(s, global_state) for s in client_states])
    mean = deltas.mean(dim=0)
    spread = (deltas - mean).pow(2).sum(dim=1).mean()
    return float(spread / mean.pow(2).sum().clamp(min=1e-30))


def lambda_dispersion(client_lambdas: Sequence[Sequence[float]]) -> float:
    """``mean_i ‖λ̄_i − mean_j λ̄_j‖²`` over the clients' mean weights."""
    lambdas = torch.tensor(client_lambdas, dtype=torch.float64)
    return float((lambdas - lambdas.mean(dim=0)).pow(2).sum(dim=1).mean())

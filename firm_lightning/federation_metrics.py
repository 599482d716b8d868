"""Round-level federation metrics: disagreement between clients and communication volume."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch


def payload_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors actually sent: Σ numel × element size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def flat_delta(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[k].float() - reference[k].float()).flatten() for k in reference])


def update_dispersion(
    client_states: Sequence[Mapping], global_state: Mapping, weights: Optional[Sequence[float]] = None
) -> float:
    """Client drift: ``Σ_i w_i ‖Δ_i − Δ̄‖² / ‖Δ̄‖²`` with ``Δ_i = θ_i − θ^t`` and ``Δ̄ = Σ_i w_i Δ_i``.

    ``weights`` (e.g. the example counts ``n_i``, as FedAvg weighs the clients) are normalised to
    sum to 1; None weighs the clients equally.
    """
    deltas = torch.stack([flat_delta(s, global_state) for s in client_states])
    w = torch.ones(len(deltas)) if weights is None else torch.as_tensor(weights, dtype=deltas.dtype)
    w = (w / w.sum()).to(deltas.dtype)
    mean = w @ deltas
    spread = w @ (deltas - mean).pow(2).sum(dim=1)
    return float(spread / mean.pow(2).sum().clamp(min=1e-30))


def lambda_dispersion(client_lambdas: Sequence[Sequence[float]]) -> float:
    """``mean_i ‖λ̄_i − mean_j λ̄_j‖²`` over the clients' mean weights."""
    lambdas = torch.tensor(client_lambdas, dtype=torch.float64)
    return float((lambdas - lambdas.mean(dim=0)).pow(2).sum(dim=1).mean())

"""Federation metrics: disagreement between clients, communication volume, and the metric rows
a round writes (``metrics.csv``, ``client_metrics.csv``), the same on every transport."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from firm_lightning.adapters import ClientUpdate
from firm_lightning.aggregation import AggregationResult
from firm_lightning.gradients import WEIGHTING_EFFECT


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


# ---------------------------------------------------------------- metric rows (metrics.csv, client_metrics.csv)


def client_row(update: ClientUpdate, round_idx: int, global_adapter: Mapping[str, torch.Tensor]) -> dict:
    """One client's row: its example count, the bytes it received and sent, its training summary.

    ``comm/bytes_*`` count the adapter tensors (numel × element size, as uploaded);
    ``comm/transport_bytes_*`` what the transport carried for them: the same tensors in-process,
    Flower's serialised messages (framing included) on Flower, which overrides them.
    """
    up, down = sum(payload_bytes(a) for a in update.adapters), payload_bytes(global_adapter)
    return {
        "round": round_idx,
        "client": update.client_id,
        "num_examples": update.num_examples,
        "comm/bytes_up": up,
        "comm/bytes_down": down,
        "comm/transport_bytes_up": up,
        "comm/transport_bytes_down": down,
        "comm/messages_up": 1,
        **update.metrics,
    }


def round_metrics(
    updates: Sequence[ClientUpdate], result: AggregationResult, global_adapter: Mapping[str, torch.Tensor],
    client_rows: Sequence[dict], objective_names: Sequence[str], uploads_visible: bool = True,
) -> dict:
    """A round's disagreement, communication and training summary over its merged ``updates``."""
    lambdas = [[u.metrics[f"lambda/{n}"] for n in objective_names] for u in updates]
    if uploads_visible:
        dispersion = update_dispersion(result.client_adapters, global_adapter)
        weighted = update_dispersion(result.client_adapters, global_adapter, [u.num_examples for u in updates])
    else:  # SecAgg+: no single client's update is ever seen
        dispersion = weighted = math.nan
    metrics = {
        "lambda_dispersion": lambda_dispersion(lambdas),
        "update_dispersion": dispersion,
        "update_dispersion_weighted": weighted,
        "comm/bytes_up": sum(r["comm/bytes_up"] for r in client_rows),
        "comm/bytes_down": sum(r["comm/bytes_down"] for r in client_rows),
        "comm/bytes_up_per_client": client_rows[0]["comm/bytes_up"],
        "comm/transport_bytes_up": sum(r["comm/transport_bytes_up"] for r in client_rows),
        "comm/transport_bytes_down": sum(r["comm/transport_bytes_down"] for r in client_rows),
        "clients": len(updates),
    }
    for key in [f"train/reward/{n}" for n in objective_names] + [f"lambda/{n}" for n in objective_names] + ["train/kl"]:
        metrics[key] = float(np.mean([u.metrics[key] for u in updates]))
    for key in WEIGHTING_EFFECT:  # NaN where a client did not measure it (FMGDA, gram_from hidden / logits)
        metrics[key] = float(np.mean([u.metrics.get(key, math.nan) for u in updates]))
    if result.server_lambdas is not None:
        metrics.update({f"server_lambda/{n}": lam for n, lam in zip(objective_names, result.server_lambdas)})
    return metrics


def client_evaluation(eval_metrics: Mapping[str, float], shares: Sequence[Mapping[str, float]],
                      objective_names: Sequence[str]) -> dict[str, float]:
    """The global adapter's eval reward on each client's own prompt distribution: mean and worst client.

    A client's reward is the mean of the held-out per-group rewards (``eval/group/<g>/<objective>``)
    weighted by ``shares`` (per client, its share of training prompts in each group); no extra
    generation. ``eval/worst_client/mean`` is the lowest client reward averaged over the objectives.
    """
    if not shares:
        return {}
    present = {k.split("/")[2] for k in eval_metrics if k.startswith("eval/group/")}
    per_client = []
    for share in shares:
        weights = {g: w for g, w in share.items() if g in present}
        total = sum(weights.values())
        if total == 0:  # none of this client's groups is in the eval set
            continue
        per_client.append([
            sum(w * eval_metrics[f"eval/group/{g}/{n}"] for g, w in weights.items()) / total for n in objective_names
        ])
    if not per_client:
        return {}
    rewards = np.array(per_client)
    out = {f"eval/client_mean/{n}": float(rewards[:, s].mean()) for s, n in enumerate(objective_names)}
    out.update({f"eval/worst_client/{n}": float(rewards[:, s].min()) for s, n in enumerate(objective_names)})
    out["eval/worst_client/mean"] = float(rewards.mean(axis=1).min())
    return out

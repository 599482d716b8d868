"""Adapter state dicts and what a client uploads, shared by clients and server (torch only).

An upload carries the client's adapter ``θ_i`` as trained, or, with a 16-bit
``federation.upload_dtype``, its update ``Δ_i = θ_i − θ^t`` in that dtype: rounding then scales
with the update, not with the weights (casting ``θ_i`` itself rounded away most of a small
update and moved the global adapter even for a client that did not train). The server rebuilds
``θ^t + Δ_i`` in the global adapter's precision before anything else sees the update.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

AdapterState = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """What a client uploads after a round, plus its local training summary (for logs only)."""

    client_id: int
    adapters: list[AdapterState]  # one adapter (FIRM), or one per objective (FMGDA)
    num_examples: int
    metrics: dict[str, float]
    delta: bool = False  # the tensors are Δ_i = θ_i − θ^t (16-bit uploads), not θ_i

    def for_upload(self, global_adapter: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> "ClientUpdate":
        """The upload: ``θ_i`` as trained, or ``Δ_i`` in ``dtype`` (e.g. bf16: half the bytes)."""
        if dtype is None or self.delta:
            return self
        adapters = [{k: (a[k].float() - v.float()).to(dtype) for k, v in global_adapter.items()} for a in self.adapters]
        return dataclasses.replace(self, adapters=adapters, delta=True)

    def applied_to(self, global_adapter: Mapping[str, torch.Tensor]) -> "ClientUpdate":
        """The adapters ``θ^t + Δ_i`` in the global adapter's dtypes (the server's view of a delta upload)."""
        if not self.delta:
            return self
        adapters = [
            {k: (v.float() + a[k].float()).to(v.dtype) for k, v in global_adapter.items()} for a in self.adapters
        ]
        return dataclasses.replace(self, adapters=adapters, delta=False)


def check_adapter_state(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state whose keys or shapes differ from ``reference`` or that holds NaN/inf.

    ``source`` names where the state came from ("update from client 3", "adapter file ...").
    """
    missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
    if missing or extra:
        raise ValueError(
            f"{source} does not match the LoRA adapter: missing {missing[:3]}, unexpected {extra[:3]}. "
            "Was it produced with the same policy and lora settings?"
        )
    for name, tensor in state.items():
        if tensor.shape != reference[name].shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{tuple(reference[name].shape)}; check lora.r and lora.target_modules."
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: tensor {name!r} contains NaN or inf; refused.")

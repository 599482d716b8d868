"""Checks on adapter state dicts, shared by the client (loading) and the server (aggregating)."""

from __future__ import annotations

from typing import Mapping

import torch


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

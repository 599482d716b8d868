"""Atomic, pickle-free checkpoints of a federation's state.

A checkpoint is two files in ``<output_dir>/checkpoint/``:

* ``state_<round>.safetensors`` holds every tensor of the state (global adapter, RNG states,
  and any dict of tensors a field holds, e.g. per-client optimiser state), flattened to keys
  such as ``global_adapter/<name>`` or ``client_optim/3/exp_avg/0``;
* ``state.json`` holds everything else (round index, metric history, reward statistics, the
  config fingerprint), with each tensor replaced by ``{"__tensor__": key}``, plus the name and
  SHA-256 of the tensor file it belongs to.

Each file is written to a temporary name, flushed, fsynced and renamed over the old one, and
the tensor file is written before the JSON that points to it: a crash (or a full disk) at any
moment leaves the previous checkpoint complete and loadable. Nothing is unpickled on load.

The state before it stays beside the latest: ``previous.json`` (the former ``state.json``) and its
tensor file, removed only when a newer state has been written and read back intact. A latest state
damaged later (a disk error, a truncated copy) is then not the end of a run: ``load_state(...,
which="previous")`` reads the one before it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os  # noqa: F401  (callers patch checkpoint.os.fsync to simulate a crash while atomic_write writes)
from pathlib import Path
from typing import Any, Literal, Optional, Type, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from firm_lightning.run_folder import atomic_write

FORMAT_VERSION = 1
# What ``describe`` records. 1 (no version saved): callable attributes left out, so an objective wrapped in
# another (NormalizedReward's reward) went undescribed. 2: callable objects described like any other,
# functions by their qualified name. 3: sampling.share_prompt and sampling.per_prompt_seeds recorded (a run
# saved before them resumes with the behaviour it had, module.EARLIER_BEHAVIOUR).
FINGERPRINT_VERSION = 3
STATE_JSON = "state.json"
PREVIOUS_JSON = "previous.json"
WHICH = {"latest": STATE_JSON, "previous": PREVIOUS_JSON}
T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not fit the current run."""


# ---------------------------------------------------------------- encoding


def encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-able form of ``value``; its tensors go into ``tensors`` under keys derived from ``path``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: encode(v, tensors, f"{path}/{k}") for k, v in value.items()}
        # Non-string keys (client ids, optimiser parameter ids) keep their type as pairs.
        return {"__items__": [[k, encode(v, tensors, f"{path}/{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__module__ == "numpy" and hasattr(value, "item"):  # numpy scalars in metric rows
        return value.item()
    raise TypeError(
        f"Cannot checkpoint {path!r} of type {type(value).__name__}: use tensors, numbers, strings, lists or dicts."
    )


def decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: decode(v, tensors) for k, v in value["__items__"]}
        return {k: decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    return value


# ---------------------------------------------------------------- files

# atomic_write (from run_folder, which every writer of a run folder uses) writes each file.


def save_state(directory: Path, state: Any, extra: dict[str, Any]) -> Path:
    """Save a dataclass ``state`` (every field) and ``extra`` (JSON-able) atomically into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    fields = {f.name: encode(getattr(state, f.name), tensors, f.name) for f in dataclasses.fields(state)}
    blob = save_safetensors(tensors) if tensors else save_safetensors({"__empty__": torch.zeros(0)})
    digest = hashlib.sha256(blob).hexdigest()
    # Named by content: rewriting a round never overwrites the file the current JSON points to.
    tensor_file = f"state_{getattr(state, 'round', 0):05d}_{digest[:12]}.safetensors"
    atomic_write(directory / tensor_file, blob)
    meta = {
        "format_version": FORMAT_VERSION,
        "tensor_file": tensor_file,
        "tensor_sha256": digest,
        "fields": fields,
        **extra,
    }
    latest = directory / STATE_JSON
    if latest.is_file():
        atomic_write(directory / PREVIOUS_JSON, latest.read_bytes())
    atomic_write(latest, json.dumps(meta, indent=1).encode())
    _read_meta(directory, STATE_JSON)  # read back: the older states go only once the new one is intact
    keep = {tensor_file, *_tensor_files(directory, PREVIOUS_JSON)}
    for old in directory.glob("state_*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return latest


def promote_previous(directory: Path) -> None:
    """Make the previous state the latest (resuming from it when the latest is damaged)."""
    atomic_write(directory / STATE_JSON, (directory / PREVIOUS_JSON).read_bytes())


def previous_round(directory: Path) -> Optional[int]:
    """The round of the intact state kept before the latest, or None when there is none or it is damaged."""
    if not (directory / PREVIOUS_JSON).is_file():
        return None
    try:
        meta, _ = _read_meta(directory, PREVIOUS_JSON)
    except CheckpointError:
        return None
    return meta["fields"].get("round")


def _tensor_files(directory: Path, name: str) -> list[str]:
    try:
        return [json.loads((directory / name).read_text())["tensor_file"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def exists(directory: Path) -> bool:
    return (directory / STATE_JSON).is_file()


def load_state(
    directory: Path, state_type: Type[T], which: Literal["latest", "previous"] = "latest"
) -> tuple[T, dict[str, Any]]:
    """The state saved by :func:`save_state` (``which``: the latest, or the one kept before it) and its
    ``extra`` entries; refuses damaged files."""
    meta, blob = _read_meta(directory, WHICH[which])
    try:
        tensors = load_safetensors(blob)
    except SafetensorError as error:
        raise CheckpointError(
            f"{directory / meta['tensor_file']} is not a valid safetensors file ({error})."
        ) from error
    names = {f.name for f in dataclasses.fields(state_type)}
    fields = {k: decode(v, tensors) for k, v in meta.pop("fields").items() if k in names}
    return state_type(**fields), meta


def _read_meta(directory: Path, name: str) -> tuple[dict, bytes]:
    """A state's JSON and its tensor file's bytes, checked against the recorded checksum."""
    meta_path = directory / name
    try:
        meta = json.loads(meta_path.read_text())
        blob = (directory / meta["tensor_file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"Cannot read the federation checkpoint in {directory}: {error}.") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path} has format version {meta.get('format_version')}; this version reads {FORMAT_VERSION}."
        )
    if hashlib.sha256(blob).hexdigest() != meta["tensor_sha256"]:
        raise CheckpointError(
            f"{directory / meta['tensor_file']} does not match its checksum in {meta_path}: the file is damaged."
        )
    return meta, blob


# ---------------------------------------------------------------- random number generators


def capture_rng() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, Python) as tensors and numbers."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    if not state:
        return
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- config fingerprints


def describe(obj: Any, depth: int = 4) -> Any:
    """A JSON-able description of a setting: its class and public attributes, recursively.

    Attributes an object reports in ``state_dict()`` are state that evolves during training
    (e.g. ``NormalizedReward``'s running statistics), not configuration, and are left out; an object
    names what it was configured with in public attributes of its own (``NormalizedReward``'s
    ``configured_statistics``). Objects that are callable (a wrapped reward) are described like any
    other; functions, methods and classes by their qualified name.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth) for v in obj]
    if isinstance(obj, (set, frozenset)):
        described = [describe(v, depth) for v in obj]
        try:
            return sorted(described)
        except TypeError:  # unorderable descriptions (dicts): ordered by their JSON text
            return sorted(described, key=json.dumps)
    if isinstance(obj, dict):
        return {str(k): describe(v, depth) for k, v in obj.items()}
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return {"shape": list(obj.shape), "dtype": str(obj.dtype)}
    if inspect.isroutine(obj) or isinstance(obj, type):
        return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
    cls = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if depth <= 0 or not hasattr(obj, "__dict__"):
        return cls
    state_dict = getattr(obj, "state_dict", None)
    evolving = set(state_dict()) if callable(state_dict) and not isinstance(obj, torch.nn.Module) else set()
    attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k not in evolving}
    return {"class": cls, **{k: _attribute(v, depth - 1) for k, v in attrs.items()}}


def _attribute(value: Any, depth: int) -> Any:
    """An attribute's description; a network a setting holds by its class only (its weights are state)."""
    if isinstance(value, torch.nn.Module):
        return f"{type(value).__module__}.{type(value).__qualname__}"
    return describe(value, depth)


def differences(
    saved: Any, current: Any, path: str = "", limit: int = 5, unrecorded: Optional[list[str]] = None
) -> list[str]:
    """Human-readable paths where two descriptions differ: ``"lora.r: was 8, now 16"``.

    ``unrecorded``: a list, for a saved description of an earlier ``FINGERPRINT_VERSION``: a key the
    current description has and the saved one lacks is appended to it (the earlier version did not
    record it) instead of counting as a difference.
    """
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in list(dict.fromkeys([*saved, *current])):
            sub = f"{path}.{key}" if path else str(key)
            if key not in saved and unrecorded is not None:
                unrecorded.append(sub)
            elif key not in saved or key not in current:
                found.append(f"{sub}: {'absent' if key not in saved else _short(saved[key])} before, "
                             f"{'absent' if key not in current else _short(current[key])} now")
            else:
                found += differences(saved[key], current[key], sub, limit, unrecorded)
            if len(found) >= limit:
                break
        return found[:limit]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        found = []
        for i, (a, b) in enumerate(zip(saved, current)):
            found += differences(a, b, f"{path}[{i}]", limit, unrecorded)
        return found[:limit]
    return [] if saved == current else [f"{path}: was {_short(saved)}, now {_short(current)}"]


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."

"""Resident memory that stays flat however many clients and rounds one process runs.

Each client fit leaves behind a Trainer, its loggers and loop state (reference cycles, freed
only by a full garbage collection) and a heap fragmented by the fit's activations, which glibc
keeps instead of returning to the system. Measured on the tiny model (benchmarks/run.py): RSS
grew by ~1.6 MB per client fit, and a full ``gc.collect()`` cost ~1 s because it walks every
object of torch, transformers and Lightning.

``steady_memory()`` freezes the long-lived objects once (``gc.freeze``: later collections skip
them), after which ``release_client_memory()`` -- a collection of the young objects plus
``malloc_trim`` -- costs ~20 ms per client fit and keeps RSS flat.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from contextlib import contextmanager

_frozen = False


def _malloc_trim() -> None:
    """Hand freed heap pages back to the system (glibc only; a no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


@contextmanager
def steady_memory():
    """Within this block, ``release_client_memory`` is cheap (long-lived objects are frozen)."""
    global _frozen
    if _frozen:  # nested (e.g. compare runs federations inside one): the outer block owns it
        yield
        return
    gc.collect()
    gc.freeze()
    _frozen = True
    try:
        yield
    finally:
        _frozen = False
        gc.unfreeze()


def release_client_memory() -> None:
    """Free what a finished client fit left behind; only inside ``steady_memory()``, where it is cheap."""
    if _frozen:
        gc.collect()
        _malloc_trim()

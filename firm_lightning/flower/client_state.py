"""A stateful client's own state on its own disk (``federation.client_optimizer_state=persist``).

In-process, the federation state (and so the server's checkpoint) holds every client's
optimiser state. A Flower client keeps its own: it is the organisation's, and it never travels.
After each fit the client saves it tagged with the round; before a fit in round ``r`` it reads
back the state after its latest round *before* ``r``, so a server that resumes and replays a
round the client had already trained (killed mid-round) gets the same fit as the first time.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from firm_lightning import checkpoint

KEEP = 2  # the state before the current round survives one replay of that round


@dataclass
class _Saved:
    round: int
    states: dict[str, dict] = field(default_factory=dict)


class ClientStateFiles:
    """A dict-like store (``get`` / ``[key] = value``) for one fit in round ``round_idx``; ``save()`` writes it."""

    def __init__(self, directory: Path, round_idx: int) -> None:
        self.directory = Path(directory)
        self.round_idx = round_idx
        self.states: dict[str, dict] = self._latest_before(round_idx)

    def get(self, key: str, default: Optional[dict] = None) -> Optional[dict]:
        return self.states.get(key, default)

    def __setitem__(self, key: str, value: dict) -> None:
        self.states[key] = value

    def save(self) -> None:
        checkpoint.save_state(self._round_dir(self.round_idx), _Saved(self.round_idx, self.states), {})
        for old in sorted(self._rounds())[:-KEEP]:
            shutil.rmtree(self._round_dir(old), ignore_errors=True)

    def _latest_before(self, round_idx: int) -> dict[str, dict]:
        earlier = [r for r in self._rounds() if r < round_idx and checkpoint.exists(self._round_dir(r))]
        if not earlier:
            return {}
        saved, _ = checkpoint.load_state(self._round_dir(max(earlier)), _Saved)
        return dict(saved.states)

    def _rounds(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return [int(p.name.removeprefix("round_")) for p in self.directory.glob("round_*") if p.is_dir()]

    def _round_dir(self, round_idx: int) -> Path:
        return self.directory / f"round_{round_idx:05d}"

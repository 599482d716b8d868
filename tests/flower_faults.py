"""A reward that fails on one client's prompts, importable by Flower's client processes
(``tests.flower_faults.FailsOnPrompts``: the tests put the repository root on their path)."""

from __future__ import annotations

import time
from pathlib import Path

from firm_lightning.rewards import CharsetReward


class FailsOnPrompts(CharsetReward):
    """``CharsetReward``, except that a batch holding any of ``prompts`` raises (a crashing client),
    and that scoring hangs while ``block_file`` exists (a test holds a round mid-way to kill it)."""

    def __init__(self, name: str, charset: str, prompts: list[str], block_file: str = "") -> None:
        super().__init__(name, charset)
        self.prompts = set(prompts)
        self.block_file = block_file

    def __call__(self, prompts, responses):
        while self.block_file and Path(self.block_file).exists():
            time.sleep(0.2)
        if self.prompts & set(prompts):
            raise RuntimeError("simulated crash on this client's data")
        return super().__call__(prompts, responses)

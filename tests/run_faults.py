"""Rewards that misbehave on cue, for runs through the command line (``class_path: run_faults.<name>``
in-process, where ``tests/`` is on the path; ``tests.run_faults.<name>`` in a subprocess given the
repository root)."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch

from firm_lightning.rewards import CharsetReward


class NaNReward(CharsetReward):
    """Every reward NaN: the run is refused by its first evaluation (round 0)."""

    def __call__(self, prompts, responses):
        return torch.full((len(responses),), math.nan)


class InterruptsOnCall(CharsetReward):
    """Ctrl-C (SIGINT to this process) on the ``call``-th scoring, once: unless ``done_file`` exists, which
    it then creates, so that the resumed run goes on. Without stateful objectives call 1 is round 0's
    evaluation and call 2 the first client fit's first step."""

    def __init__(self, name: str, charset: str, call: int, done_file: str) -> None:
        super().__init__(name, charset)
        self.call, self.done_file, self._calls = call, done_file, 0  # _: not a setting

    def __call__(self, prompts, responses):
        self._calls += 1
        if self._calls == self.call and not Path(self.done_file).exists():
            Path(self.done_file).touch()
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the signal lands here, inside the Trainer's fit or validate
        return super().__call__(prompts, responses)


class WaitsWhileFileExists(CharsetReward):
    """Scoring waits while ``block_file`` exists: a test holds a run in its first evaluation."""

    def __init__(self, name: str, charset: str, block_file: str) -> None:
        super().__init__(name, charset)
        self.block_file = block_file

    def __call__(self, prompts, responses):
        while Path(self.block_file).exists():
            time.sleep(0.1)
        return super().__call__(prompts, responses)

"""A reward that fails on one client's prompts, importable by Flower's client processes
(``tests.flower_faults.FailsOnPrompts``: the tests put the repository root on their path)."""

from __future__ import annotations

from firm_lightning.rewards import CharsetReward


class FailsOnPrompts(CharsetReward):
    """``CharsetReward``, except that a batch holding any of ``prompts`` raises (a crashing client)."""

    def __init__(self, name: str, charset: str, prompts: list[str]) -> None:
        super().__init__(name, charset)
        self.prompts = set(prompts)

    def __call__(self, prompts, responses):
        if self.prompts & set(prompts):
            raise RuntimeError("simulated crash on this client's data")
        return super().__call__(prompts, responses)

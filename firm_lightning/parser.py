"""The commands' parser: LightningCLI's, with a ``--help`` that fits a federation.

``<command> --help`` shows the federation's groups first (``federation``, then the command's own
section, the model, the data, the client optimiser) and of Lightning's per-client ``Trainer`` only the
options a client fit uses; ``--help_all`` shows every option. The options themselves are the same.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from typing import Iterator, Sequence

from lightning.pytorch.cli import LightningArgumentParser

# The Trainer's options ``--help`` shows (a client fit neither validates nor checkpoints, and the module
# optimises manually: the others rarely apply); ``--help_all`` shows them all.
TRAINER_SHOWN = ("accelerator", "strategy", "devices", "num_nodes", "precision", "max_steps", "logger", "callbacks",
                 "profiler", "log_every_n_steps")
# Titles of LightningCLI's groups as a federation uses them (their defaults are the classes' docstrings).
TITLES = {
    "trainer": "Lightning's Trainer, built afresh for every client fit (trainer.max_steps: the local steps K)",
    "optimizer": "The client optimiser, built afresh for every client fit (none: AdamW with model.learning_rate)",
    "lr_scheduler": "The client optimiser's learning-rate schedule (needs optimizer:)",
}
USAGE = "%(prog)s --config X.yaml [--group.option value ...]"


class FullHelp(argparse._HelpAction):  # a help action: parsing skips it and it is never in the config
    """``--help_all``: the help with every option, the Trainer's included."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.full_help = True
        super().__call__(parser, namespace, values, option_string)


class FIRMArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` with a short ``--help`` and ``--help_all``.

    ``first_groups``: the groups shown right after the general options, in this order (set by the builder:
    ``federation`` and the command's sections); the Trainer's group is shown last.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("usage", USAGE)
        super().__init__(*args, **kwargs)
        self.full_help = False
        self.first_groups: Sequence[str] = ("federation",)
        self.add_argument("--help_all", action=FullHelp, help="Show every option, the Trainer's included, and exit.")

    def format_help(self, *args, **kwargs) -> str:
        for name, group in (self.groups or {}).items():
            group.title = TITLES.get(name, group.title)
        with self._ordered_groups(), self._trainer_options(shown=None if self.full_help else TRAINER_SHOWN):
            return super().format_help(*args, **kwargs)

    @contextmanager
    def _ordered_groups(self) -> Iterator[None]:
        """The general options, ``first_groups``, the others as they were added, the Trainer's."""
        groups, named = list(self._action_groups), {id(g): name for name, g in (self.groups or {}).items()}
        first = list(self.first_groups)

        def rank(group) -> tuple[int, int]:
            name = named.get(id(group))
            if name is None and group in (self._positionals, self._optionals):
                return 0, 0
            if name in first:
                return 1, first.index(name)
            return (3, 0) if name == "trainer" else (2, 0)

        self._action_groups = sorted(groups, key=rank)  # a stable sort: the others keep their order
        try:
            yield
        finally:
            self._action_groups = groups

    @contextmanager
    def _trainer_options(self, shown: Sequence[str] | None) -> Iterator[None]:
        """Hide the Trainer's options not in ``shown`` (None: none), naming how many and the flag that shows them."""
        group = (self.groups or {}).get("trainer")
        hidden = [] if group is None or shown is None else [
            a for a in group._group_actions if _trainer_option(a.dest) not in {"", *shown}]
        saved = [(a, a.help) for a in hidden]
        if hidden:
            group.title += f"; --help_all shows its {len({_trainer_option(a.dest) for a in hidden})} other options"
        for action in hidden:
            action.help = argparse.SUPPRESS
        try:
            yield
        finally:
            for action, text in saved:
                action.help = text


def _trainer_option(dest: str) -> str:
    """``trainer.logger.help`` → ``logger``; ``trainer`` (the group's config file) → ``""``, always shown."""
    parts = dest.split(".")
    return parts[1] if len(parts) > 1 else ""

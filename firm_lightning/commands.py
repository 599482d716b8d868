"""The commands of ``python -m firm_lightning``: their descriptions and config sections, without importing them.

``python -m firm_lightning --help`` prints ``usage()`` from here alone (no torch, Lightning or
transformers); a command imports what it needs when it runs, and its own sections' classes when its
parser is built (``Command.sections``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Optional

PROG = "python -m firm_lightning"
SCRIPT = "firm-lightning"  # the installed command ([project.scripts] in pyproject.toml): the same commands


@dataclass
class Command:
    description: str
    section_paths: dict[str, str] = field(default_factory=dict)  # group -> "module:Class", imported when used
    ckpt_path: bool = False
    data_unless: Optional[str] = None  # a section of its own that stands in for data: when given
    example: str = "configs/tiny.yaml"  # the config a user without one starts from

    @property
    def sections(self) -> dict[str, type]:
        """The command's own config groups, ``{group: class}`` (imports their modules)."""
        found = {}
        for group, path in self.section_paths.items():
            module, name = path.split(":")
            found[group] = getattr(importlib.import_module(module), name)
        return found


COMMANDS = {
    "fit": Command(
        "Run a whole federation: N rounds of client sampling, local LoRA fits, aggregation and evaluation "
        "of the global adapter; writes metrics, adapters, plots and logs to federation.output_dir."
    ),
    "validate": Command(
        "Evaluate a saved global adapter (--ckpt_path) on the held-out prompts with the fixed eval "
        "sampling seed, or by the evaluation protocol of --evaluation.",
        {"evaluation": "firm_lightning.evaluation:EvaluationProtocol"},
        ckpt_path=True,
        data_unless="evaluation",
    ),
    "generate": Command(
        "Print responses of a saved global adapter (--ckpt_path) to --generate.prompts, with every objective's reward.",
        {"generate": "firm_lightning.generate:GenerateSettings"},
        ckpt_path=True,
    ),
    "compare": Command(
        "Run several algorithms with identical seeds, data and budget.",
        {"compare": "firm_lightning.studies.compare:CompareSettings"},
        example="configs/compare_tiny.yaml",
    ),
    "pareto": Command(
        "Sweep preferences for FIRM and linear scalarisation; draw the fronts.",
        {"pareto": "firm_lightning.studies.pareto:ParetoSettings"},
        example="configs/pareto_tiny.yaml",
    ),
    "flower": Command(
        "Run the federation on Flower: simulation engine or SuperLink + SuperNodes.",
        {"flower": "firm_lightning.flower.settings:FlowerSettings"},
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} <command> --config X.yaml [--group.option value ...]",
             f"       {SCRIPT} <command> --config X.yaml [--group.option value ...]   (the installed command)",
             "", "commands:"]
    lines += [f"  {name:<{width}}  {command.description}" for name, command in COMMANDS.items()]
    lines += ["", f"Start from a config: {PROG} fit --config configs/tiny.yaml",
              f"`{PROG} <command> --help` lists the federation's options and the Trainer's common ones, "
              "`--help_all` every option; `--print_config` shows the resolved config."]
    return "\n".join(lines)

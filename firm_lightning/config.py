"""From a config (YAML files and ``--flags``) to the objects a federation runs on.

``build_components(args)`` parses the groups every command shares -- ``model``
(``FIRMClientModule``), ``data`` (``PromptDataModule`` or a subclass), ``trainer`` (the
per-client ``Trainer``: ``max_steps`` is the number of local steps K), ``optimizer`` /
``lr_scheduler`` (the client optimiser) and ``federation`` (``FederationConfig``) -- plus the
sections a command adds (``compare``, ``pareto``, ``flower``, ``generate``, ``evaluation``). It
stands on LightningCLI's public API only (``run=False``, ``add_core_arguments_to_parser``,
``add_arguments_to_parser``, ``before_instantiate_classes``, ``instantiate_classes``,
``parse_arguments``), knows nothing of what the command does, and is what the CLI and the Flower
apps both build from. Keys and classes that moved are refused with one line naming their new place
(``refuse_moved_keys``); a class whose package is not installed, with one line naming the package and
the extra that installs it (``firm_lightning.extras``).
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import inspect
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from jsonargparse import ArgumentError, Namespace, set_dumper
from lightning.pytorch import seed_everything
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from firm_lightning.client_optimizer import use_client_optimizer
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.extras import failing_class_path, missing_package_line
from firm_lightning.federation import MOVED_KEYS, FederationConfig
from firm_lightning.module import FIRMClientModule
from firm_lightning.parser import FIRMArgumentParser
from firm_lightning.run_folder import atomic_write


class _ConfigDumper(yaml.SafeDumper):
    """Writes enum values (e.g. Timer's ``interval: Interval.step``) as their plain value.

    Lightning callbacks type some arguments ``str`` but default them to an ``Enum``; jsonargparse
    leaves such defaults as they are and PyYAML's safe dumper cannot represent them, so saving
    the resolved config (and ``--print_config``) crashed.
    """


_ConfigDumper.add_multi_representer(enum.Enum, lambda dumper, value: dumper.represent_data(value.value))
set_dumper(
    "yaml",
    lambda data: yaml.dump(data, Dumper=_ConfigDumper, default_flow_style=False, allow_unicode=True, sort_keys=False),
)


@dataclass
class Components:
    """What a config builds: the module, the data, the federation settings, the trainer config and
    the command's own sections (by group name), plus the parsed config to save it again."""

    module: FIRMClientModule
    datamodule: Optional[PromptDataModule]  # None only where a section stands in for data (``data_unless``)
    federation: FederationConfig
    trainer_config: dict
    sections: dict[str, Any] = field(default_factory=dict)
    config: Optional[Namespace] = None
    parser: Optional[LightningArgumentParser] = None

    def save_config(self, path: Path) -> None:
        """The resolved config, as YAML that ``--config`` reads back (written atomically)."""
        atomic_write(Path(path), self.parser.dump(self.config, skip_validation=True).encode())


class ComponentBuilder(LightningCLI):
    """LightningCLI without subcommands (``run=False``): parse, seed, instantiate; nothing runs.

    ``sections``: extra groups, ``{group: class}``: a settings class takes its options in the group
    (``{"compare": CompareSettings}``); an abstract class takes one of its subclasses by ``class_path``,
    or null (``{"evaluation": EvaluationProtocol}``). ``ckpt_path``: add ``--ckpt_path`` (an adapter
    file or folder). ``data_unless``: a section that stands in for ``data:`` when given, so ``data:`` may
    be left out (``validate``'s ``evaluation``); one of the two is then required.
    """

    def __init__(self, args: Sequence[str], sections: Optional[dict[str, type]] = None, ckpt_path: bool = False,
                 description: Optional[str] = None, prog: Optional[str] = None,
                 data_unless: Optional[str] = None) -> None:
        self.sections = dict(sections or {})
        self.ckpt_path = ckpt_path
        self.data_unless = data_unless
        # Errors become one message, not a usage dump; an abbreviated option is refused like a misspelt one.
        parser_kwargs = {"exit_on_error": False, "allow_abbrev": False}
        if description:
            parser_kwargs["description"] = description
        if prog:
            parser_kwargs["prog"] = prog
        super().__init__(
            FIRMClientModule,
            PromptDataModule,
            save_config_callback=None,  # the run writes config.yaml once, not once per client
            seed_everything_default=False,  # federation.seed seeds everything instead
            auto_configure_optimizers=True,  # the optimizer:/lr_scheduler: groups (one optimiser per client fit)
            load_from_checkpoint_support=False,
            subclass_mode_data=True,  # PromptDataModule or a subclass such as HHRLHFDataModule
            parser_kwargs=parser_kwargs,
            parser_class=FIRMArgumentParser,  # --help: the federation first, the Trainer's common options only
            args=list(args),
            run=False,
        )

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's trainer, model and data groups; ``data`` optional where ``data_unless`` stands in for it."""
        if self.data_unless is None:
            super().add_core_arguments_to_parser(parser)
            return
        # LightningCLI's own three groups (its add_core_arguments_to_parser), with data not required
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({f"trainer.{k}": v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self.model_class, "model", subclass_mode=self.subclass_mode_model)
        parser.add_lightning_class_args(self.datamodule_class, "data", subclass_mode=self.subclass_mode_data,
                                        required=False)

    def add_arguments_to_parser(self, parser: FIRMArgumentParser) -> None:
        parser.add_class_arguments(FederationConfig, "federation")
        parser.first_groups = ("federation", *self.sections)
        parser.link_arguments("federation.num_clients", "data.init_args.num_clients")
        parser.link_arguments("federation.seed", "data.init_args.seed")
        for group, cls in self.sections.items():
            if inspect.isabstract(cls):
                parser.add_subclass_arguments(cls, group, required=False)
            else:
                parser.add_class_arguments(cls, group)
        parser.add_argument(
            "--torch_threads", type=Optional[int], default=None,
            help="torch's intra-op threads in this process (torch.set_num_threads), set before anything is built; "
                 "null: torch's default (one per core). 1 for tiny models: their small matrices split over threads "
                 "spend the time waiting for a descheduled thread when other work shares the machine.",
        )
        parser.add_argument(
            "--reward_models", type=dict[str, str], default={},
            help="Reward models by objective name, e.g. '{\"helpful\": \"/models/rm-helpful\"}': replaces the "
                 "name_or_path of that objective's HFRewardModel (a hub name or a local folder).",
        )
        if self.ckpt_path:
            parser.add_argument("--ckpt_path", type=Optional[str], default=None,
                                help="The adapter: a .safetensors file written by fit, or a peft adapter folder.")
            parser.add_argument("--objective_state", type=Optional[str], default=None,
                                help="The run's evaluation statistics (objective_state.json, written by fit beside "
                                     "the adapters); default: found beside --ckpt_path.")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse ``args`` only: they are the command line here (LightningCLI would warn about sys.argv)."""
        try:
            self.config = parser.parse_args(args)
        except ArgumentError as error:
            line = missing_package_line(error, re.findall(r'^Parser key "([\w.]+)"', str(error)))
            if line is not None:  # a class path in a package that is not installed
                raise ValueError(line) from error
            raise ArgumentError(None, str(error) + close_matches(str(error), parser)) from error

    def before_instantiate_classes(self) -> None:
        if self.data_unless and self.config.get("data") is None and self.config.get(self.data_unless) is None:
            raise ValueError(f"Neither data: nor {self.data_unless}: is given: give data: (the prompts to evaluate "
                             f"on) or {self.data_unless}: (which stands in for it).")
        use_threads(self.config.get("torch_threads"))
        if self.config["federation"].quiet:  # loading bars of every weight file and data map: not the run's lines
            quiet_hugging_face()
        point_reward_models(self.config["model"]["objectives"], self.config.get("reward_models") or {})
        # Seeds the LoRA initialisation and anything else built from the config.
        seed_everything(self.config["federation"].seed, workers=True, verbose=False)

    def instantiate_classes(self) -> None:
        """Model and data once; trainers are built per client (``TrainerFactory``), so none here."""
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes  # renamed in 4.49
        try:
            self.config_init = instantiate(self.config)
        except (ValueError, TypeError, ImportError) as error:  # jsonargparse wraps a class's own error
            line = missing_package_line(error, keys_naming(self.config.as_dict(), failing_class_path(error)))
            if line is None:
                raise
            raise ValueError(line) from error
        self.model = self.config_init["model"]
        self.datamodule = self.config_init["data"]
        self.trainer = None
        optimizer, lr_scheduler = (_as_dict(self.config_init.get(k)) for k in ("optimizer", "lr_scheduler"))
        if lr_scheduler and not optimizer:
            raise ValueError(
                "lr_scheduler: needs an optimizer: group too, e.g. `--optimizer AdamW --optimizer.lr 0.01`."
            )
        if optimizer:
            use_client_optimizer(self.model, optimizer, lr_scheduler)

    def components(self) -> Components:
        if self.datamodule is not None:  # every prompt is measured against what the policy can hold, at load
            self.datamodule.limit_prompts(self.model.prompt_limit())
        return Components(
            module=self.model,
            datamodule=self.datamodule,
            federation=self.config_init["federation"],
            trainer_config=self.config["trainer"].as_dict(),
            sections={group: self.config_init[group] for group in self.sections},
            config=self.config,
            parser=self.parser,
        )


def build_components(args: Sequence[str], sections: Optional[dict[str, type]] = None, ckpt_path: bool = False,
                     description: Optional[str] = None, prog: Optional[str] = None,
                     data_unless: Optional[str] = None) -> Components:
    """The objects ``args`` (``--config X.yaml``, ``--federation.num_rounds 3``, ...) describe (the arguments
    after ``args``: see ``ComponentBuilder``)."""
    refuse_moved_keys(args)
    return ComponentBuilder(args, sections, ckpt_path, description, prog, data_unless).components()


_CACHE: dict[str, Components] = {}


def load_components(config_text: str, sections: Optional[dict[str, type]] = None) -> Components:
    """The objects a saved config describes, built once per process (a Flower app serves many rounds with one model)."""
    key = hashlib.sha256((config_text + repr(sorted(sections or {}))).encode()).hexdigest()
    if key not in _CACHE:
        _CACHE.clear()  # one federation per process: do not keep an old model alive
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "config.yaml"
            path.write_text(config_text)
            _CACHE[key] = build_components(["--config", str(path)], sections)
    return _CACHE[key]


def keys_naming(config: Any, class_path: Optional[str], key: str = "") -> list[str]:
    """The keys of ``config`` (a plain dict) whose value names ``class_path`` (in a list: the list's key)."""
    if isinstance(config, list):
        return list(dict.fromkeys(k for item in config for k in keys_naming(item, class_path, key)))
    if not isinstance(config, dict) or class_path is None:
        return []
    found = [key] if key and config.get("class_path") == class_path else []
    for name, value in config.items():
        found += keys_naming(value, class_path, key if name == "init_args" else f"{key}.{name}".lstrip("."))
    return found


def use_threads(threads: Optional[int]) -> None:
    """``torch_threads``: torch's intra-op threads for this process; None leaves torch's default."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"torch_threads must be >= 1, or null for torch's default; got {threads}.")
    import torch

    torch.set_num_threads(threads)


def close_matches(message: str, parser: LightningArgumentParser) -> str:
    """``"; did you mean --federation.num_rounds?"`` for the unrecognised options named in ``message``."""
    unknown = re.findall(r"--([\w.]+)", message.partition("unrecognized arguments:")[2])
    if not unknown:
        return ""
    try:
        keys = list(parser.get_defaults().keys())
    except Exception:  # the suggestion is a courtesy: never let it hide the error itself
        return ""
    found = [f"--{m}" for key in unknown for m in difflib.get_close_matches(key, keys, n=2, cutoff=0.8)]
    return f"; did you mean {' or '.join(dict.fromkeys(found))}?" if found else ""


def quiet_hugging_face() -> None:
    """No per-file progress bars from transformers, datasets and the hub (``federation.quiet``)."""
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def point_reward_models(objectives: list, paths: dict[str, str]) -> None:
    """Set ``name_or_path`` of the objective named ``name`` (found at any depth, e.g. inside a
    ``NormalizedReward``) for every ``name: path`` of ``paths`` (``--reward_models``)."""
    found = {}

    def visit(node) -> None:
        if isinstance(node, (Namespace, dict)):
            args = node.get("init_args")
            name = args.get("name") if isinstance(args, (Namespace, dict)) else None
            if name in paths and "name_or_path" in args:
                args["name_or_path"] = paths[name]
                found[name] = True
            for value in (args.values() if isinstance(args, dict) else vars(args).values() if args is not None else []):
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(objectives)
    missing = sorted(set(paths) - set(found))
    if missing:
        raise ValueError(
            f"--reward_models names {missing}, but no objective of that name has a name_or_path "
            "(an HFRewardModel); objective names are the `name` of model.objectives."
        )


# Classes that moved to another group, by (old group, class name): any spelling of the class path
# (full, through the package's face, short) ends with the class name.
MOVED_CLASSES = {("data", "HHRLHFEvaluation"): "evaluation"}


def refuse_moved_keys(args: Sequence[str]) -> None:
    """A key or class that moved is refused with one line naming its new place (flags and ``--config`` files)."""
    found = [_flag_key(a) for a in args if a.startswith("--")]
    classes = _flag_classes(args)
    for path in _config_files(args):
        data = _read_yaml(path)
        found += _yaml_keys(data)
        classes += [(group, _class_path_of(data.get(group))) for group, _ in MOVED_CLASSES]
    for key in found:
        for old, new in MOVED_KEYS.items():
            if key == old or key.startswith(old + "."):
                raise ValueError(f"{old} has moved: use {new} (see README, configuration).")
    for group, class_path in classes:
        new = MOVED_CLASSES.get((group, (class_path or "").rsplit(".", 1)[-1]))
        if new:
            raise ValueError(f"{group}: {class_path} has moved: use {new}: with the same class_path and init_args "
                             "(see README, configuration).")


def _flag_key(arg: str) -> str:
    return arg[2:].split("=", 1)[0]


def _flag_classes(args: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """``(group, class path)`` of the flags that choose a class of a group in ``MOVED_CLASSES``
    (``--data X``, ``--data=X``, ``--data.class_path X``; X may also be a mapping with a class_path)."""
    groups = {group for group, _ in MOVED_CLASSES}
    found = []
    for i, arg in enumerate(args):
        key, equals, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        group = key.removesuffix(".class_path")
        if group in groups:
            value = value if equals else args[i + 1] if i + 1 < len(args) else None
            found.append((group, _class_path_of(value)))
    return found


def _class_path_of(value) -> Optional[str]:
    """The class path a group's value names: a string, or a mapping's ``class_path`` (also as YAML text)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return None
    if isinstance(value, dict):
        value = value.get("class_path")
    return value if isinstance(value, str) else None


def _config_files(args: Sequence[str]) -> list[Path]:
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return [f for f in files if f.is_file()]


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}  # the parser reports unreadable files itself
    return data if isinstance(data, dict) else {}


def _yaml_keys(data: dict) -> list[str]:
    keys = []
    for section in ("federation", "flower"):
        if isinstance(data.get(section), dict):
            keys += [f"{section}.{k}" for k in data[section]]
    return keys


def _as_dict(value):
    return value.as_dict() if hasattr(value, "as_dict") else value

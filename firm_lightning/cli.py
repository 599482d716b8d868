"""``python -m firm_lightning {fit,validate,generate,compare,pareto} --config X.yaml``: the LightningCLI front end.

The config has LightningCLI's groups ``model`` (``FIRMClientModule``), ``data``
(``PromptDataModule``), ``trainer`` (the per-client ``Trainer``: ``max_steps`` is the
number of local steps K), ``optimizer``/``lr_scheduler`` (the client optimiser), plus
``federation`` (``FederationConfig``). ``fit`` runs a whole federation instead of one
``Trainer.fit``; ``validate`` evaluates a saved global adapter; ``generate`` prints its
responses with their rewards.
Every option is also a flag (``--federation.num_rounds 3``), and a misspelt one fails with
jsonargparse's error naming it.

A user error (bad setting, unreadable file, a federation that cannot go on) ends in one line
on stderr naming the problem, and exit code 1; ``--debug`` or ``FIRM_DEBUG=1`` shows the full
traceback instead.
"""

from __future__ import annotations

import os
import re
import sys
import time
import enum
import traceback
from pathlib import Path
from typing import Optional

import torch
import yaml
from jsonargparse import set_dumper
from lightning.pytorch import seed_everything
from lightning.pytorch.cli import LightningCLI
from safetensors import SafetensorError
from safetensors.torch import load_file

from firm_lightning import claims
from firm_lightning.client_optimizer import use_client_optimizer
from firm_lightning.compare import (
    CompareSettings, claims_report, markdown_table, plot_comparison, run_comparison, summarize,
)
from firm_lightning.datamodule import PromptDataModule
from firm_lightning.flower.settings import FlowerSettings
from firm_lightning.generate import GenerateSettings, format_generations, generate
from firm_lightning.pareto import ParetoSettings, front_report, run_sweep, write_outputs
from firm_lightning.module import FIRMClientModule
from firm_lightning.orchestrator import FederatedOrchestrator, FederationConfig, FederationError, quiet_lightning
from firm_lightning.trainer_factory import TrainerFactory


class _ConfigDumper(yaml.SafeDumper):
    """Writes enum values (e.g. Timer's ``interval: Interval.step``) as their plain value.

    Lightning callbacks type some arguments ``str`` but default them to an ``Enum``; jsonargparse
    leaves such defaults as they are and PyYAML's safe dumper cannot represent them, so saving
    the resolved config (and ``--print_config``) crashed.
    """


_ConfigDumper.add_multi_representer(enum.Enum, lambda dumper, value: dumper.represent_data(value.value))
set_dumper("yaml", lambda data: yaml.dump(data, Dumper=_ConfigDumper, default_flow_style=False, allow_unicode=True, sort_keys=False))


class FIRMCLI(LightningCLI):
    def __init__(self, args=None, **kwargs) -> None:
        super().__init__(
            FIRMClientModule,
            PromptDataModule,
            save_config_callback=None,  # the orchestrator writes config.yaml once, not once per client
            seed_everything_default=False,  # federation.seed seeds everything instead
            auto_configure_optimizers=True,  # the optimizer:/lr_scheduler: groups (wired per client fit below)
            load_from_checkpoint_support=False,
            subclass_mode_data=True,  # PromptDataModule or a subclass such as HHRLHFDataModule
            args=args,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule", "ckpt_path"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    # What each subcommand does (Lightning would describe `fit` by Trainer.fit's docstring).
    DESCRIPTIONS = {
        "fit": "Run a whole federation: N rounds of client sampling, local LoRA fits, aggregation and "
        "evaluation of the global adapter; writes metrics, adapters, plots and logs to federation.output_dir.",
        "validate": "Evaluate a saved global adapter (--ckpt_path) on the held-out prompts with the fixed eval sampling seed.",
        "generate": "Print responses of a saved global adapter (--ckpt_path) to --generate.prompts, with every objective's reward.",
        "compare": "Run several algorithms with identical seeds, data and budget.",
        "pareto": "Sweep preferences for FIRM and linear scalarisation; draw the fronts.",
        "flower": "Run the federation on Flower: simulation engine or SuperLink + SuperNodes.",
    }
    # Subcommands that are not Trainer methods: name -> (settings class, its group).
    EXTRA_SUBCOMMANDS = {"generate": (GenerateSettings, "generate"), "compare": (CompareSettings, "compare"),
                         "pareto": (ParetoSettings, "pareto"), "flower": (FlowerSettings, "flower")}

    def _add_subcommands(self, parser, **kwargs) -> None:
        for name in self.subcommands():
            kwargs.setdefault(name, {}).setdefault("description", self.DESCRIPTIONS[name])
        super()._add_subcommands(parser, **kwargs)
        subcommands = parser._subcommands_action
        for choice in subcommands._choices_actions:  # the one-line help in `--help`'s subcommand list
            choice.help = self.DESCRIPTIONS.get(choice.dest, choice.help)
        for name, (settings, group) in self.EXTRA_SUBCOMMANDS.items():
            description = self.DESCRIPTIONS[name]
            sub = self.init_parser(description=description, **kwargs.get(name, {}))
            self._add_arguments(sub)
            sub.add_class_arguments(settings, group)
            if name == "generate":
                sub.add_argument("--ckpt_path", type=Optional[str], default=None,
                                 help="The adapter: a .safetensors file written by fit, or a peft adapter folder.")
            self._subcommand_parsers[name] = sub
            self._subcommand_method_arguments[name] = []
            subcommands.add_subcommand(name, sub, help=description)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(FederationConfig, "federation")
        parser.link_arguments("federation.num_clients", "data.init_args.num_clients" if self.subclass_mode_data else "data.num_clients")
        parser.link_arguments("federation.seed", "data.init_args.seed" if self.subclass_mode_data else "data.seed")

    def _parse_ckpt_path(self) -> None:
        """``ckpt_path`` names a LoRA adapter (.safetensors), not a Lightning checkpoint: nothing to parse."""

    def before_instantiate_classes(self) -> None:
        # Seeds the LoRA initialisation and anything else built from the config.
        seed_everything(self._section("federation").seed, workers=True, verbose=False)

    def instantiate_classes(self) -> None:
        """Build model and data once; trainers are built per client by the TrainerFactory."""
        self.config_init = self.parser.instantiate_classes(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self.trainer = None
        self._configure_client_optimizer()

    def _configure_client_optimizer(self) -> None:
        optimizer, lr_scheduler = (_as_dict(self._get(self.config_init, k)) for k in ("optimizer", "lr_scheduler"))
        if lr_scheduler and not optimizer:
            raise ValueError("lr_scheduler: needs an optimizer: group too, e.g. `--optimizer AdamW --optimizer.lr 0.01`.")
        if optimizer:
            use_client_optimizer(self.model, optimizer, lr_scheduler)

    def _run_subcommand(self, subcommand: str) -> None:
        getattr(self, f"run_{subcommand}")()

    def _section(self, key: str):
        return self._get(self.config_init if hasattr(self, "config_init") else self.config, key)

    def _trainer_factory(self, output_dir: Path) -> TrainerFactory:
        trainer_config = self._get(self.config, "trainer").as_dict()
        return TrainerFactory(trainer_config, output_dir)

    def _device(self) -> str:
        accelerator = str(self._get(self.config, "trainer").get("accelerator") or "auto")
        return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"

    def _prepare_output_dir(self) -> Path:
        """Create federation.output_dir and save the resolved config there."""
        out = Path(self._section("federation").output_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
            config = self.config[self.subcommand]
            self._parser(self.subcommand).save(config, out / "config.yaml", overwrite=True, skip_check=True)
        except OSError as error:
            raise OSError(
                error.errno,
                f"Cannot write to federation.output_dir {str(out)!r} ({error.strerror or error}); "
                "pass a writable folder with --federation.output_dir.",
            ) from error
        return out

    def run_fit(self) -> None:
        federation, output_dir = self._section("federation"), self._prepare_output_dir()
        print(
            f"FIRM federation: {federation.num_rounds} rounds, {federation.num_clients} clients, "
            f"objectives {self.model.objective_names}, weighting {self.model.weighting!r}; writing to {output_dir}/",
            flush=True,
        )
        orchestrator = FederatedOrchestrator(
            self.model, self.datamodule, federation, self._trainer_factory(output_dir), echo=_echo
        )
        self.state = orchestrator.run()

    def run_compare(self) -> None:
        federation, out = self._section("federation"), self._prepare_output_dir()
        settings = self._section("compare")
        print(
            f"compare: {[a.name for a in settings.algorithms]} × seeds {settings.seeds} × "
            f"α {settings.dirichlet_alphas or [self.datamodule.hparams['dirichlet_alpha']]}; writing to {out}/",
            flush=True,
        )
        rows = run_comparison(
            self.model, self.datamodule, federation, self._get(self.config, "trainer").as_dict(), settings, _echo
        )
        table = summarize(rows, self.model.objective_names)
        claims_rows, claims_text = claims_report(rows, self.model.objective_names, out, settings)
        sentences = "\n".join(f"- {claims.verdict_sentence(r, settings.reference)}" for r in claims_rows)
        text = (
            markdown_table(table) + f"\n\n## Claims: {settings.reference} − baseline, paired on seed\n\n"
            + claims_text + "\n\n" + sentences
        )
        (out / "summary.md").write_text(text + "\n")
        plot_comparison(rows, self.model.objective_names, out / "plots")
        print(text)
        print(f"outputs in {out}/ (metrics.csv, summary.md, plots/, runs/)")
        self.summary = table
        self.claims = claims_rows

    def run_pareto(self) -> None:
        federation, out = self._section("federation"), self._prepare_output_dir()
        settings = self._section("pareto")
        names = self.model.objective_names
        print(f"pareto: {[a.name for a in settings.algorithms]} × preferences {settings.preferences}; writing to {out}/")
        tic = time.perf_counter()
        rows = run_sweep(
            self.model, self.datamodule, federation, self._get(self.config, "trainer").as_dict(), settings, _echo
        )
        report = front_report(rows, names, settings.reference)
        report["wall_s"] = time.perf_counter() - tic
        write_outputs(rows, names, report, out)
        print(f"reference point {report['reference']} ({report['reference_source']})")
        for algorithm, entry in report["algorithms"].items():
            print(f"{algorithm:<16} hypervolume {entry['hypervolume']:.5f}  non-dominated "
                  + ", ".join(f"p={e['preference']} → {[round(x, 3) for x in e['rewards']]}" for e in entry["non_dominated"]))
        print(f"outputs in {out}/ (pareto.csv, pareto.png, hypervolume.json, runs/)")
        self.report = report

    def run_flower(self) -> None:
        from firm_lightning.flower.launch import launch  # imports flwr only for this command

        out = self._prepare_output_dir()
        settings = self._section("flower")
        print(f"FIRM federation on Flower ({settings.engine}, algorithm {settings.algorithm.name}); writing to {out}/", flush=True)
        self.processes = launch(out / "config.yaml", settings, self.datamodule, _echo)

    def run_validate(self) -> None:
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path:
            self.model.load_adapter_state(load_adapter_file(ckpt_path))
        federation = self._section("federation")
        with quiet_lightning(federation.quiet):
            trainer = TrainerFactory(
                {**self._get(self.config, "trainer").as_dict(), "max_steps": 1}, federation.output_dir
            ).eval_trainer()
            results = trainer.validate(self.model, datamodule=self.datamodule, verbose=False)[0]
        print(f"adapter: {ckpt_path or '(freshly initialised)'}")
        for key, value in results.items():
            print(f"{key:<32}{value:.4f}")
        self.results = results

    def run_generate(self) -> None:
        ckpt_path = self._get(self.config, "ckpt_path")
        if ckpt_path:
            self.model.load_adapter_state(load_adapter_file(ckpt_path))
        self.generations = generate(self.model, self._section("generate"), self._device())
        print(f"adapter: {ckpt_path or '(freshly initialised)'}")
        print(format_generations(self.generations))


def load_adapter_file(path: str) -> dict:
    """The tensors of an adapter file, refusing files that are not readable safetensors."""
    file = _adapter_file(path)
    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise ValueError(
            f"{file} is not a readable safetensors adapter ({error}): it is damaged, truncated or another kind of "
            "file. Pass an adapter written by `fit` (<output_dir>/adapters/round_<r>.safetensors or adapters/final)."
        ) from error


def _as_dict(value):
    return value.as_dict() if hasattr(value, "as_dict") else value


def _adapter_file(path: str) -> Path:
    """A .safetensors adapter file, or a peft adapter folder holding adapter_model.safetensors."""
    p = Path(path)
    if p.is_dir():
        p = p / "adapter_model.safetensors"
    if not p.is_file():
        raise FileNotFoundError(
            f"No adapter at {path!r}: pass a .safetensors file written by `fit` "
            "(e.g. <output_dir>/adapters/round_005.safetensors) or a folder holding adapter_model.safetensors."
        )
    return p


def _echo(message: str) -> None:
    print(message, flush=True)


# Errors a user can fix from the message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FederationError)
DEBUG_ENV = "FIRM_DEBUG"


def main(args=None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        FIRMCLI(args=args)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {user_message(error)} (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; continue with `--federation.resume true` (same output_dir)", file=sys.stderr)
        sys.exit(130)


def user_message(error: BaseException) -> str:
    """One line: the message of the outermost exception in the chain that this package raised
    (jsonargparse re-raises our validation errors inside its Union dump), else the error's own."""
    chosen, current = error, error
    while current is not None:
        frames = traceback.extract_tb(current.__traceback__)
        if frames and f"{os.sep}firm_lightning{os.sep}" in frames[-1].filename:
            chosen = current
            break
        current = current.__cause__ or current.__context__
    text = re.sub(r"^\[Errno \d+\] ", "", str(chosen))  # OSError's prefix says nothing to a user
    return re.sub(r"\s+", " ", text).strip() or type(chosen).__name__


if __name__ == "__main__":
    main(sys.argv[1:])

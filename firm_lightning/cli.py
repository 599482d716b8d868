"""``python -m firm_lightning <command> --config X.yaml [--group.option value ...]``.

Commands: ``fit`` (a whole federation), ``validate`` (evaluate a saved adapter), ``generate``
(print its responses with their rewards), ``compare`` (several algorithms on identical seeds),
``pareto`` (a preference sweep) and ``flower`` (the federation on Flower). Each parses the same
config groups (``config.py``: ``model``, ``data``, ``trainer``, ``optimizer``, ``lr_scheduler``,
``federation``) plus its own section; every option is also a flag, and ``--print_config``
shows the resolved config.

A user error (a bad, misspelt or abbreviated setting, an unreadable file, a federation that cannot
go on) ends in one message on stderr that names the problem, and exit code 1; ``--debug`` or
``FIRM_DEBUG=1`` shows the full traceback instead; Ctrl-C ends in one line and exit code 130.
``<command> --help`` lists the options (the Trainer's common ones; ``--help_all``: every one); a
command without ``--config`` and its required settings points at an example config.

The commands that write a run folder (``fit``, ``compare``, ``pareto``, ``flower``) hold its lock
for their whole life and write nothing, ``config.yaml`` included, until every check that can refuse
the run has passed: a refused run leaves the folder as it found it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from jsonargparse import ArgumentError

from firm_lightning.commands import COMMANDS, PROG, Command, usage  # noqa: F401 (the CLI's names)
from firm_lightning.state import FederationError

if TYPE_CHECKING:
    from firm_lightning.config import Components
    from firm_lightning.run_folder import RunFolder
    from firm_lightning.studies.compare import CompareSettings
    from firm_lightning.studies.pareto import ParetoSettings
    from firm_lightning.trainer_factory import TrainerFactory

# What a command needs is imported when it runs (``python -m firm_lightning --help`` and
# ``<command> --help`` import no more than they show).


class FIRMCLI:
    """``FIRMCLI(args=["fit", "--config", "configs/tiny.yaml"])`` runs a command as the shell would.

    Afterwards ``model``, ``datamodule`` and ``components`` are the built objects, plus what the
    command produced: ``state`` (fit), ``results`` (validate), ``generations``, ``summary`` and
    ``claims`` (compare), ``report`` (pareto), ``processes`` (flower).
    """

    def __init__(self, args: Optional[list[str]] = None) -> None:
        args = list(sys.argv[1:] if args is None else args)
        if not args or args[0] in ("-h", "--help"):
            print(usage())
            return
        self.subcommand, rest = args[0], args[1:]
        if self.subcommand not in COMMANDS:
            raise ValueError(f"Unknown command {self.subcommand!r}; choose one of {', '.join(COMMANDS)} "
                             f"(`{PROG} --help` describes them).")
        command = COMMANDS[self.subcommand]
        from firm_lightning.config import build_components

        try:
            self.components: Components = build_components(
                rest, command.sections, command.ckpt_path, command.description, f"{PROG} {self.subcommand}",
                command.data_unless,
            )
        except ArgumentError as error:
            if "arguments are required" not in str(error) or _has_config(rest):
                raise
            raise ArgumentError(None, f"{error}; start from a config: {PROG} {self.subcommand} --config "
                                      f"{command.example}") from error
        self.model, self.datamodule = self.components.module, self.components.datamodule
        getattr(self, f"run_{self.subcommand}")()

    # ---- helpers ----

    def _section(self, group: str):
        return self.components.federation if group == "federation" else self.components.sections[group]

    def _folder(self) -> RunFolder:
        from firm_lightning.run_folder import RunFolder

        return RunFolder(self.components.federation.output_dir)

    def _save_config(self) -> None:
        """The resolved config into the run folder: called once the run is accepted, before its first record."""
        self.components.save_config(self._folder().create().config)

    def _check_sweep(self, shared: bool = False) -> None:
        """What can refuse a sweep (``compare``, ``pareto``) before it writes: its folder (it may hold its own
        runs, not another run's files), the client optimiser and Trainer, the data and its prompts."""
        from firm_lightning.engine import RoundEngine
        from firm_lightning.trainer_factory import TrainerFactory

        federation, folder = self.components.federation, self._folder()
        if shared and federation.overwrite:
            raise ValueError("compare.share_folder and federation.overwrite: overwrite would remove the runs of the "
                             "processes sharing the folder; overwrite in a run of its own first.")
        folder.check_clean_start(federation.resume, federation.overwrite, sweep=True)
        trainers = TrainerFactory(self.components.trainer_config, folder.path)
        RoundEngine(self.model, self.datamodule, federation, trainers, echo=lambda _: None).check_settings()
        self.datamodule.setup("fit")

    def _start_sweep(self) -> Path:
        """The sweep's checks passed: clear an earlier one (``overwrite``), save the config."""
        if self.components.federation.overwrite:
            self._folder().clear()
        self._save_config()
        return self._folder().path

    def _refuse_federation_algorithm(self, owner: str) -> None:
        """``compare`` and ``pareto`` run their own lists of algorithms: a federation.algorithm would be ignored."""
        if self.components.federation.algorithm is not None:
            raise ValueError(
                f"federation.algorithm is set, but `{self.subcommand}` runs the algorithms of {owner}; "
                f"list it there and remove federation.algorithm."
            )

    def _ckpt_path(self) -> Optional[str]:
        return self.components.config.get("ckpt_path")

    def _device(self) -> str:
        import torch

        accelerator = str(self.components.trainer_config.get("accelerator") or "auto")
        return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"

    # ---- commands ----

    def run_fit(self) -> None:
        from firm_lightning.distributed import launch_ranks
        from firm_lightning.orchestrator import FederatedOrchestrator
        from firm_lightning.trainer_factory import TrainerFactory

        federation = self.components.federation
        # trainer.strategy=ddp with k devices: ranks 1..k-1 are this command again and only serve the client
        # fits that rank 0 announces; rank 0 runs the federation and alone writes (firm_lightning/distributed.py).
        with launch_ranks(self.components.trainer_config) as ranks:
            if ranks.rank > 0:
                trainers = TrainerFactory(self.components.trainer_config, federation.output_dir)
                FederatedOrchestrator(self.model, self.datamodule, federation, trainers, echo=lambda _: None).serve()
                return
            folder = self._folder()
            with folder.lock("fit"):
                algorithm = (
                    federation.algorithm.name if federation.algorithm is not None
                    else f"weighting {self.model.weighting!r}"
                )
                print(
                    f"FIRM federation: {federation.num_rounds} rounds, {federation.num_clients} clients, "
                    f"objectives {self.model.objective_names}, {algorithm}; writing to {folder.path}/"
                    + (f"; {ranks.world} devices per client (ddp)" if ranks.world > 1 else ""),
                    flush=True,
                )
                trainers = TrainerFactory(self.components.trainer_config, folder.path)
                orchestrator = FederatedOrchestrator(self.model, self.datamodule, federation, trainers, echo=_echo)
                self.state = orchestrator.run(accepted=self._save_config)

    def run_compare(self) -> None:
        self._refuse_federation_algorithm("compare.algorithms")
        settings = self._section("compare")
        with self._folder().lock("compare", shared=settings.share_folder):
            self._check_sweep(shared=settings.share_folder)
            settings.claims_for(self.model.objective_names)  # a bad claim fails before anything is written
            self._compare(settings, self._start_sweep())

    def _compare(self, settings: CompareSettings, out: Path) -> None:
        from firm_lightning.run_folder import RunFolder, atomic_write
        from firm_lightning.studies import claims
        from firm_lightning.studies.compare import (
            claims_report,
            markdown_table,
            plot_comparison,
            run_comparison,
            summarize,
        )

        federation = self.components.federation
        print(
            f"compare: {[a.name for a in settings.algorithms]} × seeds {settings.seeds} × "
            f"α {settings.dirichlet_alphas or [self.datamodule.hparams['dirichlet_alpha']]}; writing to {out}/",
            flush=True,
        )
        rows = run_comparison(self.model, self.datamodule, federation, self.components.trainer_config, settings, _echo)
        table = summarize(rows, self.model.objective_names)
        claims_rows, claims_text = claims_report(rows, self.model.objective_names, out, settings)
        sentences = "\n".join(f"- {claims.verdict_sentence(r, settings.reference)}" for r in claims_rows)
        text = (
            markdown_table(table) + f"\n\n## Claims: {settings.reference} − baseline, paired on seed\n\n"
            + claims_text + "\n\n" + sentences
        )
        folder = RunFolder(out)
        atomic_write(folder.sweep_summary, (text + "\n").encode())
        plot_comparison(rows, self.model.objective_names, folder.plots)
        print(text)
        print(f"outputs in {out}/ ({folder.metrics.name}, {folder.sweep_summary.name}, {folder.plots.name}/, "
              f"{folder.runs.name}/)")
        self.summary = table
        self.claims = claims_rows

    def run_pareto(self) -> None:
        self._refuse_federation_algorithm("pareto.algorithms")
        with self._folder().lock("pareto"):
            self._check_sweep()
            self._pareto(self._section("pareto"), self._start_sweep())

    def _pareto(self, settings: ParetoSettings, out: Path) -> None:
        from firm_lightning.run_folder import RunFolder
        from firm_lightning.studies.pareto import front_report, run_sweep, write_outputs

        federation = self.components.federation
        names = self.model.objective_names
        print(
            f"pareto: {[a.name for a in settings.algorithms]} × preferences {settings.preferences}; writing to {out}/"
        )
        tic = time.perf_counter()
        rows = run_sweep(self.model, self.datamodule, federation, self.components.trainer_config, settings, _echo)
        report = front_report(rows, names, settings.reference)
        report["wall_s"] = time.perf_counter() - tic
        write_outputs(rows, names, report, out)
        print(f"reference point {report['reference']} ({report['reference_source']})")
        for algorithm, entry in report["algorithms"].items():
            print(
                f"{algorithm:<16} hypervolume {entry['hypervolume']:.5f}  non-dominated "
                + ", ".join(
                    f"p={e['preference']} → {[round(x, 3) for x in e['rewards']]}" for e in entry["non_dominated"]
                )
            )
        folder = RunFolder(out)
        print(f"outputs in {out}/ ({folder.pareto_table.name}, {folder.pareto_plot.name}, {folder.hypervolume.name}, "
              f"{folder.runs.name}/)")
        self.report = report

    def run_flower(self) -> None:
        from firm_lightning.flower.launch import launch  # imports flwr only for this command
        from firm_lightning.engine import RoundEngine
        from firm_lightning.trainer_factory import TrainerFactory

        settings, federation, folder = self._section("flower"), self.components.federation, self._folder()
        with folder.lock("flower"):
            settings.check(federation)  # before any process starts
            # The server app runs these checks again in its own process; here they refuse the run before
            # anything is written or started.
            trainers = TrainerFactory(self.components.trainer_config, folder.path)
            RoundEngine(self.model, self.datamodule, federation, trainers, echo=lambda _: None).check()
            if federation.overwrite:  # the server app is then told not to (its config's overwrite is false)
                folder.clear()
            self._save_config()
            algorithm = federation.algorithm.name if federation.algorithm is not None else "configured weighting"
            print(f"FIRM federation on Flower ({settings.engine}, {algorithm}); writing to {folder.path}/", flush=True)
            self.processes = launch(folder.config, settings, self.datamodule, _echo)

    def _eval_trainers(self) -> TrainerFactory:
        """Trainers for validate and generate (no client trains: max_steps only satisfies the check)."""
        from firm_lightning.trainer_factory import TrainerFactory

        return TrainerFactory({**self.components.trainer_config, "max_steps": 1}, self.components.federation.output_dir)

    def _load_adapter(self) -> Optional[str]:
        """The adapter of --ckpt_path into the model (none: the freshly initialised one); its path."""
        ckpt_path = self._ckpt_path()
        if ckpt_path:
            from firm_lightning.run_folder import load_adapter_file

            self.model.load_adapter_state(load_adapter_file(ckpt_path))
        return ckpt_path

    def _read_run(self, trainers: TrainerFactory) -> Optional[Path]:
        """Load the adapter of --ckpt_path and the run's evaluation statistics, as `fit` evaluated it.

        The statistics come from --objective_state, or ``objective_state.json`` beside the adapter;
        a freshly initialised adapter is calibrated as `fit` calibrates round 0."""
        from firm_lightning.engine import calibrated_statistics
        from firm_lightning.rewards import load_objective_states
        from firm_lightning.run_folder import OBJECTIVE_STATE_FILE, RunFolder, objective_state_beside

        ckpt_path = self._load_adapter()
        if not needs_statistics(self.model.objectives):
            return None
        explicit = self.components.config.get("objective_state")
        path = Path(explicit) if explicit else objective_state_beside(ckpt_path) if ckpt_path else None
        if path is None:
            if ckpt_path:
                raise FileNotFoundError(
                    f"No {OBJECTIVE_STATE_FILE} beside {ckpt_path}: normalised rewards need the statistics of the run "
                    f"that wrote it; pass --objective_state {RunFolder('<output_dir>').objective_state}."
                )
            self.datamodule.setup("validate")
            load_objective_states(self.model.objectives, calibrated_statistics(self.model, trainers, self.datamodule))
            return None
        try:
            load_objective_states(self.model.objectives, json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"Cannot read the evaluation statistics in {path} ({error}).") from error
        return path

    def run_validate(self) -> None:
        from firm_lightning.rewards import statistics_frozen
        from firm_lightning.trainer_factory import quiet_lightning

        federation, protocol = self.components.federation, self._section("evaluation")
        with quiet_lightning(federation.quiet):
            if protocol is not None:  # e.g. the HH-RLHF protocol (configs/hh_rlhf_eval.yaml); data: is not read
                statistics = None  # a protocol reads no run statistics (EvaluationProtocol.run)
                self._load_adapter()
                results = protocol.run(self.model, self._device())
            else:
                trainers = self._eval_trainers()
                statistics = self._read_run(trainers)
                with statistics_frozen(self.model.objectives):
                    results = trainers.eval_trainer().validate(self.model, datamodule=self.datamodule, verbose=False)[0]
        print(
            f"adapter: {self._ckpt_path() or '(freshly initialised)'}"
            + (f" (statistics: {statistics})" if statistics else "")
        )
        for key, value in results.items():
            print(f"{key:<32}{value:.4f}")
        self.results = results

    def run_generate(self) -> None:
        from firm_lightning.generate import format_generations, generate
        from firm_lightning.rewards import statistics_frozen
        from firm_lightning.trainer_factory import quiet_lightning

        with quiet_lightning(self.components.federation.quiet):
            statistics = self._read_run(self._eval_trainers())
        with statistics_frozen(self.model.objectives):
            self.generations = generate(self.model, self._section("generate"), self._device())
        print(
            f"adapter: {self._ckpt_path() or '(freshly initialised)'}"
            + (f" (statistics: {statistics})" if statistics else "")
        )
        print(format_generations(self.generations))


def needs_statistics(objectives) -> bool:
    """Whether some objective normalises with statistics a run calibrated (not fixed ones)."""
    from firm_lightning.rewards import stateful

    return any(getattr(o, "mode", "fixed") != "fixed" for o in stateful(objectives))


def _has_config(args: list[str]) -> bool:
    return any(a in ("-c", "--config") or a.startswith("--config=") for a in args)


def _echo(message: str) -> None:
    print(message, flush=True)


# Errors a user can fix from the message alone; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FederationError, ArgumentError)
DEBUG_ENV = "FIRM_DEBUG"


def main(args: Optional[list[str]] = None, run: Callable[[list[str]], object] = FIRMCLI) -> None:
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    from firm_lightning.trainer_factory import keyboard_interrupts

    try:
        with keyboard_interrupts():  # also when Lightning catches it inside a fit or an evaluation
            run(args)
    except USER_ERRORS as error:
        if debug:
            raise
        command = f"{PROG} {args[0]}" if args and args[0] in COMMANDS else PROG
        hint = f"`{command} --help` lists the options" if isinstance(error, ArgumentError) else ""
        print(f"error: {user_message(error)}" + (f" ({hint})" if hint else "")
              + f" (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
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

"""The command line's behaviour, pinned without running a federation: the commands, their options,
``--print_config``, the num_clients/seed links, the messages of bad input, and the builder's use
of LightningCLI's public API only."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from firm_lightning import cli, config
from firm_lightning.cli import COMMANDS, main
from firm_lightning.config import build_components

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")


def _exit(args, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_top_level_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "validate", "generate", "compare", "pareto", "flower"):
        assert f"  {name} " in out
    assert set(COMMANDS) == {"fit", "validate", "generate", "compare", "pareto", "flower"}


def test_an_unknown_command_is_named_with_the_choices(capsys):
    code, _, err = _exit(["fitt", "--config", CONFIG], capsys)
    assert code == 1 and "Unknown command 'fitt'" in err and "fit, validate, generate" in err


@pytest.mark.parametrize("command, option", [
    ("fit", "--federation.privacy"), ("validate", "--ckpt_path"), ("generate", "--generate.prompts"),
    ("compare", "--compare.algorithms"), ("pareto", "--pareto.preferences"), ("flower", "--flower.engine"),
])
def test_each_command_has_its_own_options(command, option, capsys):
    code, out, _ = _exit([command, "--help"], capsys)
    assert code == 0 and option in out and "--federation.algorithm" in out and "--trainer.max_steps" in out
    if command == "fit":
        assert "--flower.engine" not in out and "--ckpt_path" not in out


def test_print_config_round_trips_and_links_num_clients_and_seed(tmp_path, capsys):
    code, out, _ = _exit(
        [
            "fit",
            "--config",
            CONFIG,
            "--federation.num_clients",
            "3",
            "--federation.seed",
            "7",
            "--federation.algorithm",
            "firm_lightning.algorithms.FIRM",
            "--federation.algorithm.beta",
            "0.5",
            "--print_config",
        ],
        capsys,
    )
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed["federation"]["num_clients"] == 3 and printed["federation"]["seed"] == 7
    assert "num_clients" not in printed["data"]["init_args"]  # a link target: set from federation.num_clients only
    assert printed["federation"]["algorithm"]["init_args"]["beta"] == 0.5
    saved = tmp_path / "printed.yaml"
    saved.write_text(out)
    again = build_components(["--config", str(saved)])
    assert again.federation.num_clients == 3 and again.datamodule.num_clients == 3 and again.datamodule.seed == 7
    assert again.federation.algorithm.beta == 0.5


def test_a_misspelt_option_is_one_line_naming_it(capsys):
    code, out, err = _exit(["fit", "--config", CONFIG, "--federation.num_roundz", "3"], capsys)
    assert code == 1 and "--federation.num_roundz" in err and "--help" in err
    assert "usage:" not in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--federation.num_round", "--federation.num_r"])
def test_an_abbreviated_option_is_refused_naming_the_close_match(flag, capsys):
    code, _, err = _exit(["fit", "--config", CONFIG, flag, "1", "--print_config"], capsys)
    assert code == 1 and f"unrecognized arguments: {flag} 1; did you mean --federation.num_rounds?" in err


def test_a_misspelt_class_path_is_named_without_a_usage_dump(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model:\n  objectives:\n    - class_path: firm_lightning.rewards.NoSuchReward\n      init_args: {name: x}\n"
    )
    code, _, err = _exit(["fit", "--config", CONFIG, "--config", str(bad)], capsys)
    assert code == 1 and "NoSuchReward" in err and "usage:" not in err
    assert len(err.splitlines()) <= 3, err


def test_the_builder_uses_lightning_cli_public_api_only():
    """No private LightningCLI member is overridden or called by the builder or the CLI."""
    private = {name for name in dir(LightningCLI) if name.startswith("_") and not name.startswith("__")}
    overridden = {name for name, _ in inspect.getmembers(config.ComponentBuilder, inspect.isfunction)
                  if name in vars(config.ComponentBuilder)}
    assert not overridden & private, overridden & private
    for module in (config, cli):
        tree = ast.parse(inspect.getsource(module))
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not used & private, (module.__name__, used & private)


HELP_IMPORTS = """
import contextlib, io, runpy, sys
sys.argv = ["firm_lightning", "--help"]
with contextlib.redirect_stdout(io.StringIO()) as out:
    runpy.run_module("firm_lightning", run_name="__main__")
assert "fit" in out.getvalue()
print("imported:", sorted(m for m in ("torch", "lightning", "transformers", "firm_lightning.cli") if m in sys.modules))
"""


def test_help_imports_only_what_it_shows():
    """`--help` imports neither torch nor the CLI; the CLI module imports at module level only what
    parsing needs (each command imports its own modules when it runs, its section's when it parses)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True, cwd=root,
                          timeout=120)
    assert proc.returncode == 0 and "imported: []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    tree = ast.parse(Path(cli.__file__).read_text())
    top = {node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    top |= {a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    assert {m for m in top if m.startswith("firm_lightning")} == {"firm_lightning.commands", "firm_lightning.state"}
    assert "torch" not in top and not any(m.startswith(("lightning", "transformers")) for m in top)


def test_torch_threads_is_set_before_the_model_is_built_and_checked():
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        build_components(["--config", CONFIG, "--data.max_prompts", "16", "--torch_threads", "1"])
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        build_components(["--config", CONFIG, "--data.max_prompts", "16", "--torch_threads", "null"])
        assert torch.get_num_threads() == 2  # null: torch's own setting, untouched
        with pytest.raises(ValueError, match=r"torch_threads must be >= 1"):
            build_components(["--config", CONFIG, "--torch_threads", "0"])
    finally:
        torch.set_num_threads(before)
    configs = Path(CONFIG).parent
    for name in ("tiny", "compare_tiny", "pareto_tiny", "claims", "claims_quick"):  # tiny models and the testbed
        assert yaml.safe_load((configs / f"{name}.yaml").read_text())["torch_threads"] == 1, name
    for name in ("hh_rlhf_gpt2", "hh_rlhf_qwen"):  # real models: torch's default
        assert "torch_threads" not in yaml.safe_load((configs / f"{name}.yaml").read_text()), name


def test_a_missing_optional_package_is_one_line_naming_it_and_its_extra(tmp_path, capsys, monkeypatch):
    """The documented W&B command without wandb (the loggers extra): one line naming the key, the class, the
    package and the install command, not jsonargparse's union dump; nothing written."""
    import importlib.util

    from lightning.pytorch.loggers import wandb
    from lightning_utilities.core.imports import RequirementCache

    if importlib.util.find_spec("wandb") is not None:  # installed here: Lightning's check made to fail as without it
        monkeypatch.setattr(wandb, "_WANDB_AVAILABLE", RequirementCache("wandb>=999"))
    out = tmp_path / "run"
    code, _, err = _exit(["fit", "--config", CONFIG, "--data.max_prompts", "16", f"--federation.output_dir={out}",
                          "--trainer.logger", "WandbLogger", "--trainer.logger.offline", "true"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Union" not in err, err
    assert err.startswith("error: trainer.logger: WandbLogger needs the package 'wandb', which is not installed: "
                          "pip install 'firm_lightning[loggers]' (or pip install wandb)"), err
    assert not out.exists()
    # A class path in a package that is not installed: named when the config is parsed.
    code, _, err = _exit(["fit", "--config", CONFIG, "--trainer.logger", "not_installed_pkg.Logger"], capsys)
    assert code == 1 and err.count("\n") == 1 and "Union" not in err, err
    assert "trainer.logger: Logger needs the package 'not_installed_pkg', which is not installed" in err


def test_the_extras_named_for_missing_packages_install_them():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    from firm_lightning.extras import EXTRAS, install_hint

    extras = tomllib.loads((Path(CONFIG).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for package, extra in EXTRAS.items():
        names = {Requirement(r).name for r in extras[extra]}
        assert package in names or any(n.startswith(package + "-") for n in names), (package, extra)  # mlflow-skinny
    assert install_hint("comet-ml") == "pip install comet-ml"


@pytest.mark.parametrize("command, example", [("fit", "configs/tiny.yaml"), ("compare", "configs/compare_tiny.yaml")])
def test_a_command_without_a_config_points_at_one(command, example, capsys):
    code, _, err = _exit([command], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"the following arguments are required: model.objectives, data; start from a config: " \
           f"python -m firm_lightning {command} --config {example}" in err, err
    assert (Path(CONFIG).parents[1] / example).is_file()


def test_help_shows_the_federation_first_and_the_trainer_in_short_help_all_shows_every_option(capsys):
    code, short, _ = _exit(["compare", "--help"], capsys)
    assert code == 0
    code, full, _ = _exit(["compare", "--help_all"], capsys)
    assert code == 0
    for text in (short, full):
        order = [text.index(option) for option in ("--help_all", "--federation.num_rounds", "--compare.algorithms",
                                                   "--model.objectives", "--data ", "--optimizer ", "--trainer ")]
        assert order == sorted(order), order
        assert text.startswith("usage: python -m firm_lightning compare --config X.yaml [--group.option value ...]")
    hidden = ("--trainer.gradient_clip_val", "--trainer.max_epochs", "--trainer.limit_val_batches")
    assert not any(option in short for option in hidden) and all(option in full for option in hidden)
    assert "--trainer.max_steps" in short and "--trainer.logger " in short and "--help_all shows its" in short
    assert len(short.splitlines()) < 0.8 * len(full.splitlines())


CONSOLE_SCRIPT = """
import contextlib, importlib, io, sys, tomllib
target = tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"]["firm-lightning"]
module, name = target.split(":")
script = getattr(importlib.import_module(module), name)
import firm_lightning.__main__
assert script is firm_lightning.__main__.main, target  # what `python -m firm_lightning` runs
with contextlib.redirect_stdout(io.StringIO()) as out:
    script(["--help"])
assert "firm-lightning <command>" in out.getvalue() and "python -m firm_lightning <command>" in out.getvalue()
print("imported:", sorted(m for m in ("torch", "lightning", "transformers", "firm_lightning.cli") if m in sys.modules))
"""


def test_the_console_script_is_python_m_firm_lightning_and_is_documented():
    """``firm-lightning`` (pyproject's [project.scripts]) runs the same main as ``python -m firm_lightning`` (its help
    imports nothing heavy either), and README and the getting-started page show it beside ``python -m``."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT], capture_output=True, text=True, cwd=root,
                          timeout=120)
    assert proc.returncode == 0 and "imported: []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    for page in ("README.md", "docs/getting-started.md"):
        assert "firm-lightning fit --config configs/tiny.yaml" in (root / page).read_text(), page

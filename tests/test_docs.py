"""The docs site: built strictly, with a configuration reference and an API reference that follow the code.

The site is built once per session (or taken from ``FIRM_DOCS_SITE``, which ``make test`` sets
to the site it has just built with ``mkdocs build --strict``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import firm_lightning as fl

ROOT = Path(__file__).resolve().parents[1]


def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site_dir)],
        cwd=config.parent, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    """The built site: ``$FIRM_DOCS_SITE`` if set (``make test`` builds it first), else built here."""
    given = os.environ.get("FIRM_DOCS_SITE")
    if given:
        path = (ROOT / given).resolve()
        assert (path / "index.html").is_file(), f"FIRM_DOCS_SITE={given} holds no built site (run mkdocs build)"
        return path
    path = tmp_path_factory.mktemp("site")
    result = mkdocs_build(ROOT / "mkdocs.yml", path)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return path


def page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text()


def test_api_reference_documents_every_public_name(site):
    html = page(site, "api")
    missing = [name for name in fl.__all__ if f'id="firm_lightning.{name}"' not in html]
    assert not missing, f"no API entry for {missing}"
    # rendered from the docstrings, not only named
    assert "the only trained (and communicated) weights" in html  # FIRMClientModule's Args: lora


def test_configuration_reference_has_every_option_of_every_command_section(site):
    from firm_lightning.cli import COMMANDS
    from firm_lightning.federation import FederationConfig
    from firm_lightning.module import SamplingSettings

    html = page(site, "configuration")
    classes = {cls for command in COMMANDS.values() for cls in command.sections.values()}
    classes |= {FederationConfig, fl.FIRMClientModule, fl.PromptDataModule, SamplingSettings, fl.PolicyGradientSettings,
                fl.LoRASettings, fl.DifferentialPrivacy}
    for cls in classes:
        assert f"<code>{cls.__module__}.{cls.__qualname__}</code>" in html, f"no generated table for {cls.__name__}"
    import dataclasses

    for field in dataclasses.fields(FederationConfig):
        assert f"<code>federation.{field.name}</code>" in html, f"federation.{field.name} missing"
    for field in dataclasses.fields(SamplingSettings):
        assert f"<code>model.sampling.{field.name}</code>" in html, f"model.sampling.{field.name} missing"


def test_strict_build_fails_on_an_option_without_a_description(tmp_path):
    """The generated reference cannot silently lose a meaning: an undocumented option fails the build."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "firm_lightning").symlink_to(ROOT / "firm_lightning")
    shutil.copy(ROOT / "docs" / "hooks" / "config_reference.py", tmp_path / "hook.py")
    # TinyPolicy's options are described only in docs/config_descriptions.yml, which this site lacks.
    (tmp_path / "docs" / "index.md").write_text("# x\n\n<!-- config: firm_lightning.policy.TinyPolicy p -->\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\nhooks: [hook.py]\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "firm_lightning.policy.TinyPolicy: option 'num_layers' has no description" in result.stderr

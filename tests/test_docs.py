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
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(config),
            "--site-dir",
            str(site_dir),
        ],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
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


def doc_sources() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "README.md", *sorted(docs.glob("*.md")), *sorted((docs / "results").glob("*.json"))]


def test_no_glyph_needs_an_emoji_font():
    """Symbols of the emoji and dingbat blocks (✅, ❌, ⚠) show as empty boxes without an emoji font."""
    import re

    emoji = re.compile("[\u2600-\u27bf\u2b00-\u2bff\ufe0f\U0001f000-\U0001faff]")
    found = {p.name: sorted(set(emoji.findall(p.read_text()))) for p in doc_sources()}
    assert not {k: v for k, v in found.items() if v}


def test_results_pages_are_written_for_users():
    """The development history (issue numbers, "what changed from the earlier table") lives in changelog.md."""
    import re

    history = re.compile(r"\bissues? \d+\b|earlier table", re.IGNORECASE)
    found = {p.name: history.findall(p.read_text()) for p in doc_sources() if p.name != "changelog.md"}
    assert not {k: v for k, v in found.items() if v}


# ---- the built site in a real browser ----

# (page path, its title in the browser, its h1)
MAIN_PAGES = [
    ("", "firm_lightning", "firm_lightning"),
    ("getting-started/", "Getting started - firm_lightning", "Getting started"),
    ("concepts/", "Concepts - firm_lightning", "Concepts"),
    ("configuration/", "Configuration reference - firm_lightning", "Configuration reference"),
    ("flower/", "Federation on Flower - firm_lightning", "Federation on Flower"),
    ("reliability/", "Reliability and privacy - firm_lightning", "Reliability and privacy"),
    ("claims/", "The claims and what we measured - firm_lightning", "What the paper claims, and what we measured"),
    ("performance/", "Performance - firm_lightning", "Performance"),
    ("api/", "API reference - firm_lightning", "API reference"),
    ("quickstart/", "Quickstart notebook - firm_lightning", "firm_lightning quickstart: a federation from Python"),
]
NAV_ENTRIES = ["Getting started", "Concepts", "Configuration reference", "Federation on Flower",
               "Reliability and privacy", "Performance", "API reference"]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture()
def served(site):
    """The site on an HTTP server on localhost; yields (base URL, the (path, status) of every request)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    requests: list[tuple[str, int]] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_request(self, code="-", size="-"):
            requests.append((self.path, int(code)))

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()


def chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).is_file():
            pytest.fail(
                f"{path} is missing: `apt-get install chromium chromium-driver` (.ci/run does it) "
                "for the docs' browser test."
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # Given the driver's path, Selenium Manager (which would look drivers up online) is not used.
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def test_main_pages_render_with_their_navigation_in_a_headless_browser(served, tmp_path):
    from selenium.webdriver.common.by import By

    base, requests = served
    driver = chromium(tmp_path)
    try:
        for path, title, heading in MAIN_PAGES:
            driver.get(base + path)
            assert driver.title == title, f"/{path}: title {driver.title!r}"
            assert driver.find_element(By.CSS_SELECTOR, "article h1").text.strip() == heading
            nav = driver.find_element(By.CSS_SELECTOR, "nav.md-nav--primary")
            links = [
                a.get_attribute("textContent").strip() for a in nav.find_elements(By.CSS_SELECTOR, "a.md-nav__link")
            ]
            missing = [entry for entry in NAV_ENTRIES if entry not in links]
            assert not missing, f"/{path}: navigation lacks {missing}"
            # the theme's stylesheet is applied (the header is the palette's indigo, not unstyled)
            header = driver.find_element(By.CSS_SELECTOR, "header.md-header")
            assert header.value_of_css_property("background-color") == "rgba(64, 81, 181, 1)"  # indigo, #4051b5
            # nothing loaded from anywhere but this server
            resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            assert all(r.startswith(base) for r in resources), [r for r in resources if not r.startswith(base)]
            driver.save_screenshot(str(tmp_path / f"{path.strip('/') or 'index'}.png"))
    finally:
        driver.quit()
    failed = [(p, code) for p, code in requests if code >= 400]
    assert not failed, f"requests that failed: {failed}"
    assert {p for p, _ in requests} >= {"/" + path for path, _, _ in MAIN_PAGES}


def test_search_for_an_option_lands_on_the_configuration_reference(served, tmp_path):
    """By its last part and by its dotted name (the search splits words at dots, not at underscores)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _ = served
    driver = chromium(tmp_path)
    try:
        for query in ("learning_rate", "model.learning_rate", "max_new_tokens", "sampling.max_new_tokens"):
            driver.get(base)
            box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")
            box.click()
            box.send_keys(query)
            WebDriverWait(driver, 20).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item a"))
            first = driver.find_element(By.CSS_SELECTOR, ".md-search-result__item a").get_attribute("href")
            assert first.startswith(base + "configuration/"), (query, first)
            first_option = driver.find_element(By.CSS_SELECTOR, ".md-search-result__item")
            assert query.split(".")[-1] in first_option.get_attribute("textContent"), query
    finally:
        driver.quit()


def meaning_columns(driver) -> list[dict]:
    """For each configuration table: how far it overflows its page column, and its meaning column's width."""
    return driver.execute_script("""
      const article = document.querySelector('article.md-content__inner').getBoundingClientRect();
      const tables = [...document.querySelectorAll('article table')]
        .filter(t => [...t.querySelectorAll('th')].map(th => th.textContent.trim()).includes('meaning'));
      return tables.map(table => {
        const scroller = table.closest('.md-typeset__scrollwrap') || table.parentElement;
        const meaning = table.querySelector('tbody tr td:nth-child(4)').getBoundingClientRect();
        return {overflow: Math.max(scroller.scrollWidth - scroller.clientWidth,
                                   table.getBoundingClientRect().right - article.right),
                meaning_width: meaning.width, meaning_right: meaning.right, article_right: article.right,
                viewport: window.innerWidth};
      });""")


def test_the_configuration_tables_meaning_column_is_visible_at_1400_px_and_on_a_phone(served, tmp_path):
    base, _ = served
    driver = chromium(tmp_path)
    try:
        driver.set_window_size(1400, 900)
        driver.get(base + "configuration/")
        tables = meaning_columns(driver)
        assert len(tables) >= 20
        for table in tables:
            assert table["overflow"] <= 1, table  # no sideways scrolling, nothing cut off at the right
            assert table["meaning_right"] <= table["article_right"] + 1, table
            assert table["meaning_width"] >= 200, table  # a readable column, not a sliver
        # a phone (390 px wide): each option stacks, its meaning as wide as the screen allows
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        driver.get(base + "configuration/")
        for table in meaning_columns(driver):
            assert table["viewport"] == 390
            assert table["overflow"] <= 1 and table["meaning_right"] <= 390, table
            assert table["meaning_width"] >= 250, table
    finally:
        driver.quit()


def test_api_page_shows_no_sphinx_roles(served, tmp_path):
    from selenium.webdriver.common.by import By

    base, _ = served
    driver = chromium(tmp_path)
    try:
        driver.get(base + "api/")
        text = driver.find_element(By.CSS_SELECTOR, "article").text
        assert "FIRMClientModule" in text
        shown = [role for role in (":meth:", ":class:", ":func:", ":attr:", ":mod:") if role in text]
        assert not shown, f"Sphinx roles shown literally on the API page: {shown}"
    finally:
        driver.quit()


# ---- the README's example ----


def python_blocks(text: str) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_readme_python_example_runs_and_matches_the_docs(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    (example,) = python_blocks(readme)
    assert example in python_blocks((ROOT / "docs" / "getting-started.md").read_text()), (
        "the README's example and docs/getting-started.md's differ"
    )
    assert len(example.strip().splitlines()) <= 10
    import re

    targets = re.findall(r"\]\(((?:docs/)?[\w./-]+)\)", readme)
    assert targets and all((ROOT / t).is_file() for t in targets), [t for t in targets if not (ROOT / t).is_file()]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    state = namespace["state"]
    assert [row["round"] for row in state.history] == [0, 1, 2]
    assert (tmp_path / "runs" / "readme" / "adapters" / "final" / "adapter_model.safetensors").is_file()
    assert "eval/reward/a_to_m" in capsys.readouterr().out

"""MkDocs hook: the configuration reference and the API reference, generated so they cannot drift.

``<!-- config: firm_lightning.federation.FederationConfig federation -->`` in a page becomes a
table of every parameter of that class's signature (the options LightningCLI builds from it):
the option's key under the given prefix, its type and default from the signature, its meaning
from the ``Args:`` section of the class docstring. A parameter the docstring does not describe
takes its text from ``docs/config_descriptions.yml``; a parameter described in neither place, a
description there for a parameter that no longer exists, or one that the docstring now also
describes is a warning, which ``mkdocs build --strict`` turns into a failed build.

The API page must hold one ``::: firm_lightning.<name>`` directive for every name in
``firm_lightning.__all__`` (and none for names not in it): a public name added without docs,
or documented after it was removed, fails the strict build the same way.

Signatures and docstrings are read statically with griffe (what mkdocstrings uses), so the
build does not import torch.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import griffe
import yaml

log = logging.getLogger("mkdocs.hooks.config_reference")

MARKER = re.compile(r"<!--\s*config:\s*(?P<path>[\w.]+)(?:\s+(?P<prefix>[\w.]+))?\s*-->")
API_DIRECTIVE = re.compile(r"^:::\s*firm_lightning\.(\w+)\s*$", re.MULTILINE)
API_PAGE = "api.md"
TABLE_CLASS = "config-table"
DESCRIPTIONS = "config_descriptions.yml"

_state: dict = {}


def on_config(config, **kwargs):
    root = Path(config["config_file_path"]).parent
    _state["root"] = root
    _state["package"] = griffe.load("firm_lightning", search_paths=[str(root)], docstring_parser="google",
                                    allow_inspection=False)
    path = Path(config["docs_dir"]) / DESCRIPTIONS
    _state["fallback"] = yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
    _state["used"] = set()
    return config


def on_page_markdown(markdown, page, **kwargs):
    if page.file.src_uri == API_PAGE:
        check_api_page(markdown)
    return MARKER.sub(lambda m: config_table(m["path"], m["prefix"] or "", page.file.src_uri), markdown)


def on_post_build(config, **kwargs):
    for cls, options in _state["fallback"].items():
        for option in options or {}:
            if (cls, option) not in _state["used"]:
                log.warning(f"{DESCRIPTIONS}: {cls}.{option} is not an option of any config table in the docs "
                            "(renamed or removed?): delete the entry.")


def check_api_page(markdown: str) -> None:
    exported = list(_state["package"].exports or [])
    documented = API_DIRECTIVE.findall(markdown)
    for name in exported:
        if name not in documented:
            log.warning(f"{API_PAGE}: firm_lightning.__all__ exports {name!r} but the page has no "
                        f"'::: firm_lightning.{name}' directive.")
    for name in documented:
        if name not in exported:
            log.warning(f"{API_PAGE}: '::: firm_lightning.{name}' documents a name that firm_lightning.__all__ "
                        "does not export.")


def config_table(path: str, prefix: str, page: str) -> str:
    package = _state["package"]
    try:
        cls = package[path.removeprefix("firm_lightning.")]
    except KeyError:
        log.warning(f"{page}: config table for {path!r}: no such class in firm_lightning.")
        return f"**missing: `{path}`**"
    documented = docstring_params(cls)
    fallback = (_state["fallback"].get(path) or {})
    rows = []
    for param in cls.parameters:
        if param.name == "self" or param.kind in (
            griffe.ParameterKind.var_positional,
            griffe.ParameterKind.var_keyword,
        ):
            continue
        text = documented.get(param.name)
        if param.name in fallback:
            _state["used"].add((path, param.name))
            if text:
                log.warning(f"{DESCRIPTIONS}: {path}.{param.name} is now described in the docstring: delete the entry.")
            text = text or str(fallback[param.name])
        if not text:
            log.warning(f"{page}: {path}: option {param.name!r} has no description: add it to the class docstring's "
                        f"Args section (or to docs/{DESCRIPTIONS}).")
            text = ""
        key = f"{prefix}.{param.name}" if prefix else param.name
        rows.append(f"| `{key}` | {breakable(code(param.annotation))} | {breakable(default(param))} | {cell(text)} |")
    source = f"Generated from the signature and docstring of `{path}`"
    if not rows:  # e.g. a section's abstract type, whose subclasses have the options
        return f"{source}: no options of its own.\n"
    table = ["| option | type | default | meaning |", "|---|---|---|---|", *rows]
    # The wrapper's class lets docs/stylesheets/extra.css fit the table to the page (or stack it on a phone).
    return "\n".join([source + ".", "", f'<div class="{TABLE_CLASS}" markdown>', "", *table, "", "</div>", ""])


def docstring_params(cls) -> dict[str, str]:
    """Parameter descriptions from the class docstring's Args section (or ``__init__``'s)."""
    found: dict[str, str] = {}
    for obj in (cls, cls.members.get("__init__")):
        docstring = getattr(obj, "docstring", None)
        if docstring is None:
            continue
        for section in docstring.parse("google"):
            if section.kind == griffe.DocstringSectionKind.parameters:
                for param in section.value:
                    found.setdefault(param.name, param.description)
    return found


YAML_WORDS = {"None": "null", "True": "true", "False": "false"}


def default(param) -> str:
    """The default as it reads in YAML (null, true, false); a module constant by its full name."""
    value = param.default
    if value is None:
        return "required"
    if isinstance(value, griffe.ExprName):
        return code(value.canonical_path)
    return code(YAML_WORDS.get(str(value), value))


def code(value) -> str:
    text = str(value) if value is not None else ""
    if not text:
        return ""
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def breakable(code_span: str) -> str:
    """A code span as HTML that may wrap after ``.``, ``[``, ``,`` and ``|`` (``<wbr>``), so a long type or
    default breaks where a reader expects it to in a narrow column; copying it copies no extra character."""
    if not code_span.startswith("`"):
        return code_span
    text = code_span[1:-1].replace("\\|", "|")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r"([.\[,|])", r"\1<wbr>", text)
    # Markdown still reads the text inside inline HTML: its own characters become entities.
    return "<code>" + re.sub(r"[|_*\[\]\\]", lambda m: f"&#{ord(m[0])};", text) + "</code>"


def cell(text: str) -> str:
    """One table cell: one line, pipes escaped, ``<...>`` outside code spans shown as text, not HTML."""
    text = re.sub(r"\s+", " ", text).strip().replace("|", "\\|")
    parts = re.split(r"(`+[^`]*`+)", text)
    return "".join(p if p.startswith("`") else p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                   for p in parts)

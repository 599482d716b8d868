"""MkDocs hook: results rendered from committed results files, and no number quoted that a file does not hold.

Every measured result in the docs lives in a results file, ``docs/results/<name>.json``, written by the
command that measured it (``scripts/refresh_results.py`` for the cheap ones) or, for a study too long to rerun
here, transcribed once from the page with the command, date, machine and load the page stated. A file holds::

    {"about": {"title": ..., "command": ..., "date": ..., "machine": ..., "load": ..., "provenance": ...},
     "values": {"final": {"a_to_m": 0.4805, ...}, ...},                        # quoted one by one
     "tables": {"eval_rewards": {"columns": [...], "rows": [[...], ...]}},   # rendered whole
     "lists": {"verdicts": ["...", ...]}}                                   # rendered as bullets

A page uses them through three placeholders (replaced before the Markdown is rendered)::

    {{ results_table("tiny_demo", "eval_rewards") }}   the table; numbers with the table's "digits" (default 3)
    {{ results_list("claims", "verdicts") }}           a bulleted list
    {{ result("tiny_demo", "final.a_to_m") }}          one value (dotted path into "values", or "about.<key>");
                                                        an optional third argument is a format spec: ".4f", ",d"
    {{ results_source("tiny_demo") }}                  one line: the command, date, machine and load

Results regions are checked: every number typed by hand in one must be a number its results files hold
(rounded to the digits quoted), else a warning names the page, the number and the files, and
``mkdocs build --strict`` fails. A region is a page section (heading to next heading) that holds a
placeholder, checked against the files its placeholders name, or the text between
``<!-- results: name [name ...] -->`` and ``<!-- /results -->`` (also in README.md, which GitHub renders
and this site does not). "A number" is one with a decimal point, a thousands separator or an exponent, or an
integer of 10 or more; digits inside code, links, placeholders, HTML comments and words (``float32``,
``round_008``) are not numbers. Signs are not compared (``−0.014`` may be quoted as "by 0.014").
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.results")

RESULTS_DIR = "results"
README = "README.md"
PLACEHOLDER = re.compile(
    r"\{\{\s*(?P<kind>results_table|results_list|result|results_source)\(\s*(?P<args>[^)]*)\)\s*\}\}"
)
REGION = re.compile(r"<!--\s*results:\s*(?P<names>[\w\s-]+?)\s*-->(?P<body>.*?)<!--\s*/results\s*-->", re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s", re.MULTILINE)
# Code is shown as written (placeholders in it too); its digits, and those of HTML comments, link targets and
# URLs, are not quoted results.
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
NOT_PROSE = re.compile(CODE.pattern + r"|<!--.*?-->|\]\([^)]*\)|https?://\S+", re.DOTALL)
NUMBER = re.compile(
    r"(?<![\w.,])(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?(?:e(?P<exp>[−+-]?\d+))?(?![\w]|[.,]\d)"
)
SMALLEST_CHECKED_INTEGER = 10

_state: dict = {"dir": None, "cache": {}}


# ---- the MkDocs events ----


def on_config(config, **kwargs):
    _state["dir"] = Path(config["docs_dir"]) / RESULTS_DIR
    _state["cache"] = {}
    _state["root"] = Path(config["config_file_path"]).parent
    return config


def on_page_markdown(markdown, page, **kwargs):
    return render_page(markdown, page.file.src_uri)


def on_post_build(config, **kwargs):
    readme = _state["root"] / README
    if readme.is_file():
        check_regions(readme.read_text(), README)


# ---- rendering ----


def render_page(markdown: str, page: str) -> str:
    """The page with its results regions checked and its placeholders replaced."""
    check_page(markdown, page)
    pieces = re.split(f"({CODE.pattern})", markdown, flags=re.DOTALL)
    return "".join(piece if CODE.fullmatch(piece) else
                   PLACEHOLDER.sub(lambda m: render(m["kind"], arguments(m["args"]), page), piece)
                   for piece in pieces)


def render(kind: str, args: list[str], page: str) -> str:
    name = args[0] if args else ""
    data = load(name, page)
    if data is None:
        return f"**missing results file: `{name}`**"
    if kind == "results_source":
        return source_line(data["about"])
    if kind == "results_table":
        table = data.get("tables", {}).get(args[1] if len(args) > 1 else "")
        if table is None:
            log.warning(f"{page}: results_table{tuple(args)}: {path_of(name)} has no such table "
                        f"(it has {sorted(data.get('tables', {}))}).")
            return f"**missing results table: `{args}`**"
        return markdown_table(table)
    if kind == "results_list":
        items = data.get("lists", {}).get(args[1] if len(args) > 1 else "")
        if items is None:
            log.warning(f"{page}: results_list{tuple(args)}: {path_of(name)} has no such list.")
            return f"**missing results list: `{args}`**"
        return "".join(f"- {item}\n" for item in items)
    key = args[1] if len(args) > 1 else ""
    value = lookup(data.get("about", {}), key.removeprefix("about.")) if key.startswith("about.") else \
        lookup(data.get("values", {}), key)
    if value is None:
        log.warning(f"{page}: result{tuple(args)}: {path_of(name)} holds no value {args[1:2]}.")
        return f"**missing result: `{args}`**"
    return formatted(value, args[2] if len(args) > 2 else None)


def arguments(text: str) -> list[str]:
    """The placeholder's arguments: Python string literals separated by commas."""
    try:
        return [str(a) for a in ast.literal_eval(f"({text},)")] if text.strip() else []
    except (ValueError, SyntaxError):
        return [text]


def load(name: str, page: str):
    if name not in _state["cache"]:
        path = path_of(name)
        if not path.is_file():
            log.warning(f"{page}: no results file {path} (named {name!r}).")
            _state["cache"][name] = None
        else:
            _state["cache"][name] = json.loads(path.read_text())
    return _state["cache"][name]


def path_of(name: str) -> Path:
    return (_state["dir"] or Path("docs") / RESULTS_DIR) / f"{name}.json"


def lookup(values: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(values, dict) or part not in values:
            return None
        values = values[part]
    return values


def formatted(value, spec: str | None = None, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if spec:
        return format(value, spec)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def markdown_table(table: dict) -> str:
    digits = table.get("digits", 3)
    lines = ["| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    for row in table["rows"]:
        lines.append("| " + " | ".join(formatted(c, digits=digits).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def source_line(about: dict) -> str:
    """The measurement's provenance in one sentence or two: command, date, machine, load."""
    text = f"Measured with `{about['command']}`" if about.get("command") else "Measured"
    text += "".join(f"{sep}{about[key]}" for key, sep in (("date", " on "), ("machine", "; machine: "),
                                                           ("load", "; load: ")) if about.get(key)) + "."
    return f"{text} {about['provenance']}" if about.get("provenance") else text


# ---- the check: no number quoted that a results file does not hold ----


def check_page(markdown: str, page: str) -> None:
    for section in HEADING.split(CODE.sub(" ", markdown)):  # a "# comment" in a code block is no heading
        names = [arguments(m["args"])[0] for m in PLACEHOLDER.finditer(section) if arguments(m["args"])]
        if names:
            check_text(REGION.sub("", section), names, page)
    check_regions(markdown, page)


def check_regions(markdown: str, page: str) -> None:
    for region in REGION.finditer(CODE.sub(" ", markdown)):
        check_text(region["body"], region["names"].split(), page)


def check_text(text: str, names: list[str], page: str) -> None:
    held = [number for name in dict.fromkeys(names) for number in numbers_held(name, page)]
    files = ", ".join(str(path_of(n)) for n in dict.fromkeys(names))
    for quoted in quoted_numbers(text):
        value, quantum = parse(quoted)
        if not any(abs(abs(h) - abs(value)) <= quantum / 2 * (1 + 1e-9) + 1e-12 for h in held):
            log.warning(f"{page}: quotes {quoted}, which {files} does not hold: render it with "
                        "{{ result(...) }}, or add it (with its provenance) to the results file.")


def quoted_numbers(text: str) -> list[str]:
    prose = PLACEHOLDER.sub(" ", NOT_PROSE.sub(" ", text))
    found = []
    for m in NUMBER.finditer(prose):
        if m["frac"] or m["exp"] or "," in m["int"] or int(m["int"]) >= SMALLEST_CHECKED_INTEGER:
            found.append(m.group(0))
    return found


def parse(quoted: str) -> tuple[float, float]:
    """The number and half its last digit's place times two (the quantum it was rounded to)."""
    m = NUMBER.fullmatch(quoted)
    decimals = len(m["frac"]) - 1 if m["frac"] else 0
    exponent = int(m["exp"].replace("−", "-")) if m["exp"] else 0
    mantissa = float(m["int"].replace(",", "") + (m["frac"] or ""))
    return mantissa * 10.0 ** exponent, 10.0 ** (exponent - decimals)


def numbers_held(name: str, page: str) -> list[float]:
    data = load(name, page)
    return [] if data is None else list(flatten(data))


def flatten(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from flatten(v)
    elif isinstance(value, list):
        for v in value:
            yield from flatten(v)
    elif isinstance(value, bool):
        return
    elif isinstance(value, (int, float)):
        if math.isfinite(value):
            yield float(value)
    elif isinstance(value, str):
        for m in NUMBER.finditer(value.replace("−", "-")):
            yield parse(m.group(0))[0]

"""Optional dependencies: the package a configured class misses, and the one line that says how to install it.

A Lightning logger whose package is absent (``WandbLogger`` without wandb) fails when the config is
instantiated, and jsonargparse reports it inside a long "Does not validate against any of the Union
subtypes" dump; ``missing_package`` finds the package in the error's chain and ``install_hint`` names
the extra of this package that installs it. Imports nothing heavy.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Iterator, Optional

# The extra of pyproject.toml that installs a package, by the name a missing-module error gives (the import
# name, or the distribution a Lightning requirement names); tests/test_cli_surface.py checks it against pyproject.
EXTRAS = {"wandb": "loggers", "mlflow": "loggers"}

# Lightning's requirement checks (lightning_utilities.RequirementCache) say "Requirement 'wandb>=0.12.10' not met"
# or "Module not found: 'tensorboardX'"; an import says "No module named 'x'" (and sets ``name``).
_NAMED = re.compile(r"Requirement '([A-Za-z0-9][A-Za-z0-9._-]*)|Module not found: '([A-Za-z0-9_.]+)'")
_CLASS_PATH = re.compile(r"class_path '([\w.]+)'")


def chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def missing_package(error: BaseException) -> Optional[str]:
    """The package a ``ModuleNotFoundError`` in ``error``'s chain names as not installed, else None."""
    for link in chain(error):
        if not isinstance(link, ModuleNotFoundError):
            continue
        found = _NAMED.search(str(link))
        if found:
            return found.group(1) or found.group(2).split(".")[0]
        top = (link.name or "").split(".")[0]
        if top and importlib.util.find_spec(top) is None:  # an installed package's misspelt module is no missing one
            return top
    return None


def failing_class_path(error: BaseException) -> Optional[str]:
    """The class path jsonargparse names in the chain ("Problem with given class_path 'X'"), else None."""
    for link in chain(error):
        found = _CLASS_PATH.search(str(link))
        if found:
            return found.group(1)
    return None


def install_hint(package: str) -> str:
    """``pip install 'firm_lightning[loggers]' (or pip install wandb)``; ``pip install X`` without an extra."""
    extra = EXTRAS.get(package)
    return f"pip install 'firm_lightning[{extra}]' (or pip install {package})" if extra else f"pip install {package}"


def missing_package_line(error: BaseException, keys: list[str]) -> Optional[str]:
    """One line naming the uninstalled package behind ``error`` and how to install it; None if none is missing.
    ``keys``: the config keys that name the failing class (found by the caller), e.g. ``["trainer.logger"]``."""
    package = missing_package(error)
    if package is None:
        return None
    class_path = failing_class_path(error)
    who = class_path.rsplit(".", 1)[-1] if class_path else "This config"
    where = f"{', '.join(keys)}: " if keys else ""
    return f"{where}{who} needs the package '{package}', which is not installed: {install_hint(package)}"

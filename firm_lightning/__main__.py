"""``python -m firm_lightning`` and the installed ``firm-lightning`` (``[project.scripts]``): ``main``."""

import sys
from typing import Optional


def main(args: Optional[list[str]] = None) -> None:
    """The command list without importing anything else (no torch, Lightning, transformers); a command
    through the CLI (``firm_lightning.cli.main``)."""
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help"):
        from firm_lightning.commands import usage

        print(usage())
        return
    from firm_lightning.cli import main as run_command

    run_command(args)


if __name__ == "__main__":
    main()

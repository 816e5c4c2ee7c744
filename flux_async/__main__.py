"""``python -m flux_async``: the ``flux-async`` command line.

It needs the ``cli`` extra (click and tqdm); without it this says how to get it and
exits 2 instead of showing an ImportError traceback::

    $ python -m flux_async demo
"""

from __future__ import annotations

import sys

_CLI_DEPENDENCIES = frozenset({"click", "tqdm"})


def main() -> None:
    """Run the command line, or explain what to install when its dependencies are missing.

    Example::

        $ python -m flux_async generate prompts.txt --emulator
    """
    try:
        from ._cli import main as cli_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in _CLI_DEPENDENCIES:
            raise
        print(
            f"flux-async: the command line needs {exc.name}: pip install 'flux-async[cli]'",
            file=sys.stderr,
        )
        sys.exit(2)
    cli_main()


if __name__ == "__main__":
    main()

"""User-facing errors and the command-line wrapper that reports them in one line."""
from __future__ import annotations

import sys
from typing import Callable


class TransfiraError(Exception):
    """Bad input or configuration: reported as a one-line message, without a traceback."""


def describe(err: BaseException) -> str:
    """One line for an exception: the message of a :class:`TransfiraError`, else type and message."""
    return str(err) if isinstance(err, TransfiraError) else f"{type(err).__name__}: {err}"


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's ``main``; a :class:`TransfiraError` prints ``error: ...`` and exits 2."""
    try:
        main()
    except TransfiraError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

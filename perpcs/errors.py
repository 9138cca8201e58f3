"""One error type for every problem a user can fix (bad input, bad flags, missing files).

Scripts wrap their ``main`` in :func:`run_cli`, which prints the message and exits with code 2,
without a traceback: the message itself names the file, the user and the field.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn


class PerpcsError(Exception):
    """A problem in the user's input or settings; the message says what and where."""


def fail(message: str) -> NoReturn:
    raise PerpcsError(message)


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main; user-fixable errors exit 2 with one clear line on stderr."""
    try:
        main()
    except PerpcsError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

"""One kind of user-facing error, and the CLI wrapper that turns it into one line + exit 2.

Bad input must never end in a traceback: every check that can blame the user raises
`HeaderNetError` with a message naming the file or field and what was expected, and the thin
CLIs run their body through `run_cli`, which prints `error: <message>` and exits with code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Callable, Iterator, NoReturn

EXIT_BAD_INPUT = 2


class HeaderNetError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


def fail(message: str) -> NoReturn:
    """Raise a `HeaderNetError`; a terse helper for validation code."""
    raise HeaderNetError(message)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show Python warnings as `warning: <message>` (one line, no source location) while a CLI
    runs: they are messages to the user, not to the developer of the line that warned."""
    original = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"warning: {' '.join(str(message).split())}\n"
    try:
        yield
    finally:
        warnings.formatwarning = original


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI body: `HeaderNetError` becomes one stderr line and exit code 2; warnings are
    one line each."""
    try:
        with one_line_warnings():
            main()
    except HeaderNetError as exc:
        message = " ".join(str(exc).split())  # always one line
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line too (`--help` still prints the usage).

    argparse's default prints the whole usage block (~50 lines for the trainer) before the
    message; a user who typed `--backbone resnet` needs only the message.
    """

    def error(self, message: str) -> NoReturn:
        print(f"error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)

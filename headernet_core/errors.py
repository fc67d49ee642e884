"""One kind of user-facing error, and the CLI wrapper that turns it into one line + exit 2.

Bad input must never end in a traceback: every check that can blame the user raises
`HeaderNetError` with a message naming the file or field and what was expected, and the thin
CLIs run their body through `run_cli`, which prints `error: <message>` and exits with code 2.
An I/O error nobody checked for (a disk that fills up, a folder that vanished) is reported the
same way, naming the file: the environment, not the program, is what has to change.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import sys
import threading
import warnings
from typing import Callable, Iterator, NoReturn

EXIT_BAD_INPUT = 2


class HeaderNetError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


class OutOfMemoryEnd(HeaderNetError):
    """A run ran out of memory at micro-batch 1 (under DDP: at a global batch whose half would
    not divide by the `world` processes): nothing smaller is left to try. `peak`: the GiB in
    use then."""

    def __init__(self, peak: float, batch: int = 1, world: int = 1) -> None:
        where = f"batch {batch}" if world == 1 else \
            f"global batch {batch} of {world} DDP processes (its half would not divide by them)"
        super().__init__(f"out of memory at {where} (peak {peak:.1f} GiB)")
        self.peak, self.batch, self.world = peak, batch, world

    def __reduce__(self):   # rebuilt from its fields when pickled (a Ray Train worker's error)
        return type(self), (self.peak, self.batch, self.world)

    def record(self) -> dict[str, float | int]:
        """Its fields as status.json's `out_of_memory` holds them (`recorded_end` reads them)."""
        return {"peak_gib": self.peak, "batch": self.batch, "world": self.world}


def fail(message: str) -> NoReturn:
    """Raise a `HeaderNetError`; a terse helper for validation code."""
    raise HeaderNetError(message)


def fail_not_utf8(path: str | os.PathLike, exc: UnicodeDecodeError) -> NoReturn:
    """The one line for a text input (CSV, YAML) that is not UTF-8: where, and which byte."""
    fail(f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8")


def sigterm_as_sigint() -> None:
    """Treat SIGTERM (`kill`, `docker stop`, a batch scheduler) like Ctrl-C: whatever handles
    SIGINT at that moment runs (Ray Tune's graceful stop during a search, else
    KeyboardInterrupt), so the command ends with its interrupted state saved and exit code 130.
    Call it again after a library that installs its own SIGTERM handler (`ray.init` does)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def forward(signum, frame) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, forward)


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block act when it ends, through whatever handled
    them before: recording how a run ended is not cut off halfway. Under torchrun a peer's
    failure reaches rank 0 twice at once, as a broken collective and as the launcher's SIGTERM;
    a KeyboardInterrupt raised while rank 0 records the first left status.json `running`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: held.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back: the default
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if held:
            signal.raise_signal(held[0])


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


def _report(line: str) -> None:
    """Print a CLI's final line; under torchrun only rank 0 does (every rank fails alike)."""
    if os.environ.get("RANK", "0") in ("", "0"):
        print(line, file=sys.stderr)


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI body: `HeaderNetError` becomes one stderr line and exit code 2; warnings are
    one line each; an interruption (Ctrl-C or SIGTERM) exits with 130."""
    previous = signal.getsignal(signal.SIGTERM)
    sigterm_as_sigint()
    try:
        with one_line_warnings():
            main()
    except HeaderNetError as exc:
        message = " ".join(str(exc).split())  # always one line
        _report(f"error: {message}")
        raise SystemExit(EXIT_BAD_INPUT) from None
    except OSError as exc:
        _report(f"error: {' '.join(describe_os_error(exc).split())}")
        raise SystemExit(EXIT_BAD_INPUT) from None
    except RecursionError:
        _report("error: input nested too deeply to read (a config, space or JSON file?)")
        raise SystemExit(EXIT_BAD_INPUT) from None
    except KeyboardInterrupt:
        _report("interrupted")
        raise SystemExit(130) from None
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def describe_os_error(exc: OSError) -> str:
    """`<path>: <reason> [ERRNO]` for an I/O error, on one line."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    code = f" [{errno.errorcode[exc.errno]}]" if exc.errno in errno.errorcode else ""
    return f"{reason}{code}" if exc.filename is None else f"{exc.filename}: {reason}{code}"


def first_paragraph(doc: str | None) -> str:
    """A module docstring's first paragraph on one line: a CLI's `--help` description (its
    first line alone can stop mid-sentence)."""
    return " ".join((doc or "").strip().split("\n\n", 1)[0].split())


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line too (`--help` still prints the usage).

    argparse's default prints the whole usage block (~50 lines for the trainer) before the
    message; a user who typed `--backbone resnet` needs only the message.
    """

    def error(self, message: str) -> NoReturn:
        print(f"error: {' '.join(message.split())} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)

"""Where outputs may go: safe folder names, writable locations, never over an input, space left.

Everything here only looks (stat, access); it writes nothing, so the CLIs call it while
checking their input, before the first byte is written. A name that becomes a folder
(`--run_name`, the search's `--name`) is one path component of a few safe characters: `..`,
`a/b` or a 300-character name cannot land outside (or deep inside) the report folder.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from .errors import fail

MAX_NAME_LEN = 120          # a folder name; trial folders are cut to this length too
NAME_CHARS = "letters, digits, '.', '_' and '-'"


def check_name(value: str, flag: str, *, extra: str = "") -> str:
    """`value` if it is a single safe path component: starts with a letter or digit, then
    letters, digits, `._-` (and the characters in `extra`), at most MAX_NAME_LEN long."""
    allowed = re.escape(extra)
    pattern = rf"[A-Za-z0-9][A-Za-z0-9._{allowed}-]*"
    if not isinstance(value, str) or not re.fullmatch(pattern, value) or len(value) > MAX_NAME_LEN:
        shown = value if not isinstance(value, str) or len(value) <= 60 else value[:57] + "..."
        chars = NAME_CHARS if not extra else NAME_CHARS.replace(" and '-'", f", '-' and {extra!r}")
        fail(f"{flag} must be a plain folder name ({chars}; starting with a letter or digit; "
             f"at most {MAX_NAME_LEN} characters), got {shown!r}")
    return value


def check_writable_dir(folder: str | Path, what: str) -> None:
    """`folder` exists as a writable folder, or can be created: every existing part of it is
    a folder and the deepest existing one is writable."""
    folder = Path(folder).expanduser().absolute()
    probe = folder
    while not probe.exists() and not probe.is_symlink() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        detail = "" if probe == folder else f" (so {folder} cannot be created)"
        fail(f"{what} {probe} is a file, not a folder{detail}")
    if not probe.exists():
        fail(f"{what} {folder}: cannot be created ({probe} is a broken link)")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"{what} {folder}: {probe} is not writable")


def check_output_file(path: str | Path, what: str, *, inputs: Iterable[str | Path | None] = ()) -> None:
    """`path` can be written as a file: not a folder, its folder writable, and not one of the
    `inputs` (the same file under any name)."""
    path = Path(path).expanduser()
    if path.is_dir():
        fail(f"{what} {path} is a folder; expected a file path")
    check_writable_dir(path.parent, what)
    for source in inputs:
        if source is not None and same_file(path, source):
            fail(f"{what} {path} is an input of this command ({source}); inputs are never "
                 f"written: choose another path")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (resolving links; missing files compare by path)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or below it (both resolved)."""
    path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return path == folder or folder in path.parents


def folder_sizes(folder: str | Path) -> tuple[int, int]:
    """(bytes in all files, bytes of the largest file) under `folder`; (0, 0) when it does not
    exist. A file that vanishes while it is counted (an atomic write's temp file, renamed
    meanwhile) counts as 0."""
    total = largest = 0
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            try:
                size = os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
            total, largest = total + size, max(largest, size)
    return total, largest


def folder_bytes(folder: str | Path) -> int:
    """Bytes in the files under `folder` (see `folder_sizes`)."""
    return folder_sizes(folder)[0]


def free_bytes(folder: str | Path) -> int:
    """Free bytes on the filesystem that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free

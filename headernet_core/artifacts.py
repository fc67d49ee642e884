"""Run-folder files, written atomically (temp file in the same folder + rename).

A reader (a user, TensorBoard, a Tune driver, a resumed run) must never see half a file, and a
crash mid-write must leave the previous version intact.

- The temp file is created with mode 0666 and the kernel applies the umask, like any file the
  user creates (`tempfile.mkstemp` would make every artifact 0600 and hide results from the
  other users and containers of a shared results folder).
- `durable=True` fsyncs the file before the rename and the folder after it: for files the next
  step depends on (`last.pt` before a resume trusts it, a best checkpoint before the previous
  one is deleted, signed resume state).
- `replace=False` never replaces an existing file, even one created a moment ago by another
  process (hard link instead of rename): for files that must not overwrite user data.
- A temp file a kill left behind (`.<name>.<random>.tmp`) is removed by
  `remove_stale_temps` when the folder's owner starts again.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

TEMP_SUFFIX = ".tmp"
_TEMP_RE = re.compile(r"^\..+\.[0-9a-z_]{8}\.tmp$")  # ours and tempfile.mkstemp's (older runs)


def _create_temp(path: Path) -> Path:
    """An empty new file `.<name>.<8 hex>.tmp` beside `path` (mode 0666 & ~umask)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temp file name", str(path))


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's) content to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a folder; the file itself was synced
        if not Path(path).is_dir() or exc.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, durable: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it becomes `path` in one rename.

    `durable`: fsync before and after the rename. `replace=False`: refuse (FileExistsError) when
    `path` exists at the moment of the rename, whoever created it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    try:
        yield tmp
        if durable:
            fsync_path(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
        if durable:
            fsync_path(path.parent)
    except OSError as exc:
        if exc.filename is None or exc.filename == str(tmp):  # name the file, not its temp
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _link_no_clobber(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and fails if `path` exists
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: best effort
        if path.exists():
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.rename(tmp, path)


def remove_stale_temps(*folders: str | Path) -> list[Path]:
    """Delete the temp files an interrupted write left in `folders` (not recursive). Call it
    only while owning the folder (its lock held), so no live writer's temp file is removed."""
    removed = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if _TEMP_RE.match(entry.name) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def write_text(path: str | Path, text: str, *, durable: bool = False) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text)


def write_csv(frame: Any, path: str | Path, *, replace: bool = True) -> None:
    """A pandas DataFrame as CSV without its index, atomically (`atomic_path`)."""
    with atomic_path(path, replace=replace) as tmp:
        frame.to_csv(tmp, index=False)


def json_safe(value: Any) -> Any:
    """A JSON-ready value: NaN/inf become null so the file stays strict JSON, numpy and torch
    scalars become Python numbers; containers recursively."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any, *, durable: bool = False) -> None:
    write_text(path, json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n", durable=durable)


def read_json_dict(path: str | Path) -> dict[str, Any]:
    """A JSON object file as a dict; {} when it is absent, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def write_yaml(path: str | Path, data: dict[str, Any]) -> None:
    write_text(path, yaml.safe_dump(json_safe(data), sort_keys=False))

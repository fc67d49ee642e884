"""Run-folder files, written atomically (temp file in the same folder + `os.replace`).

A reader (a user, TensorBoard, a Tune driver, a resumed run) must never see half a file, and a
crash mid-write must leave the previous version intact.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _json_safe(value: Any) -> Any:
    """NaN/inf become null so the file stays strict JSON; numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")


def write_yaml(path: str | Path, data: dict[str, Any]) -> None:
    write_text(path, yaml.safe_dump(_json_safe(data), sort_keys=False))

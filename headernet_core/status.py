"""A run's `status.json`: its state, who runs it, and a heartbeat, so a dead run shows as dead.

    {"state": "running", "epochs_done": 3, "updated": "2026-05-01T10:00:00",
     "pid": 4242, "host": "gpu-node-1", "process_start": 123456,
     "heartbeat": "2026-05-01T10:04:30+00:00", "world_size": 1}

`state` is running / stopped / finished / failed / interrupted (`error` says why for the last
two; a run that ran out of memory with nothing smaller to try also has `out_of_memory`: its
peak, batch and processes). While a run is `running` the heartbeat is refreshed every
`HEARTBEAT_S` seconds, so a run whose process was killed (`kill -9`, the OOM killer, a reboot)
still says `running` on disk but `read_status` reports it `dead`: its pid is gone on its host,
or (seen from another host) its heartbeat is older than `STALE_S`.

If the disk is full the atomic rewrite (a new temp file) can fail while an in-place rewrite of
the existing, smaller-than-a-block file still succeeds: `write_status` falls back to that,
so a run that fails for lack of space can still say so.
"""
from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .artifacts import read_json_dict, write_json
from .errors import OutOfMemoryEnd
from .locks import owner_alive, owner_record

STATUS_NAME = "status.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# The heartbeat thread and the training loop both rewrite status.json: one at a time, so a
# heartbeat can never put back "running" over the loop's "finished".
_MUTEX = threading.Lock()


def write_status(run_dir: str | Path, state: str, epochs_done: int, error: str | None = None,
                 world_size: int = 1, out_of_memory: dict[str, Any] | None = None) -> None:
    """`world_size`: how many DDP processes train the run (rank 0 writes; 1 without DDP);
    `out_of_memory`: the fields of an `OutOfMemoryEnd` (`recorded_end`)."""
    payload = {"state": state, "epochs_done": epochs_done,
               "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), **owner_record(), "heartbeat": _now(),
               "world_size": world_size}
    if error:
        payload["error"] = error
    if out_of_memory:
        payload["out_of_memory"] = out_of_memory
    with _MUTEX:
        _store(Path(run_dir) / STATUS_NAME, payload)


def beat(run_dir: str | Path) -> None:
    """Refresh the heartbeat of this process's running run (from the heartbeat thread)."""
    with _MUTEX:
        record = read_status_record(run_dir)
        if record.get("state") == "running" and record.get("pid") == os.getpid():
            _store(Path(run_dir) / STATUS_NAME, {**record, "heartbeat": _now()})


def _store(path: Path, payload: dict[str, Any]) -> None:
    try:
        write_json(path, payload)
    except OSError:
        # No room for a temp file: overwrite the existing file's first block in place.
        with open(path, "r+" if path.exists() else "w") as fh:
            fh.write(json.dumps(payload, indent=2) + "\n")
            fh.truncate()


def read_status_record(run_dir: str | Path) -> dict[str, Any]:
    """The status.json record ({} when absent or unreadable)."""
    return read_json_dict(Path(run_dir) / STATUS_NAME)


def heartbeat_age(record: dict[str, Any]) -> float | None:
    try:
        beat = datetime.fromisoformat(str(record["heartbeat"]))
    except (KeyError, ValueError):
        return None
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=timezone.utc)
    return max(0.0, time.time() - beat.timestamp())


def effective_state(record: dict[str, Any]) -> str | None:
    """The recorded state, except `dead` for a `running` run whose process is gone."""
    state = record.get("state")
    if state == "running" and "pid" in record and not owner_alive(record, heartbeat_age(record)):
        return "dead"
    return state


def read_status(run_dir: str | Path) -> str | None:
    """running / dead / stopped / finished / failed / interrupted, or None without a status."""
    return effective_state(read_status_record(run_dir))


def recorded_end(status: Mapping[str, Any]) -> OutOfMemoryEnd | None:
    """The `OutOfMemoryEnd` a run's status.json record holds (written by whichever rank ran
    out), or None: how a search, a trial and DDP rank 0 tell such an end from a failure."""
    fields = status.get("out_of_memory")
    try:
        return OutOfMemoryEnd(float(fields["peak_gib"]), int(fields["batch"]), int(fields["world"]))
    except (TypeError, KeyError, ValueError):
        return None

"""One writer per folder: a lock file that a dead owner cannot hold forever, and a heartbeat.

A run folder (or a search folder) written by two processes at once ends up with interleaved
epochs and checkpoints from both. `FolderLock` creates `<folder>/.lock` exclusively (O_EXCL,
atomic on local disks and NFS) holding the owner's pid, host and process start time, and
touches it every `HEARTBEAT_S` seconds while the owner lives. A second owner is refused with
one line naming the holder, unless the lock is stale:

- same host: the pid no longer exists, or now belongs to another process (start time differs);
- another host (a cluster's shared storage): no heartbeat for `STALE_S` seconds.

A kill -9 therefore never leaves a folder locked for good, and a live owner on another machine
is respected.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .errors import fail

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0   # ten missed heartbeats


def hostname() -> str:
    return socket.gethostname()


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:  # the command name (field 2) may hold spaces and parentheses: split after its ')'
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def owner_record() -> dict[str, Any]:
    """Who this process is, as lock files and status.json record it."""
    pid = os.getpid()
    return {"pid": pid, "host": hostname(), "process_start": process_start(pid)}


def owner_alive(record: dict[str, Any], heartbeat_age: float | None) -> bool:
    """Whether the process a lock or status record names still runs. On this host that is
    known; elsewhere only the heartbeat tells (older than STALE_S: dead)."""
    pid = record.get("pid")
    if isinstance(pid, int) and record.get("host") == hostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # exists, owned by another user
        started = record.get("process_start")
        return started is None or process_start(pid) in (None, started)
    return heartbeat_age is not None and heartbeat_age < STALE_S


class FolderLock:
    """`with FolderLock(folder, "a search"):` — exclusive use of `folder` (created if needed)."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self.record: dict[str, Any] | None = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder, age = self._holder()
                if holder is not None and owner_alive(holder, age):
                    since = holder.get("since", "?")
                    fail(f"{self.folder} is in use by {holder.get('what', 'another process')} "
                         f"(pid {holder.get('pid')} on {holder.get('host')}, since {since}); wait "
                         f"for it to end, or if that process is gone, delete {self.path}")
                if holder is None and age is not None and age < STALE_S:
                    fail(f"{self.folder} is being taken by another process right now "
                         f"({self.path} is new and empty); try again in a moment")
                with contextlib.suppress(FileNotFoundError):  # stale: the owner is dead
                    self.path.unlink()
                continue
            self.record = {**owner_record(), "what": self.what,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(self.record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            holder, _ = self._holder()
            if holder != self.record:  # another process took it over in the same instant
                self.record = None
                fail(f"{self.folder} was taken by another process at the same moment; try again")
            return
        fail(f"{self.folder}: could not take {self.path}; delete it if no process uses the folder")

    def _holder(self) -> tuple[dict[str, Any] | None, float | None]:
        """The lock file's record (None if unreadable) and its age since the last heartbeat."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(text)
        except ValueError:
            return None, age
        return (record if isinstance(record, dict) else None), age

    def beat(self) -> None:
        """Mark the owner alive (the lock file's mtime is the heartbeat)."""
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        if self.record is None:
            return
        holder, _ = self._holder()
        if holder == self.record:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.record = None

    def __enter__(self) -> FolderLock:
        """Acquire, and keep the lock fresh while held: on another host only the heartbeat
        tells a live owner from a dead one (`owner_alive`), and a search or a retrain holds
        its folder far longer than STALE_S."""
        self.acquire()
        self._heartbeat = Heartbeat(self.beat, interval=HEARTBEAT_S).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._heartbeat.stop()
        self.release()


class Heartbeat:
    """Call `beats` every `interval` seconds on a daemon thread until `stop()`; a beat that
    raises is skipped (a heartbeat must never end the run it reports on)."""

    def __init__(self, *beats: Callable[[], None], interval: float = HEARTBEAT_S) -> None:
        self.beats, self.interval = beats, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="headernet-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for beat in self.beats:
                with contextlib.suppress(Exception):
                    beat()

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

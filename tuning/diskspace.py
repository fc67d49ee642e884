"""The search's storage: one warning before the trials stop fitting on it, and a clean stop
before it is full.

A full disk fails every trial that is writing at that moment, and it usually happens hours
into a search; worse, the search can then no longer save (or sign) the state `--resume`
needs, nor write its summary. `DiskWatch` (a Tune callback on the driver) acts early:
- after every trial that ends, it projects what the trials still to run will write (the ended
  trials' folders are the measure) and warns once, in one line, when that does not fit in the
  free space (at the start: when almost nothing is free);
- after every epoch a trial reports, it stops the whole search as Ctrl-C would (Tune's own
  graceful stop: state saved, summary written, `--resume` continues it) once the free space
  falls under a reserve: room for each running trial's next checkpoint (an atomic write holds
  the old file and the new one at once) plus one, and never under `RESERVE_MIN_BYTES`.

Ray's own disk monitor is turned off for the local Ray (tuning/cluster.py): it repeats an
error every 10 s once the disk of Ray's temp folder is 95% full, about object spilling, which
a search barely uses, and says nothing about the trial folders.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from headernet_core.paths import folder_sizes, free_bytes

from .summary import format_bytes

MIN_FREE_BYTES = 1024 ** 3        # below this at the start, even a small search is at risk
RESERVE_MIN_BYTES = 256 * 1024 ** 2   # Tune's state, the summary, its plots: never less
ENDED = ("TERMINATED", "ERROR")


def reserve_bytes(largest_file: int, running: int) -> int:
    """Free space under which the search stops: each running trial's next checkpoint (its
    largest file so far) and one more, at least `RESERVE_MIN_BYTES`."""
    return max(RESERVE_MIN_BYTES, largest_file * (running + 1))


def shortage(free: int, ended_sizes: list[int], to_run: int) -> str | None:
    """What will not fit, as the end of a sentence; None when it fits."""
    if free < MIN_FREE_BYTES:
        return f"only {format_bytes(free)} free"
    if not ended_sizes or to_run <= 0:
        return None
    per_trial = sum(ended_sizes) / len(ended_sizes)
    need = per_trial * to_run
    if need <= free:
        return None
    return (f"{format_bytes(free)} free, and the {to_run} trial(s) still to run need about "
            f"{format_bytes(need)} ({format_bytes(per_trial)} per ended trial so far)")


class DiskWatch(Callback):
    """Warns once when the trials still to run will not fit in the search folder's free space,
    and stops the search cleanly once that space is under `reserve_bytes` (module docstring)."""

    def __init__(self, search_dir: str | Path, num_samples: int, out: TextIO | None = None) -> None:
        self.search_dir, self.num_samples, self.out = Path(search_dir), num_samples, out
        self.sizes: dict[str, int] = {}   # trial id -> bytes of its folder when it ended
        self.largest_file = 0             # the largest file any trial has written (a checkpoint)
        self.warned = self.stopping = False

    def setup(self, **info: Any) -> None:
        self._check([])

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.largest_file = max(self.largest_file, folder_sizes(Path(trial.path))[1])
        running = sum(t.status == "RUNNING" for t in trials)
        self._stop_if_full(reserve_bytes(self.largest_file, running))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for t in trials:   # the ended one, and those that ended before a resume
            if (t is trial or t.status in ENDED) and t.trial_id not in self.sizes:
                self.sizes[t.trial_id], largest = folder_sizes(Path(t.path))
                self.largest_file = max(self.largest_file, largest)
        self._check(list(self.sizes.values()))

    on_trial_error = on_trial_complete

    def _stop_if_full(self, reserve: int) -> None:
        """Tune's graceful stop (its SIGUSR1 handler: what Ctrl-C does) once the free space is
        under `reserve`; nothing when Tune has no handler installed (not in the main thread)."""
        if self.stopping:
            return
        free = self._free()
        handler = signal.getsignal(signal.SIGUSR1)
        if free is None or free >= reserve or not callable(handler):
            return
        self.stopping = True
        print(f"error: the search's storage ({self.search_dir}) has {format_bytes(free)} free, "
              f"under the {format_bytes(reserve)} kept for the running trials' next checkpoints "
              f"and the search's own state: stopping the search as Ctrl-C would; free space, "
              f"then continue it with --resume", file=self.out or sys.stderr, flush=True)
        handler(signal.SIGUSR1, None)

    def _check(self, ended_sizes: list[int]) -> None:
        if self.warned or (free := self._free()) is None:
            return
        problem = shortage(free, ended_sizes, self.num_samples - len(ended_sizes))
        if problem:
            self.warned = True
            print(f"warning: the search's storage ({self.search_dir}) has {problem}: free space, "
                  f"or move output_root (--storage_path on a cluster), before a full disk fails "
                  f"the trials writing to it", file=self.out or sys.stderr, flush=True)

    def _free(self) -> int | None:
        """Free bytes of the search's storage; None when it cannot be read (a watch that
        cannot look must not stop the search)."""
        try:
            return free_bytes(self.search_dir)
        except OSError:
            return None

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles callbacks with the experiment: a resumed search keeps the sizes measured
        and, on a new console, may warn again."""
        return {**self.__dict__, "out": None, "warned": False, "stopping": False}

"""One warning, before the disk fills, that the search's trials will not fit on its storage.

A full disk fails every trial that is writing at that moment, and it usually happens hours
into a search. What fills it is known early: each ended trial's folder (checkpoints, logs,
curves) is a measure of what the trials still to run will write. `DiskWatch` (a Tune callback
on the driver) compares that projection with the free space after every trial that ends, and
warns once, in one line, when it does not fit; at the start it warns when the storage has
almost nothing free.

Ray's own disk monitor is turned off for the local Ray (tuning/cluster.py): it repeats an
error every 10 s once the disk of Ray's temp folder is 95% full, about object spilling, which
a search barely uses, and says nothing about the trial folders.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from ray.tune import Callback

from headernet_core.paths import folder_bytes, free_bytes

from .summary import format_bytes

MIN_FREE_BYTES = 1024 ** 3   # below this at the start, even a small search is at risk
ENDED = ("TERMINATED", "ERROR")


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
    """Warns once when the trials still to run will not fit in the search folder's free space."""

    def __init__(self, search_dir: str | Path, num_samples: int, out: TextIO | None = None) -> None:
        self.search_dir, self.num_samples, self.out = Path(search_dir), num_samples, out
        self.sizes: dict[str, int] = {}   # trial id -> bytes of its folder when it ended
        self.warned = False

    def setup(self, **info: Any) -> None:
        self._check([])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trials, trial)

    def _ended(self, trials: list, trial: Any) -> None:
        for t in trials:   # the ended one, and those that ended before a resume
            if (t is trial or t.status in ENDED) and t.trial_id not in self.sizes:
                self.sizes[t.trial_id] = folder_bytes(Path(t.local_path))
        self._check(list(self.sizes.values()))

    def _check(self, ended_sizes: list[int]) -> None:
        if self.warned:
            return
        try:
            free = free_bytes(self.search_dir)
        except OSError:   # a watch that cannot look must not stop the search
            return
        problem = shortage(free, ended_sizes, self.num_samples - len(ended_sizes))
        if problem:
            self.warned = True
            print(f"warning: the search's storage ({self.search_dir}) has {problem}: free space, "
                  f"or move output_root (--storage_path on a cluster), before a full disk fails "
                  f"the trials writing to it", file=self.out or sys.stderr, flush=True)

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles callbacks with the experiment: a resumed search keeps the sizes measured
        and, on a new console, may warn again."""
        return {**self.__dict__, "out": None, "warned": False}

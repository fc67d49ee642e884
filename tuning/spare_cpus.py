"""The cores a CPU search's last trials take over once the other trials have ended.

A search on the CPU runs `max_concurrent` trials of `resources.cpu` cores each. Once every
trial has started and fewer than `max_concurrent` are left, the ended trials' cores stay idle
until the search ends: on the demo the last trial often trains alone for 10 s or more of a
~75 s search, on one of the two cores. Ray cannot give a running actor more CPUs, but torch
can use more intra-op threads at any time, so:

- the driver (`SpareCpus`, a Tune callback; local Ray and CPU-only trials) writes each running
  trial's share of the search's cores to `<search>/.spare_cpus.json` whenever a trial starts or
  ends, back to `resources.cpu` as soon as a trial starts again (a retried trial);
- each trial (`SpareCpuTaker`, called by the trainer between batches) sets its threads to that
  share less its loader threads within a second, mid-epoch, but takes more threads only for
  cores that stayed idle while it trained: an OpenMP thread on a core another process holds
  stalls every op (headernet_core/threads.py).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from ray.tune import Callback

from headernet_core.artifacts import read_json_dict, write_json

from .prefetch import active_after_last_start

SPARE_FILE = ".spare_cpus.json"


class SpareCpus(Callback):
    """Writes `{"cpus_per_trial": N}` to `<search_dir>/.spare_cpus.json`: the search's
    `max_concurrent * cpus` cores (at most the machine's `machine_cpus`) shared by the trials
    still running, once no trial is left to start; `cpus` again while every slot is taken or a
    trial may still start."""

    def __init__(self, search_dir: str | Path, num_samples: int, max_concurrent: int,
                 cpus: int, machine_cpus: int) -> None:
        self.path = Path(search_dir) / SPARE_FILE
        self.num_samples, self.max_concurrent, self.cpus = num_samples, max_concurrent, cpus
        self.total = min(max_concurrent * cpus, machine_cpus)
        self.written = cpus

    def setup(self, **info) -> None:
        self.path.unlink(missing_ok=True)   # left by an interrupted run of this search
        self.written = self.cpus

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._update(trials, ended=None)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._update(trials, ended=trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trials, ended=trial)

    def on_experiment_end(self, trials, **info) -> None:
        self.path.unlink(missing_ok=True)

    def share(self, trials: list[Any], ended: Any) -> int:
        """The cores each active trial may use."""
        active = active_after_last_start(trials, ended, self.num_samples)
        if not active or active >= self.max_concurrent:   # None: a trial is still to start
            return self.cpus
        return max(self.cpus, self.total // active)

    def _update(self, trials: list[Any], ended: Any) -> None:
        share = self.share(trials, ended)
        if share != self.written:
            write_json(self.path, {"cpus_per_trial": share})
            self.written = share

    def __getstate__(self) -> dict:
        return {**self.__dict__, "written": self.cpus}   # pickled into tuner.pkl


CHECK_S = 0.5   # how often a trial reads the share, and how long it watches the cores before taking them


class SpareCpuTaker:
    """Called by the trainer after every batch, on the thread that computes (torch's thread
    count belongs to the calling thread: set from another thread it changes nothing).

    At most every CHECK_S it reads the trial's share. Fewer threads are set at once. More are
    set only for cores that were idle over the next CHECK_S while this trial kept training, so
    its own threads are not counted and it never pauses to measure; while they are busy (e.g.
    the driver loading the summary's libraries, ~2 s) it keeps watching, window after window,
    at the cost of reading /proc/stat. `base_threads`, the trial's own allocation, is the floor."""

    def __init__(self, search_dir: str | Path, base_threads: int, num_workers: int,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(search_dir) / SPARE_FILE
        self.base_threads, self.num_workers = base_threads, num_workers
        self.log, self.clock = log, clock
        self.share = 0                  # the share acted on
        self.next_check = 0.0
        self.watching: tuple[int, tuple[float, float] | None] | None = None   # (share, cpu times)

    def __call__(self) -> None:
        now = self.clock()
        if now < self.next_check:
            return
        self.next_check = now + CHECK_S
        share = read_json_dict(self.path).get("cpus_per_trial")
        share = share if isinstance(share, int) and share > 0 else 0
        if self.watching is not None and self.watching[0] == share:
            self._grow(share)
            return
        self.watching = None
        if share == self.share:
            return
        import torch

        from headernet_core.threads import cpu_times

        current = torch.get_num_threads()
        target = self._target(share)
        if target > current:
            self.watching = (share, cpu_times())
            return
        self.share = share
        if target < current:
            self._set(current, target, f"{share} cores per trial: a trial started again")

    def _grow(self, share: int) -> None:
        import torch

        from headernet_core.threads import cpu_times, free_cores, idle_between

        now = cpu_times()
        idle = idle_between(self.watching[1], now)
        self.watching = None
        current = torch.get_num_threads()
        target = self._target(share)
        if idle is None:   # unknown (no /proc/stat): keep the trial's own threads
            self.share = share
            return
        grown = min(target, current + free_cores(idle))
        if grown >= target:
            self.share = share
        else:
            self.watching = (share, now)   # the next window starts where this one ended
        if grown > current:
            self._set(current, grown, f"{share} cores per trial now that fewer trials run, "
                                      f"{idle:.1f} idle beside this trial")

    def _target(self, share: int) -> int:
        """The threads a share gives: less the loader threads, never below the trial's own."""
        return max(self.base_threads, share - self.num_workers)

    def _set(self, current: int, threads: int, why: str) -> None:
        import torch

        torch.set_num_threads(threads)
        self.log(f"cpu threads: {current} -> {threads} ({why})")

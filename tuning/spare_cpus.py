"""The cores a CPU search's last trials take over once the other trials have ended.

A search on the CPU runs `max_concurrent` trials of `resources.cpu` cores each. Once every
trial has started and fewer than `max_concurrent` are left, the ended trials' cores stay idle
until the search ends: on the demo the last trial often trains alone for 10 s or more of a
~75 s search, on one of the two cores. Ray cannot give a running actor more CPUs, but torch
can use more intra-op threads at any time, so:

- the driver (`SpareCpus`, a Tune callback; local Ray and CPU-only trials) writes each running
  trial's share of the search's cores to `<search>/.spare_cpus.json` whenever a trial starts or
  ends, back to `resources.cpu` as soon as a trial starts again (a retried trial);
- each trial (`take_spare_cpus`, after its epoch's report) sets its threads to that share less
  its loader threads, but takes more threads only when those cores are idle right now: an
  OpenMP thread on a core another process holds stalls every op (headernet_core/threads.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

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


def take_spare_cpus(search_dir: str | Path, base_threads: int, num_workers: int,
                    seen: dict[str, int]) -> str | None:
    """After a trial's epoch report: torch's intra-op threads follow the trial's share of the
    search's cores (never below `base_threads`, the trial's own allocation). More threads only
    for cores that are idle now (sampled once per new share). `seen` keeps the last share this
    trial acted on. Returns a line for the trial's log when the count changed."""
    import torch

    from headernet_core.threads import idle_cpus

    share = read_json_dict(Path(search_dir) / SPARE_FILE).get("cpus_per_trial")
    share = share if isinstance(share, int) and share > 0 else 0
    if share == seen.get("share"):
        return None
    seen["share"] = share
    current = torch.get_num_threads()
    target = max(base_threads, share - num_workers)
    why = f"{share} cores per trial now that fewer trials run"
    if target > current:
        idle = idle_cpus()   # this trial's thread sleeps meanwhile: its own core counts as idle
        target = current if idle is None else max(current, min(target, int(idle + 0.1) - num_workers))
        why += f", {'?' if idle is None else f'{idle:.1f}'} idle"
    if target == current:
        return None
    torch.set_num_threads(target)
    return f"cpu threads: {current} -> {target} ({why})"

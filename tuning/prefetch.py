"""The Tune callback that loads the summary's libraries while the search's last trial runs.

The summary (tuning/summary.py) imports scikit-learn (pulled in by `optuna.importance`) and
matplotlib, ~2 s that would otherwise be added after the last trial ends. Once every trial has
started and a slot has fallen idle for good, a core is free until the search ends: the imports
run there, on a background thread of the driver. Before that moment both cores train, and
loading them would only slow the trials down.
"""
from __future__ import annotations

import threading

from ray.tune import Callback

ACTIVE = ("PENDING", "RUNNING")
_started: list[threading.Thread] = []   # this process's import thread, once started


def active_after_last_start(trials: list, ended, num_samples: int) -> int | None:
    """How many trials are still pending or running (`ended`, the one Tune reports as ending,
    aside) once all `num_samples` have started; None while a trial is still to start. Fewer
    than the search's slots then means a slot stays idle until the search ends."""
    if len(trials) < num_samples:
        return None
    return sum(t.status in ACTIVE for t in trials if t is not ended)


def wait_for_imports() -> None:
    """Before the summary imports the same modules: never two threads importing them at once
    (a concurrent import can see a module half-initialised); returns at once when none ran."""
    for thread in _started:
        thread.join()


def import_summary_libraries() -> None:
    """What `write_summary` imports lazily; a failure here is left for the summary to report."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
        import matplotlib.ticker  # noqa: F401
        import optuna.importance  # noqa: F401 - imports scikit-learn (its fANOVA evaluator)
    except Exception:  # noqa: BLE001
        pass


class SummaryPrefetch(Callback):
    """Starts `import_summary_libraries` on a thread, once, when every one of `num_samples`
    trials has started and fewer than `max_concurrent` are left running."""

    def __init__(self, num_samples: int, max_concurrent: int) -> None:
        self.num_samples, self.max_concurrent = num_samples, max_concurrent
        self.started = False

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._maybe_start(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._maybe_start(trials, trial)

    def _maybe_start(self, trials, ended) -> None:
        active = active_after_last_start(trials, ended, self.num_samples)
        if self.started or active is None or active >= self.max_concurrent:
            return
        self.started = True
        thread = threading.Thread(target=import_summary_libraries, name="summary-imports", daemon=True)
        _started.append(thread)
        thread.start()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "started": False}   # pickled into tuner.pkl: a resume starts over

"""The Tune callback that signs Tune's state after every save (imports Ray: load it only to
build a Tuner). The why and the format: `tuning/resume_guard.py`.

It holds nothing (no path, no key): it is pickled into tuner.pkl, and finds the search folder
and Tune's local staging folder through the trials it is given, the key through
`resume_guard.load_key` in the driver.
"""
from __future__ import annotations

import fnmatch
import logging
from pathlib import Path

from ray.tune import Callback

from . import resume_guard
from .ray_compat import EXPERIMENT_STATE, TUNE_STATE_FILES, forget_pickled_error

logger = logging.getLogger(__name__)


class ResumeSnapshot(Callback):
    """Copies and signs Tune's latest state files whenever Tune has saved new ones."""

    def __init__(self) -> None:
        self._seen: tuple | None = None
        self._saved = False

    def get_state(self) -> None:
        """Tune asks every callback for its state as the last step of saving its own
        (`TuneController.save_to_dir`), right before this step's `on_step_end`: the sign that
        there is something new to sign. (No state of its own: None.)"""
        self._saved = True

    def on_step_end(self, iteration, trials, **info) -> None:
        self._forget_pickled_errors(trials)
        if self._saved:   # not every step: Tune's loop steps many times a second
            self._saved = False
            self._snapshot(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._forget_pickled_errors([trial])

    def on_experiment_end(self, trials, **info) -> None:
        # Tune forced its final save just before this call.
        self._forget_pickled_errors(trials)
        self._snapshot(trials)

    @staticmethod
    def _forget_pickled_errors(trials) -> None:
        """Tune would unpickle a failed trial's error.pkl from the search folder when it builds
        the results; its error.txt (plain text) says the same and is read instead."""
        for trial in trials:
            forget_pickled_error(trial)

    def _snapshot(self, trials) -> None:
        if not trials:
            return
        # Tune's local staging folder: the files there are complete, the synced copies in the
        # search folder may lag or be mid-copy
        staging = Path(trials[0].local_experiment_path)
        if not staging.is_dir():
            return
        names = [entry.name for entry in staging.iterdir() if entry.is_file()]
        # Tune's own choice: the newest session's file of each (tuner.pkl is not in staging)
        newest = {pattern: max(matches) for pattern in TUNE_STATE_FILES[1:]
                  if (matches := fnmatch.filter(names, pattern))}
        state = newest.get(EXPERIMENT_STATE)
        if state is None:
            return
        stat = (staging / state).stat()
        seen = (state, stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return
        files = {name: (staging / name).read_bytes() for name in newest.values()}
        try:
            resume_guard.record(Path(trials[0].remote_experiment_path), files)
        except Exception as exc:  # noqa: BLE001 - a failed snapshot must not end the search
            logger.warning("could not sign the search's resume state (%s); --resume will refuse "
                           "this search if the next snapshot fails too", exc)
            return
        self._seen = seen

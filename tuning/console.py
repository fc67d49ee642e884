"""What a search prints while it runs: one line per trial event and a compact periodic table.

Built only from Ray Tune's own extension points (no scraping of Ray's output):
- `TrialEvents` (a `tune.Callback`): `[m:ss] t003 started | epoch 2 <metric> ... | stopped early
  | finished | failed`, with the short `tNNN` name of the trial's folder (`trial.trial_dirname`)
  and the search's best so far. An epoch that ends its trial says so on its own line.
- `CompactTable` (a `tune.ProgressReporter`, the legacy reporter API that Ray honours in its
  legacy output, `ray_compat.use_legacy_console`): after every `TABLE_EVERY_EVENTS` events (at
  most once a minute), the running trials and the best one, with their searched params, epoch,
  objective and the search's best so far in launch order.
- Everything else is kept quiet with Ray's own switches: `RunConfig(verbose=1)` of the legacy
  output (no per-trial boxes); in each trial (`tuning.trial.run_trial(quiet=True)`) its
  stdout/stderr (the trainer's epoch lines and warnings) go to `train.log` in its folder and
  the worker's `ray.train`/`ray.tune` loggers are at WARNING (no "Checkpoint successfully
  created", no "Restored from checkpoint"); a failed trial's traceback stays in its error.txt
  (`TUNE_PRINT_ALL_TRIAL_ERRORS=0`). Ray's `log_to_file` is not used: it tees, the console
  still gets every line. Optuna's INFO lines are off in the driver.

`--verbose` restores Ray's default console (new output engine, per-trial result boxes, trial
output forwarded to the driver) and keeps the event lines.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

import optuna
from ray import tune

from headernet_core.config import format_value

from .ray_compat import (
    TUNE_LOGGER,
    TUNE_RESUME_HINTS,
    TUNE_STOP_NOTICE,
    use_legacy_console,
)
from .trial import SCHEDULER_STOP, finite, one_line_error, trial_dirname

TABLE_EVERY_EVENTS = 20     # the table after this many event lines (trial starts and epochs),
TABLE_MIN_GAP_S = 60.0      # and at most once a minute: a recap of what scrolled by, as often
                            # in a fast demo as in a slow search, whatever the machine's speed
TABLE_TOP = 1               # finished trials shown besides the running ones: the best


def short_name(trial: Any) -> str:
    """`t003` of `t003_backbone=csn_...` (the trial folder's launch-order prefix)."""
    return trial_dirname(trial).split("_", 1)[0]


def _objective(trial: Any) -> float | None:
    """The trial's best objective so far (its last report's `objective`), None before its first epoch."""
    return finite((trial.last_result or {}).get("objective"))


def _shown(value: float | None) -> str:
    return "-" if value is None else format_value(value)


def error_text(trial: Any) -> str:
    """The trial's error on one line. Tune writes it to the driver's copy of the trial folder
    (`error_file`) before the callbacks run; the storage copy (`get_error`) comes later."""
    path = getattr(trial, "error_file", None)
    if path and os.path.isfile(path):
        return one_line_error(Path(path).read_text())
    return one_line_error(trial.get_error())


class _Console:
    """What the event lines and the table share: the objective, its direction, the params."""

    def __init__(self, metric: str, mode: str, params: Sequence[str], search_dir: str | Path,
                 out: TextIO | None = None) -> None:
        self.metric, self.mode, self.params = metric, mode, list(params)
        self.search_dir = str(search_dir)
        self.out = out
        self.start = time.time()

    def better(self, a: float | None, b: float | None) -> bool:
        if a is None:
            return False
        return b is None or (a > b if self.mode == "max" else a < b)

    def elapsed(self) -> str:
        seconds = int(time.time() - self.start)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
            else f"{seconds // 60}:{seconds % 60:02d}"

    def emit(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def __getstate__(self) -> dict[str, Any]:   # Tune pickles callbacks with the experiment
        return {**self.__dict__, "out": None}


class TrialEvents(_Console, tune.Callback):
    """One line per trial event (see the module docstring)."""

    def __init__(self, metric: str, mode: str, params: Sequence[str], search_dir: str | Path,
                 max_failures: int = 0, out: TextIO | None = None) -> None:
        super().__init__(metric, mode, params, search_dir, out)
        self.max_failures = max_failures
        self.best: tuple[str, float] | None = None
        self.failures: dict[str, int] = {}
        self.ended: set[str] = set()

    def setup(self, **info) -> None:
        self.start = time.time()       # also on --resume, where Tune restores this object

    def _line(self, trial: Any, text: str) -> None:
        self.emit(f"[{self.elapsed()}] {short_name(trial)} {text}")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info) -> None:
        params = " ".join(f"{k}={format_value(v)}" for k, v in (trial.config or {}).items())
        self._line(trial, f"started   {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info) -> None:
        """An epoch; when the scheduler ends the trial with it (`done`), its end too."""
        epoch = int(result.get("epoch", 0))
        value, objective = finite(result.get(self.metric)), finite(result.get("objective"))
        text = f"epoch {epoch}  {self.metric} {_shown(value)}  trial best {_shown(objective)}"
        if self.better(objective, self.best[1] if self.best else None):
            self.best = (short_name(trial), objective)
            text += "  * search best"
        elif self.best:
            text += f"  (search best {format_value(self.best[1])}, {self.best[0]})"
        if result.get("done"):
            self.ended.add(trial.trial_id)
            text += f"  -> {self._ending(trial, epoch)}"
        self._line(trial, text)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info) -> None:
        if trial.trial_id in self.ended:     # said with its last epoch
            return
        epoch = int((trial.last_result or {}).get("epoch", 0))
        objective = _objective(trial)
        shown = f"{self.metric} {format_value(objective)}" if objective is not None else "no epoch"
        self._line(trial, f"{self._ending(trial, epoch)}: best {shown}")

    def _ending(self, trial: Any, epoch: int) -> str:
        if Path(self.search_dir, Path(trial.path).name, SCHEDULER_STOP).is_file():
            return f"stopped early by ASHA after epoch {epoch}"
        return f"finished after epoch {epoch}"

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info) -> None:
        count = self.failures[trial.trial_id] = self.failures.get(trial.trial_id, 0) + 1
        self._line(trial, f"failed ({error_text(trial)}); retry {count} of "
                          f"{self.max_failures} from its last epoch")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info) -> None:
        self._line(trial, f"failed: {error_text(trial)}")


class CompactTable(_Console, tune.ProgressReporter):
    """The periodic table (see the module docstring)."""

    def __init__(self, metric: str, mode: str, params: Sequence[str], search_dir: str | Path,
                 every_events: int = TABLE_EVERY_EVENTS, min_gap_s: float = TABLE_MIN_GAP_S,
                 out: TextIO | None = None) -> None:
        super().__init__(metric, mode, params, search_dir, out)
        self.every_events, self.min_gap_s = every_events, min_gap_s
        self.total: int | None = None
        self.last_time = time.time()
        self.seen: dict[str, int] = {}      # trial id -> events counted at the last table

    def setup(self, start_time: float | None = None, total_samples: int | None = None, **kwargs) -> None:
        self.total = total_samples
        self.start = self.last_time = start_time or time.time()

    @staticmethod
    def _events(trials: list) -> dict[str, int]:
        """Per trial, the event lines it has caused: its start and one per epoch."""
        return {t.trial_id: int(t.status != "PENDING") + int((t.last_result or {}).get("epoch", 0))
                for t in trials}

    def should_report(self, trials: list, done: bool = False) -> bool:
        """After `every_events` new events, at most every `min_gap_s`; never at the end (the
        search prints its own result)."""
        if done or time.time() - self.last_time < self.min_gap_s:
            return False
        now = self._events(trials)
        return sum(n - self.seen.get(k, 0) for k, n in now.items()) >= self.every_events

    def report(self, trials: list, done: bool, *sys_info: str) -> None:
        self.last_time, self.seen = time.time(), self._events(trials)
        self.emit("\n".join(self.table(trials)))

    def table(self, trials: list) -> list[str]:
        started = sorted((t for t in trials if t.status != "PENDING"), key=short_name)
        so_far, best_so_far, best = [], None, None
        for trial in started:          # the search's best objective in launch order
            value = _objective(trial)
            if self.better(value, best_so_far):
                best_so_far, best = value, trial
            so_far.append(best_so_far)
        running = [t for t in started if t.status == "RUNNING"]
        ranked = sorted((t for t in started if t not in running and _objective(t) is not None),
                        key=lambda t: _objective(t) * (-1 if self.mode == "max" else 1))
        shown = {t.trial_id for t in running + ranked[:TABLE_TOP]}
        counts = {s: sum(t.status == s for t in trials) for s in ("RUNNING", "TERMINATED", "ERROR", "PENDING")}
        head = (f"[{self.elapsed()}] {counts['RUNNING']} running, {counts['TERMINATED']} done, "
                f"{counts['ERROR']} failed, {counts['PENDING']} pending of {self.total or len(trials)}")
        if best is not None:
            head += f" | best so far {short_name(best)} {self.metric} {format_value(best_so_far)}"
        hidden = len(started) - len(shown)
        if hidden:
            head += f" | {hidden} more in trials.csv at the end"
        header = ["trial", "status", *self.params, "epoch", self.metric, "best so far"]
        rows = []
        for trial, running_best in zip(started, so_far):
            if trial.trial_id not in shown:
                continue
            result = trial.last_result or {}
            rows.append([short_name(trial), trial.status.lower(),
                         *[format_value(trial.config.get(p, "-")) for p in self.params],
                         str(int(result["epoch"])) if "epoch" in result else "-",
                         _shown(_objective(trial)), _shown(running_best)])
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
        return [head] + ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
                         for row in [header, *rows]]


def console_run_config(*, metric: str, mode: str, params: Sequence[str], search_dir: str | Path,
                       max_failures: int, verbose: bool) -> dict[str, Any]:
    """Keyword arguments for `tune.RunConfig` that set up the console, and the environment
    Ray reads for it (legacy output so that `progress_reporter` is honoured)."""
    use_legacy_console(not verbose)
    # quiet: a failed trial's event line says it; its error.txt has it all
    os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "1" if verbose else "0"
    config: dict[str, Any] = {"callbacks": [TrialEvents(metric, mode, params, search_dir, max_failures)], "verbose": 1}
    if not verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        config["progress_reporter"] = CompactTable(metric, mode, params, search_dir)
    return config


# This command's line in place of Tune's when a search is stopped (Ctrl-C, SIGTERM, the disk watch).
STOP_LINE = ("stopping: saving the search's state and writing its summary; a running trial "
             "resumes from its last finished epoch")


class StopNotice:
    """A filter of Tune's logger: Tune's stop notice ("e.g. via SIGINT/Ctrl+C", also when the
    disk watch stops the search) becomes STOP_LINE and is remembered (`seen`: the search was
    stopped, whatever state Tune then gives the running trials); its "Resume experiment with:
    Tuner.restore(...)" is dropped: that call would skip this command's check of the signed
    state, and the summary prints the command that resumes the search instead."""

    def __init__(self) -> None:
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(TUNE_STOP_NOTICE):
            self.seen = True
            print(STOP_LINE, flush=True)
            return False
        return not message.startswith(TUNE_RESUME_HINTS)


@contextlib.contextmanager
def own_stop_lines() -> Iterator[StopNotice]:
    """Around `tuner.fit()`: this command's lines instead of Tune's when the search is stopped;
    yields whether it was."""
    logger, notice = logging.getLogger(TUNE_LOGGER), StopNotice()
    logger.addFilter(notice)
    try:
        yield notice
    finally:
        logger.removeFilter(notice)

"""The search's Optuna study, kept in the search folder (imports Ray: load it only to build a Tuner).

`optuna_study.log` is an Optuna journal file (append-only, safe on NFS): `optuna.load_study` and
`optuna-dashboard <file>` read it while the search runs, and `--resume` continues the same
study, because Tune's searcher state holds the storage, not a copy of the trials.

A journal outlives Tune's searcher snapshot, which can be seconds older after a hard kill. Then
`--resume` may (a) re-run the last epoch of a trial the study already holds as finished: Optuna
refuses to update a finished trial, so `StudySearch` keeps the recorded result instead of
failing the search; (b) ask again for the trials asked after the snapshot (Tune's own state is
as old): each such ask gets the study's trial it had before, in order, with its params (Tune
names the trial and its folder as before, and the trainer continues that folder), so that every
trial is one entry of the study. One left unclaimed when a search finishes is FAIL
(`fail_unfinished`): none stays "running" forever.

Trial states tell the sampler the truth: a trial that ran all its epochs is COMPLETE with its
best epoch's objective; one the scheduler stopped before its own epochs is PRUNED, with the
objective (best so far) of every epoch it ran as intermediate values (Optuna's TPE ranks those
after the complete ones, by their deepest epoch); a failed trial is FAIL (Ray's own handling).
Ray's `OptunaSearch` alone would call a stopped trial COMPLETE with its early value, and never
hears the last epoch of a trial the scheduler stops (Tune sends that result only to
`on_trial_complete`). A multi-objective study takes no intermediate values.

A trial that ran out of memory at micro-batch 1 is told PRUNED, not FAIL (Optuna's samplers
skip FAIL trials), and violates every constraint of the space (`constraint_values`), so the sampler
learns which configs do not fit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState
from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from .ray_compat import (
    journal_lock_file,
    mark_searcher_trial_complete,
    searcher_completed,
    searcher_study,
    searcher_trials,
    study_trial,
)
from .summary import optuna_distribution
from .trial import OOM_ENDED, TRIAL_EPOCHS

if TYPE_CHECKING:
    from .space import Param

STUDY_FILE = "optuna_study.log"
WARM_START_ATTR = "warm_start"   # user attr of a trial copied from another search's study


def stopped_early(result: dict[str, Any] | None) -> bool:
    """Whether a trial's last result is from before its own epochs (a scheduler stopped it)."""
    result = result or {}
    epochs, epoch = result.get(TRIAL_EPOCHS), result.get("epoch")
    return epochs is not None and epoch is not None and int(epoch) < int(epochs)


def study_storage(search_dir: str | Path) -> JournalStorage:
    """The journal storage of the study in `search_dir`."""
    return JournalStorage(JournalFileBackend(str(Path(search_dir) / STUDY_FILE)))


def load_search_study(search_dir: str | Path) -> optuna.Study:
    """The study of the search in `search_dir` (one study per journal file)."""
    return optuna.load_study(study_name=None, storage=study_storage(search_dir))


def warm_start_trials(other_dir: str | Path, params: Sequence[Param]) -> list[optuna.trial.FrozenTrial]:
    """The finished and pruned trials of the search in `other_dir`, as trials of a study over
    `params`: each value under this space's distribution, so that TPE models imported and new
    trials as one space (a widened range included); a trial holding a value outside this
    space's ranges or a param it does not search is left out. The caller has checked that
    kinds, log scales and choice lists agree."""
    distributions = {p.name: optuna_distribution(p) for p in params}

    def fits(name: str, value: Any) -> bool:
        dist = distributions.get(name)
        if isinstance(dist, CategoricalDistribution):
            return value in dist.choices
        return dist is not None and dist.low <= value <= dist.high

    copies = []
    for trial in load_search_study(other_dir).get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if all(fits(name, value) for name, value in trial.params.items()):
            copies.append(optuna.trial.create_trial(
                state=trial.state, values=trial.values if trial.state == TrialState.COMPLETE else None,
                params=trial.params, distributions={n: distributions[n] for n in trial.params},
                intermediate_values=trial.intermediate_values,
                user_attrs={**trial.user_attrs, WARM_START_ATTR: str(other_dir)}))
    return copies


def imported_trials(search_dir: str | Path) -> int:
    """How many trials of the study in `search_dir` a warm start copied from another search."""
    return sum(WARM_START_ATTR in t.user_attrs
               for t in load_search_study(search_dir).get_trials(deepcopy=False))


def clear_stale_lock(search_dir: str | Path) -> None:
    """Before a resume: a journal lock left by a killed driver (one search owns its folder, so
    any lock there is stale) would make the resumed search wait 30 s and warn, then break it."""
    journal_lock_file(Path(search_dir, STUDY_FILE)).unlink(missing_ok=True)


def fail_unfinished(search_dir: str | Path) -> None:
    """At the end of a finished search: a study trial still RUNNING was asked before a hard
    kill and never asked again (see the module's docstring); it never ran to an end: FAIL."""
    study = load_search_study(search_dir)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)


def constraint_values(bounds: Sequence[tuple[str, str, float]], result: dict[str, Any]
                      ) -> dict[str, float]:
    """A space's `constraints` ((metric, "max" | "min", bound), ...) as Optuna constraint
    values (`Trial.set_constraint`, Optuna 5's successor of a sampler's `constraints_func`):
    <= 0 when met, read from a trial's last result. A missing value (e.g. no peak where /proc
    is absent) meets its bound; an out-of-memory end violates every bound."""
    values = {}
    for metric, side, bound in bounds:
        value = result.get(metric)
        if result.get(OOM_ENDED):
            values[f"{metric}_{side}"] = 1.0
        elif not isinstance(value, (int, float)) or not math.isfinite(value):
            values[f"{metric}_{side}"] = 0.0
        else:
            values[f"{metric}_{side}"] = value - bound if side == "max" else bound - value
    return values


class StudySearch(OptunaSearch):
    """`OptunaSearch` over a persistent study that a restored snapshot may lag behind."""

    # Tune trial ids the study already held as finished when the searcher was restored or
    # the trial was handed back (a new search never has any).
    _finished_before_restore: frozenset[str] = frozenset()
    # Numbers of the study's trials asked after the restored snapshot, in order: the next asks.
    _asked_after_snapshot: tuple[int, ...] = ()
    # Tune trial id -> the epochs the study holds for it (seeded from the study on restore).
    _reported_epochs: dict[str, set[int]] | None = None
    # Metrics of a trial's last result kept as its user attributes (optuna-dashboard shows them).
    recorded_metrics: tuple[str, ...] = ("peak_mem_gib", "clips_per_s")
    constraints: tuple[tuple[str, str, float], ...] = ()

    def __init__(self, *args: Any, constraints: Sequence[tuple[str, str, float]] = (),
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.constraints = tuple(constraints)

    def suggest(self, trial_id: str) -> dict | None:
        """A new Tune trial gets the next study trial asked after the restored snapshot, if
        any (its params stand, its recorded epochs and end are kept), else a new one."""
        if self._asked_after_snapshot and trial_id not in searcher_trials(self):
            number, *rest = self._asked_after_snapshot
            self._asked_after_snapshot = tuple(rest)
            study = searcher_study(self)
            frozen = study.get_trials(deepcopy=False)[number]
            searcher_trials(self)[trial_id] = study_trial(study, frozen)
            if frozen.state.is_finished():
                self._finished_before_restore = self._finished_before_restore | {trial_id}
            self._reported_epochs = {**(self._reported_epochs or {}),
                                     trial_id: set(frozen.intermediate_values)}
        return super().suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Optuna's step is the trial's epoch, reported once. Tune's `training_iteration`
        restarts from its snapshot when a trial is restored, and a restored trial re-reports
        its recorded epoch: as steps, either would put an epoch's value under another epoch or
        make Optuna warn and drop it (what optuna-dashboard shows per epoch)."""
        if (trial_id in self._finished_before_restore or result.get(OOM_ENDED)
                or isinstance(self.metric, (list, tuple))):   # multi-objective: no intermediate values
            return
        if "epoch" not in result:
            super().on_trial_result(trial_id, result)
            return
        epoch = int(result["epoch"])
        self._reported_epochs = self._reported_epochs or {}
        reported = self._reported_epochs.setdefault(trial_id, set())
        if epoch not in reported:
            reported.add(epoch)
            super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: epoch})

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        """COMPLETE, PRUNED (stopped before its own epochs) or FAIL; the last epoch's objective
        becomes an intermediate value first (Tune sends a stopped trial's last result only
        here)."""
        if trial_id in self._finished_before_restore:
            mark_searcher_trial_complete(self, trial_id)
            return
        ot_trial = searcher_trials(self).get(trial_id)
        if result and ot_trial is not None:
            for metric in self.recorded_metrics:
                value = result.get(metric)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    ot_trial.set_user_attr(metric, float(value))
            for key, value in constraint_values(self.constraints, result).items():
                ot_trial.set_constraint(key, value)
            if result.get(OOM_ENDED):
                ot_trial.set_user_attr(OOM_ENDED, True)
                searcher_study(self).tell(ot_trial, state=TrialState.PRUNED)
                mark_searcher_trial_complete(self, trial_id)
                return
        if result and not error:
            if "epoch" in result:
                self.on_trial_result(trial_id, result)
            if stopped_early(result) and trial_id not in searcher_completed(self):
                searcher_study(self).tell(searcher_trials(self)[trial_id], state=TrialState.PRUNED)
                mark_searcher_trial_complete(self, trial_id)
                return
        super().on_trial_complete(trial_id, result, error)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        study, ot_trials = searcher_study(self), searcher_trials(self)
        known = {t.number for t in ot_trials.values()}
        study_trials = study.get_trials(deepcopy=False)
        self._asked_after_snapshot = tuple(
            t.number for t in study_trials if t.number not in known and WARM_START_ATTR not in t.user_attrs)
        self._finished_before_restore = frozenset(
            trial_id for trial_id, ot_trial in ot_trials.items()
            if study_trials[ot_trial.number].state.is_finished())
        self._reported_epochs = {trial_id: set(study_trials[ot_trial.number].intermediate_values)
                                 for trial_id, ot_trial in ot_trials.items()}


"""The search's Optuna study in the search folder, when Tune's searcher snapshot lags behind it
(what a hard kill and --resume leave): no crash, every trial's recorded state kept."""
from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tuning.study import STUDY_FILE, StudySearch, clear_stale_lock, fail_unfinished, study_storage


def space(trial) -> None:
    trial.suggest_float("x", 0.0, 1.0)


def searcher(folder) -> StudySearch:
    return StudySearch(space=space, metric="objective", mode="max", storage=study_storage(folder),
                       study_name="s", sampler=optuna.samplers.RandomSampler(seed=0))


def test_a_restored_snapshot_that_lags_behind_the_study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = searcher(tmp_path)
    first.suggest("a")
    first.suggest("b")
    first.save(str(tmp_path / "searcher-state.pkl"))          # Tune's snapshot
    first.on_trial_result("a", {"objective": 0.4, "training_iteration": 1})
    first.on_trial_complete("a", {"objective": 0.5})           # after the snapshot
    asked_c = first.suggest("c")                               # asked after it: Tune forgets it
    # the driver is killed; --resume restores the older snapshot over the same journal
    second = searcher(tmp_path)
    second.restore(str(tmp_path / "searcher-state.pkl"))
    # Tune re-runs a's last epoch and completes it again: the study keeps what it recorded
    second.on_trial_result("a", {"objective": 0.9, "training_iteration": 1})
    second.on_trial_complete("a", {"objective": 0.9})
    second.on_trial_result("b", {"objective": 0.6, "training_iteration": 1})
    second.on_trial_complete("b", {"objective": 0.6})
    # Tune asks again for the trial it forgot: the study's trial 2 (c's params), not a new one
    assert second.suggest("d") == asked_c
    second.on_trial_complete("d", {"objective": 0.7})
    second.suggest("e")                                        # nothing left over: a new trial
    study = optuna.load_study(study_name=None, storage=study_storage(tmp_path))
    assert [(t.number, t.state, t.value) for t in study.trials] == [
        (0, TrialState.COMPLETE, 0.5), (1, TrialState.COMPLETE, 0.6),
        (2, TrialState.COMPLETE, 0.7), (3, TrialState.RUNNING, None)]
    assert (tmp_path / STUDY_FILE).is_file()


def test_a_trial_that_ended_after_the_snapshot_keeps_its_end(tmp_path):
    """c was asked and ASHA-stopped after the snapshot; d asked after it too, never asked again
    (the resumed search has fewer trials left): c's end stands, d is FAIL at the search's end."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = searcher(tmp_path)
    first.suggest("a")
    first.save(str(tmp_path / "searcher-state.pkl"))
    asked_c = first.suggest("c")
    first.on_trial_complete("c", epoch_result(0.3, 1))       # stopped at epoch 1 of 3
    first.suggest("d")
    second = searcher(tmp_path)
    second.restore(str(tmp_path / "searcher-state.pkl"))
    assert second.suggest("c2") == asked_c
    second.on_trial_result("c2", epoch_result(0.8, 2))       # re-run: the study keeps its record
    second.on_trial_complete("c2", epoch_result(0.8, 2))
    second.on_trial_complete("a", epoch_result(0.5, 3))
    fail_unfinished(tmp_path)
    study = optuna.load_study(study_name=None, storage=study_storage(tmp_path))
    assert [(t.state, t.intermediate_values) for t in study.trials] == [
        (TrialState.COMPLETE, {3: 0.5}), (TrialState.PRUNED, {1: 0.3}), (TrialState.FAIL, {})]


def test_plain_optuna_search_would_fail_there(tmp_path):
    """Why StudySearch exists: the same sequence with Ray's OptunaSearch raises."""
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    make = lambda: OptunaSearch(space=space, metric="objective", mode="max",   # noqa: E731
                                storage=study_storage(tmp_path), study_name="s")
    first = make()
    first.suggest("a")
    first.save(str(tmp_path / "state.pkl"))
    first.on_trial_complete("a", {"objective": 0.5})
    second = make()
    second.restore(str(tmp_path / "state.pkl"))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        second.on_trial_result("a", {"objective": 0.9, "training_iteration": 1})


def test_a_lock_left_by_a_killed_driver_is_cleared_before_a_resume(tmp_path):
    study = optuna.create_study(storage=study_storage(tmp_path), study_name="s")
    lock = tmp_path / f"{STUDY_FILE}.lock"
    lock.symlink_to(tmp_path / STUDY_FILE)          # what JournalFileSymlinkLock leaves behind
    clear_stale_lock(tmp_path)
    assert not lock.is_symlink()
    study.enqueue_trial({"x": 0.5})                 # writes without waiting for a lock
    clear_stale_lock(tmp_path)                      # nothing there: fine


def test_a_new_search_never_reads_the_study_back_on_a_result(tmp_path, monkeypatch):
    """The restore-only check costs a new search nothing per epoch."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fresh = searcher(tmp_path)
    fresh.suggest("a")
    monkeypatch.setattr(fresh._ot_study, "get_trials", lambda *a, **k: pytest.fail("read back"))
    fresh.on_trial_result("a", {"objective": 0.4, "training_iteration": 1})


def test_intermediate_values_are_per_epoch_across_a_restore(tmp_path):
    """Optuna's steps are epochs: a restored trial (Tune's iteration counter restarted from an
    older snapshot) and a re-reported recorded epoch neither shift nor drop an epoch's value,
    and Optuna has nothing to warn about."""
    import warnings
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = searcher(tmp_path)
    first.suggest("a")
    first.save(str(tmp_path / "searcher-state.pkl"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.on_trial_result("a", {"objective": 0.4, "epoch": 1, "training_iteration": 1})
        first.on_trial_result("a", {"objective": 0.5, "epoch": 2, "training_iteration": 2})
        second = searcher(tmp_path)     # killed; the snapshot is from before both epochs
        second.restore(str(tmp_path / "searcher-state.pkl"))
        # the trial resumes from its last.pt: epoch 2 re-reported, then epoch 3, as Tune
        # iterations 1 and 2 of the restored trial
        second.on_trial_result("a", {"objective": 0.5, "epoch": 2, "training_iteration": 1})
        second.on_trial_result("a", {"objective": 0.7, "epoch": 3, "training_iteration": 2})
        second.on_trial_complete("a", {"objective": 0.7, "epoch": 3})
    [trial] = optuna.load_study(study_name=None, storage=study_storage(tmp_path)).trials
    assert trial.intermediate_values == {1: 0.4, 2: 0.5, 3: 0.7}


# --- constraints and out-of-memory ends (issue 21) --------------------------------------------
def constrained(folder, ceiling: float = 2.0) -> StudySearch:
    bounds = (("peak_mem_gib", "max", ceiling),)
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2)
    return StudySearch(space=space, metric=["objective", "objective_clips_per_s"], mode=["max", "max"],
                       storage=study_storage(folder), study_name="s", sampler=sampler,
                       constraints=bounds)


def feasible(trial) -> bool:
    return bool(trial.constraints) and all(c <= 0 for c in trial.constraints.values())


def test_a_memory_ceiling_marks_trials_above_it_infeasible(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = constrained(tmp_path)
    for name, peak in (("a", 1.5), ("b", 3.0), ("c", 2.0)):
        search.suggest(name)
        search.on_trial_complete(name, {"objective": 0.5, "objective_clips_per_s": 10.0,
                                        "peak_mem_gib": peak, "epoch": 2})
    trials = optuna.load_study(study_name="s", storage=study_storage(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [feasible(t) for t in trials] == [True, False, True]
    assert trials[1].user_attrs["peak_mem_gib"] == 3.0
    search.suggest("d")      # the sampler goes on with an infeasible trial in the study


def test_an_out_of_memory_end_is_pruned_and_infeasible(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = constrained(tmp_path, ceiling=70.0)
    search.suggest("a")
    search.on_trial_result("a", {"objective": float("nan"), "epoch": 1, "oom_ended": 1,
                                 "peak_mem_gib": 0.5})
    search.on_trial_complete("a", {"objective": float("nan"), "epoch": 1, "oom_ended": 1,
                                   "peak_mem_gib": 0.5})
    [trial] = optuna.load_study(study_name="s", storage=study_storage(tmp_path)).trials
    assert trial.state == TrialState.PRUNED and not trial.intermediate_values
    assert not feasible(trial)


def epoch_result(value: float, epoch: int, epochs: int = 3) -> dict:
    """A trial's report as tuning/trial.py sends it."""
    return {"objective": value, "epoch": epoch, "trial_epochs": epochs, "training_iteration": epoch}


def test_finished_stopped_and_failed_trials_get_their_true_states(tmp_path):
    """As Tune's controller calls the searcher: a result the scheduler stops on goes only to
    on_trial_complete; an errored trial gets error=True and no result."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = searcher(tmp_path)
    for trial_id in "abc":
        search.suggest(trial_id)
    for epoch, value in enumerate((0.3, 0.5, 0.6), start=1):      # a: all 3 epochs
        search.on_trial_result("a", epoch_result(value, epoch))
    search.on_trial_complete("a", epoch_result(0.6, 3))
    search.on_trial_result("b", epoch_result(0.2, 1))               # b: ASHA stops it at epoch 2
    search.on_trial_complete("b", epoch_result(0.4, 2))
    search.on_trial_complete("c", error=True)                       # c: failed
    study = optuna.load_study(study_name=None, storage=study_storage(tmp_path))
    assert [(t.state, t.value, t.intermediate_values) for t in study.trials] == [
        (TrialState.COMPLETE, 0.6, {1: 0.3, 2: 0.5, 3: 0.6}),
        (TrialState.PRUNED, 0.4, {1: 0.2, 2: 0.4}),   # its value: the last intermediate
        (TrialState.FAIL, None, {})]


def test_a_trial_stopped_before_a_kill_is_pruned_after_the_resume(tmp_path):
    """Killed after ASHA stopped b but before the searcher heard of it: the resumed trial
    reports its recorded epochs once (tuning/trial.py's report_recorded), and b is PRUNED."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = searcher(tmp_path)
    first.suggest("b")
    first.on_trial_result("b", epoch_result(0.2, 1))
    first.save(str(tmp_path / "searcher-state.pkl"))
    second = searcher(tmp_path)
    second.restore(str(tmp_path / "searcher-state.pkl"))
    second.on_trial_complete("b", {**epoch_result(0.4, 2), "training_iteration": 1})
    [trial] = optuna.load_study(study_name=None, storage=study_storage(tmp_path)).trials
    assert (trial.state, trial.intermediate_values) == (TrialState.PRUNED, {1: 0.2, 2: 0.4})


def test_a_multi_objective_study_takes_no_intermediate_values(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = StudySearch(space=space, metric=["objective", "cost"], mode=["max", "min"],
                         storage=study_storage(tmp_path), study_name="s")
    search.suggest("a")
    search.suggest("b")
    search.on_trial_result("a", {**epoch_result(0.3, 1), "cost": 1.0})
    search.on_trial_complete("a", {**epoch_result(0.5, 3), "cost": 2.0})
    search.on_trial_complete("b", {**epoch_result(0.2, 1), "cost": 1.0})
    study = optuna.load_study(study_name=None, storage=study_storage(tmp_path))
    assert [(t.state, t.values, t.intermediate_values) for t in study.trials] == [
        (TrialState.COMPLETE, [0.5, 2.0], {}), (TrialState.PRUNED, None, {})]

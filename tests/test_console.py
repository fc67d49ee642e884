"""The search console's pieces with stand-in trials (the end-to-end line count is checked on
the README's demo search in tests/test_search.py)."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tuning.console import CompactTable, TrialEvents, console_run_config
from tuning.search import with_retrain_flags
from tuning.space import load_space
from tuning.trial import SCHEDULER_STOP


def fake_trial(tmp_path: Path, index: int, status: str = "RUNNING", epoch: int | None = None,
               objective: float | None = None, lr: float = 1e-3, error: str | None = None):
    name = f"t{index:03d}_lr_head={lr:.1e}"
    (tmp_path / name).mkdir(exist_ok=True)
    result = {} if epoch is None else {"epoch": float(epoch), "val_f1": objective, "objective": objective}
    error_file = None
    if error is not None:
        error_file = tmp_path / name / "error.txt"
        error_file.write_text(error)
    return SimpleNamespace(experiment_tag=f"{index}_lr_head={lr}", config={"lr_head": lr},
                           trial_id=f"id{index}", status=status, last_result=result,
                           path=str(tmp_path / name), error_file=error_file and str(error_file),
                           get_error=lambda: None)


def test_one_line_per_trial_event(tmp_path):
    out = io.StringIO()
    events = TrialEvents("val_f1", "max", ["lr_head"], tmp_path, max_failures=1, out=out)
    a, b = fake_trial(tmp_path, 1), fake_trial(tmp_path, 2, lr=2e-3)
    events.on_trial_start(0, [a, b], a)
    events.on_trial_result(0, [a, b], a, {"epoch": 1.0, "val_f1": 0.5, "objective": 0.5})
    events.on_trial_result(0, [a, b], b, {"epoch": 1.0, "val_f1": 0.4, "objective": 0.4})
    (Path(b.path) / SCHEDULER_STOP).write_text("{}")              # ASHA's own record
    events.on_trial_result(0, [a, b], b, {"epoch": 2.0, "val_f1": 0.7, "objective": 0.7, "done": True})
    events.on_trial_complete(0, [a, b], b)                          # already said: no line
    a.last_result = {"epoch": 3.0, "objective": 0.6}
    events.on_trial_complete(0, [a, b], a)                          # ended without a done result
    c = fake_trial(tmp_path, 3, error="Traceback (most recent call last):\n  File x\nValueError: boom")
    events.on_trial_recover(0, [c], c)
    events.on_trial_error(0, [c], c)
    lines = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "t001 started   lr_head=1.0e-03",
        "t001 epoch 1  val_f1 0.5  trial best 0.5  * search best",
        "t002 epoch 1  val_f1 0.4  trial best 0.4  (search best 0.5, t001)",
        "t002 epoch 2  val_f1 0.7  trial best 0.7  * search best  -> stopped early by ASHA after epoch 2",
        "t001 finished after epoch 3: best val_f1 0.6",
        "t003 failed (ValueError: boom); retry 1 of 1 from its last epoch",
        "t003 failed: ValueError: boom",
    ]
    assert all(line.startswith("[0:00] ") for line in lines)


def test_the_table_is_compact_and_comes_after_enough_events(tmp_path):
    out = io.StringIO()
    table = CompactTable("val_f1", "max", ["lr_head"], tmp_path, every_events=5, min_gap_s=0, out=out)
    table.setup(total_samples=6)
    trials = [fake_trial(tmp_path, 1, "TERMINATED", 3, 0.61, 1e-3),
              fake_trial(tmp_path, 2, "TERMINATED", 1, 0.42, 2e-3),
              fake_trial(tmp_path, 3, "TERMINATED", 3, 0.83, 3e-3),
              fake_trial(tmp_path, 4, "TERMINATED", 2, 0.70, 4e-3),
              fake_trial(tmp_path, 5, "RUNNING", 1, 0.55, 5e-3),
              fake_trial(tmp_path, 6, "PENDING")]
    assert table.should_report(trials)              # 15 events since the start
    table.report(trials, False)
    assert not table.should_report(trials)          # nothing new
    assert not table.should_report(trials, done=True)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("1 running, 4 done, 0 failed, 1 pending of 6 | best so far t003 val_f1 0.83"
                             " | 3 more in trials.csv at the end")
    assert lines[1].split() == ["trial", "status", "lr_head", "epoch", "val_f1", "best", "so", "far"]
    rows = [line.split() for line in lines[2:]]
    # the running trial and the best other one, in launch order, best so far in launch order
    assert rows == [["t003", "terminated", "3.0e-03", "3", "0.83", "0.83"],
                    ["t005", "running", "5.0e-03", "1", "0.55", "0.83"]]
    trials[4].last_result = {"epoch": 4.0, "objective": 0.9}
    assert not table.should_report(trials)          # 3 new events < 5


def test_console_setup_uses_rays_legacy_reporter_unless_verbose(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.delenv("TUNE_PRINT_ALL_TRIAL_ERRORS", raising=False)
    quiet = console_run_config(metric="val_f1", mode="max", params=["lr_head"], search_dir=tmp_path,
                               max_failures=0, verbose=False)
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0" and isinstance(quiet["progress_reporter"], CompactTable)
    assert os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] == "0"
    assert quiet["verbose"] == 1 and isinstance(quiet["callbacks"][0], TrialEvents)
    loud = console_run_config(metric="val_f1", mode="max", params=["lr_head"], search_dir=tmp_path,
                              max_failures=0, verbose=True)
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1" and "progress_reporter" not in loud


# --- the space's retrain section and TPE start-up -----------------------------------------------
def write(tmp_path: Path, **sections) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"search": {"lr_head": {"loguniform": [1e-4, 1e-3]}}, **sections}))
    return path


def test_budget_startup_trials_and_the_retrain_section(tmp_path):
    space = load_space(str(write(tmp_path, budget={"startup_trials": 3},
                                 retrain={"epochs": 5, "test_csv": "s/test.csv"})))
    assert space.startup_trials == 3
    assert space.retrain == {"epochs": 5, "test_csv": "s/test.csv", "train_on_val": False}
    assert "TPE after 3 random trials" in space.describe() and "retrain:   the best config for 5" in space.describe()
    assert load_space(str(write(tmp_path))).startup_trials == 10 and load_space(str(write(tmp_path))).retrain == {}
    off = load_space(str(write(tmp_path, retrain={"epochs": 5})), sets=["retrain.epochs=0"])
    assert off.retrain == {}


@pytest.mark.parametrize("sections, fragment", [
    ({"retrain": {"epoch": 3}}, "retrain.epoch: unknown key (did you mean epochs?)"),
    ({"retrain": {"epochs": -1}}, "retrain.epochs: must be >= 0"),
    ({"retrain": {"epochs": 2, "train_on_val": "yes"}}, "retrain.train_on_val: expected true or false"),
    ({"budget": {"startup_trials": -1}}, "budget.startup_trials: must be >= 0"),
])
def test_bad_retrain_and_startup_settings(tmp_path, sections, fragment):
    from headernet_core.errors import HeaderNetError
    with pytest.raises(HeaderNetError) as excinfo:
        load_space(str(write(tmp_path, **sections)))
    assert fragment in str(excinfo.value)


def test_retrain_flags_override_the_space(tmp_path):
    space = load_space(str(write(tmp_path, retrain={"epochs": 5, "test_csv": "a.csv"})))
    args = SimpleNamespace(retrain_best=None, test_csv=None)
    assert with_retrain_flags(space, args).retrain["epochs"] == 5
    args = SimpleNamespace(retrain_best=2, test_csv="b.csv")
    retrain = with_retrain_flags(space, args).retrain
    assert retrain["epochs"] == 2 and retrain["test_csv"] == str(Path("b.csv").absolute())
    assert with_retrain_flags(space, SimpleNamespace(retrain_best=0, test_csv=None)).retrain == {}
    plain = load_space(str(write(tmp_path)))
    from headernet_core.errors import HeaderNetError
    with pytest.raises(HeaderNetError, match="--test_csv scores the retrained best config"):
        with_retrain_flags(plain, SimpleNamespace(retrain_best=None, test_csv="b.csv"))


def test_tunes_stop_lines_become_this_commands_own(capsys):
    """Stopping a search (Ctrl-C, SIGTERM, the disk watch): Tune's notice becomes one line of
    ours and its `Tuner.restore(...)` hint is dropped (the summary prints `--resume`, which
    checks the signed state); its other lines pass, and nothing is filtered outside the fit."""
    from tuning.console import STOP_LINE, TUNE_LOGGER, own_stop_lines

    logger = logging.getLogger(TUNE_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with own_stop_lines() as stop:
            assert not stop.seen
            logger.warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run. ...")
            assert stop.seen
            logger.warning("Experiment has been interrupted, but the most recent state was saved.\n"
                           "Resume experiment with: Tuner.restore(path=\"/x\", trainable=...)")
            logger.warning("Trial t001 errored")
        logger.warning("Stop signal received (outside the search)")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Trial t001 errored", "Stop signal received (outside the search)"]
    assert capsys.readouterr().out.splitlines() == [STOP_LINE]

"""The user's whole journey, end to end on tiny CPU data: split in one folder -> train from
another -> search (console, study file, TPE) -> retrain the best -> test (a resumed search's
study: tests/test_search.py)."""
from __future__ import annotations

import json
import wsgiref.util
from pathlib import Path

import optuna
import pandas as pd
import conftest
import pytest
import yaml

from conftest import write_clips
from headernet_core import split_dataset
from headernet_core.config import TrainConfig
from headernet_core.evaluation import evaluate
from headernet_core.trainer import train
from tuning.retrain import main as retrain_main
from tuning.search import main as search_main
from tuning.study import STUDY_FILE
from tuning.summary import FINAL_HEADING

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
TINY = {k: v for k, v in conftest.TINY_TRAINER.items() if k not in ("epochs", "cpu", "progress")}


def load_study(search_dir: Path) -> optuna.Study:
    """What the README says: optuna.load_study on the journal file in the search folder."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    return optuna.load_study(study_name=None,
                             storage=JournalStorage(JournalFileBackend(str(search_dir / STUDY_FILE))))


def model_based(study: optuna.Study, startup: int) -> list[int]:
    """Numbers of the trials TPE sampled from its model: asked when `startup` trials had ended."""
    ended = [t.datetime_complete for t in study.trials if t.datetime_complete]
    return [t.number for t in study.trials if sum(e < t.datetime_start for e in ended) >= startup]


def write_space(path: Path, **sections) -> Path:
    """conftest's tiny space, one trial at a time, TPE after 2 random trials, no early stopping."""
    sections.setdefault("search", {"backbone": {"choice": ["vmae", "csn"]},
                                   "lr_head": {"loguniform": [5e-4, 3e-3]}})
    sections["budget"] = {"max_concurrent": 1, "startup_trials": 2, **sections.get("budget", {})}
    sections = {"name": "journey", "scheduler": {"type": "none"}, **sections}
    return conftest.write_space(path, **sections)


def test_split_in_one_folder_then_train_elsewhere_search_retrain_and_test(tmp_path, monkeypatch, capsys):
    # 1. clips indexed relative to the folder the user works in (what broke the search before)
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    elsewhere.mkdir()
    frame = write_clips(here / "data" / "clips", 48, seed=7)
    frame["path"] = ["data/" + p for p in frame["path"]]
    frame.to_csv(here / "all.csv", index=False)
    monkeypatch.chdir(here)
    split_dataset.main(["--input_csv", "all.csv", "--output_dir", "splits", "--val_split", "0.25",
                        "--test_split", "0.25"])
    splits = here / "splits"
    assert all((splits / f"{n}.csv").is_file() for n in ("train", "val", "test"))

    # 2. a single run from another folder finds every clip
    monkeypatch.chdir(elsewhere)
    result = train(TrainConfig(train_csv=str(splits / "train.csv"), val_csv=str(splits / "val.csv"),
                               **TINY, epochs=1, cpu=True, progress=False, output_root="runs",
                               run_name="r"), log=lambda _: None)
    assert result.epochs_done == 1

    # 3. a search started where the split was made (its trials run in Ray's own folders),
    #    then the best config retrained and scored once on the test split
    monkeypatch.chdir(here)
    space = write_space(here / "space.yaml", trainer={**TINY, "epochs": 2, "cpu": True, "progress": True,
                                                      "output_root": str(here / "out")})
    capsys.readouterr()
    search_main(["--space", str(space), "--train_csv", "splits/train.csv", "--val_csv", "splits/val.csv",
                 "--retrain_best", "1", "--test_csv", "splits/test.csv"])
    console = capsys.readouterr().out
    search_dir = here / "out" / "journey"
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert [t["status"] for t in summary["trials"]] == ["finished"] * 4, summary["trials"]

    # the console: event lines with tNNN names and the objective, Ray's chatter kept out
    for fragment in ("t001 started", "t004 started", "t001 epoch 1  val_f1", "t001 finished after epoch 2: best val_f1"):
        assert fragment in console, fragment
    assert console.count("warning: progress is off in trials") == 1
    for noise in ("Checkpoint successfully created", "run_trial pid", "Trial status:", "╭"):
        assert noise not in console, noise
    assert "epoch 2/2" in (search_dir / summary["trials"][0]["name"] / "train.log").read_text()

    # the study file: every trial once, TPE's model used after the 2 start-up trials
    study = load_study(search_dir)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    assert sorted(json.dumps(t.params, sort_keys=True) for t in study.trials) == \
        sorted(json.dumps(t["params"], sort_keys=True) for t in summary["trials"])
    assert model_based(study, 2) == [2, 3]

    # the final model: a fresh run folder with the trial's config and the space's devices,
    # scored at the threshold its validation chose
    best = summary["best_trial"]
    final = search_dir / "final"
    config = yaml.safe_load((final / "config.yaml").read_text())
    trial_config = yaml.safe_load((search_dir / best["name"] / "config.yaml").read_text())
    assert (config["epochs"], config["output_root"], config["run_name"]) == (1, str(search_dir), "final")
    assert config["progress"] is True and config["num_workers"] == 0   # the space's, not the trial's
    assert trial_config["threads"] == 1 and config["threads"] is None  # the trainer's policy, not the slot's
    for key in ("backbone", "lr_head", "lr_backbone", "select_metric", "num_frames"):
        assert config[key] == trial_config[key], key
    test = json.loads((final / "test_metrics.json").read_text())
    final_best = json.loads((final / "best_metrics.json").read_text())
    assert test["threshold"] == pytest.approx(final_best["val_threshold"])
    metrics, _ = evaluate(final / final_best["checkpoint"], splits / "test.csv", threshold=test["threshold"])
    assert test["test_f1"] == pytest.approx(metrics["f1"]) and test["test_clips"] == 12
    assert summary["state"] == "finished"
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert summary["final"]["test_f1"] == test["test_f1"]
    assert FINAL_HEADING in (search_dir / "summary.md").read_text()
    assert (final / "test_per_video.csv").is_file()
    assert "test (test.csv, 12 clips) at threshold" in console

    # a second retrain never overwrites; another name trains on train + val and scores last.pt
    # at the best trial's validation threshold
    with pytest.raises(SystemExit) as exc:
        retrain_main([str(search_dir), "--epochs", "1", "--test_csv", "splits/test.csv"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "final already exists" in err and err.count("\n") == 1
    retrain_main([str(search_dir), "--epochs", "1", "--test_csv", "splits/test.csv", "--name", "final2",
                  "--train_on_val", "--cpu", "--threads", "2", "--views", "2", "--spatial_views", "3"])
    assert yaml.safe_load((search_dir / "final2" / "config.yaml").read_text())["threads"] == 2
    test2 = json.loads((search_dir / "final2" / "test_metrics.json").read_text())
    trial_best = json.loads((search_dir / best["name"] / "best_metrics.json").read_text())
    assert test2["checkpoint"] == "final2/checkpoints/last.pt" and test2["views"] == 6
    assert test2["test_clips"] == 12   # views averaged per clip, not rows per view
    assert test2["threshold"] == pytest.approx(trial_best["val_threshold"])
    combined = pd.read_csv(search_dir / "final2_train_plus_val.csv")
    assert len(combined) == len(pd.read_csv(splits / "train.csv")) + len(pd.read_csv(splits / "val.csv"))


def test_the_study_file_opens_in_optuna_dashboard(tmp_path):
    """optuna-dashboard (the `dashboard` extra; the tests install it) serves the journal file as it is."""
    import optuna_dashboard as dashboard
    from tuning.study import study_storage
    study = optuna.create_study(storage=study_storage(tmp_path), study_name="s", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    app = dashboard.wsgi(str(tmp_path / STUDY_FILE))
    environ = {"PATH_INFO": "/api/studies"}
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    body = b"".join(app(environ, lambda s, headers, *exc_info: status.append(s)))
    assert status[0].startswith("200")
    studies = json.loads(body)["study_summaries"]
    assert [(s["study_name"]) for s in studies] == ["s"]

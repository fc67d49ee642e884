"""A two-objective search end to end (tiny CPU trials): the Pareto front, its table and plot,
the study's constraints, an out-of-memory backoff inside a trial, and `retrain --trial`."""
from __future__ import annotations

import csv
import json

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from headernet_core.metrics import MEASURED_METRICS
from headernet_core.config import TrainConfig
from headernet_core.memory import OOM_TEST_ENV
from headernet_core.trainer import train
from tuning.retrain import best_trial
from tuning.search import main
from tuning.study import study_storage

pytestmark = pytest.mark.slow
OBJECTIVES = {"val_f1": "max", "clips_per_s": "max"}
UNTIMED = list(MEASURED_METRICS)


def non_dominated(rows: list[dict[str, str]]) -> set[str]:
    """Brute force: the names of the rows no other row beats on every objective."""
    points = {r["name"]: [float(r[m]) for m in OBJECTIVES] for r in rows
              if r["status"] == "finished" and all(r[m] for m in OBJECTIVES)}
    return {name for name, p in points.items()
            if not any(all(q[i] >= p[i] for i in range(2)) and q != p for q in points.values())}


def test_two_objective_search_writes_the_front(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv(OOM_TEST_ENV, "2:2")   # every trial runs out of memory in epoch 2 above batch 2
    space = {
        "name": "p",
        "trainer": {"train_csv": str(tiny_data["train_csv"]), "val_csv": str(tiny_data["val_csv"]),
                    "vmae_variant": "tiny", "num_frames": 4, "input_size": 32, "batch_size": 8,
                    "epochs": 2, "cpu": True, "num_workers": 0, "progress": False, "plots": False,
                    "tensorboard": False, "output_root": str(tmp_path / "out")},
        "search": {"lr_head": {"loguniform": [3e-4, 3e-3]}, "lr_backbone": {"loguniform": [1e-4, 1e-3]}},
        "objective": {"metrics": list(OBJECTIVES), "modes": list(OBJECTIVES.values())},
        "constraints": {"peak_mem_gib": {"max": 1000}},
        "budget": {"num_samples": 4, "max_concurrent": 1, "seed": 0, "startup_trials": 2},   # one trial actor
        "resources": {"cpu": 1, "gpu": 0},
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    main(["--space", str(path)])
    search_dir = tmp_path / "out" / "p"

    summary = json.loads((search_dir / "search_summary.json").read_text())
    with open(search_dir / "trials.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    assert set(summary["pareto_front"]) == non_dominated(rows) and summary["pareto_front"]
    assert summary["cost"]["unit"] == "CPU-hours" and summary["cost"]["total"] > 0
    markdown = (search_dir / "summary.md").read_text()
    assert "## Pareto front" in markdown and "plots/pareto.png" in markdown
    assert (search_dir / "plots" / "pareto.png").stat().st_size > 0

    study = optuna.load_study(study_name=None, storage=study_storage(search_dir))
    assert len(study.directions) == 2
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert all(t.constraints and max(t.constraints.values()) <= 0 for t in study.trials)
    assert {t.number for t in study.best_trials} == {
        int(name[1:4]) - 1 for name in summary["pareto_front"]}

    # inside a trial the backoff happened, was recorded, and equals a run resumed at its batch
    first = search_dir / rows[0]["name"]
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert (saved["batch_size"], saved["grad_accum"]) == (2, 4)
    assert "out of memory in epoch 2 at batch 8" in (first / "train.log").read_text()
    monkeypatch.delenv(OOM_TEST_ENV)
    reference = TrainConfig.from_dict({**saved, "batch_size": 8, "grad_accum": 1,
                                       "output_root": str(tmp_path / "ref"), "run_name": "r",
                                       "resume": False, "overwrite": False})
    train(reference, on_epoch=lambda r: r.epoch == 1, log=lambda _: None)
    resumed = train(reference.replace(batch_size=2, grad_accum=4, resume=True), log=lambda _: None)
    a = pd.read_csv(first / "metrics_epoch.csv").drop(columns=UNTIMED)
    b = pd.read_csv(resumed.run_dir / "metrics_epoch.csv").drop(columns=UNTIMED)
    pd.testing.assert_frame_equal(a, b, atol=1e-5)

    # retrain: the front's best by val_f1 by default, any trial with --trial
    assert best_trial(search_dir)[0] == summary["pareto_front"][0]
    assert best_trial(search_dir, "t003")[0].startswith("t003_")

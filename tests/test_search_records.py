"""How a trial's state is read back after a search (no Ray needed): the trainer's status.json,
Tune's own status and whether the search was interrupted decide what the summary says."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuning.search import collect_records
from tuning.space import load_space


class FakeGrid(list):
    """The part of Ray's ResultGrid that collect_records reads."""

    def __init__(self, results, statuses):
        super().__init__(results)
        self._experiment_analysis = SimpleNamespace(trials=[SimpleNamespace(status=s) for s in statuses])


def trial(root: Path, name: str, state: str | None, epochs: int, error=None):
    folder = root / name
    folder.mkdir()
    if state is not None:
        (folder / "status.json").write_text(json.dumps({"state": state, "epochs_done": epochs}))
        (folder / "best_metrics.json").write_text(json.dumps({"epoch": 1, "val_f1": 0.5,
                                                              "checkpoint": "checkpoints/best_epoch_1.pt"}))
    return SimpleNamespace(path=str(folder), error=error, config={"lr_head": 1e-3})


@pytest.mark.parametrize("interrupted", [False, True])
def test_states(tmp_path, interrupted):
    space = load_space("demo")
    results = [trial(tmp_path, "t001_a", "finished", 4),
               trial(tmp_path, "t002_b", "stopped", 1),     # ASHA stopped it
               trial(tmp_path, "t003_c", "stopped", 2),     # Ctrl-C cut it short
               trial(tmp_path, "t004_d", None, 0),          # never started
               trial(tmp_path, "t005_e", "failed", 1, error=RuntimeError("boom\nCUDA out of memory"))]
    grid = FakeGrid(results, ["TERMINATED", "TERMINATED", "RUNNING", "PENDING", "ERROR"])
    records = collect_records(space, tmp_path, grid, interrupted)
    states = [r.status for r in records]
    assert states == ["finished", "stopped_early", "interrupted" if interrupted else "stopped_early",
                      "interrupted" if interrupted else "pending", "failed"]
    assert records[4].error == "CUDA out of memory"
    assert [r.epochs_run for r in records] == [4, 1, 2, 0, 1]
    assert records[0].checkpoint is None  # the weights file does not exist: no dangling path


def test_without_tune_statuses_an_interrupted_stop_counts_as_interrupted(tmp_path):
    grid = [trial(tmp_path, "t001_a", "stopped", 1)]
    assert collect_records(load_space("demo"), tmp_path, grid, True)[0].status == "interrupted"

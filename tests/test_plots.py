"""Run plots: the files appear as valid PNGs, atomically, in every degenerate case."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headernet_core.plots import write_plots, write_run_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def _epochs(n: int, **overrides) -> pd.DataFrame:
    rng = np.random.default_rng(n)
    data = {"epoch": np.arange(1, n + 1), "train_loss": np.linspace(1.0, 0.2, n),
            "val_loss": np.linspace(1.1, 0.4, n)}
    for col in ("val_f1", "val_auc", "val_precision", "val_recall", "val_ap"):
        data[col] = rng.random(n)
    data.update(overrides)
    return pd.DataFrame(data)


def _predictions(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    labels = (rng.random(n) < 0.3).astype(int)
    labels[:2] = [0, 1]
    return labels, np.clip(rng.normal(0.3 + 0.4 * labels, 0.2), 0, 1)


def _assert_pngs(plot_dir: Path, written: list[Path], names: list[str]) -> None:
    assert [p.name for p in written] == names
    for path in written:
        assert path.parent == plot_dir
        assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert sorted(p.name for p in plot_dir.iterdir()) == sorted(names)  # no temp files left


def test_all_four_plots(tmp_path):
    labels, probs = _predictions()
    written = write_plots(tmp_path / "plots", _epochs(5), labels, probs, best_epoch=3)
    _assert_pngs(tmp_path / "plots", written, ["loss.png", "metrics.png", "roc.png", "pr.png"])


def test_single_epoch(tmp_path):
    labels, probs = _predictions()
    written = write_plots(tmp_path, _epochs(1), labels, probs, best_epoch=1)
    _assert_pngs(tmp_path, written, ["loss.png", "metrics.png", "roc.png", "pr.png"])


def test_nan_values_and_no_best_epoch(tmp_path):
    epochs = _epochs(3, val_loss=[NAN, 0.5, NAN], val_auc=[NAN, NAN, NAN], val_ap=[NAN] * 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_plots(tmp_path, epochs, None, None, best_epoch=None)
    _assert_pngs(tmp_path, written, ["loss.png", "metrics.png"])


def test_one_class_skips_roc_and_pr(tmp_path):
    written = write_plots(tmp_path, _epochs(2), np.zeros(10, dtype=int), np.linspace(0, 1, 10), 2)
    _assert_pngs(tmp_path, written, ["loss.png", "metrics.png"])


def test_overwrites_existing_plots(tmp_path):
    labels, probs = _predictions()
    write_plots(tmp_path, _epochs(2), labels, probs, 1)
    written = write_plots(tmp_path, _epochs(4), labels, probs, 4)
    _assert_pngs(tmp_path, written, ["loss.png", "metrics.png", "roc.png", "pr.png"])


def test_length_mismatch_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="differ in length"):
        write_plots(tmp_path, _epochs(2), np.array([0, 1]), np.array([0.5]), 1)


def test_leaves_pyplot_and_backend_alone(tmp_path):
    # In a fresh interpreter: plotting must not import pyplot or pick a backend for the user.
    code = textwrap.dedent(f"""
        import sys
        import numpy as np, pandas as pd
        import matplotlib
        matplotlib.rcParams["backend"] = "pdf"
        from headernet_core.plots import write_plots
        df = pd.DataFrame({{"epoch": [1, 2], "train_loss": [1.0, 0.5], "val_loss": [1.0, 0.6]}})
        write_plots({str(tmp_path)!r}, df, np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.4, 0.3]), 2)
        assert "matplotlib.pyplot" not in sys.modules
        assert matplotlib.rcParams["backend"] == "pdf"
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "roc.png").read_bytes()[:8] == PNG_MAGIC


def test_a_run_folder_whose_plots_were_cut_short_is_drawn_from_its_artifacts(tiny_config):
    """A search's trial stopped as the search ends loses its actor right after its last report:
    its plots are drawn afterwards from metrics_epoch.csv, best_metrics.json and
    val_predictions.csv (tuning.summary.complete_trial_plots)."""
    import os

    from headernet_core.plots import plots_outdated, write_run_plots
    from headernet_core.trainer import train

    result = train(tiny_config(epochs=2, plots=True), log=lambda _: None)
    run, plots = result.run_dir, result.run_dir / "plots"
    assert not plots_outdated(run)
    (plots / "roc.png").unlink()
    (plots / "pr.png").unlink()
    (plots / ".pr.png.0a1b2c3d.tmp").write_bytes(b"half a png")   # the drawing the kill cut short
    assert plots_outdated(run)
    written = write_run_plots(run)
    _assert_pngs(plots, written, ["loss.png", "metrics.png", "roc.png", "pr.png"])
    assert not plots_outdated(run)
    # an epoch after the drawing (after the newest PNG: drawing can take over a second here)
    later = max(p.stat().st_mtime_ns for p in plots.glob("*.png")) + 10**9
    os.utime(run / "metrics_epoch.csv", ns=(later, later))
    assert plots_outdated(run)
    (run / "metrics_epoch.csv").unlink()
    assert not plots_outdated(run)   # no epoch: nothing to draw


def test_the_summary_completes_the_plots_of_trials_that_ended_without_them(tiny_config, tmp_path):
    from types import SimpleNamespace

    import yaml

    from tuning.summary import complete_trial_plots

    search = tmp_path / "runs"
    cut = train_run(tiny_config, "t001_cut")
    off = train_run(tiny_config, "t002_off")
    broken = train_run(tiny_config, "t003_broken")
    for run in (cut, off, broken):
        for png in (run / "plots").iterdir():
            png.unlink()
    config = yaml.safe_load((off / "config.yaml").read_text())
    (off / "config.yaml").write_text(yaml.safe_dump({**config, "plots": False}))   # not wanted
    (broken / "metrics_epoch.csv").write_text("not,a\nmetrics table")
    records = [SimpleNamespace(name=run.name) for run in (cut, off, broken)]
    problems = complete_trial_plots(search, records)
    assert sorted(p.name for p in (cut / "plots").iterdir()) == ["loss.png", "metrics.png", "pr.png", "roc.png"]
    assert list((off / "plots").iterdir()) == []
    assert len(problems) == 1 and problems[0].startswith("warning: plots of t003_broken not drawn: ")


def train_run(tiny_config, name: str) -> Path:
    from headernet_core.trainer import train

    return train(tiny_config(epochs=1, plots=True, run_name=name), log=lambda _: None).run_dir


def test_the_summary_waits_for_a_trial_process_still_drawing(tiny_config, monkeypatch):
    """A trial's actor may still be drawing its plots while Ray shuts down: the summary waits
    for that process (on this machine) before it removes the drawing's temp files and draws
    what is missing, so the two never write the same folder at once."""
    import subprocess
    import sys
    import threading
    from types import SimpleNamespace

    import tuning.summary
    from headernet_core.locks import owner_record
    from headernet_core.status import write_status
    from tuning.summary import complete_trial_plots

    run = train_run(tiny_config, "t001_ending")
    for png in (run / "plots").iterdir():
        png.unlink()
    temp = run / "plots" / ".roc.png.f3d5b710.tmp"
    records = [SimpleNamespace(name=run.name)]

    def owned_by(seconds: float) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
        threading.Thread(target=proc.wait, daemon=True).start()   # reaped at exit, as Ray's are
        monkeypatch.setattr("headernet_core.locks.os.getpid", lambda: proc.pid)
        write_status(run, "stopped", 1)   # as the trial's process records itself
        monkeypatch.undo()
        assert read_pid(run) == proc.pid and owner_record()["pid"] != proc.pid
        return proc

    ending = owned_by(1.0)
    temp.write_bytes(b"half a png")
    assert complete_trial_plots(run.parent, records) == []
    assert ending.poll() is not None   # waited for
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png", "metrics.png", "pr.png", "roc.png"]

    for png in (run / "plots").iterdir():
        png.unlink()
    temp.write_bytes(b"half a png")
    monkeypatch.setattr(tuning.summary, "EXIT_WAIT_S", 0.2)
    stuck = owned_by(60.0)
    try:
        problems = complete_trial_plots(run.parent, records)
    finally:
        stuck.kill()
        stuck.wait()
    assert problems == [f"warning: plots of {run.name} not checked: its process {stuck.pid} still runs"]
    assert [p.name for p in (run / "plots").iterdir()] == [temp.name]   # left to its owner

    # current plots: a process still running is neither waited for nor warned about
    write_run_plots(run)
    monkeypatch.setattr(tuning.summary, "EXIT_WAIT_S", 5)
    alive = owned_by(60.0)
    try:
        assert complete_trial_plots(run.parent, records) == []
        assert alive.poll() is None
    finally:
        alive.kill()
        alive.wait()


def read_pid(run: Path) -> int:
    import json

    return json.loads((run / "status.json").read_text())["pid"]

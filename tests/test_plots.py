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

from headernet_core.plots import write_plots

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

"""PNG curves of a run: loss and validation metrics per epoch, ROC and PR of the best epoch.

Figures are built with `matplotlib.figure.Figure` on an Agg canvas instead of pyplot, so plotting
from a training loop (or a Ray worker) never touches the user's backend or pyplot's figure
registry, and a figure is freed as soon as it goes out of scope.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .artifacts import atomic_path
from .metrics import best_threshold

_FIGSIZE = (7.0, 4.5)
_DPI = 100
_MARGINS = {"left": 0.115, "right": 0.97, "bottom": 0.12, "top": 0.92}

# (column, legend label) of the per-epoch plots.
_LOSS_COLUMNS = (("train_loss", "train loss"), ("val_loss", "val loss"))
_EPOCH_METRICS: tuple[tuple[str, str], ...] = (
    ("val_f1", "F1 (best threshold)"),
    ("val_auc", "ROC AUC"),
    ("val_ap", "average precision"),
    ("val_precision", "precision (best threshold)"),
    ("val_recall", "recall (best threshold)"),
)


def new_figure() -> tuple[Figure, object]:
    """A Figure on its own Agg canvas: no pyplot state, safe in workers and threads.

    Fixed margins (room for a title, axis labels and 4-digit tick labels) instead of
    `tight_layout`, which renders every figure once more to measure it: a quarter of the plot
    time, paid at every epoch of every trial of a search."""
    fig = Figure(figsize=_FIGSIZE, dpi=_DPI)
    FigureCanvasAgg(fig)  # attaches itself as fig.canvas
    fig.subplots_adjust(**_MARGINS)
    return fig, fig.add_subplot(1, 1, 1)


def finish_figure(fig: Figure, ax, path: Path, grid_axis: str = "both", **legend) -> Path:
    """How every run and search plot ends: a grid, a legend (`legend`: its keywords) only when
    something is labelled (matplotlib warns on an empty one), then written atomically (the temp
    name ends in .tmp, hence the explicit format) and freed."""
    ax.grid(alpha=0.3, axis=grid_axis)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**legend)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        fig.clear()
    return path


def _epoch_plot(path: Path, epochs: pd.DataFrame, best_epoch: int | None,
                columns: Sequence[tuple[str, str]], legend_size: str | None = None, **axes) -> Path:
    """One line per present column (markers, so a single epoch still shows a point) and the
    best epoch as a dashed line."""
    fig, ax = new_figure()
    x = pd.to_numeric(epochs["epoch"], errors="coerce").to_numpy(dtype=float)
    for column, label in columns:
        if column in epochs:
            y = pd.to_numeric(epochs[column], errors="coerce").to_numpy(dtype=float)
            ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.25
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
    ax.set(xlabel="epoch", **axes)
    return finish_figure(fig, ax, path, loc="best", fontsize=legend_size)


def _roc_plot(path: Path, y: np.ndarray, p: np.ndarray, title: str) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    fig, ax = new_figure()
    ax.plot(fpr, tpr, label=f"AUC = {roc_auc_score(y, p):.3f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title,
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    return finish_figure(fig, ax, path, loc="lower right")


def _pr_plot(path: Path, y: np.ndarray, p: np.ndarray, title: str) -> Path:
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(y, p)
    threshold, best_p, best_r, best_f1 = best_threshold(y, p)
    fig, ax = new_figure()
    ax.plot(recall, precision, drawstyle="steps-post",
            label=f"AP = {average_precision_score(y, p):.3f}")
    ax.axhline(y.mean(), color="grey", linestyle=":", linewidth=1,
               label=f"positive rate {y.mean():.3f}")
    ax.scatter([best_r], [best_p], color="red", zorder=3,
               label=f"best F1 {best_f1:.3f} at threshold {threshold:.3f}")
    ax.set(xlabel="recall", ylabel="precision", title=title, xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    return finish_figure(fig, ax, path, loc="lower left", fontsize="small")


def write_plots(plot_dir: Path, epochs: pd.DataFrame, labels: np.ndarray | None,
                prob_header: np.ndarray | None, best_epoch: int | None) -> list[Path]:
    """Write loss.png and metrics.png, plus roc.png and pr.png of the best epoch's predictions.

    `epochs` is the metrics_epoch table (missing columns are skipped, NaN leaves gaps). ROC/PR
    need finite predictions with both classes; otherwise they are skipped silently (the
    metrics already warned). Returns the paths written.
    """
    plot_dir = Path(plot_dir)
    written = [_epoch_plot(plot_dir / "loss.png", epochs, best_epoch, _LOSS_COLUMNS,
                           ylabel="loss", title="Loss per epoch"),
               _epoch_plot(plot_dir / "metrics.png", epochs, best_epoch, _EPOCH_METRICS, "small",
                           ylabel="value", title="Validation metrics per epoch", ylim=(-0.02, 1.02))]
    if labels is None or prob_header is None:
        return written
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(prob_header, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and prob_header ({p.size}) differ in length")
    if np.unique(y).size < 2 or not np.all(np.isfinite(p)):
        return written
    suffix = "" if best_epoch is None else f" (epoch {best_epoch})"
    written.append(_roc_plot(plot_dir / "roc.png", y, p, f"ROC, validation{suffix}"))
    written.append(_pr_plot(plot_dir / "pr.png", y, p, f"Precision-recall, validation{suffix}"))
    return written


def plots_outdated(run_dir: str | Path) -> bool:
    """Whether a run folder's plots/ lacks what its artifacts give: loss/metrics curves older
    than metrics_epoch.csv, or ROC/PR older than val_predictions.csv (or missing)."""
    run_dir = Path(run_dir)
    metrics, predictions, plots = run_dir / "metrics_epoch.csv", run_dir / "val_predictions.csv", run_dir / "plots"

    def older(png: Path, source: Path) -> bool:
        return not png.is_file() or png.stat().st_mtime_ns < source.stat().st_mtime_ns

    if not metrics.is_file():
        return False   # no epoch yet: nothing to draw
    if older(plots / "loss.png", metrics) or older(plots / "metrics.png", metrics):
        return True
    return predictions.is_file() and (older(plots / "roc.png", predictions) or older(plots / "pr.png", predictions))


def write_run_plots(run_dir: str | Path) -> list[Path]:
    """plots/ of a run folder drawn from its artifacts alone (metrics_epoch.csv,
    best_metrics.json, val_predictions.csv), as the trainer draws them, for a run whose process
    ended before it could: a search's trial stopped as the search ends, whose actor Ray ends
    right after the trial's last report. Temp files of a drawing cut short are removed."""
    from .artifacts import read_json_dict, remove_stale_temps

    run_dir = Path(run_dir)
    remove_stale_temps(run_dir / "plots")
    epochs = pd.read_csv(run_dir / "metrics_epoch.csv")
    best_epoch = read_json_dict(run_dir / "best_metrics.json").get("epoch")
    labels = prob = None
    if (run_dir / "val_predictions.csv").is_file():
        predictions = pd.read_csv(run_dir / "val_predictions.csv", usecols=["label", "prob_header"])
        labels, prob = predictions["label"].to_numpy(), predictions["prob_header"].to_numpy()
    return write_plots(run_dir / "plots", epochs, labels, prob,
                       int(best_epoch) if isinstance(best_epoch, (int, float)) else None)

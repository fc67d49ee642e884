"""The search summary's plots: the objective per trial (launch order, best so far) and the
objective against each searched param, each point coloured by its trial's status.

    plots/objective_per_trial.png   the objective by launch order with the best-so-far line
    plots/param_<name>.png          objective against each searched param (its whole range)

This module imports matplotlib: tuning.summary imports it only when it draws, so nothing delays
a search's first trial.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from headernet_core.plots import finish_figure, new_figure

from .summary import TrialRecord, _fmt_value, _present
from .trial import finite

if TYPE_CHECKING:
    from tuning.space import Param

OBJECTIVE_PLOT = "objective_per_trial.png"
PARETO_PLOT = "pareto.png"

# (marker colour, filled) per status; failed trials are red crosses.
_STATUS_STYLE: dict[str, tuple[str, bool]] = {
    "finished": ("tab:blue", True),
    "stopped_early": ("tab:blue", False),
    "running": ("tab:green", False),
    "interrupted": ("tab:grey", False),
    "pending": ("tab:grey", False),
    "out_of_memory": ("tab:red", False),
}


def write_plots(plot_dir: Path, records: Sequence[TrialRecord], space_params: Sequence[Param],
                metric: str, mode: str, best: TrialRecord | None) -> list[Path]:
    """Each plot that has a finite point; a plot with nothing to show is removed if an older
    summary left one, so the folder never shows stale results."""
    jobs = [(plot_dir / OBJECTIVE_PLOT,
             lambda path: _objective_plot(path, records, metric, mode, best))]
    jobs += [(plot_dir / ("param_" + re.sub(r"[^A-Za-z0-9._-]", "_", p.name) + ".png"),
              lambda path, p=p: _param_plot(path, p, records, metric, mode, best))
             for p in space_params]
    written = []
    for path, draw in jobs:
        if draw(path) is not None:
            written.append(path)
        else:
            path.unlink(missing_ok=True)
    return written


def write_pareto_plot(plot_dir: Path, records: Sequence[TrialRecord],
                      objectives: Sequence[tuple[str, str]], front: Sequence[str]) -> Path:
    """pareto.png: every trial by its first two objective values (best epoch), the front's
    trials joined by a line (its staircase) and named."""
    (mx, _), (my, _) = objectives[0], objectives[1]
    points = [(x, y, r) for r in records if (x := finite((r.best_metrics or {}).get(mx))) is not None
              and (y := finite((r.best_metrics or {}).get(my))) is not None]
    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = new_figure()
    _scatter_by_status(ax, points)
    on_front = sorted((x, y, r.name) for x, y, r in points if r.name in front)
    if on_front:
        ax.plot([p[0] for p in on_front], [p[1] for p in on_front], color="black", linewidth=1,
                marker="o", markerfacecolor="none", markersize=11, label="Pareto front")
        for x, y, name in on_front:
            ax.annotate(name.split("_", 1)[0], (x, y), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
    more = f" (+{len(objectives) - 2} more objectives)" if len(objectives) > 2 else ""
    return _finish(fig, ax, plot_dir / PARETO_PLOT, xlabel=f"{mx} ({objectives[0][1]})",
                   ylabel=f"{my} ({objectives[1][1]})",
                   title=f"{mx} against {my} at each trial's best epoch{more}")


def _scatter_by_status(ax, points: Sequence[tuple[float, float, TrialRecord]]) -> None:
    """Points coloured by status (hollow: not run to the end); failed trials as red crosses."""
    for status, (colour, filled) in _STATUS_STYLE.items():
        xs = [x for x, _, r in points if r.status == status]
        ys = [y for _, y, r in points if r.status == status]
        if xs:
            ax.scatter(xs, ys, s=30, edgecolors=colour, facecolors=colour if filled else "none",
                       label=status.replace("_", " "), zorder=3)
    failed = [(x, y) for x, y, r in points if r.status == "failed"]
    if failed:
        ax.scatter(*zip(*failed), marker="x", color="tab:red", s=40, label="failed", zorder=3)


def _mark_best(ax, points: Sequence[tuple[float, float, TrialRecord]],
               best: TrialRecord | None) -> None:
    spot = [(x, y) for x, y, r in points if best is not None and r is best]
    if spot:
        ax.scatter(*zip(*spot), marker="*", s=220, color="gold", edgecolors="black",
                   linewidths=0.8, label=f"best: {best.name}", zorder=4)


def _finish(fig, ax, path: Path, grid_axis: str = "both", **labels: str) -> Path:
    """Label the axes, then `finish_figure` with a small legend."""
    ax.set(**labels)
    return finish_figure(fig, ax, path, grid_axis, loc="best", fontsize="small")


def _objective_plot(path: Path, records: Sequence[TrialRecord], metric: str, mode: str,
                    best: TrialRecord | None) -> Path | None:
    points = [(float(r.order), finite(r.objective), r) for r in records
              if finite(r.objective) is not None]
    if not points:
        return None
    fig, ax = new_figure()
    _scatter_by_status(ax, points)
    xs = np.array([x for x, _, _ in points])
    ys = np.array([y for _, y, _ in points])
    order = np.argsort(xs, kind="stable")
    so_far = (np.maximum if mode == "max" else np.minimum).accumulate(ys[order])
    ax.step(xs[order], so_far, where="post", color="black", linewidth=1, label="best so far")
    failed = [float(r.order) for r in records
              if r.status == "failed" and finite(r.objective) is None]
    if failed:   # no value: crosses along the bottom edge (x in data, y in axes units)
        ax.plot(failed, [0.03] * len(failed), linestyle="none", marker="x", color="tab:red",
                transform=ax.get_xaxis_transform(), label="failed, no epoch", clip_on=False)
    _mark_best(ax, points, best)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, path, xlabel="trial (launch order)", ylabel=f"{metric} (best epoch)",
                   title=f"{metric} per trial ({mode}imize)")


def _param_plot(path: Path, param: Param, records: Sequence[TrialRecord], metric: str,
                mode: str, best: TrialRecord | None) -> Path | None:
    scored = [(r.params[param.name], finite(r.objective), r) for r in records
              if _present(r.params, param.name) and finite(r.objective) is not None]
    if param.kind == "choice":
        return _categorical_plot(path, param, scored, metric, mode, best)
    log = param.kind == "loguniform" or bool(param.log)
    points = [(x, y, r) for v, y, r in scored
              if (x := finite(v)) is not None and (x > 0 or not log)]
    if not points:
        return None
    fig, ax = new_figure()
    _scatter_by_status(ax, points)
    _mark_best(ax, points, best)
    _numeric_axis(ax, param, [x for x, _, _ in points], log)
    return _finish(fig, ax, path, xlabel=f"{param.name}{' (log scale)' if log else ''}",
                   ylabel=f"{metric} (best epoch)", title=f"{metric} against {param.name} ({mode}imize)")


def _numeric_axis(ax, param: Param, xs: Sequence[float], log: bool) -> None:
    """The whole searched range (where in it the trials landed is the point of the plot)."""
    low = min([*xs, *([float(param.low)] if param.low is not None else [])])
    high = max([*xs, *([float(param.high)] if param.high is not None else [])])
    if log:
        ax.set_xscale("log")
        if high > low:
            ax.set_xlim(low / 1.2, high * 1.2)
        # 1-2-5 ticks over a narrow range, decades over a wide one; never minor labels
        # (matplotlib's crowd into each other).
        decades = math.log10(high / low) if high > low else 0.0
        subs = (1.0, 2.0, 3.0, 5.0) if decades <= 1.2 else \
            (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        return
    if high > low:
        pad = 0.04 * (high - low)
        ax.set_xlim(low - pad, high + pad)
    if param.kind == "int":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _categorical_plot(path: Path, param: Param, scored: Sequence[tuple[Any, float, TrialRecord]],
                      metric: str, mode: str, best: TrialRecord | None) -> Path | None:
    """A box per value with the trials as jittered points over it."""
    if not scored:
        return None
    labels = [_fmt_value(v) for v in param.values]
    labels += sorted({_fmt_value(v) for v, _, _ in scored} - set(labels))
    position = {label: i for i, label in enumerate(labels)}
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, size=len(scored))
    points = [(position[_fmt_value(v)] + dx, y, r) for (v, y, r), dx in zip(scored, jitter)]
    groups = {i: [y for v, y, _ in scored if position[_fmt_value(v)] == i]
              for i in range(len(labels))}
    filled = [i for i, ys in groups.items() if ys]
    fig, ax = new_figure()
    ax.boxplot([groups[i] for i in filled], positions=filled, widths=0.5, showfliers=False,
               manage_ticks=False, medianprops={"color": "tab:orange"})
    _scatter_by_status(ax, points)
    _mark_best(ax, points, best)
    ax.set_xticks(range(len(labels)))
    rotate = sum(map(len, labels)) > 40
    ax.set_xticklabels(labels, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    if rotate:  # slanted labels need more room below than the fixed margins give
        fig.subplots_adjust(bottom=0.1 + 0.012 * max(map(len, labels)))
    ax.set_xlim(-0.6, len(labels) - 0.4)
    return _finish(fig, ax, path, "y", xlabel=param.name, ylabel=f"{metric} (best epoch)",
                   title=f"{metric} against {param.name} ({mode}imize)")

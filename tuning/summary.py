"""End-of-search summary: what was tried, which trial won, and where its checkpoint is.

`tuning.search` builds one `TrialRecord` per trial (from its folder and Ray's results) and calls
`write_summary`, at the end of a search and again after an interruption. It writes into the
search folder, every file atomically, so rewriting it at any time is safe:

    search_summary.json   counts per status, the best trial, every trial, importances, the
                          retrained final model (tuning.retrain adds it): strict JSON
    trials.csv            one row per trial in launch order: status, objective, params, key metrics
    summary.md            `render_markdown` of search_summary.json, nothing else: best trial
                          first, then every trial best first
    plots/                drawn by tuning.summary_plots

Cost: each trial's device-hours (the wall time of its epochs x the GPUs, or without GPUs the
CPUs, it held) and the search's total. A multi-objective search adds `pareto_front`: the
trials no other trial beats on every objective metric (each read at the trial's best epoch of
the first), among those that finished, did not run out of memory and meet the constraints.

The best trial is the record with the best finite objective (its best epoch's value) among the
trials that did not fail: a failed trial's numbers come from a run that broke, so a search whose
every trial failed names no best trial. Ties go to more epochs run, then to the smaller name.

Parameter importances (PED-ANOVA: Optuna 5.0's default evaluator, named explicitly so an Optuna
4.x install, which defaults to fANOVA, gives the same kind of number) are computed only when
they can say something: at least `MIN_IMPORTANCE_TRIALS` trials with a finite objective (any
status: ASHA-stopped trials count with their early best epoch, as Optuna's sampler saw them) and
at least `MIN_VARYING_PARAMS` searched params taking two or more values among them (with one,
its importance is 1 by definition). Otherwise `importances` is null and `importances_note`
says why. Trials missing a conditional param are fine; a trial with a value outside the space
(a space edited between runs) is left out and counted in the note.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shlex
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import optuna

from headernet_core.artifacts import json_safe, remove_stale_temps, write_json, write_text
from headernet_core.config import format_value, load_yaml_mapping

from .trial import finite

if TYPE_CHECKING:                       # space.py pulls in the trainer's config; only types here
    from tuning.space import Param

SUMMARY_JSON = "search_summary.json"
TRIALS_CSV = "trials.csv"
SUMMARY_MD = "summary.md"
PLOTS_DIRNAME = "plots"

STATUSES = ("finished", "stopped_early", "failed", "running", "pending", "interrupted",
            "out_of_memory")
STATES = ("finished", "interrupted", "running")
MODES = ("max", "min")
# Best-epoch metrics copied into trials.csv when a trial reported them.
KEY_METRICS = ("val_f1", "val_auc", "val_ap", "val_loss")
# Importances need this many trials with a finite objective, and this many params that vary
# among them (PED-ANOVA compares the top 10% of trials with all: below this it is noise).
MIN_IMPORTANCE_TRIALS = 4
MIN_VARYING_PARAMS = 2
# Below this many trials the top 10% is one or two trials: importances are a rough hint.
ROUGH_IMPORTANCE_TRIALS = 20
# Error text in the markdown table is cut here (the JSON and CSV keep it whole).
MD_ERROR_CHARS = 160
# The best trial's value of a searched number this close to a bound (fraction of the range, on
# the log scale for a log range) may mean the best lies beyond it: the summary says so.
EDGE_FRACTION = 0.05

@dataclass
class TrialRecord:
    """One trial as the summary sees it (built by tuning.search from the trial folder)."""
    name: str                           # trial folder name
    status: str                         # one of STATUSES
    params: dict[str, Any]              # sampled values only (conditional params may be absent)
    objective: float | None             # best epoch's objective value (None/NaN: no epoch)
    best_epoch: int | None
    epochs_run: int
    best_metrics: dict[str, float]      # that epoch's metric row (may be empty)
    checkpoint: str | None              # best_epoch_<N>.pt relative to the search folder
    error: str | None                   # one-line error of a failed trial
    node: str | None = None             # Ray node id / hostname
    order: int = 0                      # launch order, 1-based (0: use the position in records)
    device_hours: float | None = None   # epochs' wall time x the trial's GPUs (or CPUs)
    variant: str | None = None          # backbone-variant, e.g. vmae-large
    feasible: bool = True               # meets the space's constraints (last epoch's values)


# --- public helpers -------------------------------------------------------------------------
def format_bytes(n: int | float) -> str:
    """1536 -> '1.5 KiB' (binary units, one decimal; whole bytes below 1 KiB)."""
    if n is None or not math.isfinite(n) or n < 0:
        raise ValueError(f"format_bytes: expected a size >= 0, got {n!r}")
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def best_record(records: Sequence[TrialRecord], mode: str) -> TrialRecord | None:
    """The record with the highest (max) or lowest (min) finite objective among those that did
    not fail; ties: more epochs run, then the smaller name. None when no such record exists."""
    _check_choice("mode", mode, MODES)
    ranked = sorted((r for r in records if r.status != "failed" and finite(r.objective) is not None),
                    key=lambda r: _rank_key(r.objective, r.epochs_run, r.name, mode))
    return ranked[0] if ranked else None


def edge_warnings(best: TrialRecord | None, space_params: Sequence[Param]) -> list[str]:
    """One line per searched number whose best-trial value lies in the outer EDGE_FRACTION of
    its range: the search may have been fenced in there, and a wider range may find better."""
    lines = []
    for param in space_params:
        value = finite((best.params if best else {}).get(param.name))
        if param.kind == "choice" or value is None or not param.high > param.low:
            continue
        log = param.kind == "loguniform" or param.log
        low, high, at = (math.log(x) if log else x for x in (param.low, param.high, value))
        position = (at - low) / (high - low)
        if EDGE_FRACTION < position < 1 - EDGE_FRACTION:
            continue
        side, bound = ("upper", param.high) if position >= 0.5 else ("lower", param.low)
        lines.append(f"the best trial's {param.name} {format_value(value, 3)} is at the {side} "
                     f"edge of its range {format_value(param.low, 3)} .. {format_value(param.high, 3)}"
                     f"{' (log scale)' if log else ''}: the best may lie beyond {format_value(bound, 3)}; "
                     f"consider widening the range")
    return lines


def feature_cache_note(search_dir: Path, records: Sequence[TrialRecord]) -> str | None:
    """How many clips the frozen-feature cache kept out of the backbone, summed over the
    trials' metrics_epoch.csv (`backbone_clips` against train + val clips); None if it saved
    nothing (no frozen trial, or the cache was off)."""
    ran = without = 0
    for record in records:
        try:
            with open(search_dir / record.name / "metrics_epoch.csv", newline="") as fp:
                for row in csv.DictReader(fp):
                    ran += int(float(row["backbone_clips"]))
                    without += int(float(row["train_clips"])) + int(float(row["val_clips"]))
        except (OSError, KeyError, ValueError):
            continue
    if ran >= without:
        return None
    return (f"feature cache: the backbone ran on {ran:,} clips instead of {without:,} "
            f"({without / max(ran, 1):.1f}x fewer)")


# --- the summary ----------------------------------------------------------------------------
EXIT_WAIT_S = 5.0   # for trial processes still ending (tuning.trial waits up to 3 s for its thread)


def complete_trial_plots(search_dir: Path, records: Sequence[TrialRecord]) -> list[str]:
    """Draw, from its artifacts, the plots/ of every trial that ended without them. A trial
    draws its plots when it ends, but one stopped as the search ends is in an actor Ray ends
    right after the trial's last report (SIGTERM; the process exits without waiting for the
    trial's thread), or that is still drawing while Ray shuts down: usually the last one or
    two. A trial's process still running on this machine is waited for first (EXIT_WAIT_S in
    all), so nothing draws beside it and the temp files of a drawing it could not finish are
    removed; one whose plots are already current is left to end with Ray (a reused actor ran
    most of the search's trials: under load it can outlive the wait). Returns a warning line
    per trial that could not be drawn (the summary goes on)."""
    import os
    import time

    from headernet_core.locks import owner_alive
    from headernet_core.plots import plots_outdated, write_run_plots
    from headernet_core.status import read_status_record

    problems = []
    deadline = time.monotonic() + EXIT_WAIT_S
    for record in records:
        run_dir = Path(search_dir) / record.name
        try:
            if not (run_dir / "config.yaml").is_file() or not load_yaml_mapping(run_dir / "config.yaml").get("plots", True):
                continue
            owner = read_status_record(run_dir)   # the trial's process (another host's: not waited for)
            if owner.get("pid") == os.getpid():
                owner = {}   # trained in this process (not through Ray): it has ended
            if owner_alive(owner, None) and not plots_outdated(run_dir):
                continue
            while owner_alive(owner, None) and time.monotonic() < deadline:
                time.sleep(0.05)
            if owner_alive(owner, None):
                problems.append(f"warning: plots of {record.name} not checked: its process {owner.get('pid')} still runs")
                continue
            remove_stale_temps(run_dir / "plots")
            if plots_outdated(run_dir):
                write_run_plots(run_dir)
        except Exception as exc:  # noqa: BLE001 - one trial's plots never stop the summary
            problems.append(f"warning: plots of {record.name} not drawn: {type(exc).__name__}: {exc}")
    return problems


def write_summary(search_dir: Path, *, name: str, metric: str, mode: str,
                  space_params: Sequence[Param], records: Sequence[TrialRecord], state: str,
                  disk_bytes: int, notes: Sequence[str] = (),
                  val_csv: str | None = None, objectives: Sequence[tuple[str, str]] = (),
                  cost_unit: str = "GPU-hours",
                  warm_start: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write search_summary.json, trials.csv, summary.md and plots/ into `search_dir`.

    `state` is the search's: finished | interrupted | running. `val_csv`, when given, goes into
    the command that evaluates the best checkpoint. `warm_start`: {"from": the other search's
    folder, "trials": how many of its trials the study imported}. Returns the summary as
    written to JSON.
    """
    _check_choice("mode", mode, MODES)
    _check_choice("state", state, STATES)
    for record in records:
        _check_choice(f"status of trial {record.name}", record.status, STATUSES)
    search_dir = Path(search_dir)
    records = _in_launch_order(records)
    best = best_record(records, mode)
    importances, importances_note = _importances(records, space_params, mode)

    summary: dict[str, Any] = {
        "name": name,
        "state": state,
        "metric": metric,
        "mode": mode,
        "num_trials": len(records),
        "counts": {s: sum(r.status == s for r in records) for s in STATUSES},
        "best_trial": _best_dict(search_dir, best, val_csv),
        "edge_warnings": edge_warnings(best, space_params),
        "trials": [_trial_dict(r) for r in records],
        "importances": importances,
        "importances_note": importances_note,
        "disk_bytes": int(disk_bytes),
        "disk": format_bytes(disk_bytes),
        "warm_start": dict(warm_start) if warm_start else None,
        "notes": [str(n) for n in notes],
        "param_names": _param_names(records, space_params),   # the trials table's param columns
        "plots": [],
    }
    final = _earlier_final(search_dir)
    if final:   # a model retrained while the search was interrupted stays on record
        summary["final"] = final
    from .summary_plots import write_pareto_plot, write_plots  # imports this module: only when drawing

    plots = write_plots(search_dir / PLOTS_DIRNAME, records, space_params, metric, mode, best)
    summary.update(_cost(records, cost_unit))
    if objectives:
        summary["objectives"] = [{"metric": m, "mode": d} for m, d in objectives]
        summary["pareto_front"] = pareto_front(records, objectives)
        for trial, record in zip(summary["trials"], records):
            trial["objectives"] = {m: finite((record.best_metrics or {}).get(m)) for m, _ in objectives}
        plots.append(write_pareto_plot(search_dir / PLOTS_DIRNAME, records, objectives,
                                       summary["pareto_front"]))
    summary["plots"] = [f"{PLOTS_DIRNAME}/{p.name}" for p in plots]

    _write_csv(search_dir / TRIALS_CSV, records, space_params, [m for m, _ in objectives])
    _write_md_and_json(search_dir, summary)
    return summary


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """`a` is at least as good as `b` on every objective and better on one."""
    sign = [1 if mode == "max" else -1 for mode in modes]
    better = [s * (x - y) for s, x, y in zip(sign, a, b)]
    return all(d >= 0 for d in better) and any(d > 0 for d in better)


def pareto_front(records: Sequence[TrialRecord], objectives: Sequence[tuple[str, str]]) -> list[str]:
    """Names of the non-dominated trials, best first by the first objective (see the module
    docstring for which trials take part)."""
    modes = [mode for _, mode in objectives]
    points = {}
    for r in records:
        values = [finite((r.best_metrics or {}).get(m)) for m, _ in objectives]
        if r.status in ("finished", "stopped_early") and r.feasible and None not in values:
            points[r.name] = values
    front = [name for name, p in points.items()
             if not any(dominates(q, p, modes) for other, q in points.items() if other != name)]
    return sorted(front, key=lambda n: _rank_key(points[n][0], 0, n, modes[0]))


def _cost(records: Sequence[TrialRecord], unit: str) -> dict[str, Any]:
    """`cost` (the unit and the search's total) and `out_of_memory` (trial names per backbone
    variant), each only when there is something to say."""
    out: dict[str, Any] = {}
    hours = [r.device_hours for r in records if r.device_hours is not None]
    if hours:
        out["cost"] = {"unit": unit, "total": float(sum(hours)),
                       "trials": {r.name: r.device_hours for r in records}}
    ended: dict[str, list[str]] = {}
    for r in records:
        if r.status == "out_of_memory":
            ended.setdefault(r.variant or "?", []).append(r.name)
    if ended:
        out["out_of_memory"] = ended
    return out


def _write_md_and_json(search_dir: Path, summary: dict[str, Any]) -> None:
    write_text(search_dir / SUMMARY_MD, render_markdown(summary))
    write_json(search_dir / SUMMARY_JSON, summary)   # last: its presence means all are written


FINAL_HEADING = "## Final model (best config retrained, scored on the test split)"


def _earlier_final(search_dir: Path) -> dict[str, Any] | None:
    """The `final` record of a summary written before (None when there is none)."""
    try:
        final = json.loads((search_dir / SUMMARY_JSON).read_text()).get("final")
        _final_markdown(final)   # fails on a record tuning.retrain did not write (or a non-dict)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):   # no such record: dropped
        return None
    return final


def add_final_model(search_dir: Path, final: Mapping[str, Any]) -> None:
    """Record a retrained final model (tuning.retrain) in an existing summary: the `final` key
    of search_summary.json (replacing an earlier one), then summary.md rendered again from it."""
    search_dir = Path(search_dir)
    summary = json.loads((search_dir / SUMMARY_JSON).read_text())
    summary["final"] = json_safe(dict(final))
    _write_md_and_json(search_dir, summary)


def _final_markdown(final: Mapping[str, Any]) -> str:
    lines = [FINAL_HEADING, "",
             f"`{final['run_dir']}`: trial **{final['trial']}**'s config trained for "
             f"{final['epochs']} epochs{' on train + val' if final.get('train_on_val') else ''}.", ""]
    if final.get("test_csv"):
        lines += [f"Test split `{final['test_csv']}` ({final.get('test_clips')} clips, "
                  f"{final.get('test_positives')} headers), scored once at threshold "
                  f"{_fmt_value(final['threshold'])} ({final['threshold_source']}), "
                  f"{final['views']} view(s) per clip, weights `{final['checkpoint']}`:", ""]
        keys = [k for k in ("test_f1", "test_precision", "test_recall", "test_accuracy",
                            "test_auc", "test_ap") if k in final]
        lines += _table(keys, [[_fmt_value(final[k]) for k in keys]]) + [""]
        lines += [f"Errors per match: `{final['per_video']}`.", ""]
    else:
        lines += ["No test CSV was given: nothing scored.", ""]
    return "\n".join(lines) + "\n"


# --- records --------------------------------------------------------------------------------
def _check_choice(what: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{what}: expected one of {', '.join(allowed)}, got {value!r}")


def _int_or_none(value: Any) -> int | None:
    number = finite(value)
    return None if number is None else int(number)


def _present(params: Mapping[str, Any], key: str) -> bool:
    """A param counts as sampled unless absent, None or NaN (how a dataframe shows absent)."""
    return key in params and json_safe(params[key]) is not None


def _rank_key(objective: Any, epochs_run: int | None, name: str, mode: str) -> tuple:
    """Best first: the objective, then more epochs run, then the smaller name."""
    value = finite(objective)
    return (-value if mode == "max" else value, -int(epochs_run or 0), name)


def _in_launch_order(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Sorted by `order`; a record without one (0) takes its 1-based position."""
    numbered = [r if r.order and r.order > 0 else replace(r, order=i + 1)
                for i, r in enumerate(records)]
    return sorted(numbered, key=lambda r: r.order)   # stable: equal orders keep their positions


def _trial_dict(record: TrialRecord) -> dict[str, Any]:
    return {
        "order": record.order,
        "name": record.name,
        "status": record.status,
        "params": json_safe(record.params),
        "objective": finite(record.objective),
        "best_epoch": _int_or_none(record.best_epoch),
        "epochs_run": int(record.epochs_run or 0),
        "checkpoint": record.checkpoint,
        "error": _one_line(record.error),
        "node": record.node,
    }


def _best_dict(search_dir: Path, best: TrialRecord | None,
               val_csv: str | None) -> dict[str, Any] | None:
    if best is None:
        return None
    checkpoint_abs = str(search_dir.absolute() / best.checkpoint) if best.checkpoint else None
    command = None
    if checkpoint_abs and val_csv:
        command = (f"python -m headernet_core.evaluate --checkpoint {shlex.quote(checkpoint_abs)} "
                   f"--val_csv {shlex.quote(str(val_csv))}")
    shared = ("name", "status", "params", "objective", "best_epoch", "epochs_run")
    return {
        **{key: value for key, value in _trial_dict(best).items() if key in shared},
        "best_metrics": json_safe(best.best_metrics or {}),
        "checkpoint": best.checkpoint,
        "checkpoint_abs": checkpoint_abs,
        "evaluate_command": command,
        "node": best.node,
    }


def _one_line(text: str | None) -> str | None:
    return None if text is None else " ".join(str(text).split())


def _param_names(records: Sequence[TrialRecord], space_params: Sequence[Param]) -> list[str]:
    """The space's params in order, then any other key a record holds (a --set leftover)."""
    names = [p.name for p in space_params] + [k for r in records for k in r.params]
    return list(dict.fromkeys(names))


# --- importances ----------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """No 'A new study created' log lines and no evaluator warnings (few trials per regime)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def optuna_distribution(param: Param) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution a search samples `param` from (`Param.suggest`)."""
    if param.kind == "choice":
        return optuna.distributions.CategoricalDistribution(list(param.values))
    if param.kind == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high),
                                                    log=bool(param.log), step=int(param.step or 1))
    if param.kind in ("loguniform", "uniform"):
        log = param.kind == "loguniform"
        step = None if log or param.step is None else float(param.step)
        return optuna.distributions.FloatDistribution(float(param.low), float(param.high),
                                                      log=log, step=step)
    raise ValueError(f"param {param.name}: unknown kind {param.kind!r}")


def _optuna_value(param: Param, value: Any) -> Any:
    """The record's value in the type Optuna's distribution takes (ints may arrive as 4.0)."""
    value = json_safe(value)
    if param.kind == "int" and isinstance(value, float) and value.is_integer():
        return int(value)
    if param.kind in ("loguniform", "uniform") and isinstance(value, int) \
            and not isinstance(value, bool):
        return float(value)
    return value


def _importances(records: Sequence[TrialRecord], space_params: Sequence[Param],
                 mode: str) -> tuple[dict[str, float] | None, str]:
    """({param: importance} most important first, how it was computed) or (None, why not)."""
    with _quiet_optuna():
        try:
            distributions = {p.name: optuna_distribution(p) for p in space_params}
        except Exception as exc:  # a bound Optuna rejects: the summary must still be written
            return None, f"not computed: the space has no Optuna form ({type(exc).__name__}: {exc})"
        trials, outside = [], 0
        for record in records:
            value = finite(record.objective)
            if value is None:
                continue
            params = {p.name: _optuna_value(p, record.params[p.name]) for p in space_params
                      if _present(record.params, p.name)}
            try:
                trials.append(optuna.trial.create_trial(
                    params=params, distributions={k: distributions[k] for k in params},
                    value=value))
            except (ValueError, TypeError):
                outside += 1
        left_out = f"; {outside} trial(s) with a value outside the space left out" if outside else ""
        if len(trials) < MIN_IMPORTANCE_TRIALS:
            return None, (f"not computed: {len(trials)} trial(s) with a finite objective, "
                          f"{MIN_IMPORTANCE_TRIALS} needed{left_out}")
        varying = [n for n in distributions
                   if len({repr(t.params[n]) for t in trials if n in t.params}) >= 2]
        if len(varying) < MIN_VARYING_PARAMS:
            which = ", ".join(varying) or "none"
            return None, (f"not computed: {len(varying)} searched param(s) took two or more "
                          f"values among the {len(trials)} trials ({which}), "
                          f"{MIN_VARYING_PARAMS} needed{left_out}")
        try:
            study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
            study.add_trials(trials)
            raw = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        except Exception as exc:  # the evaluator's own limits: report them, keep the summary
            return None, f"not computed: Optuna's evaluator failed ({type(exc).__name__}: {exc})"
    # most important first; ties by name, so the same trials always give the same summary
    importances = dict(sorted(((str(k), float(v)) for k, v in raw.items()), key=lambda kv: (-kv[1], kv[0])))
    top = max(1, math.ceil(0.1 * len(trials)))
    note = (f"PED-ANOVA (Optuna {optuna.__version__}) over {len(trials)} trials: how much each "
            f"param separates the best {top} trial(s) from all; shares sum to 1{left_out}")
    if len(set(importances.values())) == 1 and len(importances) > 1:
        note += "; all equal: no param separates the best trials from the rest yet"
    elif len(trials) < ROUGH_IMPORTANCE_TRIALS:
        note += f"; a rough hint with fewer than {ROUGH_IMPORTANCE_TRIALS} trials"
    return importances, note


# --- trials.csv -----------------------------------------------------------------------------
def _write_csv(path: Path, records: Sequence[TrialRecord], space_params: Sequence[Param],
               objective_metrics: Sequence[str] = ()) -> None:
    """`objective_metrics`: a multi-objective search's metrics, each a column named as itself."""
    params = _param_names(records, space_params)
    metrics = [m for m in dict.fromkeys([*KEY_METRICS, *objective_metrics])
               if m in objective_metrics or any(m in (r.best_metrics or {}) for r in records)]
    costs = any(r.device_hours is not None for r in records)
    columns = (["order", "name", "status", "objective", "best_epoch", "epochs_run"]
               + [f"param_{p}" for p in params] + metrics + (["device_hours"] if costs else [])
               + ["checkpoint", "error", "node"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for r in records:
        row = [r.order, r.name, r.status, finite(r.objective), _int_or_none(r.best_epoch),
               int(r.epochs_run or 0)]
        row += [r.params.get(p) for p in params]
        row += [(r.best_metrics or {}).get(m) for m in metrics]
        row += [r.device_hours] if costs else []
        row += [r.checkpoint, _one_line(r.error), r.node]
        writer.writerow(["" if v is None else v for v in map(json_safe, row)])
    write_text(path, buffer.getvalue())


# --- summary.md -----------------------------------------------------------------------------
_STATE_TEXT = {
    "finished": "finished",
    "interrupted": "interrupted (partial results: unfinished trials are listed as such)",
    "running": "running (a snapshot, rewritten as trials finish)",
}


def _md(value: Any) -> str:
    """A table cell: one line, pipes escaped."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _fmt_value(value: Any) -> str:
    """A table cell's value: 3 significant digits, '-' when missing."""
    value = json_safe(value)
    return "-" if value is None else format_value(value, 3, None, yaml=True)


def _fmt_objective(value: Any) -> str:
    number = finite(value)
    return "-" if number is None else f"{number:.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines


def _table_order(trials: Sequence[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best objective first, then trials without one in launch order, failed trials last."""
    def key(t: dict[str, Any]) -> tuple:
        scored = finite(t["objective"]) is not None
        rank = _rank_key(t["objective"], t["epochs_run"], t["name"], mode) if scored else (t["order"],)
        return (t["status"] == "failed", not scored, rank)
    return sorted(trials, key=key)


def render_markdown(summary: Mapping[str, Any]) -> str:
    """summary.md: search_summary.json (as `write_summary` returns it) for people."""
    metric, mode = summary["metric"], summary["mode"]
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in summary["counts"].items() if n)
    lines = [f"# Search summary: {summary['name']}", "",
             f"- State: {_STATE_TEXT[summary['state']]}",
             f"- Objective: {mode}imize `{metric}` (each trial's best epoch)",
             f"- Trials: {summary['num_trials']}" + (f" ({counts})" if counts else ""),
             f"- Disk used: {summary['disk']}"]
    if summary.get("cost"):
        lines.append(f"- Cost: {summary['cost']['total']:.3g} {summary['cost']['unit']} in all")
    if summary.get("warm_start"):
        warm = summary["warm_start"]
        lines.append(f"- Warm start: {warm['trials']} trials of `{warm['from']}` imported into the study")
    lines.append("")
    lines += _best_markdown(summary["best_trial"], metric, summary.get("edge_warnings", ()))
    if summary.get("final"):
        lines += _final_markdown(summary["final"]).splitlines()
    lines += _pareto_markdown(summary)
    lines += _trials_markdown(summary)
    lines += _out_of_memory_markdown(summary)
    lines += ["## Parameter importances", ""]
    if summary["importances"]:
        lines += _table(["param", "importance"],
                        [[k, f"{v:.3f}"] for k, v in summary["importances"].items()]) + [""]
    lines += [f"{summary['importances_note'][0].upper()}{summary['importances_note'][1:]}.", ""]

    if summary["plots"]:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})" for p in summary["plots"]] + [""]
    if summary["notes"]:
        lines += ["## Notes", ""] + [f"- {_one_line(n)}" for n in summary["notes"]] + [""]
    return "\n".join(lines)


def _best_markdown(info: Mapping[str, Any] | None, metric: str, edge: Sequence[str] = ()) -> list[str]:
    lines = ["## Best trial", ""]
    if info is None:
        return lines + ["No trial has a finite objective yet: nothing to pick.", ""]
    epochs = f"epoch {info['best_epoch']}" if info["best_epoch"] is not None else "best epoch"
    lines += [(f"**{info['name']}** ({info['status'].replace('_', ' ')}): "
               f"`{metric}` = {_fmt_objective(info['objective'])} at {epochs} "
               f"of {info['epochs_run']} run"), ""]
    if info["params"]:
        lines += _table(["param", "value"],
                        [[k, _fmt_value(v)] for k, v in info["params"].items()]) + [""]
    lines += [f"**Warning**: {line}." for line in edge] + ([""] if edge else [])
    if info["best_metrics"]:
        # lr_* here are the schedule's values during that epoch, not the sampled peak LRs
        shown = ", ".join(f"{'scheduled ' if k.startswith('lr_') else ''}{k} {_fmt_value(v)}"
                          for k, v in info["best_metrics"].items())
        lines += [f"Metrics of that epoch: {shown}", ""]
    lines += [f"Checkpoint: `{info['checkpoint_abs']}`" if info["checkpoint_abs"]
              else "Checkpoint: none kept (deleted or never written).", ""]
    if info["evaluate_command"]:
        lines += ["Evaluate it:", "", "```bash", info["evaluate_command"], "```", ""]
    return lines


def _pareto_markdown(summary: Mapping[str, Any]) -> list[str]:
    """A multi-objective search's front: each trial on it with its objective values."""
    if "pareto_front" not in summary:
        return []
    metrics = [o["metric"] for o in summary["objectives"]]
    aims = ", ".join(f"{o['mode']}imize `{o['metric']}`" for o in summary["objectives"])
    lines = ["## Pareto front", "", (f"Objectives: {aims} (at each trial's best epoch of "
                                     f"`{metrics[0]}`). No trial below beats another on every "
                                     f"objective."), ""]
    if not summary["pareto_front"]:
        return lines + ["No trial has every objective value yet.", ""]
    trials = {t["name"]: t for t in summary["trials"]}
    rows = [[name, *(_fmt_value(trials[name]["objectives"].get(m)) for m in metrics)]
            for name in summary["pareto_front"]]
    return lines + _table(["trial", *metrics], rows) + [""]


def _out_of_memory_markdown(summary: Mapping[str, Any]) -> list[str]:
    ended = summary.get("out_of_memory")
    if not ended:
        return []
    return (["## Out of memory at micro-batch 1", ""]
            + _table(["backbone", "trials"], [[variant, ", ".join(names)]
                                              for variant, names in sorted(ended.items())]) + [""])


def _trials_markdown(summary: Mapping[str, Any]) -> list[str]:
    """The trials table, best first; a summary written before `param_names` was recorded
    shows the params in the order the trials hold them."""
    trials = summary["trials"]
    if not trials:
        return ["## Trials (best first)", "", "No trial was started.", ""]
    params = summary.get("param_names") or list(dict.fromkeys(k for t in trials for k in t["params"]))
    best = (summary["best_trial"] or {}).get("name")
    has_node = any(t["node"] for t in trials)
    has_error = any(t["error"] for t in trials)
    cost = summary.get("cost")
    header = (["#", "trial", "status", summary["metric"], "best epoch", "epochs"] + params
              + ([cost["unit"]] if cost else [])
              + (["node"] if has_node else []) + (["error"] if has_error else []))
    rows = []
    for t in _table_order(trials, summary["mode"]):
        name = f"**{t['name']}** (best)" if t["name"] == best else t["name"]
        row = [t["order"], name, t["status"].replace("_", " "), _fmt_objective(t["objective"]),
               _fmt_value(t["best_epoch"]), t["epochs_run"]]
        row += [_fmt_value(t["params"].get(p)) for p in params]
        if cost:
            row.append(_fmt_value(cost["trials"].get(t["name"])))
        if has_node:
            row.append(t["node"] or "-")
        if has_error:
            error = t["error"] or ""
            row.append(error if len(error) <= MD_ERROR_CHARS
                       else error[:MD_ERROR_CHARS - 3] + "...")
        rows.append(row)
    return (["## Trials (best first)", ""] + _table(header, rows)
            + ["", f"Every column: `{TRIALS_CSV}`.", ""])

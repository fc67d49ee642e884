"""How good a model does a search find per epoch budget? Replays searches on a table of real
learning curves of this trainer, driving the searcher and scheduler objects a real search uses.

    # once (about half an hour on one core, outside CI): every config of a grid, 2 training seeds
    python bench/search_quality.py record --space demo --values 5 --epochs 6 --out curves.csv.gz
    # the comparison (minutes): mean simple regret per arm at equal epoch budgets
    python bench/search_quality.py --seeds 20 --first_seed 10 --json

Recording: each searched number of the space becomes `--values` points of its range (log-spaced
for a log scale), each choice keeps its values; every combination is trained for `--epochs`
with each of `--train_seeds` seeds, in-process, one thread, and its per-epoch metric is kept
(`bench/search_quality_demo.csv.gz` comes from the demo task's tiny random backbones, not from
a real model: record your own table with your space on your GPUs to compare on your data).

Replay: each searched key becomes a choice of the recorded values; a trial's curve is one of
its config's recorded seeds, drawn at random; trials run one after another. Tune's controller is
played in-process without Ray actors: `suggest`, then per epoch the scheduler's
`on_trial_result` and the searcher's `on_trial_result`, and the last result (or the one the
scheduler stopped) to both `on_trial_complete`. Regret at a budget of B epochs: the best config's
true value (the mean of its seeds' best-epoch metric) minus the true value of the config whose
trial has the best observed objective among the trials that ran all their epochs within B.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import math
import multiprocessing
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from common import demo_split

REPO = Path(__file__).resolve().parents[1]

TABLE = REPO / "bench" / "search_quality_demo.csv.gz"
ARMS = ("random_asha", "random_fifo", "ray_default", "tpe_fifo", "headernet")
BUDGET_TRIALS = (8, 16, 32, 64)      # budgets in full trials' worth of epochs
# The recorded demo task: the demo's data and tiny models, smaller clips (cheap to record), a
# wider LR range than the demo's own (so that a high LR's fast start and worse end shows).
DEMO_DATA = ("--clips_per_match", "80", "--size", "32")
DEMO_SETS = ("num_frames=4", "input_size=32", "search.lr_backbone={loguniform: [1.0e-4, 1.0e-2]}",
             "search.lr_head={loguniform: [1.0e-4, 1.0e-2]}")
PARAM_PREFIX = "p:"                  # table columns holding a config's searched values


# --- recording ----------------------------------------------------------------------------------
def grid_values(param: Any, count: int) -> list[Any]:
    """A searched key's recorded values: a choice's own, else `count` points of the range."""
    if param.kind == "choice":
        return list(param.values)
    log = param.kind == "loguniform" or param.log
    points = (np.geomspace if log else np.linspace)(param.low, param.high, count)
    if param.kind == "int":
        return sorted({round(p) for p in points})
    return [float(f"{p:.4g}") for p in points]


def grid(space: Any, count: int) -> list[dict[str, Any]]:
    """Every combination of the params' grid values (a param whose `when` fails is left out)."""
    names = [p.name for p in space.params]
    configs = []
    for values in itertools.product(*(grid_values(p, count) for p in space.params)):
        current = dict(zip(names, values))
        sampled = {p.name: current[p.name] for p in space.params if p.active(current)}
        if sampled not in configs:
            configs.append(sampled)
    return configs


def record_run(space: Any, sampled: dict[str, Any], seed: int, epochs: int, root: str) -> list[dict]:
    """Train one config with one seed; one row per epoch (its metric and seconds)."""
    from headernet_core.trainer import train

    config = space.trial_config(sampled).replace(
        epochs=epochs, seed=seed, output_root=root, run_name="run", overwrite=True, resume=False,
        cpu=True, threads=1, num_workers=0, progress=False, plots=False, tensorboard=False)
    rows: list[dict] = []
    start = time.perf_counter()

    def on_epoch(report: Any) -> None:
        rows.append({"epoch": report.epoch, "value": float(report.metrics.get(space.metric, math.nan)),
                     "seconds": round(time.perf_counter() - start, 2)})

    with contextlib.redirect_stdout(io.StringIO()):
        result = train(config, on_epoch=on_epoch, lock=False)
    shutil.rmtree(result.run_dir)      # a finished run folder is never trained over
    return rows


def recorded_runs(out: Path) -> set[tuple[int, int]]:
    """(config, seed) of every run the partial files next to `out` hold."""
    done: set[tuple[int, int]] = set()
    for part in Path(out).parent.glob(f"{Path(out).name}.partial*.csv"):
        frame = pd.read_csv(part, usecols=["config", "seed"])
        done |= set(zip(frame["config"], frame["seed"]))
    return done


def record(args: argparse.Namespace) -> None:
    """Train every grid config with each seed; rows are appended to `<out>.partial*.csv` as runs
    end (a restarted recording, or a second one with --reversed, skips those), and the table is
    written when every run is there."""
    from tuning.space import load_space

    data = Path(args.data_dir)
    sets = list(args.set) or (list(DEMO_SETS) if args.space == "demo" else [])
    if args.space == "demo":    # the README's demo data, in a folder of the bench's own
        train_csv, val_csv = demo_split(data, DEMO_DATA)
        sets += [f"train_csv={train_csv}", f"val_csv={val_csv}"]
    space = load_space(args.space, sets=sets)
    configs = grid(space, args.values)
    runs = [(index, seed) for index in range(len(configs)) for seed in range(args.train_seeds)]
    partial = Path(f"{args.out}.partial{'-reversed' if args.reversed else ''}.csv")
    print(f"{len(configs)} configs x {args.train_seeds} seeds x {args.epochs} epochs "
          f"({len(recorded_runs(args.out))} runs already recorded)", flush=True)
    with tempfile.TemporaryDirectory() as root:
        for index, seed in reversed(runs) if args.reversed else runs:
            if (index, seed) in recorded_runs(args.out):   # re-read: another recorder may share the work
                continue
            rows = record_run(space, configs[index], seed, args.epochs, root)
            frame = pd.DataFrame([{"config": index, "seed": seed,
                                   **{PARAM_PREFIX + k: v for k, v in configs[index].items()}, **row}
                                  for row in rows])
            frame.to_csv(partial, mode="a", header=not partial.is_file(), index=False)
            print(f"config {index} seed {seed}: {space.metric} "
                  f"{' '.join(format(r['value'], '.3f') for r in rows)} ({rows[-1]['seconds']:.0f} s)",
                  flush=True)
    if len(recorded_runs(args.out)) < len(runs):
        return   # another recorder is still at work: the last one to end writes the table
    parts = sorted(Path(args.out).parent.glob(f"{Path(args.out).name}.partial*.csv"))
    table = pd.concat([pd.read_csv(p) for p in parts]).drop_duplicates(["config", "seed", "epoch"])
    table.sort_values(["config", "seed", "epoch"]).to_csv(
        args.out, index=False, compression="gzip", float_format="%.5g")
    Path(str(args.out) + ".json").write_text(json.dumps(
        {"space": args.space, "sets": sets, "metric": space.metric, "mode": space.mode,
         "epochs": args.epochs, "values": args.values}) + "\n")
    for part in parts:
        part.unlink()
    print(f"table: {args.out}")


# --- replay -------------------------------------------------------------------------------------
@dataclass
class Table:
    """Recorded learning curves: config (its values in `params` order) -> objective (best so
    far, as a trial reports it) per training seed and epoch."""
    space: str
    sets: list[str]
    mode: str
    epochs: int
    params: list[str]
    curves: dict[tuple, np.ndarray] = field(default_factory=dict)   # [seed, epoch]

    def true_value(self, key: tuple) -> float:
        """A config's value: its seeds' mean best-epoch metric."""
        return float(self.curves[key][:, -1].mean())

    def values(self, name: str) -> list[Any]:
        return sorted({key[self.params.index(name)] for key in self.curves})


def _plain(value: Any) -> Any:
    """A table cell as the Python value a search samples (numpy scalars unwrapped)."""
    return value.item() if isinstance(value, np.generic) else value


def load_table(path: Path) -> Table:
    info = json.loads(Path(str(path) + ".json").read_text())
    frame = pd.read_csv(path)
    params = [c.removeprefix(PARAM_PREFIX) for c in frame.columns if c.startswith(PARAM_PREFIX)]
    table = Table(info["space"], info["sets"], info["mode"], int(info["epochs"]), params)
    best_so_far = np.fmax.accumulate if info["mode"] == "max" else np.fmin.accumulate
    for _, runs in frame.groupby("config"):
        first = runs.iloc[0]
        key = tuple(_plain(first[PARAM_PREFIX + p]) for p in params)
        curves = [best_so_far(run.sort_values("epoch")["value"].to_numpy())
                  for _, run in runs.groupby("seed")]
        table.curves[key] = np.stack(curves)
    return table


def replay_space(table: Table, sets: Sequence[str] = ()) -> Any:
    """The recorded space as a search sees it (its budget and scheduler, `sets` applied), each
    searched key a choice of the recorded values."""
    from tuning.space import Param, load_space

    space = load_space(table.space, sets=[*table.sets, f"epochs={table.epochs}", *sets])
    params = tuple(Param(name=p, kind="choice", values=tuple(table.values(p))) for p in table.params)
    return dataclasses.replace(space, params=params)


def arm_objects(arm: str, space: Any, seed: int, folder: Path) -> tuple[Any, Any]:
    """(searcher, scheduler) of an arm, built as a search builds them."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tuning.search import make_scheduler, make_searcher
    from tuning.study import StudySearch
    from tuning.trial import OBJECTIVE

    space = dataclasses.replace(space, seed=seed)
    if arm == "ray_default":      # Ray's OptunaSearch (its seeded TPE) + ASHA as Ray ships them
        searcher = OptunaSearch(space=space.define_by_run, metric=OBJECTIVE, mode=space.mode, seed=seed)
        scheduler = ASHAScheduler()
    elif arm.startswith("random_"):
        searcher = StudySearch(space=space.define_by_run, metric=OBJECTIVE, mode=space.mode,
                               sampler=optuna.samplers.RandomSampler(seed=seed))
        scheduler = make_scheduler(dataclasses.replace(
            space, scheduler={"type": "asha" if arm == "random_asha" else "none",
                              "grace_period": 1, "reduction_factor": 2}), folder)
    else:                         # tpe_fifo, headernet: the project's searcher
        if arm == "tpe_fifo":
            space = dataclasses.replace(space, scheduler={"type": "none"})
        searcher, scheduler = make_searcher(space, None), make_scheduler(space, folder)
    scheduler.set_search_properties(OBJECTIVE, space.mode)
    return searcher, scheduler


def replay_one(arm: str, table: Table, space: Any, seed: int, max_epochs: int,
               tell_stopped: str = "pruned", resume_after: int = 0,
               refill: bool = True) -> list[tuple[int, tuple, float]]:
    """One search, trials one after another, as Tune's controller drives the searcher and the
    scheduler, until `max_epochs` epochs are spent: (epochs spent when it ended, config,
    observed objective) of each trial that ran all its epochs. `tell_stopped="complete"`: the
    results lack the trial's epochs, so a stopped trial is told COMPLETE (Ray's behaviour).
    `resume_after` N: the search is interrupted after its N-th trial and resumed; Tune restores
    the scheduler as it was pickled when the search started and adds every trial back to it,
    whose result log (`result.json`, as Tune's JsonLoggerCallback writes it) is there unless
    `refill` is off (then ASHA's rungs start empty, as with Ray's own ASHA)."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from tuning.ray_compat import TUNE_RESULT_FILE
    from tuning.trial import OBJECTIVE, TRIAL_EPOCHS

    rng = np.random.default_rng(seed)
    finished, spent, number = [], 0, 0
    with tempfile.TemporaryDirectory() as folder:
        searcher, scheduler = arm_objects(arm, space, seed, Path(folder))
        trials = []
        while spent < max_epochs:
            if number == resume_after > 0:
                scheduler = arm_objects(arm, space, seed, Path(folder))[1]
                for trial in trials:
                    scheduler.on_trial_add(None, trial)
            trial_id = f"t{number:04d}"
            number += 1
            trial = SimpleNamespace(trial_id=trial_id, relative_logdir=trial_id)
            trials.append(trial)
            (Path(folder) / trial_id).mkdir()
            config = searcher.suggest(trial_id)
            key = tuple(config[p] for p in table.params)
            curves = table.curves[key]
            curve = curves[rng.integers(len(curves))]
            scheduler.on_trial_add(None, trial)
            for epoch, value in enumerate(curve, start=1):
                spent += 1
                result = {OBJECTIVE: float(value), "epoch": epoch, "training_iteration": epoch}
                if tell_stopped == "pruned":
                    result[TRIAL_EPOCHS] = table.epochs
                if refill:
                    with open(Path(folder) / trial_id / TUNE_RESULT_FILE, "a") as log:
                        log.write(json.dumps(result) + "\n")
                if scheduler.on_trial_result(None, trial, result) != TrialScheduler.STOP:
                    searcher.on_trial_result(trial_id, result)
                    if epoch < table.epochs:
                        continue
                scheduler.on_trial_complete(None, trial, result)   # stopped, or its last epoch
                searcher.on_trial_complete(trial_id, result)
                break
            if epoch == table.epochs:
                finished.append((spent, key, float(curve[-1])))
    return finished


def regrets(table: Table, finished: list[tuple[int, tuple, float]], budgets: Sequence[int]) -> list[float]:
    """Simple regret at each budget: the best config's value minus that of the config whose
    finished trial looks best by then (none yet: a random config's expected regret)."""
    sign = 1.0 if table.mode == "max" else -1.0
    true = {key: table.true_value(key) for key in table.curves}
    best = max(sign * v for v in true.values())
    out = []
    for budget in budgets:
        seen = [(sign * observed, key) for spent, key, observed in finished if spent <= budget]
        value = sign * true[max(seen)[1]] if seen else float(np.mean([sign * v for v in true.values()]))
        out.append(best - value)
    return out


def _replay_task(task: tuple) -> tuple[str, int, list[float]]:
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    arm, table, space, seed, budgets, tell_stopped, resume_after, refill = task
    finished = replay_one(arm, table, space, seed, max(budgets),
                          tell_stopped if arm == "headernet" else "pruned", resume_after, refill)
    return arm, seed, regrets(table, finished, budgets)


def compare(table: Table, space: Any, seeds: Sequence[int], arms: Sequence[str],
            budgets: Sequence[int], tell_stopped: str = "pruned", processes: int = 2,
            resume_after: int = 0, refill: bool = True) -> dict[str, Any]:
    """The one-line result: mean regret per arm and budget, and the standard error of the
    per-seed paired difference between `headernet` and the best other arm at each budget."""
    tasks = [(arm, table, space, seed, budgets, tell_stopped, resume_after, refill)
             for arm in arms for seed in seeds]
    if processes > 1:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            done = pool.map(_replay_task, tasks, chunksize=1)
    else:
        done = [_replay_task(task) for task in tasks]
    per_seed = {arm: np.array([r for a, _, r in sorted(done, key=lambda d: d[1]) if a == arm])
                for arm in arms}
    regret = {arm: [round(float(x), 4) for x in per_seed[arm].mean(axis=0)] for arm in arms}
    diff_se = []
    if "headernet" in arms and len(arms) > 1:
        for b in range(len(budgets)):
            other = min((a for a in arms if a != "headernet"), key=lambda a: regret[a][b])
            diff = per_seed["headernet"][:, b] - per_seed[other][:, b]
            diff_se.append(round(float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0, 4))
    return {"seeds": len(seeds), "budgets": list(budgets), "regret": regret, "diff_se": diff_se}


def replay_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="search_quality.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--seeds", type=int, default=20, help="replayed searches per arm")
    parser.add_argument("--first_seed", type=int, default=10,
                        help="seeds 0-9 chose the defaults; report on 10 onwards")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGET_TRIALS)),
                        help="epoch budgets, in trials' worth of epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="the headernet arm's space settings, as tuning.search's --set "
                             "(e.g. scheduler.type=none, budget.startup_trials=5)")
    parser.add_argument("--tell_stopped", choices=("pruned", "complete"), default="pruned",
                        help="what the headernet arm tells the sampler of a stopped trial")
    parser.add_argument("--resume_after", type=int, default=0, metavar="N",
                        help="interrupt each search after its N-th trial and resume it")
    parser.add_argument("--no_refill", action="store_true",
                        help="with --resume_after: no result logs, so a restored ASHA's rungs start empty")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args(argv)
    table = load_table(args.table)
    space = replay_space(table, args.set)
    budgets = [int(b) * table.epochs for b in args.budgets.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm {unknown[0]} (arms: {', '.join(ARMS)})")
    start = time.perf_counter()
    result = compare(table, space, range(args.first_seed, args.first_seed + args.seeds), arms,
                     budgets, args.tell_stopped, args.processes, args.resume_after, not args.no_refill)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{len(table.curves)} configs, {table.epochs} epochs, {args.seeds} seeds, "
          f"{time.perf_counter() - start:.0f} s; mean simple regret of {table.space}'s objective")
    print("budget (epochs)  " + "  ".join(f"{b:>7d}" for b in budgets))
    for arm in arms:
        print(f"{arm:<16} " + "  ".join(f"{r:7.4f}" for r in result["regret"][arm]))
    if result["diff_se"]:
        print(f"{'diff SE':<16} " + "  ".join(f"{r:7.4f}" for r in result["diff_se"]))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["record"]:
        parser = argparse.ArgumentParser(prog="search_quality.py record")
        parser.add_argument("--space", default="demo")
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="as tuning.search's --set (demo default: DEMO_SETS)")
        parser.add_argument("--values", type=int, default=5, help="grid points per searched number")
        parser.add_argument("--epochs", type=int, default=6)
        parser.add_argument("--train_seeds", type=int, default=2)
        parser.add_argument("--data_dir", default=str(Path(tempfile.gettempdir()) / "headernet_bench_quality"))
        parser.add_argument("--out", type=Path, default=TABLE)
        parser.add_argument("--reversed", action="store_true",
                            help="last run first: a second recorder beside a running one")
        record(parser.parse_args(argv[1:]))
        return
    replay_main(argv)


if __name__ == "__main__":
    main()

"""Run a hyperparameter search: Ray Tune trials of the headernet_core trainer, Optuna TPE
sampling, ASHA early stopping, a summary at the end.

    python -m tuning.search --space demo                       # local Ray, started and stopped here
    python -m tuning.search --space vmae_full --train_csv s/train.csv --val_csv s/val.csv
    python -m tuning.search --space vmae_full --resume         # continue an interrupted search
    python -m tuning.search --space vmae_full --address HEAD:6379 --storage_path /shared/hpo
    python -m tuning.search --space vmae_full --name wider --warm_start report/header_experiments/vmae_full

Order of work: load + check the space, the data and every checkpoint a trial could need, and
the search folder (nothing is started before all of that passes); then Ray; then the Tuner
(new or restored); then the summary. Search folder: `<storage_path>/<name>/` with one folder
per trial holding the standard run artifacts beside Ray Tune's own files.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import os
import shlex
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import yaml

from headernet_core.artifacts import read_json_dict, remove_stale_temps, write_json, write_text
from headernet_core.backbones.configs import FOLDER_FILES, published_folder
from headernet_core.config import TrainConfig, fields_with_role, format_value
from headernet_core.errors import CliParser, HeaderNetError, fail, first_paragraph, run_cli, sigterm_as_sigint
from headernet_core.locks import LOCK_NAME, FolderLock
from headernet_core.paths import check_name, check_writable_dir, folder_bytes, same_file
from headernet_core.status import recorded_end

from .cluster import check_address, join_cluster, prepare_environment, start_local_ray, stop_ray
from .ddp_trial import TRIAL_TOKEN, placeable_trials, worker_group_cleanup, workers_of
from . import resume_guard
from .ray_compat import TUNER_PKL
from .space import SearchSpace, find_space_file, load_space
from .summary import (TrialRecord, best_record, complete_trial_plots, edge_warnings,
                      feature_cache_note, format_bytes, write_summary)
from .trial import (OBJECTIVE, QUIET_HOOK, SCHEDULER_STOP, objective_keys, one_line_error, run_trial,
                    search_warnings, trial_dirname)

if TYPE_CHECKING:
    from headernet_core.data import CheckedSplits

# Trainer keys holding paths: made absolute in the driver, because Ray runs each trial in its
# own working directory (and on other machines with the same shared paths).
PATH_KEYS = fields_with_role("path")
SEARCH_RECORD = "search.json"   # how the search was started, so --resume rebuilds the same space
SPACE_COPY = "space.yaml"
# What a search folder holds before Ray first writes to it: a new search may reuse such a folder
# (an earlier start that stopped there), never one holding anything else.
PRE_RAY_FILES = {SEARCH_RECORD, SPACE_COPY, LOCK_NAME}
# The demo dataset the README's commands make: 10 matches (2 held out as test, 2 for val).
DEMO_MATCHES, DEMO_TEST_SPLIT = 10, 0.2


@dataclasses.dataclass(frozen=True)
class StartRecord:
    """search.json: how a search was started, so --resume rebuilds exactly that space and
    refuses a flag that asks for another search. Its keys are the file's (records written
    before `cwd`, `args` or `verbose` existed still resume)."""
    space_file: str                       # absolute (relative in early records: against cwd)
    space_yaml: str                       # the space file's text at the start
    sets: list[str]                       # --set values plus the trainer's PATH_KEYS, absolute
    num_samples: int | None = None
    max_concurrent: int | None = None
    cwd: str | None = None                # the folder the search was started from
    args: dict[str, Any] | None = None    # shaping_flags() at the start
    verbose: bool = False
    warm_start: str | None = None         # --warm_start: the search whose trials seeded the study

    @classmethod
    def read(cls, path: Path) -> StartRecord:
        saved = read_json_dict(path)
        types = {"space_file": str, "space_yaml": str, "sets": list, "args": dict}
        if not all(isinstance(saved.get(key), kind) for key, kind in types.items()
                   if key in saved or key != "args"):
            fail(f"{path}: unreadable or incomplete (expected the JSON this command writes when "
                 f"a search starts); the search cannot be resumed")
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """What this command does, decided once by `plan_search` from its flags and, on --resume,
    the StartRecord of the search, which wins for everything that shapes the search."""
    search_dir: Path
    space: SearchSpace                    # paths absolute, retrain flags applied
    start: StartRecord                    # read on --resume, else written when the search starts
    resume: bool
    address: str | None
    keep_checkpoints: str                 # all | best_trial
    retrain_best: int | None              # the retrain flags, repeated by the resume command
    test_csv: str | None                  # absolute
    warnings: tuple[str, ...] = ()        # said once when a new search starts (none on --resume)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = CliParser(prog="python -m tuning.search", description=first_paragraph(__doc__))
    parser.add_argument("--space", required=True, help="search space: a YAML path or a name in search_spaces/")
    parser.add_argument("--name", help="search folder name (default: the space's name)")
    parser.add_argument("--train_csv", help="training split CSV (overrides the space)")
    parser.add_argument("--val_csv", help="validation split CSV (overrides the space)")
    parser.add_argument("--num_samples", type=int, help="number of trials (overrides the space)")
    parser.add_argument("--max_concurrent", type=int, help="trials running at once (overrides the space)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a trainer key or section.key of the space (repeatable)")
    parser.add_argument("--address", help="join this existing Ray cluster (e.g. HEAD_IP:6379)")
    parser.add_argument("--storage_path", help="where search folders go; shared storage on a cluster "
                                               "(default: the space's output_root)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted search of this name")
    parser.add_argument("--keep_checkpoints", choices=("all", "best_trial"),
                        help="all (default): best+last of every trial; best_trial: delete the other "
                             "trials' weights at the end (--resume keeps the search's choice)")
    parser.add_argument("--retrain_best", type=int, metavar="EPOCHS",
                        help="after the search, train the best config for EPOCHS as <search>/final/ "
                             "(overrides the space's retrain.epochs; 0: no retrain)")
    parser.add_argument("--test_csv", help="held-out CSV the retrained model is scored on, at the "
                                           "threshold chosen on validation (overrides retrain.test_csv)")
    parser.add_argument("--warm_start", metavar="OTHER_SEARCH_DIR",
                        help="start the study from the finished and stopped trials of another "
                             "search folder over the same parameters (ranges may differ)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own console (per-trial result boxes, every trial's output)")
    return parser.parse_args(argv)


# --- checks before anything starts --------------------------------------------------------
def resolve_space(args: argparse.Namespace, start: StartRecord | None) -> SearchSpace:
    """The space as the CLI describes it, or exactly as it was when a resumed search started,
    with every path made absolute against the folder the search was started from."""
    if start is not None:
        return recorded_space(start)
    sets = list(args.sets)
    sets += [f"{key}={value}" for key, value in (("train_csv", args.train_csv), ("val_csv", args.val_csv))
             if value is not None]
    space = load_space(args.space, sets=sets, num_samples=args.num_samples,
                       max_concurrent=args.max_concurrent)
    return absolute_paths(space, Path.cwd())


def recorded_space(start: StartRecord) -> SearchSpace:
    """The space exactly as a search's StartRecord says it started (paths absolute)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(start.space_file).name
        path.write_text(start.space_yaml)
        space = load_space(str(path), sets=start.sets, num_samples=start.num_samples,
                           max_concurrent=start.max_concurrent)
    space = dataclasses.replace(space, path=Path(start.space_file))
    return absolute_paths(space, Path(start.cwd or Path.cwd()))


def with_retrain_flags(space: SearchSpace, args: argparse.Namespace) -> SearchSpace:
    """--retrain_best/--test_csv over the space's `retrain` section (not part of what --resume
    must repeat: they act after the search). A test CSV alone keeps the space's epochs."""
    retrain = dict(space.retrain)
    if args.retrain_best is not None:
        if args.retrain_best < 0:
            fail(f"--retrain_best must be >= 0 epochs, got {args.retrain_best}")
        retrain = {"train_on_val": False, "test_csv": None, **retrain, "epochs": args.retrain_best}
    if args.test_csv is not None:
        if not retrain.get("epochs"):
            fail("--test_csv scores the retrained best config: add --retrain_best EPOCHS "
                 "(or a retrain section in the space)")
        retrain["test_csv"] = absolute(args.test_csv)
    return dataclasses.replace(space, retrain=retrain if retrain.get("epochs") else {})


def absolute(path: str, base: Path | None = None) -> str:
    """`path`, `~` expanded, made absolute against `base` (default: the working directory)."""
    return str((base or Path.cwd()).joinpath(Path(path).expanduser()).absolute())


def absolute_paths(space: SearchSpace, base: Path) -> SearchSpace:
    """PATH_KEYS in the fixed settings, in path-valued choices and in choices' overrides."""
    def fix(key: str, value: Any) -> Any:
        return absolute(value, base) if key in PATH_KEYS and isinstance(value, str) and value else value

    def fix_all(values: dict[str, Any]) -> dict[str, Any]:
        return {key: fix(key, value) for key, value in values.items()}

    params = tuple(dataclasses.replace(
        p, values=tuple(fix(p.name, v) for v in p.values),
        overrides={fix(p.name, choice): fix_all(extra) for choice, extra in p.overrides.items()})
        for p in space.params)
    trainer = fix_all(space.trainer)
    # The trainer's default checkpoint_root is relative too: pin it to where the search started,
    # not to whatever working directory Ray gives a trial.
    trainer.setdefault("checkpoint_root", fix("checkpoint_root", TrainConfig().checkpoint_root))
    retrain = {key: absolute(value, base) if key == "test_csv" and value else value
               for key, value in space.retrain.items()}
    return dataclasses.replace(space, trainer=trainer, params=params, retrain=retrain)


def prepare_demo_data(space: SearchSpace) -> None:
    """The demo space generates its dataset on first use: only when the CSVs are the demo's own
    paths (`<demo_data>/splits/{train,val}.csv`) and none of its split files exists (a user's
    CSV, or one of the three, is never generated over; a --test_csv of the user's is read,
    never written)."""
    train_csv, val_csv = space.trainer.get("train_csv"), space.trainer.get("val_csv")
    if not space.demo_data or not train_csv or not val_csv:
        return
    folder = Path(space.demo_data).absolute()
    if not (same_file(train_csv, folder / "splits/train.csv") and same_file(val_csv, folder / "splits/val.csv")):
        return  # the user's data: check_data reports what is missing
    own_test = Path(train_csv).with_name("test.csv")  # the demo's own, whatever --test_csv says
    if any(Path(path).exists() for path in (train_csv, val_csv, own_test)):
        return
    from headernet_core.demo_data import generate
    from headernet_core.split_dataset import relative_to, split_parts, write_csv
    import pandas as pd

    print(f"demo dataset missing: generating it in {folder} (once)")
    csv = folder / "raw" / "all_clips.csv"
    if not csv.is_file():  # the CSV is written last: without it the folder is incomplete
        csv = generate(folder / "raw", seed=0, overwrite=True, matches=DEMO_MATCHES)
    frame = pd.read_csv(csv)
    # The README's split command, in-process: paths relative to the split CSVs' folder
    frame["path"] = [relative_to(csv.parent / p, Path(train_csv).parent) for p in frame["path"]]
    parts = split_parts(frame, 0.2, DEMO_TEST_SPLIT, seed=42, group=True)
    for name, path in (("train", train_csv), ("val", val_csv), ("test", own_test)):
        write_csv(parts[name], Path(path))


def check_data(space: SearchSpace) -> CheckedSplits:
    """Check the space's split CSVs and every clip header once (with the leak warnings); the
    result goes to every trial (`run_trial(checked=...)`), which then skips those checks."""
    import warnings

    from headernet_core.data import check_frames, check_splits, load_split, split_warnings

    for key in ("train_csv", "val_csv"):
        if not space.trainer.get(key):
            fail(f"{space.path}: no {key}: set it in the space's trainer section or pass --{key}")
    csvs = {"train": space.trainer["train_csv"], "val": space.trainer["val_csv"]}
    checked = check_splits(csvs)
    train_df, val_df = (load_split(csvs[split], split, checked) for split in ("train", "val"))
    for message in split_warnings(train_df, val_df, csvs["train"], csvs["val"]):
        warnings.warn(message, stacklevel=2)
    frames = [*train_df["clip_frames"], *val_df["clip_frames"]]
    # num_frames from an int range: checked at its largest draw (combinations give its low bound)
    top = {p.name: p.high for p in space.params if p.kind == "int" and p.name == "num_frames"}
    for sampled, _ in space.combinations():   # the trainer's own frame check, for every trial
        values = space.trainer_values({**sampled, **top})
        try:
            check_frames(TrainConfig.from_dict(values, source=str(space.path)), frames)
        except HeaderNetError as exc:
            fail(f"{space.path}: {exc}")
    if test_csv := space.retrain.get("test_csv"):  # scored after the search: a missing file must not surface hours from now
        load_split(test_csv, "test")
    return checked


def check_checkpoints(space: SearchSpace) -> None:
    """Every backbone source any trial could use (through any choice or its overrides) must
    exist before the search starts, not fail trial by trial hours into it."""
    for _, values in space.combinations():
        if ckpt := values.get("backbone_ckpt"):
            if not Path(ckpt).exists():
                fail(f"{space.path}: backbone_ckpt {ckpt} not found")
            continue
        variant = values.get("vmae_variant")
        # A variant without published weights (tiny: random) has no folder.
        folder = published_folder(variant, values["checkpoint_root"]) if values.get("backbone") == "vmae" else None
        missing = [f for f in FOLDER_FILES if not (folder / f).is_file()] if folder else []
        if missing:
            fail(f"{space.path}: vmae_variant {variant} needs {folder / missing[0]} "
                 f"(download OpenGVLab/{folder.name} or set checkpoint_root/backbone_ckpt)")


def check_local_machine(space: SearchSpace, address: str | None) -> None:
    """A local search: a trial's GPUs and its worker group must fit this machine, checked
    before anything is written or started (the local Ray never counts more CPUs or GPUs than
    the machine has; `concurrent_trials` checks again against what it counted)."""
    if address is not None:
        return
    gpu, count = space.resources.get("gpu", 0), 0
    if gpu > 0:
        import torch
        count = torch.cuda.device_count()
        if count == 0:
            fail(f"{space.path}: resources.gpu is {gpu:g} but this machine has no CUDA GPU; "
                 f"use resources.gpu=0 with trainer cpu: true, or --address a cluster with GPUs")
        if gpu > count:
            fail(f"{space.path}: resources.gpu {gpu:g} per trial but this machine has {count} GPU(s)")
    concurrent_trials(space, {"CPU": float(os.cpu_count() or 1), "GPU": float(count)}, "this machine")


def check_cluster_gpus(space: SearchSpace, nodes: list[dict[str, Any]] | None = None) -> None:
    """A trial runs on one node: some alive node must hold the GPUs one trial asks for (a
    cluster of eight 1-GPU nodes cannot run a 2-GPU trial, and Tune would wait forever)."""
    gpu = space.resources.get("gpu", 0)
    if gpu <= 0:
        return
    if nodes is None:
        import ray
        nodes = ray.nodes()
    per_node = [n.get("Resources", {}).get("GPU", 0) for n in nodes if n.get("Alive", True)]
    largest = max(per_node, default=0)
    if largest < gpu:
        fail(f"{space.path}: resources.gpu {gpu:g} per trial but the Ray cluster's largest node has "
             f"{largest:g} GPU(s) ({sum(per_node):g} in all; a trial runs on one node)")


def concurrent_trials(space: SearchSpace, cluster: dict[str, float] | None = None,
                      where: str = "the Ray cluster") -> int:
    """`max_concurrent`, capped for N-worker trials at the worker groups the cluster can place
    (each group reserves its own resources beside its trial's token): one line, naming `where`
    the resources were counted, when none fits."""
    if workers_of(space.resources) == 1:
        return space.max_concurrent
    if cluster is None:
        import ray
        cluster = ray.cluster_resources()
    fits = placeable_trials(space.resources, cluster)
    if fits < 1:
        r = space.resources
        fail(f"{space.path}: resources.workers {workers_of(r)} x (cpu {r.get('cpu', 1):g}, gpu "
             f"{r.get('gpu', 0):g}) per trial does not fit {where} ({cluster.get('CPU', 0):g} CPU, "
             f"{cluster.get('GPU', 0):g} GPU in all)")
    return min(space.max_concurrent, fits)


def search_state(search_dir: Path) -> str | None:
    summary = search_dir / "search_summary.json"
    if summary.is_file():
        return read_json_dict(summary).get("state") or "unknown"
    return "started" if (search_dir / TUNER_PKL).is_file() else None


def check_search_dir(search_dir: Path, resume: bool) -> StartRecord | None:
    """A new search needs a fresh name; --resume needs something to resume. Returns the
    record of how a resumed search was started."""
    state = search_state(search_dir)
    if resume:
        record = search_dir / SEARCH_RECORD
        if state is None or not record.is_file():
            fail(f"{search_dir}: nothing to resume (no search was started under this name)")
        if state == "finished":
            fail(f"{search_dir}: this search has finished, there is nothing to resume (its summary: "
                 f"{search_dir / 'summary.md'}); to train its best config longer: python -m "
                 f"tuning.retrain {search_dir} --epochs N")
        return StartRecord.read(record)
    if state == "finished":
        fail(f"{search_dir} already holds a finished search; choose another --name "
             f"(its summary: {search_dir / 'summary.md'})")
    if state is not None:
        fail(f"{search_dir} holds an unfinished search; continue it with --resume or choose another --name")
    if search_dir.exists() and not search_dir.is_dir():
        fail(f"{search_dir} is a file; choose another --name or --storage_path")
    other = sorted(p.name for p in search_dir.iterdir() if p.name not in PRE_RAY_FILES) \
        if search_dir.is_dir() else []
    if other:
        fail(f"{search_dir} already holds files that are not a search's (e.g. {other[0]}); a new "
             f"search never writes over them: choose another --name or --storage_path")
    return None


def shaping_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The CLI flags that shape a search beyond the space file, as search.json records them
    and --resume compares them (CSV paths absolute, so the folder run from does not matter)."""
    csvs = {key: absolute(value) if value else None
            for key, value in (("train_csv", args.train_csv), ("val_csv", args.val_csv))}
    return {"sets": list(args.sets), **csvs, "keep_checkpoints": args.keep_checkpoints}


def check_resume_args(args: argparse.Namespace, start: StartRecord, search_dir: Path) -> None:
    """--resume continues the search exactly as it started (Tune restores the same sampler,
    scheduler and trial count): a flag that asks for something else is an error, not ignored.
    (The space file itself was found by load_space before this runs.)"""
    space_file = find_space_file(args.space)
    changed = []
    if space_file.resolve() != Path(start.space_file).resolve():
        changed.append(f"--space {args.space} (started with {start.space_file})")
    for flag in ("num_samples", "max_concurrent"):
        value, before = getattr(args, flag), getattr(start, flag)
        if value is not None and value != before:
            changed.append(f"--{flag} {value} (started with {before or 'the space file'})")
    started, now = start.args or {}, shaping_flags(args)
    if now["sets"] and "sets" in started and now["sets"] != started["sets"]:
        changed.append(f"--set {' '.join(args.sets)} (started with {' '.join(started['sets']) or 'none'})")
    for key in ("train_csv", "val_csv"):
        if now[key] and key in started and now[key] != started[key]:
            changed.append(f"--{key} {getattr(args, key)} (started with {started[key] or 'the space file'})")
    if args.warm_start and absolute(args.warm_start) != start.warm_start:
        changed.append(f"--warm_start {args.warm_start} (started with {start.warm_start or 'none'})")
    if changed:
        fail(f"{search_dir}: --resume continues the search as it was started, but "
             f"{'; '.join(changed)}; drop those flags or start a new search with another --name")
    if space_file.read_text() != start.space_yaml:
        print(f"note: {start.space_file} changed since this search started; resuming with the "
              f"copy it started from ({search_dir / 'space.yaml'})")


# --- Ray --------------------------------------------------------------------------------------
def start_ray(address: str | None, quiet: bool) -> None:
    """Local Ray by default (started and stopped by this command, on 127.0.0.1 only) or join
    `address` (see tuning/cluster.py). `quiet`: the workers log no INFO lines (QUIET_HOOK)."""
    runtime_env = {"worker_process_setup_hook": QUIET_HOOK} if quiet else None
    if address:
        join_cluster(address, runtime_env)
    else:
        start_local_ray(runtime_env)


def build_tuner(plan: SearchPlan, checked: CheckedSplits | None = None):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from .console import console_run_config
    from .diskspace import DiskWatch
    from .snapshot import ResumeSnapshot
    from .study import clear_stale_lock

    space, search_dir, verbose = plan.space, plan.search_dir, plan.start.verbose
    console = console_run_config(metric=space.metric, mode=space.mode,
                                 params=[p.name for p in space.params], search_dir=search_dir,
                                 max_failures=space.max_failures, verbose=verbose)
    workers = workers_of(space.resources)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, search_dir=str(search_dir), checked=checked,
                             quiet=not verbose),
        # N workers reserve their own CPUs/GPUs (tuning/ddp_trial.py); the trial a token.
        TRIAL_TOKEN if workers > 1 else
        {"cpu": space.resources.get("cpu", 1), "gpu": space.resources.get("gpu", 0)})
    if plan.resume:
        # Tune restores the searcher (its study is the same journal file) and the RunConfig,
        # console included, as the search started.
        clear_stale_lock(search_dir)
        return tune.Tuner.restore(str(search_dir), trainable=trainable,
                                  resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode=space.mode,
                                    search_alg=make_searcher(space, search_dir, plan.start.warm_start),
                                    scheduler=make_scheduler(space, search_dir), num_samples=space.num_samples,
                                    max_concurrent_trials=concurrent_trials(space),
                                    # one actor per slot for the whole search: torch and the
                                    # trainer are imported once, not once per trial (N-worker
                                    # trials: their workers are new actors anyway)
                                    reuse_actors=workers == 1,
                                    trial_dirname_creator=trial_dirname,
                                    trial_name_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=search_dir.name, storage_path=str(search_dir.parent),
            **{**console, "callbacks": [CSVLoggerCallback(), JsonLoggerCallback(), ResumeSnapshot(),
                                        DiskWatch(search_dir, space.num_samples),
                                        *([worker_group_cleanup(search_dir)] if workers > 1 else []),
                                        *console["callbacks"]]},
            failure_config=tune.FailureConfig(max_failures=space.max_failures),
            # Tune checkpoints are tiny progress markers (weights live in each run folder);
            # keeping them all avoids restoring from one that was already deleted.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))


def make_searcher(space: SearchSpace, search_dir: Path | None, warm_start: str | None = None):
    """A new search's searcher: `StudySearch` with seeded multivariate TPE over the study in
    `search_dir` (None: in memory, as the search-quality bench replays it), first given the
    finished and stopped trials of the `warm_start` search folder."""
    from .ray_compat import searcher_study
    from .study import StudySearch, study_storage, warm_start_trials

    storage = study_storage(search_dir) if search_dir is not None else None
    # Several objectives: Optuna's multi-objective TPE over every `objective*` key (no
    # intermediate values then); the space allows no scheduler with them.
    keys = objective_keys(space.objective_metrics)
    several = len(keys) > 1
    searcher = StudySearch(space=space.define_by_run, metric=keys if several else OBJECTIVE,
                           mode=list(space.objective_modes) if several else space.mode,
                           sampler=tpe_sampler(space.seed, space.startup_trials), storage=storage,
                           study_name=search_dir.name if search_dir is not None else None,
                           constraints=space.constraints)
    if warm_start:   # a new search only: --resume finds them in the study already
        searcher_study(searcher).add_trials(warm_start_trials(warm_start, space.params))
    return searcher


def make_scheduler(space: SearchSpace, search_dir: Path):
    """The space's scheduler: ASHA over epochs (recording its stops in the trial folders) or
    FIFO (every trial runs all its epochs)."""
    from ray.tune.schedulers import FIFOScheduler

    from .scheduler import RecordingASHA

    if space.scheduler.get("type") != "asha":
        return FIFOScheduler()
    return RecordingASHA(search_dir, time_attr="epoch", max_t=space.max_epochs(),
                         grace_period=space.scheduler["grace_period"],
                         reduction_factor=space.scheduler["reduction_factor"])


# --- after the search ---------------------------------------------------------------------
def collect_records(space: SearchSpace, results, interrupted: bool) -> list[TrialRecord]:
    records = []
    for result in results:
        folder = Path(result.path)
        status_record = read_json_dict(folder / "status.json")
        status = status_record.get("state")
        best = read_json_dict(folder / "best_metrics.json")
        error = None
        if result.error is not None:
            state, error = "failed", one_line_error(result.error)
        elif (end := recorded_end(status_record)) is not None:
            state, error = "out_of_memory", str(end)
        elif status == "finished":
            state = "finished"
        elif (folder / SCHEDULER_STOP).is_file():
            state = "stopped_early"  # ASHA ended it: --resume leaves it alone
        elif interrupted:
            state = "interrupted"  # Ctrl-C or a kill cut it short: --resume continues it
        else:
            state = "pending" if status is None else "stopped_early"
        checkpoint = best.get("checkpoint")
        checkpoint = f"{folder.name}/{checkpoint}" if checkpoint and (folder / checkpoint).is_file() else None
        # The params the trial itself recorded: Tune's result.config is its last report's, which
        # for a trial that failed before reporting can be another trial's (a reused actor's).
        trial_record = read_json_dict(folder / "trial.json")
        own = trial_record.get("params")
        records.append(TrialRecord(
            name=folder.name, status=state, params=dict(own if isinstance(own, dict) else result.config or {}),
            objective=best.get(space.metric), best_epoch=best.get("epoch"),
            epochs_run=int(status_record.get("epochs_done", 0)),
            best_metrics={k: v for k, v in best.items() if isinstance(v, (int, float))},
            checkpoint=checkpoint, error=error,
            node=(trial_record.get("node_id") or "")[:12] or None,
            **trial_cost(space, folder, state),
            order=_order(folder.name)))
    return sorted(records, key=lambda r: (r.order, r.name))


def trial_cost(space: SearchSpace, folder: Path, state: str) -> dict[str, Any]:
    """A trial's device-hours (its epochs' wall time x the GPUs it held, or the CPUs without
    GPUs), its backbone variant (config.yaml), and whether its last epoch met the space's
    constraints (what the study was told)."""
    rows = []
    with contextlib.suppress(OSError, ValueError, csv.Error), \
            open(folder / "metrics_epoch.csv", newline="") as fp:
        rows = list(csv.DictReader(fp))
    seconds = sum(float(row.get("epoch_seconds") or 0) for row in rows)
    slots = space.resources.get("gpu", 0) or space.resources.get("cpu", 1)
    config: Any = {}
    with contextlib.suppress(OSError, yaml.YAMLError):
        config = yaml.safe_load((folder / "config.yaml").read_text())
    config = config if isinstance(config, dict) else {}
    backbone = config.get("backbone")
    variant = config.get("vmae_variant" if backbone == "vmae" else "csn_variant")
    last = rows[-1] if rows else {}
    feasible = state != "out_of_memory" and all(
        not last.get(metric) or (float(last[metric]) <= bound if side == "max" else float(last[metric]) >= bound)
        for metric, side, bound in space.constraints)
    return {"device_hours": seconds * slots / 3600 if rows else None,
            "variant": f"{backbone}-{variant}" if backbone else None, "feasible": feasible}


def _order(name: str) -> int:
    head = name.split("_", 1)[0].lstrip("t")
    return int(head) if head.isdigit() else 0


def tpe_sampler(seed: int, startup_trials: int = 10):
    """Seeded multivariate TPE with `group=True`: conditional parameters (e.g. `lr_backbone`
    only where the backbone trains) are modelled per branch instead of being treated as
    independent. The first `startup_trials` trials are random (Optuna's n_startup_trials).
    Both options are marked experimental in Optuna; the warning says nothing the user can act
    on, so it is kept off the console."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=startup_trials)


def prune_checkpoints(search_dir: Path, records: list[TrialRecord], best: TrialRecord | None) -> None:
    """--keep_checkpoints best_trial: only the best trial keeps weights."""
    for record in records:
        if best is not None and record.name == best.name:
            continue
        for weights in (search_dir / record.name / "checkpoints").glob("*.pt"):
            weights.unlink()
        record.checkpoint = None


def plan_search(args: argparse.Namespace) -> SearchPlan:
    """Check the flags, the space and the search folder and decide what the search does,
    writing nothing: a new search's StartRecord comes from the flags, a resumed one's from its
    search.json (a flag that would change the search is refused)."""
    if args.address and not args.storage_path:
        fail("--address needs --storage_path on storage every node mounts (e.g. an NFS path)")
    if args.storage_path and "://" in args.storage_path:
        fail(f"--storage_path {args.storage_path}: expected a filesystem path every node mounts "
             f"(NFS, a shared disk); URLs are not supported: trials write their artifacts as files")
    if args.name is not None:
        check_name(args.name, "--name")
    current = load_space(args.space, sets=args.sets)  # checked first; gives name and output_root
    storage = Path(args.storage_path or current.trainer.get("output_root")
                   or TrainConfig().output_root).expanduser().absolute()
    check_writable_dir(storage, "--storage_path" if args.storage_path else "the space's output_root")
    search_dir = storage / (args.name or current.name)
    start = check_search_dir(search_dir, args.resume)
    if start is not None:
        check_resume_args(args, start, search_dir)
    space = with_retrain_flags(resolve_space(args, start), args)
    warnings: list[str] = []
    if start is None:
        warm_start = absolute(args.warm_start) if args.warm_start else None
        if warm_start:
            warnings = check_warm_start(warm_start, space)
        space_file = find_space_file(args.space).absolute()   # --resume may run from another folder
        start = StartRecord(
            space_file=str(space_file), space_yaml=space_file.read_text(),
            sets=[*args.sets, *[f"{k}={v}" for k, v in space.trainer.items() if k in PATH_KEYS]],
            num_samples=args.num_samples, max_concurrent=args.max_concurrent, cwd=str(Path.cwd()),
            args=shaping_flags(args), verbose=args.verbose, warm_start=warm_start)
    return SearchPlan(
        search_dir=search_dir, space=space, start=start, resume=args.resume, address=args.address,
        keep_checkpoints=args.keep_checkpoints or (start.args or {}).get("keep_checkpoints") or "all",
        retrain_best=args.retrain_best,
        test_csv=absolute(args.test_csv) if args.test_csv else None,
        warnings=tuple(warnings))


def check_warm_start(other: str, space: SearchSpace) -> list[str]:
    """--warm_start: the other search must have searched the same objective and parameters,
    each of the same kind, log scale and choice list (its trials would mean something else to
    the sampler); its ranges may differ. Returns one line naming the trainer settings that
    differ (its results were measured under those)."""
    record = Path(other) / SEARCH_RECORD
    if not record.is_file():
        fail(f"--warm_start {other}: not a search folder (no {SEARCH_RECORD})")
    theirs = recorded_space(StartRecord.read(record))
    if (theirs.metric, theirs.mode) != (space.metric, space.mode):
        fail(f"--warm_start {other}: that search's objective is {theirs.mode} {theirs.metric}, "
             f"this one's {space.mode} {space.metric}")
    ours, old = {p.name: p for p in space.params}, {p.name: p for p in theirs.params}
    if set(ours) != set(old):
        fail(f"--warm_start {other}: that search searched {', '.join(sorted(old))}, this one "
             f"{', '.join(sorted(ours))}; a warm start needs the same parameters")
    for name, param in ours.items():
        before = old[name]
        for what, now, then in (("kind", param.kind, before.kind), ("log scale", param.log, before.log),
                                ("choices", param.values, before.values)):
            if now != then:
                fail(f"--warm_start {other}: search.{name} differs in its {what} "
                     f"({format_value(then, 4, None)} there, {format_value(now, 4, None)} here); "
                     f"a warm start needs the same kinds, log scales and choice lists")
    differ = sorted(k for k in {*space.trainer, *theirs.trainer}
                    if space.trainer.get(k) != theirs.trainer.get(k))
    if not differ:
        return []
    return [f"--warm_start: trainer settings differ from {other}: " + ", ".join(
        f"{k} {format_value(theirs.trainer.get(k), 4, None)} there, "
        f"{format_value(space.trainer.get(k), 4, None)} here" for k in differ)]


def run_search(args: argparse.Namespace) -> int:
    plan = plan_search(args)
    search_dir, space = plan.search_dir, plan.space
    # Resume only from state this project signed, checked before anything is written.
    verified = resume_guard.verify(search_dir) if plan.resume else None
    # Ray's environment (read when ray is imported) and, with --address, a head that answers
    # and accepts this process's token (one line within seconds).
    prepare_environment(local=not plan.address)
    if plan.address:
        check_address(plan.address)
    if plan.resume and args.verbose != plan.start.verbose:
        print(f"note: a resumed search keeps the console it started with "
              f"({'--verbose' if plan.start.verbose else 'compact'})")
    check_checkpoints(space)
    check_local_machine(space, plan.address)
    if not plan.resume:
        resume_guard.load_key(create=True)  # a search that could not be resumed is not started
    prepare_demo_data(space)
    checked = check_data(space)

    created = not search_dir.exists()
    try:
        with FolderLock(search_dir, "a search"):
            check_search_dir(search_dir, plan.resume)  # again: no other search can start from here on
            remove_stale_temps(search_dir, search_dir / resume_guard.SNAPSHOT_DIR)
            if verified is not None and (replaced := resume_guard.install(search_dir, verified)):
                print(f"note: resuming from the signed state; unsigned or stale Ray Tune files "
                      f"{', '.join(replaced)} moved to {search_dir / resume_guard.SNAPSHOT_DIR / resume_guard.DISPLACED}")
            return search_owned(plan, checked)
    finally:
        if created and search_dir.is_dir() and not any(search_dir.iterdir()):
            search_dir.rmdir()  # refused before writing anything: leave nothing behind


def search_owned(plan: SearchPlan, checked: CheckedSplits) -> int:
    """The search itself, once every check passed and this process owns the search folder."""
    search_dir, space = plan.search_dir, plan.space
    if not plan.resume:
        search_dir.mkdir(parents=True, exist_ok=True)
        write_json(search_dir / SEARCH_RECORD, dataclasses.asdict(plan.start))
        write_text(search_dir / SPACE_COPY, plan.start.space_yaml)
    print(space.describe())
    for line in [*search_warnings(space, search_dir), *plan.warnings]:
        print(f"warning: {line}")
    from .study import STUDY_FILE
    print(f"search folder: {search_dir}  (live study: optuna-dashboard {search_dir / STUDY_FILE})")

    try:
        best, records, interrupted = fit_and_summarise(plan, checked)
    except KeyboardInterrupt:
        # A second Ctrl-C (or SIGTERM) while stopping: Tune skips its last save and no summary
        # is written, but the search continues from Tune's last periodic save.
        print(f"stopped at once, without a summary: continue with {resume_command(plan)}", file=sys.stderr)
        raise SystemExit(130) from None
    if interrupted:
        return 130
    if best is not None and space.retrain:
        from .retrain import DEVICE_KEYS, FINAL, retrain
        retrain(search_dir, epochs=space.retrain["epochs"], test_csv=space.retrain.get("test_csv"),
                train_on_val=space.retrain.get("train_on_val", False), lock=False,
                name=free_name(search_dir, FINAL),
                devices={k: v for k, v in space.trainer.items() if k in DEVICE_KEYS})
    if records and all(r.status == "failed" for r in records):
        print(f"every trial failed: see the errors in {search_dir / 'summary.md'}", file=sys.stderr)
        return 1
    return 0


def fit_and_summarise(plan: SearchPlan, checked: CheckedSplits
                      ) -> tuple[TrialRecord | None, list[TrialRecord], bool]:
    """Start (or join) Ray, run the trials, write the summary: (best, records, interrupted)."""
    space, search_dir = plan.space, plan.search_dir
    start_ray(plan.address, quiet=not plan.start.verbose)
    sigterm_as_sigint()  # ray.init installed its own SIGTERM handler (exit 1, no summary)
    try:
        if plan.address:
            check_cluster_gpus(space)
        concurrent_trials(space)   # an N-worker group that cannot be placed: one line, now
        tuner = build_tuner(plan, checked)
        if not plan.resume:
            resume_guard.sign_tuner(search_dir)
        from .console import own_stop_lines
        with own_stop_lines() as stop:
            results = tuner.fit()
        done = results.num_terminated + results.num_errors
        # Stopped: Tune may call a stopped N-worker trial terminated (its TorchTrainer returned).
        interrupted = stop.seen or done < space.num_samples
        if not interrupted:
            from .study import fail_unfinished
            fail_unfinished(search_dir)
        records = collect_records(space, results, interrupted)
    except BaseException:
        stop_ray()
        raise
    # Stopping Ray (the local one this command started; from a cluster it only disconnects) is
    # waiting for its processes to exit: done while the summary is written, which needs only the
    # trial folders.
    stopping = threading.Thread(target=stop_ray, name="ray-shutdown")
    stopping.start()
    try:
        best = summarise(plan, records, interrupted)
    finally:
        stopping.join()
    return best, records, interrupted


def free_name(folder: Path, name: str) -> str:
    """`name`, or `name_2`, `name_3`... when taken: a model retrained by hand while the search
    was interrupted keeps its folder when the resumed search retrains its own."""
    taken = {p.name for p in folder.iterdir()}
    return next(n for n in (name, *(f"{name}_{i}" for i in range(2, len(taken) + 3))) if n not in taken)


def summarise(plan: SearchPlan, records: list[TrialRecord], interrupted: bool) -> TrialRecord | None:
    """Prune checkpoints, write the summary, print the result; returns the best trial."""
    space, search_dir = plan.space, plan.search_dir
    best = best_record(records, space.mode)
    if plan.keep_checkpoints == "best_trial" and not interrupted:
        prune_checkpoints(search_dir, records, best)
    notes = [f"interrupted: continue with {resume_command(plan)}"] if interrupted else []
    if cache_note := feature_cache_note(search_dir, records):
        notes.append(cache_note)
    for line in complete_trial_plots(search_dir, records):
        print(line, file=sys.stderr)
    size = folder_bytes(search_dir)
    # A warm start: the other search and how many of its trials the study imported.
    from .study import imported_trials
    warm_start = {"from": plan.start.warm_start, "trials": imported_trials(search_dir)} if plan.start.warm_start else None
    write_summary(search_dir, name=search_dir.name, metric=space.metric, mode=space.mode,
                  space_params=space.params, records=records,
                  state="interrupted" if interrupted else "finished", disk_bytes=size,
                  notes=notes, val_csv=space.trainer.get("val_csv"), warm_start=warm_start,
                  objectives=space.objectives,
                  cost_unit="GPU-hours" if space.resources.get("gpu", 0) else "CPU-hours")
    print_result(search_dir, space, records, best, size, notes)
    return best


def resume_command(plan: SearchPlan) -> str:
    """The command that continues this search from any folder: the space file it started from
    (absolute: `--space demo` could find another file elsewhere), its name and storage, its
    cluster, and this command's retrain flags (--resume does not keep those: they act after
    the search)."""
    start = plan.start
    space = absolute(start.space_file, Path(start.cwd or Path.cwd()))
    command = ["python", "-m", "tuning.search", "--space", space, "--name", plan.search_dir.name,
               "--storage_path", str(plan.search_dir.parent)]
    for flag in ("address", "retrain_best", "test_csv"):
        if (value := getattr(plan, flag)) is not None:
            command += [f"--{flag}", str(value)]
    return shlex.join([*command, "--resume"])


def print_result(search_dir: Path, space: SearchSpace, records: list[TrialRecord],
                 best: TrialRecord | None, size: int, notes: list[str]) -> None:
    counts = Counter(record.status for record in records)
    print("\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" of {space.num_samples} trials")
    if best is None:
        print("no best trial: no trial finished an epoch without failing")
    else:
        params = ", ".join(f"{k}={format_value(v, 3, None)}" for k, v in best.params.items())
        print(f"best trial {best.name}: {space.metric} {best.objective:.4f} at epoch {best.best_epoch} ({params})")
        if best.checkpoint:
            print(f"best checkpoint: {search_dir / best.checkpoint}")
        for line in edge_warnings(best, space.params):
            print(f"warning: {line}")
    print(f"summary: {search_dir / 'summary.md'}  |  the search holds {format_bytes(size)} on disk")
    print(f"curves: tensorboard --logdir {search_dir}")
    for note in notes:
        print(note)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> None:
        if code := run_search(args):
            sys.exit(code)

    run_cli(body)


if __name__ == "__main__":
    main()

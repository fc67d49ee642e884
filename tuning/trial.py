"""One Ray Tune trial: a plain function that runs the headernet_core trainer in-process.

The trial's run folder is Tune's own trial folder on the search's storage
(`<storage>/<search>/<trial>/`), so the standard run artifacts land beside Tune's files on
shared storage on any node. Each epoch reports the epoch's metrics plus `objective` (the best
epoch's value so far of the search metric) with a small Tune checkpoint; the real training
state is the run folder's `checkpoints/last.pt`, which a retried or restored trial resumes.
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import math
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from headernet_core.artifacts import read_json_dict, write_json
from headernet_core.config import TrainConfig, fields_with_role, format_value
from headernet_core.errors import OutOfMemoryEnd
from headernet_core.status import recorded_end

from .space import SearchSpace

OBJECTIVE = "objective"
OOM_ENDED = "oom_ended"                  # in a trial's last result: it ran out of memory at batch 1
# Reported each epoch beside the objective: the epochs the trial was to run, so the searcher
# tells a trial the scheduler stopped (its last epoch before these) from one that finished.
TRIAL_EPOCHS = "trial_epochs"
SCHEDULER_STOP = "scheduler_stop.json"  # in a trial folder: ASHA stopped it (tuning/scheduler.py)
TRIAL_LOG = "train.log"                  # in a trial folder: the trainer's output (compact console)


def trial_dirname(trial: Any) -> str:
    """`t003_backbone=csn_lr_head=1.2e-03`: launch order, then the sampled values (short)."""
    index = str(trial.experiment_tag).split("_", 1)[0]
    index = f"{int(index):03d}" if index.isdigit() else trial.trial_id
    parts = [f"{key}={format_value(value, digits=3, sci_from=1e3)}"   # short: a folder name
             for key, value in sorted(trial.config.items())]
    name = "_".join([f"t{index}", *parts])
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)[:120]


# The trainer keys run_trial sets itself whatever the space says (see replaced_settings for
# how): the best-epoch metric, the runs' root and the device settings of the trial's Ray slot.
# A space's `threads` is kept (a trial fills it only when unset), so it is not among them.
TRIAL_REPLACED = ("select_metric", "output_root",
                  *(key for key in fields_with_role("device") if key != "threads"))


def replaced_settings(space: SearchSpace, search_dir: str | Path) -> list[str]:
    """One line per trainer setting of the space that `run_trial` replaces in every trial
    (how and why), for the search to print once. Settings the space leaves at the trainer's
    default are not mentioned."""
    given = dict(space.trainer)
    searched = {p.name for p in space.params}
    cpus = max(1, int(space.resources.get("cpu", 1)))
    lines = [f"search.{key} has no effect: every trial sets {key} itself" for key in sorted(searched)
             if key in TRIAL_REPLACED]
    if given.get("select_metric", space.metric) != space.metric:
        lines.append(f"select_metric {given['select_metric']} is replaced by {space.metric} in "
                     f"trials: a trial's best epoch is the one with the best search objective")
    if given.get("num_workers", 0) > cpus - 1:
        lines.append(f"num_workers {given['num_workers']} becomes {cpus - 1} in trials: "
                     f"resources.cpu {cpus:g} leaves {cpus - 1} core(s) beside the training thread")
    if given.get("gpus"):
        lines.append(f"gpus {' '.join(map(str, given['gpus']))} is replaced in trials: Ray gives each "
                     f"trial its own GPUs (resources.gpu)")
    if given.get("progress"):
        lines.append("progress is off in trials: per-batch bars would interleave in the search console")
    root = given.get("output_root")
    if root and Path(root).absolute() != Path(search_dir).absolute().parent:
        lines.append(f"output_root {root} is not used: trials write into the search folder {search_dir}")
    return lines


def search_warnings(space: SearchSpace, search_dir: str | Path) -> list[str]:
    """Every warning the search's trials would give about their settings, once: the settings
    trials replace, then `ignored_settings` over each combination of choices (the trials log
    their own copy into their folders)."""
    from headernet_core.config import ignored_settings

    lines = replaced_settings(space, search_dir)
    where: dict[str, list[str]] = {}
    combos = list(space.combinations())
    for sampled, values in combos:
        choices = " ".join(f"{p.name}={sampled[p.name]}" for p in space.params
                           if p.kind == "choice" and p.name in sampled)
        for line in ignored_settings(TrainConfig.from_dict(values, source=str(space.path))):
            where.setdefault(line, []).append(choices)
    for line, places in where.items():
        lines.append(line if len(places) == len(combos) or not places[0] else
                     f"{line} (trials with {' / '.join(dict.fromkeys(places))})")
    return lines


def objective_keys(metrics: Sequence[str]) -> list[str]:
    """What a trial reports per objective metric at its best epoch: `objective` for the first
    (the best-epoch metric), `objective_<metric>` for each further one of a multi-objective search."""
    return [OBJECTIVE, *(f"{OBJECTIVE}_{metric}" for metric in metrics[1:])]


def one_line_error(error: BaseException | str | None) -> str:
    """Ray wraps trial errors in tracebacks; keep the innermost message, on one line."""
    if error is None:
        return "unknown error"
    text = str(error).strip().splitlines()
    for line in reversed(text):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:500]
    return type(error).__name__


def finite(value: Any) -> float | None:
    """A finite float, or None (None, NaN, inf, bools, non-numbers)."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def trial_metrics(row: dict[str, Any], best: dict[str, Any] | None, best_epoch: int | None,
                  metrics: Sequence[str], node: str, epochs: int) -> dict[str, Any]:
    """What a trial reports to Tune after an epoch: its finite metrics, each objective metric's
    value at the best epoch so far (`objective_keys`), the best epoch, the node and the epochs
    it was to run (TRIAL_EPOCHS)."""
    values = {k: number for k, v in row.items() if (number := finite(v)) is not None}
    values |= {"best_epoch": best_epoch or 0, "node_id": node, TRIAL_EPOCHS: epochs}
    for key, metric in zip(objective_keys(metrics), metrics):
        values[key] = float((best or {}).get(metric, float("nan")))
    return values


def _quiet_teardown(unraisable: Any) -> None:
    """Ray ends a finished trial's actor with SIGTERM, whose handler raises SystemExit inside
    whatever finalizer runs then; Python prints that as "Exception ignored in ..." (nine lines
    of a harmless traceback per trial). Drop those; report any other unraisable as usual."""
    if not isinstance(unraisable.exc_value, SystemExit):
        sys.__unraisablehook__(unraisable)


def quiet_ray_loggers() -> None:
    """A quiet search's `worker_process_setup_hook` (`QUIET_HOOK`, set on its Ray job), so it
    acts from the moment a worker starts: Ray Train and Tune log no INFO lines from a trial
    (per-epoch "Checkpoint successfully created", and a resumed trial's "Restored on ... from
    checkpoint", which Tune logs before the trial's own code runs); their warnings and errors
    still reach the console."""
    for name in ("ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.unraisablehook = _quiet_teardown


QUIET_HOOK = f"{__name__}.{quiet_ray_loggers.__name__}"


@contextlib.contextmanager
def trial_output(run_dir: Path, quiet: bool) -> Iterator[None]:
    """`quiet`: the trial's stdout and stderr (the trainer's lines, its warnings) go to
    `<run_dir>/train.log` instead of being forwarded to the search's console by Ray."""
    if not quiet:
        yield
        return
    with open(run_dir / TRIAL_LOG, "a", buffering=1) as stream, \
            contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        yield


def collect_previous_trial() -> None:
    """Free what the actor's previous trial left in reference cycles (its model, optimizer,
    GPU memory). A full `gc.collect()` scans every object torch, timm, scikit-learn and Ray
    created at import: ~0.23 s per trial start. The first trial of an actor freezes those
    instead (`gc.freeze`: kept for good, as they would be anyway, never scanned again), so
    each later collection scans only what trials created: ~2 ms."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
    else:
        gc.collect()


EXIT_WAIT_S = 3.0   # under the 5 s Tune gives its actors to exit at the end of a search
_trial_threads: list[threading.Thread] = []   # this process's trial threads (one per trial)


def _wait_for_trial_threads() -> None:
    """At the actor's exit (atexit: the interpreter still runs every thread): let a trial thread
    that is still ending finish first. Tune ends a search's actors without waiting for their
    trial threads (`FunctionTrainable.cleanup` joins with timeout 0), and a thread that frees
    tensors or runs torch ops once the interpreter is finalizing aborts the process ("terminate
    called without an active exception", and Ray's C++ stack on the search's console)."""
    for thread in _trial_threads:
        if thread is not threading.current_thread():
            thread.join(timeout=EXIT_WAIT_S)


# Before Tune reuses an actor for the next trial it waits this long (2 s by default) for the
# previous trial's thread, and fails the next trial if that thread is still alive. A trial that
# ASHA stopped frees its model and draws its plots as it ends: more than 2 s on a busy machine
# (a demo trial failed so on a loaded 2-core machine). Set in the actor process itself, since
# the actors of a `ray start` cluster do not inherit the driver's environment; a value in the
# actor's environment stands.
TRIAL_THREAD_WAIT = ("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")


def register_trial_thread() -> None:
    """Called on the thread that runs a trial: the process waits for it at exit, and Tune waits
    for it before giving the actor the next trial (`TRIAL_THREAD_WAIT`)."""
    os.environ.setdefault(*TRIAL_THREAD_WAIT)
    if not _trial_threads:
        atexit.register(_wait_for_trial_threads)
    _trial_threads[:] = [t for t in _trial_threads if t.is_alive()] + [threading.current_thread()]


def starting_point(config: TrainConfig, run_dir: Path) -> tuple[TrainConfig, bool]:
    """Where a (retried) trial starts: `config` with an out-of-memory halving's
    micro-batch and accumulation, which config.yaml records at once (memory.recorded_micro_batch),
    and whether it resumes (its last.pt is there). The halving applies without last.pt too: the
    N workers of a trial that ran out of memory in epoch 1 agree on it through Tune's retry."""
    from headernet_core.memory import recorded_micro_batch

    return recorded_micro_batch(config, run_dir), (run_dir / "checkpoints" / "last.pt").is_file()


def run_trial(sampled: dict[str, Any], *, space: SearchSpace, search_dir: str,
              checked: dict | None = None, quiet: bool = False) -> None:
    """The Tune function trainable (wrapped with `tune.with_parameters`). `checked`: the split
    CSVs the driver validated (`headernet_core.data.check_splits`), so a trial does not read
    and check every CSV row and clip header again.

    Trials reuse their Ray actor (`reuse_actors=True`): torch, the trainer and the backbone
    code are imported once per actor, not once per trial. Nothing a trial sets leaks into the
    next: the run folder comes from this trial's name (`get_trial_dir()` points at a different
    local folder after a reuse, but always ends in the trial's folder name), `train()` seeds
    every global RNG and sets the thread count, and the warning registry and compile caches
    are reset here. `quiet`: the trainer's output goes to the trial's train.log
    (`trial_output`) and Ray Train/Tune log no INFO lines from the trial ("Checkpoint
    successfully created" per epoch); their warnings and errors still reach the console."""
    import warnings

    import ray
    import torch
    from ray import tune

    register_trial_thread()

    from headernet_core.features import cache_dir
    from headernet_core.trainer import train

    if quiet:
        quiet_ray_loggers()   # also for a job started without QUIET_HOOK

    context = tune.get_context()
    run_name = Path(context.get_trial_dir()).name
    run_dir = Path(search_dir) / run_name
    workers = int(space.resources.get("workers", 1))
    # N workers: each has its own CPUs and GPUs (tuning/ddp_trial.py); this process has a token.
    gpu_ids = ray.get_gpu_ids() if workers == 1 else list(range(int(space.resources.get("gpu", 0))))
    cpus = max(1, int(space.resources.get("cpu", 1)))
    if not gpu_ids:
        # A 0-GPU Ray trial still sees every GPU (Ray >= 2.4x): hide them so it cannot touch one.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    config, resume = starting_point(space.trial_config(sampled), run_dir)
    num_workers = min(config.num_workers, cpus - 1)
    config = config.replace(
        output_root=search_dir, run_name=run_name, progress=False,
        resume=resume, overwrite=not resume,
        cpu=not gpu_ids, gpus=list(range(len(gpu_ids))) if gpu_ids and workers == 1 else None,
        num_workers=num_workers,
        # The trial's CPUs are shared by torch's intra-op threads and the loader threads.
        threads=config.threads or max(1, cpus - num_workers),
        # Every trial (and every search) on this storage shares one frozen-feature cache.
        feature_cache_dir=str(cache_dir(config.replace(output_root=str(Path(search_dir).parent)))),
        # The trial's best epoch is the objective's best epoch.
        select_metric=space.metric)
    node = ray.get_runtime_context().get_node_id()
    write_json(run_dir / "trial.json", {"trial_id": context.get_trial_id(), "name": run_name,
                                        "params": sampled, "node_id": node,
                                        "hostname": os.uname().nodename, "pid": os.getpid()})
    reported = False

    def report(row: dict[str, Any], best: dict[str, Any] | None, best_epoch: int | None) -> None:
        nonlocal reported
        with tempfile.TemporaryDirectory() as tmp:
            # The weights live in the run folder (last.pt); Tune's checkpoint only marks progress.
            Path(tmp, "progress.json").write_text(json.dumps({"epoch": int(row["epoch"]),
                                                              "run_dir": str(run_dir)}))
            tune.report(trial_metrics(row, best, best_epoch, space.objective_metrics, node, config.epochs),
                        checkpoint=tune.Checkpoint.from_directory(tmp))
        reported = True

    if (run_dir / SCHEDULER_STOP).is_file() or (
            workers > 1 and read_json_dict(run_dir / "status.json").get("state") == "finished"):
        # ASHA stopped this trial before the search was interrupted (Tune's saved state may
        # predate that): its decision stands, the trial is not trained further. An N-worker
        # trial restored after its last epoch: tell Tune once.
        report_recorded(run_dir, report)
        return
    # What an earlier trial of this actor left behind: its GPU memory, compiled graphs (a new
    # model would otherwise recompile until torch.compile's cache limit turns compiling off).
    collect_previous_trial()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if config.compile:
        torch.compiler.reset()
    # The search owns the folder (its lock); a retried trial takes over its own run folder.
    if workers > 1:
        from .ddp_trial import run_workers

        try:
            run_workers(config, space.resources, run_dir, space.objective_metrics, checked, quiet)
        except Exception:
            ended = recorded_out_of_memory_end(run_dir)
            if ended is None:
                raise   # a halving (config.yaml) is picked up by Tune's retry (max_failures)
            report(ended, None, None)   # ended, not failed: as one process
        return
    stopped: list[Any] = []   # the SystemExit's code (None is a code)
    ended = None
    with warnings.catch_warnings(), trial_output(run_dir, quiet):  # a fresh warning registry
        try:
            result = train(config, on_epoch=lambda r: report(r.metrics, r.best_metrics, r.best_epoch),
                           lock=False, checked=checked)
        except SystemExit as stop:   # Tune ended the trial in a report (ASHA, the search's end)
            stopped.append(stop.code)
        except OutOfMemoryEnd as end:
            ended = recorded_out_of_memory_end(run_dir, end)
    if ended is not None:
        # Ended, not failed: the study records it (PRUNED, infeasible) instead of ignoring it.
        report(ended, None, None)
        return
    if stopped:
        # Re-raised without the trainer's frames: its model and tensors are freed here, at once,
        # not whenever Tune drops the exception; the thread then ends well within the actor's
        # exit wait (`_wait_for_trial_threads`).
        raise SystemExit(stopped[0])
    if not reported and result.best_metrics:
        # Restored after its last epoch had finished: tell Tune the final state once.
        report_recorded(run_dir, report)


def recorded_out_of_memory_end(run_dir: Path, end: OutOfMemoryEnd | None = None) -> dict[str, Any] | None:
    """What a trial reports when its run ended out of memory with nothing smaller to try: its
    epochs, the peak and OOM_ENDED (the study's PRUNED, infeasible). `end`: the exception a
    one-process trial caught; without it the end recorded in status.json by the rank that ran
    out (an N-worker trial sees the exception only inside Ray Train's error). None when there
    is no such end."""
    status = read_json_dict(run_dir / "status.json")
    end = end or recorded_end(status)
    if end is None:
        return None
    return {"epoch": int(status.get("epochs_done") or 0), "peak_mem_gib": end.peak, OOM_ENDED: 1}


def report_recorded(run_dir: Path, report) -> None:
    """Report a run's recorded best epoch as its final result (nothing when it has none)."""
    best = read_json_dict(run_dir / "best_metrics.json")
    if best:
        epochs_done = int(read_json_dict(run_dir / "status.json").get("epochs_done") or best["epoch"])
        report({**best, "epoch": epochs_done}, best, int(best["epoch"]))

"""One Ray Tune trial: a plain function that runs the headernet_core trainer in-process.

The trial's run folder is Tune's own trial folder on the search's storage
(`<storage>/<search>/<trial>/`), so the standard run artifacts land beside Tune's files on
shared storage on any node. Each epoch reports the epoch's metrics plus `objective` (the best
epoch's value so far of the search metric) with a small Tune checkpoint; the real training
state is the run folder's `checkpoints/last.pt`, which a retried or restored trial resumes.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from headernet_core.artifacts import read_json_dict, write_json

from .space import SearchSpace

OBJECTIVE = "objective"
SCHEDULER_STOP = "scheduler_stop.json"  # in a trial folder: ASHA stopped it (tuning/scheduler.py)


def trial_dirname(trial: Any) -> str:
    """`t003_backbone=csn_lr_head=1.2e-03`: launch order, then the sampled values (short)."""
    index = str(trial.experiment_tag).split("_", 1)[0]
    index = f"{int(index):03d}" if index.isdigit() else trial.trial_id
    parts = [f"{key}={_short(value)}" for key, value in sorted(trial.config.items())]
    name = "_".join([f"t{index}", *parts])
    return "".join(c if c.isalnum() or c in "._=-" else "_" for c in name)[:120]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1e}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e3) else f"{value:.3g}"
    return str(value)


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(float(v))}


def run_trial(sampled: dict[str, Any], *, space: SearchSpace, search_dir: str,
              checked: dict | None = None) -> None:
    """The Tune function trainable (wrapped with `tune.with_parameters`). `checked`: the split
    CSVs the driver validated (`headernet_core.data.check_splits`), so a trial does not read
    and check every CSV row and clip header again.

    Trials reuse their Ray actor (`reuse_actors=True`): torch, the trainer and the backbone
    code are imported once per actor, not once per trial. Nothing a trial sets leaks into the
    next: the run folder comes from this trial's name (`get_trial_dir()` points at a different
    local folder after a reuse, but always ends in the trial's folder name), `train()` seeds
    every global RNG and sets the thread count, and the warning registry and compile caches
    are reset here."""
    import gc
    import warnings

    import ray
    import torch
    from ray import tune

    from headernet_core.features import CACHE_DIRNAME
    from headernet_core.train import train

    context = tune.get_context()
    run_name = Path(context.get_trial_dir()).name
    run_dir = Path(search_dir) / run_name
    gpu_ids = ray.get_gpu_ids()
    cpus = max(1, int(space.resources.get("cpu", 1)))
    if not gpu_ids:
        # A 0-GPU Ray trial still sees every GPU (Ray >= 2.4x): hide them so it cannot touch one.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    config = space.trial_config(sampled)
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    num_workers = min(config.num_workers, cpus - 1)
    config = config.replace(
        output_root=search_dir, run_name=run_name, progress=False,
        resume=resume, overwrite=not resume,
        cpu=not gpu_ids, gpus=list(range(len(gpu_ids))) if gpu_ids else None,
        num_workers=num_workers,
        # The trial's CPUs are shared by torch's intra-op threads and the loader threads.
        threads=config.threads or max(1, cpus - num_workers),
        # Every trial (and every search) on this storage shares one frozen-feature cache.
        feature_cache_dir=config.feature_cache_dir or str(Path(search_dir).parent / CACHE_DIRNAME),
        # The trial's best epoch is the objective's best epoch.
        select_metric=space.metric)
    node = ray.get_runtime_context().get_node_id()
    write_json(run_dir / "trial.json", {"trial_id": context.get_trial_id(), "name": run_name,
                                        "params": sampled, "node_id": node,
                                        "hostname": os.uname().nodename, "pid": os.getpid()})
    reported = False

    def report(row: dict[str, Any], best: dict[str, Any] | None, best_epoch: int | None) -> None:
        nonlocal reported
        metrics = _finite(row)
        metrics[OBJECTIVE] = float((best or {}).get(space.metric, float("nan")))
        metrics["best_epoch"] = best_epoch or 0
        with tempfile.TemporaryDirectory() as tmp:
            # The weights live in the run folder (last.pt); Tune's checkpoint only marks progress.
            Path(tmp, "progress.json").write_text(json.dumps({"epoch": int(row["epoch"]),
                                                              "run_dir": str(run_dir)}))
            tune.report({**metrics, "node_id": node}, checkpoint=tune.Checkpoint.from_directory(tmp))
        reported = True

    if (run_dir / SCHEDULER_STOP).is_file():
        # ASHA stopped this trial before the search was interrupted (Tune's saved state may
        # predate that): its decision stands, the trial is not trained further.
        report_recorded(run_dir, report)
        return
    # What an earlier trial of this actor left behind: its GPU memory, compiled graphs (a new
    # model would otherwise recompile until torch.compile's cache limit turns compiling off).
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if config.compile:
        torch._dynamo.reset()
    # The search owns the folder (its lock); a retried trial takes over its own run folder.
    with warnings.catch_warnings():  # a fresh registry: this trial's warnings are shown too
        result = train(config, on_epoch=lambda r: report(r.metrics, r.best_metrics, r.best_epoch),
                       lock=False, checked=checked)
    if not reported and result.best_metrics:
        # Restored after its last epoch had finished: tell Tune the final state once.
        report_recorded(run_dir, report)


def report_recorded(run_dir: Path, report) -> None:
    """Report a run's recorded best epoch as its final result (nothing when it has none)."""
    best = read_json_dict(run_dir / "best_metrics.json")
    if best:
        epochs_done = int(read_json_dict(run_dir / "status.json").get("epochs_done") or best["epoch"])
        report({**best, "epoch": epochs_done}, best, int(best["epoch"]))

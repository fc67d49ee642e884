"""A trial bigger than one process: a space's `resources: {workers: N, cpu: C, gpu: G}` runs
each trial as a Ray Train `TorchTrainer` of N DDP workers with C CPUs and G GPUs each (Ray's
pattern for Train inside Tune: a Tune function trainable that runs the TorchTrainer, whose
`TuneReportCallback` forwards rank 0's reports to Tune).

In Ray 2.60 the workers get their own placement group beside the trial's, so the trial function
itself reserves only a token (`TRIAL_TOKEN`: `{"cpu": 0}` alone raises, an empty bundle). The
token is 1 MiB of Ray's `memory` resource rather than a CPU fraction such as 0.01: with a CPU
token, N workers x C CPUs equal to a node's cores (2 x 1 on a 2-core machine, 2 x 4 on an
8-core box with 2 GPUs) would need cores + 0.01 and never be placed. The search caps its
concurrency at the groups the cluster can place (`placeable_trials`), and a group that cannot
be placed fails after `GROUP_START_TIMEOUT_S` with no controller retry (Ray's default retries
forever). Every worker runs `headernet_core.trainer.train` in Ray's process group; rank 0
writes the trial's run folder, as under torchrun. A failed or killed worker fails the trial;
Tune retries it (max_failures) and the retry resumes from the run folder's last.pt. A worker
that runs out of GPU memory writes the halved micro-batch to config.yaml before the trial fails
(the workers cannot agree on it in-process), and the retry starts every worker at it, with or
without last.pt (`tuning.trial.starting_point`); with no halving left (`OutOfMemoryEnd` in
status.json) the trial ends, not fails, as a one-process trial does (`recorded_out_of_memory_end`).

Tune ends a trial (ASHA's stop, or `max_t` reached) by ending its actor, which takes Ray
Train's controller with it before the controller removes the workers' placement group (whose
lifetime is the search's job): the group would hold its CPUs/GPUs until the search ends, and no
later trial could be placed. Rank 0 therefore records the group's id in the run folder
(`WORKERS_PG`), and the driver's `WorkerGroupCleanup` callback removes it when the trial ends,
which also ends workers still in an epoch. No worker then records an ASHA stop, so the callback
waits for rank 0's process to end, then writes `stopped` and draws the plots from the run folder.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

from headernet_core.artifacts import read_json_dict, write_text
from headernet_core.config import TrainConfig

TRIAL_TOKEN = {"cpu": 0, "memory": 2**20}
GROUP_START_TIMEOUT_S = 60
GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"   # Ray Train's documented switch
STOP_WAIT_S = 30.0
WORKERS_PG = Path("ray_train") / "workers_placement_group"   # in a run folder: the group's id


def workers_of(resources: dict[str, float]) -> int:
    return int(resources.get("workers", 1))


def placeable_trials(resources: dict[str, float], cluster: dict[str, float]) -> int:
    """How many N-worker trials the cluster's total resources can hold at once."""
    workers = workers_of(resources)
    fits = [int((cluster.get("CPU", 0) + 1e-9) // (workers * resources.get("cpu", 1)))]
    if resources.get("gpu", 0) > 0:
        fits.append(int((cluster.get("GPU", 0) + 1e-9) // (workers * resources["gpu"])))
    return min(fits)


def run_workers(config: TrainConfig, resources: dict[str, float], run_dir: Path, metrics: Sequence[str],
                checked: Any, quiet: bool) -> None:
    """Train `config` (already set up for the trial) on N workers; returns when they finish."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    os.environ.setdefault(GROUP_START_TIMEOUT_ENV, str(GROUP_START_TIMEOUT_S))
    gpu = resources.get("gpu", 0)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": config.to_dict(), "run_dir": str(run_dir), "checked": checked,
                           "quiet": quiet, "metrics": list(metrics)},
        scaling_config=ScalingConfig(num_workers=workers_of(resources), use_gpu=gpu > 0,
                                     resources_per_worker={"CPU": resources.get("cpu", 1),
                                                           **({"GPU": gpu} if gpu > 0 else {})}),
        torch_config=TorchConfig(backend="nccl" if gpu > 0 else "gloo"),
        run_config=RunConfig(name="ray_train", storage_path=str(run_dir), callbacks=[TuneReportCallback()],
                             failure_config=FailureConfig(max_failures=0, controller_failure_limit=0)))
    trainer.fit()


def worker_loop(loop: dict[str, Any]) -> None:
    """One DDP worker (Ray Train's process group is up): the trainer, reporting every epoch."""
    import ray.train

    from headernet_core.trainer import train

    from .trial import SCHEDULER_STOP, trial_metrics, trial_output

    context = ray.train.get_context()
    run_dir = Path(loop["run_dir"])
    group = ray.util.get_current_placement_group()
    if context.get_world_rank() == 0 and group is not None:
        write_text(run_dir / WORKERS_PG, group.id.hex())
    os.environ["LOCAL_RANK"] = str(context.get_local_rank())
    os.environ["LOCAL_WORLD_SIZE"] = str(context.get_local_world_size())
    config = TrainConfig.from_dict(loop["config"], source="trial")
    if config.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    resume = (run_dir / "checkpoints" / "last.pt").is_file()   # a retried trial continues
    config = config.replace(resume=resume, overwrite=not resume)

    node = ray.get_runtime_context().get_node_id()

    def on_epoch(report) -> bool:
        ray.train.report(trial_metrics(report.metrics, report.best_metrics, report.best_epoch,
                                       loop["metrics"], node, config.epochs))
        # ASHA's stop, if it has been recorded by now (rank 0's answer holds for all ranks)
        return (run_dir / SCHEDULER_STOP).is_file()

    with trial_output(run_dir, loop["quiet"] and context.get_world_rank() == 0):
        train(config, on_epoch=on_epoch, lock=False, checked=loop["checked"])


def finish_stopped(run_dir: Path, wait_s: float = STOP_WAIT_S) -> bool:
    """A trial ASHA stopped (scheduler_stop.json) whose workers were ended mid-epoch: once rank 0's
    process is gone, record `stopped` at its last completed epoch and draw its plots. Returns
    whether it did."""
    import pandas as pd

    from headernet_core.config import load_yaml_mapping
    from headernet_core.locks import hostname, owner_alive
    from headernet_core.plots import write_plots
    from headernet_core.status import read_status_record, write_status

    from .trial import SCHEDULER_STOP

    record = read_status_record(run_dir)
    if not (run_dir / SCHEDULER_STOP).is_file() or record.get("state") != "running":
        return False
    deadline = time.monotonic() + wait_s
    while record.get("host") == hostname() and owner_alive(record, None) and time.monotonic() < deadline:
        time.sleep(0.2)
        record = read_status_record(run_dir)
    if record.get("state") != "running":
        return False   # rank 0 recorded its own end meanwhile
    history = pd.read_csv(run_dir / "metrics_epoch.csv") if (run_dir / "metrics_epoch.csv").is_file() else None
    epochs = 0 if history is None else int(history["epoch"].max())
    write_status(run_dir, "stopped", epochs, world_size=int(record.get("world_size", 1)))
    if (history is not None and (run_dir / "config.yaml").is_file()
            and load_yaml_mapping(run_dir / "config.yaml").get("plots", True)):
        predictions = run_dir / "val_predictions.csv"
        labels = prob = None
        if predictions.is_file():
            frame = pd.read_csv(predictions)
            labels, prob = frame["label"].to_numpy(), frame["prob_header"].to_numpy()
        best = read_json_dict(run_dir / "best_metrics.json")
        write_plots(run_dir / "plots", history, labels, prob, best.get("epoch"))
    return True


def release_workers(run_dir: Path) -> None:
    """Remove the trial's worker placement group (ending any worker still in it)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    path = run_dir / WORKERS_PG
    if not path.is_file():
        return
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(path.read_text().strip())))
    with contextlib.suppress(Exception):   # already removed by Ray Train's own shutdown
        remove_placement_group(group)
    path.unlink(missing_ok=True)


def worker_group_cleanup(search_dir: Path):
    """The driver's Tune callback for N-worker trials: when a trial ends, fails or is retried,
    its worker group is removed; a trial ASHA stopped is then recorded `stopped`."""
    from ray.tune import Callback

    class WorkerGroupCleanup(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            run_dir = search_dir / Path(trial.path).name
            release_workers(run_dir)
            finish_stopped(run_dir)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            release_workers(search_dir / Path(trial.path).name)

        on_trial_recover = on_trial_error

    return WorkerGroupCleanup()

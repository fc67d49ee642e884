"""The cores of ended trials go to the CPU search's last trials (tuning/spare_cpus.py)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import headernet_core.threads
import tuning.spare_cpus
from tuning.space import load_space
from tuning.spare_cpus import SPARE_FILE, SpareCpus, SpareCpuTaker


def trials(*statuses):
    return [SimpleNamespace(status=s) for s in statuses]


def written(folder: Path):
    path = folder / SPARE_FILE
    return json.loads(path.read_text())["cpus_per_trial"] if path.exists() else None


def test_the_share_grows_only_once_no_trial_is_left_to_start(tmp_path):
    callback = SpareCpus(tmp_path, num_samples=4, max_concurrent=2, cpus=2, machine_cpus=8)
    callback.setup()
    now = trials("TERMINATED", "RUNNING", "RUNNING")          # one still to start
    callback.on_trial_complete(1, now, now[0])
    assert written(tmp_path) is None
    now = trials("TERMINATED", "TERMINATED", "RUNNING", "RUNNING")   # every slot still trains
    callback.on_trial_start(2, now, now[3])
    assert written(tmp_path) is None
    now = trials("TERMINATED", "TERMINATED", "RUNNING", "RUNNING")
    callback.on_trial_complete(3, now, now[3])                 # one left: it gets both slots
    assert written(tmp_path) == 4
    now = trials("TERMINATED", "TERMINATED", "RUNNING", "PENDING")   # a retried trial comes back
    callback.on_trial_start(4, now, now[3])
    assert written(tmp_path) == 2
    callback.on_trial_error(5, now, now[3])
    assert written(tmp_path) == 4
    callback.on_experiment_end(now)
    assert not (tmp_path / SPARE_FILE).exists()


def test_the_share_never_exceeds_the_machine(tmp_path):
    """4 slots of 1 CPU on a 2-core machine: Ray runs 2 trials at once, and those 2 must not
    each take 2 threads when the others have ended."""
    callback = SpareCpus(tmp_path, num_samples=6, max_concurrent=4, cpus=1, machine_cpus=2)
    now = trials("TERMINATED", "TERMINATED", "TERMINATED", "TERMINATED", "RUNNING", "RUNNING")
    callback.on_trial_complete(1, now, now[3])
    assert written(tmp_path) is None   # 2 cores for 2 trials: 1 each, as they have
    now[4].status = "TERMINATED"
    callback.on_trial_complete(2, now, now[4])
    assert written(tmp_path) == 2


def test_a_resumed_search_starts_from_the_trials_own_cpus(tmp_path):
    """Tune pickles its callbacks with the search: the restored one has written nothing yet,
    and a share left by the interrupted run is removed before any trial reads it."""
    callback = SpareCpus(tmp_path, num_samples=2, max_concurrent=2, cpus=1, machine_cpus=2)
    now = trials("TERMINATED", "RUNNING")
    callback.on_trial_complete(1, now, now[0])
    assert written(tmp_path) == 2
    restored = pickle.loads(pickle.dumps(callback))
    restored.setup()
    assert written(tmp_path) is None and restored.written == 1
    restored.on_trial_complete(2, now, now[0])
    assert written(tmp_path) == 2


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Machine:
    """A fake clock and /proc/stat: `run(seconds, idle)` advances both (idle: cores idle)."""

    def __init__(self, monkeypatch, cores: int = 2):
        self.now, self.idle, self.total, self.cores, self.reads = 0.0, 0.0, 0.0, cores, 0
        monkeypatch.setattr(headernet_core.threads, "usable_cpus", lambda: list(range(cores)))
        monkeypatch.setattr(headernet_core.threads, "cpu_times", self.cpu_times)

    def cpu_times(self):
        self.reads += 1
        return None if self.idle is None else (self.idle, self.total)

    def run(self, seconds: float, idle: float | None) -> None:
        self.now += seconds
        if idle is None:
            self.idle = None
            return
        self.idle = (self.idle or 0.0) + idle * seconds * 100
        self.total += self.cores * seconds * 100


def share(folder: Path, cpus: int) -> None:
    (folder / SPARE_FILE).write_text(json.dumps({"cpus_per_trial": cpus}))


def test_a_trial_takes_the_share_mid_epoch_for_cores_idle_beside_it(tmp_path, monkeypatch, one_thread):
    machine, lines = Machine(monkeypatch), []
    take = SpareCpuTaker(tmp_path, 1, 0, log=lines.append, clock=lambda: machine.now)
    take()                                        # no share written: the trial's own cpus
    assert torch.get_num_threads() == 1 and machine.reads == 0
    share(tmp_path, 2)
    machine.run(0.1, idle=1.0)
    take()                                        # read at most every CHECK_S
    assert machine.reads == 0
    machine.run(0.4, idle=1.0)
    take()                                        # the share is new: watch the cores, no pause
    assert torch.get_num_threads() == 1 and machine.reads == 1
    machine.run(0.5, idle=0.95)                   # the other core stayed idle while it trained
    take()
    assert torch.get_num_threads() == 2 and lines == [
        "cpu threads: 1 -> 2 (2 cores per trial now that fewer trials run, 0.9 idle beside this trial)"]
    for _ in range(4):
        machine.run(0.5, idle=0.0)
        take()                                    # the same share: nothing more to measure
    assert machine.reads == 2 and torch.get_num_threads() == 2
    share(tmp_path, 1)                            # a retried trial started: give them back at once
    machine.run(0.5, idle=0.0)
    take()
    assert torch.get_num_threads() == 1 and lines[-1] == \
        "cpu threads: 2 -> 1 (1 cores per trial: a trial started again)"


def test_busy_cores_are_watched_until_free_and_loader_threads_keep_theirs(tmp_path, monkeypatch, one_thread):
    machine, lines = Machine(monkeypatch, cores=4), []
    take = SpareCpuTaker(tmp_path, 1, 1, log=lines.append, clock=lambda: machine.now)
    share(tmp_path, 4)
    take()
    machine.run(0.5, idle=0.5)                    # another process (the summary's imports) holds them
    take()
    assert torch.get_num_threads() == 1 and lines == [] and machine.reads == 2
    machine.run(0.2, idle=3.0)
    take()                                        # one window per CHECK_S
    assert machine.reads == 2
    machine.run(0.3, idle=1.0)                    # the window since the busy one: one core free
    take()
    assert torch.get_num_threads() == 2 and machine.reads == 3
    machine.run(0.5, idle=2.0)
    take()                                        # 4 cores less 1 loader thread: 3, and no more
    assert torch.get_num_threads() == 3 and len(lines) == 2
    for _ in range(3):
        machine.run(0.5, idle=2.0)
        take()
    assert machine.reads == 4                     # done watching: the share is taken
    share(tmp_path, 8)
    for _ in range(3):                            # no /proc/stat: stays as it is
        machine.run(0.5, idle=None)
        take()
    assert torch.get_num_threads() == 3


def run_one_epoch_trial(tmp_path, monkeypatch, space):
    """run_trial with a trainer that reports one epoch, outside Ray."""
    import ray
    from ray import tune

    import headernet_core.trainer
    from tuning.trial import run_trial

    folder = tmp_path / "t001_lr_head=1e-3"
    folder.mkdir()
    context = SimpleNamespace(get_trial_dir=lambda: str(folder), get_trial_id=lambda: "abc")
    monkeypatch.setattr(tune, "get_context", lambda: context)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: None)
    monkeypatch.setattr(ray, "get_gpu_ids", list)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))
    machine = Machine(monkeypatch)
    monkeypatch.setattr(headernet_core.threads, "cpu_times", lambda: (machine.run(0.5, idle=1.0),
                                                                      machine.cpu_times())[1])
    monkeypatch.setattr(tuning.spare_cpus, "CHECK_S", 0.0)

    def one_epoch(config, on_epoch, between_batches=None, **kwargs):
        for _ in range(3):   # batches: read the share, watch the cores, take them
            if between_batches is not None:
                between_batches()
        on_epoch(SimpleNamespace(metrics={"epoch": 1, "val_f1": 0.5}, best_metrics={"val_f1": 0.5},
                                 best_epoch=1))
        return SimpleNamespace(best_metrics={"val_f1": 0.5})
    monkeypatch.setattr(headernet_core.trainer, "train", one_epoch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    (tmp_path / SPARE_FILE).write_text(json.dumps({"cpus_per_trial": 2}))
    run_trial({"lr_head": 1e-3}, space=space, search_dir=str(tmp_path))


def test_a_cpu_trial_takes_the_spare_cores_between_batches(tmp_path, monkeypatch, one_thread):
    run_one_epoch_trial(tmp_path, monkeypatch, load_space("demo"))
    assert torch.get_num_threads() == 2


def test_threads_the_space_fixes_are_kept(tmp_path, monkeypatch, one_thread):
    run_one_epoch_trial(tmp_path, monkeypatch, load_space("demo", sets=["trainer.threads=1"]))
    assert torch.get_num_threads() == 1

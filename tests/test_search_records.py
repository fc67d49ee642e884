"""How a trial's state is read back after a search: the trainer's status.json, the scheduler's
stop record and whether the search was interrupted decide what the summary says."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from tuning.search import collect_records
from tuning.trial import SCHEDULER_STOP
from tuning.space import load_space


def trial(root: Path, name: str, state: str | None, epochs: int, error=None, asha_stopped=False):
    folder = root / name
    folder.mkdir()
    if asha_stopped:
        (folder / SCHEDULER_STOP).write_text(json.dumps({"epoch": epochs}))
    if state is not None:
        (folder / "status.json").write_text(json.dumps({"state": state, "epochs_done": epochs}))
        (folder / "best_metrics.json").write_text(json.dumps({"epoch": 1, "val_f1": 0.5,
                                                              "checkpoint": "checkpoints/best_epoch_1.pt"}))
    return SimpleNamespace(path=str(folder), error=error, config={"lr_head": 1e-3})


@pytest.mark.parametrize("interrupted", [False, True])
def test_states(tmp_path, interrupted):
    space = load_space("demo")
    # Tune calls the cut and the ASHA-stopped trial both TERMINATED: only the record differs
    results = [trial(tmp_path, "t001_a", "finished", 4),
               trial(tmp_path, "t002_b", "stopped", 1, asha_stopped=True),
               trial(tmp_path, "t003_c", "stopped", 2),     # Ctrl-C cut it short
               trial(tmp_path, "t004_d", None, 0),          # never started
               trial(tmp_path, "t005_e", "failed", 1, error=RuntimeError("boom\nCUDA out of memory"))]
    records = collect_records(space, results, interrupted)
    states = [r.status for r in records]
    assert states == ["finished", "stopped_early", "interrupted" if interrupted else "stopped_early",
                      "interrupted" if interrupted else "pending", "failed"]
    assert records[4].error == "CUDA out of memory"
    assert [r.epochs_run for r in records] == [4, 1, 2, 0, 1]
    assert records[0].checkpoint is None  # the weights file does not exist: no dangling path


def test_a_trials_params_are_its_own_record_not_tunes_last_report(tmp_path):
    """Tune's result.config is the config of the trial's last report: for a trial that failed
    before it reported on a reused actor, that was another trial's. The params the trial wrote
    to its trial.json win; Tune's are the fallback for a trial that never started."""
    started = trial(tmp_path, "t001_a", "finished", 1)
    (tmp_path / "t001_a" / "trial.json").write_text(json.dumps({"params": {"lr_head": 2e-3}}))
    never = trial(tmp_path, "t002_b", None, 0, error=RuntimeError("reset failed"))
    records = collect_records(load_space("demo"), [started, never], interrupted=False)
    assert [r.params for r in records] == [{"lr_head": 2e-3}, {"lr_head": 1e-3}]


def test_asha_records_the_trials_it_stops_before_max_t(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from tuning.scheduler import RecordingASHA

    asha = RecordingASHA(tmp_path, time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2)
    asha.set_search_properties("objective", "max")
    trials = [SimpleNamespace(trial_id=f"id{i}", relative_logdir=f"t00{i}_x", config={}) for i in range(3)]
    for t in trials:
        (tmp_path / t.relative_logdir).mkdir()
        asha.on_trial_add(None, t)
    actions = [asha.on_trial_result(None, t, {"epoch": 1, "objective": v})
               for t, v in zip(trials, (0.9, 0.8, 0.1))]
    stopped = [t.relative_logdir for t in trials if (tmp_path / t.relative_logdir / SCHEDULER_STOP).is_file()]
    assert stopped == [t.relative_logdir for t, a in zip(trials, actions) if a == TrialScheduler.STOP]
    assert "t000_x" not in stopped and "t002_x" in stopped  # the best goes on, the worst stops
    assert json.loads((tmp_path / "t002_x" / SCHEDULER_STOP).read_text())["epoch"] == 1
    # reaching max_t is a normal end, not an early stop
    assert asha.on_trial_result(None, trials[0], {"epoch": 4, "objective": 0.9}) == TrialScheduler.STOP
    assert not (tmp_path / "t000_x" / SCHEDULER_STOP).exists()


def test_a_trial_asha_stopped_is_not_trained_again_after_a_resume(tmp_path, monkeypatch):
    """Tune's saved state may predate ASHA's stop (a kill between the two): the restored trial
    must keep ASHA's decision, report its recorded best once and not train."""
    import ray
    from ray import tune

    import headernet_core.trainer
    from tuning.trial import run_trial

    folder = tmp_path / "t002_lr_head=1e-3"
    folder.mkdir()
    (folder / SCHEDULER_STOP).write_text(json.dumps({"epoch": 1}))
    (folder / "status.json").write_text(json.dumps({"state": "running", "epochs_done": 1}))
    (folder / "best_metrics.json").write_text(json.dumps({"epoch": 1, "val_f1": 0.25, "val_loss": 0.7}))
    reports = []
    context = SimpleNamespace(get_trial_dir=lambda: str(folder), get_trial_id=lambda: "abc")
    monkeypatch.setattr(tune, "get_context", lambda: context)
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: reports.append(metrics))
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "node"))

    def must_not_train(*args, **kwargs):
        raise AssertionError("an ASHA-stopped trial was trained again")
    monkeypatch.setattr(headernet_core.trainer, "train", must_not_train)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    run_trial({"lr_head": 1e-3}, space=load_space("demo"), search_dir=str(tmp_path))
    assert len(reports) == 1 and reports[0]["epoch"] == 1 and reports[0]["objective"] == 0.25


def test_a_restored_asha_refills_its_rungs_from_the_restored_trials(tmp_path):
    """Tune saves no scheduler state: without the refill, the first trial to reach a rung
    after a resume passes it whatever its score."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tuning.ray_compat import TUNE_RESULT_FILE
    from tuning.scheduler import RecordingASHA

    def restored(name: str, objectives: list[float]) -> Trial:
        trial = Trial("run_trial", stub=True, trial_id=name)
        trial.relative_logdir = name
        (tmp_path / name).mkdir()
        (tmp_path / name / TUNE_RESULT_FILE).write_text("".join(
            json.dumps({"epoch": epoch, "objective": value, "trial_id": name}) + "\n"
            for epoch, value in enumerate(objectives, 1))
            # a damaged log's lines that parse but ASHA cannot compare: left out, not a traceback
            + '{"epoch": "1", "objective": 0.1}\n{"epoch": 1, "objective": null}\n{"epoch": true, "objective": 0}\n')
        return trial

    asha = RecordingASHA(tmp_path, time_attr="epoch", max_t=4, grace_period=1, reduction_factor=2,
                         metric="objective", mode="max")
    for trial in (restored("t001", [0.9, 0.9]), restored("t002", [0.8])):
        asha.on_trial_add(None, trial)
    assert not list(tmp_path.glob("*/" + SCHEDULER_STOP))   # the replay records no stop
    new = Trial("run_trial", stub=True, trial_id="t003")
    asha.on_trial_add(None, new)                # a new trial has no folder yet
    new.relative_logdir = "t003"
    (tmp_path / "t003").mkdir()
    assert asha.on_trial_result(None, new, {"epoch": 1, "objective": 0.5}) == TrialScheduler.STOP
    assert json.loads((tmp_path / "t003" / SCHEDULER_STOP).read_text())["epoch"] == 1
    better = Trial("run_trial", stub=True, trial_id="t004")
    asha.on_trial_add(None, better)
    assert asha.on_trial_result(None, better, {"epoch": 1, "objective": 0.95}) == TrialScheduler.CONTINUE


def test_a_reused_actor_frees_the_previous_trial_without_scanning_the_imports():
    """collect_previous_trial: the first trial of an actor freezes what imports created; a
    later one collects the previous trial's reference cycles (only those are scanned)."""
    import subprocess
    import sys

    code = """
import gc, weakref
from tuning.trial import collect_previous_trial
collect_previous_trial()
assert gc.get_freeze_count() > 0
class Model: pass
model = Model(); model.self = model          # a cycle, as a trial's modules and optimizer make
alive = weakref.ref(model); del model
collect_previous_trial()
assert alive() is None
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_trial_actor_lets_tune_wait_for_the_previous_trials_thread(monkeypatch):
    """Tune fails the next trial of a reused actor whose previous trial's thread is still
    ending after TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default; seen under load in a cluster
    test): every trial sets a longer wait in its own actor process (a cluster's actors do not
    inherit the driver's environment), and a value already there stands."""
    import ray.tune.trainable.function_trainable as function_trainable

    from tuning.trial import TRIAL_THREAD_WAIT, register_trial_thread

    name, value = TRIAL_THREAD_WAIT
    assert name in Path(function_trainable.__file__).read_text(), "Ray no longer reads " + name
    monkeypatch.delenv(name, raising=False)
    register_trial_thread()
    assert os.environ[name] == value and float(value) >= 30
    monkeypatch.setenv(name, "7")
    register_trial_thread()
    assert os.environ[name] == "7"


def test_a_trial_actor_waits_for_its_trial_thread_at_exit(tmp_path):
    """The process exits while its trial thread still runs torch ops (as when Tune ends an
    actor whose stopped trial is still unwinding): it waits for the thread, which finishes its
    work, and exits cleanly instead of aborting ("terminate called without an active
    exception" when a daemon thread runs torch during finalization)."""
    import subprocess
    import sys

    done = tmp_path / "thread_finished"
    code = f"""
import threading, time, torch
from tuning.trial import register_trial_thread
torch.set_num_threads(1)
started = threading.Event()
def trial():
    register_trial_thread()
    x = torch.randn(400, 400)
    started.set()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        (x @ x).relu_()
    open({str(done)!r}, "w").close()
threading.Thread(target=trial, daemon=True).start()   # Tune's trial threads are daemons
started.wait()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0 and "terminate" not in out.stderr, out.stderr[-2000:]
    assert done.is_file()   # the thread ran to its end before the process exited


def end_actor_during_trial(tmp_path, imports: str, trial_body: str, done: Path) -> str:
    """Run `trial_body` (statements, after `register_trial_thread()`) on a Tune-like trial
    thread of a Ray actor that is ended with `__ray_terminate__` meanwhile, as Tune ends its
    actors at the end of a search; wait for `done` to exist. `imports` run in the actor before
    the thread starts (as a real trial has imported everything long before it ends: an import
    on a thread while the interpreter shuts down fails by itself). Returns the driver's console."""
    import os
    import subprocess
    import sys
    import textwrap

    code = f"""
import os, time
from tuning.cluster import start_local_ray
start_local_ray()
import ray

@ray.remote(num_cpus=1)
class Actor:
    def start_trial(self):
        import threading
        import tuning.trial
        from tuning.trial import register_trial_thread
        # the wait itself is under test (0 s fails), not whether its 3 s suffice on a machine
        # as loaded as the parallel suite makes it
        tuning.trial.EXIT_WAIT_S = 20
{textwrap.indent(textwrap.dedent(imports), " " * 8)}
        def trial():
            register_trial_thread()
{textwrap.indent(textwrap.dedent(trial_body), " " * 12)}
        threading.Thread(target=trial, daemon=True).start()

actor = Actor.remote()
ray.get(actor.start_trial.remote())
actor.__ray_terminate__.remote()
deadline = time.monotonic() + 40
while time.monotonic() < deadline and not os.path.exists({str(done)!r}):
    time.sleep(0.2)
time.sleep(1)   # the actor's exit, and Ray's log lines about it, reach this driver
ray.shutdown()
"""
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-2000:]
    return console


@pytest.mark.slow
def test_a_ray_actor_ended_by_tune_lets_its_trial_thread_finish_and_draw(tmp_path):
    """Tune ends an actor with `__ray_terminate__` (the end of a search) while its trial thread
    runs torch, then draws the stopped trial's plots on its way out (the trainer draws them when
    a run ends): the actor's exit waits for the thread, so the plots are written and nothing
    aborts. Without the wait, Ray printed "*** SIGABRT received ***" and its C++ stack, and a
    first version put a C++ terminate from matplotlib's font code on the console. An actor Tune
    drops instead gets SIGTERM and exits at once: the summary draws those trials' plots
    (tuning.summary.complete_trial_plots)."""
    folder, done = tmp_path / "plots", tmp_path / "thread_finished"
    console = end_actor_during_trial(tmp_path, """
        from pathlib import Path
        import numpy as np
        import torch
        from headernet_core.trainer import RunPlots, RunState   # matplotlib: on the thread, as in a trial
    """, f"""
        x = torch.randn(400, 400)
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            (x @ x).relu_()
        history = [{{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "val_f1": 0.5 + e / 10}}
                   for e in (1, 2)]
        plots = RunPlots(Path({str(folder)!r}))
        plots.best = (2, np.array([0, 1, 0, 1, 1]), np.array([0.2, 0.7, 0.4, 0.9, 0.6]))
        plots.draw(RunState(epoch=2, history=history, best_epoch=2))
        open({str(done)!r}, "w").close()
    """, done)
    assert done.is_file(), console[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["loss.png", "metrics.png", "pr.png", "roc.png"]
    assert "SIGABRT" not in console and "terminate" not in console, console[-2000:]


@pytest.mark.slow
def test_a_quiet_search_quiets_tune_in_every_trial_actor_from_its_start(tmp_path):
    """`start_ray(quiet=True)` gives the job QUIET_HOOK, which Ray runs in every worker as it
    starts, Tune's trial actors included (they carry their own runtime env): Tune's INFO lines
    logged there before a trial's code runs (a resumed trial's "Restored on ... from
    checkpoint") stay off the console. A verbose search keeps them."""
    import os
    import subprocess
    import sys

    code = """
import logging, sys
from tuning.search import start_ray
start_ray(None, quiet=sys.argv[1] == "quiet")
import ray

@ray.remote(num_cpus=1, runtime_env={"env_vars": {"PL_DISABLE_FORK": "1"}})   # as Tune's actors
class Actor:
    def level(self):
        return logging.getLogger("ray.tune.trainable.trainable").getEffectiveLevel()

print("LEVEL", ray.get(Actor.remote().level.remote()))
ray.shutdown()
"""
    repo = Path(__file__).resolve().parents[1]
    levels = {}
    for mode in ("quiet", "verbose"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                             cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)}, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        [line] = [x for x in out.stdout.splitlines() if x.startswith("LEVEL ")]
        levels[mode] = int(line.split()[1])
    assert levels == {"quiet": logging.WARNING, "verbose": logging.INFO}, levels

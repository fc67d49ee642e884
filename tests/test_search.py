"""The search service end to end on tiny CPU trials: bad input before Ray, a real search with a
failing trial, a full disk, resume after a hard kill and after SIGTERM, a frozen search, a
killed trial retried, and the README's demo search (two nodes: tests/test_cluster.py)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import conftest
import pandas as pd
import pytest
import yaml
from conftest import read_json, trial_dirs, wait_for

from tuning.console import STOP_LINE
from tuning.summary import FINAL_HEADING
from tuning.search import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


ASHA = {"type": "asha", "grace_period": 1, "reduction_factor": 2}


def write_space(tmp_path: Path, tiny_data, **sections) -> Path:
    """conftest's tiny space, 3 epochs a trial and ASHA."""
    sections["trainer"] = {"epochs": 3, **sections.get("trainer", {})}
    sections.setdefault("scheduler", ASHA)
    return conftest.write_space(tmp_path, tiny_data, **sections)


def planted_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` when it is loaded (what an attacker would plant)."""
    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    import pickle
    return pickle.dumps(Planted())


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


def start_search(space: Path, cwd: Path, *args: str) -> subprocess.Popen:
    """`python -m tuning.search --space <space> <args>` in its own session (a test can signal
    or kill its whole process group), stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "tuning.search", "--space", str(space), *args], cwd=cwd,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def running_trial(proc: subprocess.Popen, search_dir: Path, epochs: int, *, not_pid: int | None = None
                  ) -> tuple[Path, dict, pd.DataFrame]:
    """Once a trial of the search `proc` runs has written `epochs` epochs and still runs (in a
    process other than `not_pid`): its folder, its status.json record and those epochs' rows."""
    def found():
        for folder in trial_dirs(search_dir):
            record = read_json(folder / "status.json")
            if record.get("epochs_done", 0) >= epochs and record.get("state") == "running" \
                    and record.get("pid") != not_pid:
                return folder, record, pd.read_csv(folder / "metrics_epoch.csv").iloc[:epochs]
        return None
    return wait_for(proc, found, f"a trial running past epoch {epochs}")


# --- bad input: one line, exit 2, Ray never started -----------------------------------------
def test_bad_inputs_fail_before_ray(tiny_data, tmp_path, capsys):
    import ray
    space = write_space(tmp_path, tiny_data)
    cases = [
        (["--space", str(space), "--train_csv", str(tmp_path / "nope.csv")], "nope.csv"),
        (["--space", str(space), "--set", "resources.gpu=1", "--set", "cpu=false"], "GPU"),
        (["--space", str(space), "--set", "backbone=vmae", "--set", "vmae_variant=base",
          "--set", f"checkpoint_root={tmp_path / 'ckpts'}"], "VideoMAEv2-Base"),
        (["--space", str(space), "--resume"], "nothing to resume"),
        (["--space", str(space), "--num_samples", "0"], "num_samples"),
        (["--space", str(space), "--address", "127.0.0.1:1"], "--storage_path"),
        (["--space", "no_such_space"], "no_such_space"),
    ]
    for args, fragment in cases:
        code, err = run_cli(args, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, err)
        assert not ray.is_initialized()
    assert not (tmp_path / "out" / "s").exists()


# --- a real search --------------------------------------------------------------------------
def test_search_end_to_end_with_a_failing_trial(tiny_data, tmp_path, capsys, monkeypatch):
    # lr_backbone 1e38 passes every check before Ray (a trainer may take any finite LR), then
    # diverges in its first epoch: those trials fail inside Ray.
    space = write_space(tmp_path, tiny_data, search={
        "lr_backbone": {"choice": [1e-3, 1e38]}, "lr_head": {"loguniform": [3e-4, 3e-3]}},
        budget={"num_samples": 5, "max_concurrent": 2, "seed": 3})
    from tuning import diskspace   # a disk with 1 KiB free: the trials still to run cannot fit
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 1024)
    monkeypatch.setattr(diskspace, "MIN_FREE_BYTES", 0)
    monkeypatch.setattr(diskspace, "reserve_bytes", lambda *args: 0)   # warned, never stopped
    main(["--space", str(space)])
    import ray
    assert not ray.is_initialized()  # stopped beside the summary, and waited for before returning
    captured = capsys.readouterr()
    console = captured.out.splitlines()   # a failed trial is one event line
    assert any("failed: " in line and "diverged" in line for line in console), console
    disk = [line for line in captured.err.splitlines() if line.startswith("warning: the search's storage")]
    assert len(disk) == 1 and "1.0 KiB free" in disk[0], captured.err[-3000:]
    search_dir = tmp_path / "out" / "s"
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert summary["state"] == "finished" and len(summary["trials"]) == 5
    failed = [t for t in summary["trials"] if t["status"] == "failed"]
    ok = [t for t in summary["trials"] if t["status"] in ("finished", "stopped_early")]
    assert failed and ok, summary["counts"]
    assert all("diverged" in t["error"] for t in failed)
    for trial in ok:  # a trial that ran every epoch is finished, even though ASHA ended it at max_t
        assert (trial["status"] == "finished") == (trial["epochs_run"] == 3), trial
    assert all(t["params"]["lr_backbone"] == 1e38 for t in failed)
    assert_study_states(search_dir, summary)

    for trial in ok:
        folder = search_dir / trial["name"]
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["lr_head"] == pytest.approx(trial["params"]["lr_head"])
        assert config["num_frames"] == 4
        for name in ("metrics_epoch.csv", "best_metrics.json", "val_predictions.csv"):
            assert (folder / name).is_file(), name
        best = json.loads((folder / "best_metrics.json").read_text())
        # the objective is the best epoch's value, not the last epoch's
        metrics = pd.read_csv(folder / "metrics_epoch.csv")
        assert trial["objective"] == pytest.approx(metrics["val_f1"].max())
        assert (folder / best["checkpoint"]).is_file()
        # per trial only the best and the last checkpoint are kept
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == \
            sorted([Path(best["checkpoint"]).name, "last.pt"])
    for name in ("trials.csv", "summary.md"):
        assert (search_dir / name).is_file()

    # the best trial's checkpoint reproduces its reported metric
    from headernet_core.evaluation import evaluate
    best = summary["best_trial"]
    metrics, _ = evaluate(best["checkpoint_abs"], tiny_data["val_csv"])
    assert metrics["val_f1"] == pytest.approx(best["objective"], abs=1e-6)

    # the name now holds a finished search: a new one must not reuse it
    code, err = run_cli(["--space", str(space)], capsys)
    assert code == 2 and "finished search" in err

    # the signed copies of Tune's real state files: each damaged one is named, nothing changes
    import shutil
    manifest = json.loads((search_dir / ".resume" / "manifest.json").read_text())["files"]
    for pattern in ("tuner.pkl", "experiment_state-*", "searcher-state-*", "search_gen_state-*"):
        [name] = [n for n in manifest if Path(n).match(pattern)]
        damaged = tmp_path / "damaged" / "s"
        shutil.rmtree(damaged.parent, ignore_errors=True)
        shutil.copytree(search_dir, damaged)
        # as if it had been interrupted (a finished search is not resumed at all)
        record = damaged / "search_summary.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "state": "interrupted"}))
        blob = damaged / ".resume" / manifest[name]
        blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])
        before = {p: p.stat().st_mtime_ns for p in damaged.rglob("*")}
        code, err = run_cli(["--space", str(space), "--resume", "--storage_path", str(damaged.parent)], capsys)
        assert code == 2 and f"signed copy of {name}" in err and "--name" in err, err
        assert {p: p.stat().st_mtime_ns for p in damaged.rglob("*")} == before


def test_a_search_whose_every_trial_failed_exits_non_zero(tiny_data, tmp_path, capsys):
    space = write_space(tmp_path, tiny_data, search={"lr_head": {"loguniform": [3e-4, 3e-3]}},
                        trainer={"lr_backbone": 1e38, "backbone": "vmae"},  # diverges in its first epoch
                        budget={"num_samples": 2, "max_concurrent": 2, "seed": 0},
                        scheduler={"type": "none"})
    with pytest.raises(SystemExit) as exc:
        main(["--space", str(space)])
    assert exc.value.code == 1
    assert "every trial failed" in capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "s" / "search_summary.json").read_text())
    assert summary["counts"]["failed"] == 2 and summary["best_trial"] is None


def test_a_filling_disk_stops_the_search_cleanly_and_resume_finishes_it(tiny_data, tmp_path, capsys,
                                                                         monkeypatch):
    """Free space falling under the reserve at an epoch's report stops the search as Ctrl-C
    would (state saved, summary written, exit 130) before anything fails for want of space;
    once space is freed, --resume finishes it, the cut trial from its last epoch."""
    from tuning import diskspace
    space = write_space(tmp_path, tiny_data, search={"lr_head": {"loguniform": [3e-4, 3e-3]}},
                        trainer={"epochs": 2, "backbone": "csn"}, scheduler={"type": "none"},
                        budget={"num_samples": 2, "max_concurrent": 1, "seed": 0})
    looks = []
    def filling(folder):   # plenty at the start, then 100 MiB: under the 256 MiB reserve
        looks.append(folder)
        return 10 * 1024 ** 3 if len(looks) == 1 else 100 * 1024 ** 2
    monkeypatch.setattr(diskspace, "free_bytes", filling)
    storage = tmp_path / "elsewhere"   # not the space's output_root: the resume must name it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:   # relative paths: the hint makes them absolute
        main(["--space", space.name, "--storage_path", storage.name, "--retrain_best", "0"])
    assert stopped.value.code == 130
    captured = capsys.readouterr()
    assert STOP_LINE in captured.out   # this command's line, not Tune's "e.g. via SIGINT/Ctrl+C"
    lines = [line for line in captured.err.splitlines() if line.startswith("error: the search's storage")]
    assert len(lines) == 1 and "100.0 MiB free, under the 256.0 MiB" in lines[0] and "--resume" in lines[0], captured.err
    [hint] = [line for line in captured.out.splitlines() if line.startswith("interrupted: continue with ")]
    resume = shlex.split(hint.removeprefix("interrupted: continue with "))
    assert resume[:3] == ["python", "-m", "tuning.search"] and resume[-1] == "--resume"
    assert resume[resume.index("--storage_path") + 1] == str(storage), hint
    assert resume[resume.index("--space") + 1] == str(space), hint
    assert resume[resume.index("--retrain_best") + 1] == "0", hint   # not kept by --resume itself
    search_dir = storage / "s"
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert summary["state"] == "interrupted" and summary["counts"]["failed"] == 0, summary["counts"]
    [cut] = trial_dirs(search_dir)
    assert len(pd.read_csv(cut / "metrics_epoch.csv")) == 1   # stopped after its first epoch

    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 10 * 1024 ** 3)   # space freed
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    main(resume[3:])   # the command the search printed, from another folder
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert summary["state"] == "finished"
    assert [t["status"] for t in summary["trials"]] == ["finished"] * 2, summary["counts"]
    assert pd.read_csv(cut / "metrics_epoch.csv")["epoch"].tolist() == [1, 2]


# --- a hard kill, then SIGTERM, then --resume: ASHA's stops, the study and finished work kept --
@pytest.mark.slow(seconds=110)
def test_a_killed_then_interrupted_search_resumes_to_the_same_result(tiny_data, tmp_path, capsys):
    """One search, one trial at a time, ASHA on, started with --verbose:
    1. the driver and every Ray process it started die at once (kill -9: a reboot) as soon as
       ASHA has stopped a trial, before Tune's saved state may know it; Tune's live files are
       then damaged or planted by someone who can write the folder;
    2. --resume (the signed copies are used, the planted files set aside, never loaded), then
       SIGTERM (kill, docker stop) once a new trial runs: exit 130 like Ctrl-C, this command's
       stop line and resume hint, the console it started with; the best trial so far is
       retrained while the search is interrupted;
    3. --resume to the end: each trial once, ASHA's stops still stops with the epochs they had,
       nothing finished rewritten, the study holds what trials.csv says, and the search's own
       retrain goes beside the one made by hand."""
    space = write_space(tmp_path, tiny_data, budget={"num_samples": 8, "max_concurrent": 1, "seed": 0})
    search_dir = tmp_path / "out" / "s"

    def asha_stopped() -> list[str]:
        return [d.name for d in trial_dirs(search_dir) if (d / "scheduler_stop.json").is_file()]

    # 1. killed as soon as ASHA has stopped a trial
    proc = start_search(space, tmp_path, "--verbose")
    wait_for(proc, asha_stopped, "an ASHA stop")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    stopped, started = asha_stopped(), len(trial_dirs(search_dir))
    finished = [d.name for d in trial_dirs(search_dir) if read_json(d / "status.json").get("state") == "finished"]
    assert finished, "ASHA stops a trial only after one has finished its rung"
    kept = {p: p.stat().st_mtime_ns for name in finished for p in (search_dir / name / "checkpoints").glob("*.pt")}
    marker = tmp_path / "PLANTED_PICKLE_RAN"
    for live in [*search_dir.glob("experiment_state-*.json"), *search_dir.glob("searcher-state-*.pkl")]:
        live.write_bytes(live.read_bytes()[: live.stat().st_size // 2])
    (search_dir / "tuner.pkl").write_bytes(planted_pickle(marker))
    (search_dir / "searcher-state-2099-12-31_23-59-59.pkl").write_bytes(planted_pickle(marker))
    (search_dir / "callback-states-2099-12-31_23-59-59.pkl").write_bytes(planted_pickle(marker))

    # 2. resumed, then SIGTERM once a new trial runs
    proc = start_search(space, tmp_path, "--resume")
    wait_for(proc, lambda: len(trial_dirs(search_dir)) > started, "a new trial")
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output[-3000:]
    assert "--resume" in output and "moved to" in output  # the planted files were set aside
    # this command's stop line and resume hint, not Tune's (Tuner.restore skips the signed state)
    assert STOP_LINE in output and "Tuner.restore" not in output and "Stop signal" not in output, output[-3000:]
    assert "keeps the console it started with (--verbose)" in output
    assert "Trial status:" in output and "run_trial pid" in output   # Ray's console, trial output
    assert re.search(r"\bt\d{3} started", output), output[-3000:]      # and the event lines
    assert not marker.exists()
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert summary["state"] == "interrupted"
    # a trial cut by the signal is not "stopped early": only ASHA's own stops are
    assert summary["counts"].get("stopped_early", 0) == len(asha_stopped()), summary["counts"]
    from tuning.retrain import main as retrain_main
    capsys.readouterr()
    retrain_main([str(search_dir), "--epochs", "1"])
    assert "note: s has not finished: t00" in capsys.readouterr().out
    by_hand = json.loads((search_dir / "search_summary.json").read_text())["final"]

    # 3. resumed to the end, retraining the best itself
    resumed = start_search(space, tmp_path, "--resume", "--retrain_best", "1")
    output = resumed.communicate(timeout=500)[0]
    assert resumed.returncode == 0, output[-3000:]
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert summary["state"] == "finished" and len(summary["trials"]) == 8
    indices = [d.name.split("_", 1)[0] for d in trial_dirs(search_dir)]
    assert len(indices) == len(set(indices)) == 8, indices
    by_name = {t["name"]: t for t in summary["trials"]}
    for name in stopped:
        trial = by_name[name]
        assert trial["status"] == "stopped_early" and trial["epochs_run"] < 3, trial
        rows = pd.read_csv(search_dir / name / "metrics_epoch.csv")
        assert len(rows) == trial["epochs_run"], (name, len(rows))
    for trial in summary["trials"]:
        assert (trial["status"] == "stopped_early") == (search_dir / trial["name"] / "scheduler_stop.json").is_file()
    for path, mtime in kept.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten"
    assert not marker.exists()
    assert_study_states(search_dir, summary)
    assert summary["final"]["run_dir"] == str(search_dir / "final_2")
    assert by_hand["run_dir"] == str(search_dir / "final") and (search_dir / "final" / "config.yaml").is_file()
    assert (search_dir / "summary.md").read_text().count(FINAL_HEADING) == 1


def assert_study_states(search_dir, summary) -> None:
    """The study tells the sampler what trials.csv says, one entry per trial (a hard kill and
    --resume included): a PRUNED trial per stopped one (its last epoch among its intermediate
    values), COMPLETE per finished one, FAIL per failed one."""
    import optuna
    from optuna.trial import TrialState

    from tuning.study import WARM_START_ATTR, study_storage

    study = optuna.load_study(study_name=None, storage=study_storage(search_dir))
    trials = [t for t in study.trials if WARM_START_ATTR not in t.user_attrs]
    assert len(trials) == len(summary["trials"]), [(t.number, t.state, t.params) for t in study.trials]
    searched = sorted(trials[0].params)
    assert sorted([t.params[k] for k in searched] for t in trials) == \
        sorted([t["params"][k] for k in searched] for t in summary["trials"])
    numbers = [t.number for t in trials]   # a resume continues the study: no gap, no repeat
    assert numbers == list(range(numbers[0], numbers[0] + len(trials))), numbers
    objectives = {tuple(t["params"][k] for k in searched): t["objective"] for t in summary["trials"]}
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(objectives[tuple(t.params[k] for k in searched)]), t.number
    states = [t.state for t in trials]
    counts = summary["counts"]
    assert states.count(TrialState.PRUNED) == counts.get("stopped_early", 0), (states, counts)
    assert states.count(TrialState.COMPLETE) == counts.get("finished", 0), (states, counts)
    assert states.count(TrialState.FAIL) == counts.get("failed", 0), (states, counts)
    stopped = sorted(stop_epoch(search_dir, t) for t in summary["trials"] if t["status"] == "stopped_early")
    deepest = sorted(max(t.intermediate_values) for t in trials if t.state == TrialState.PRUNED)
    assert deepest == stopped, (deepest, stopped)


def stop_epoch(search_dir: Path, trial: dict) -> int:
    """The epoch a stopped trial last told the study of: ASHA's (scheduler_stop.json; a trial of
    N workers may write an epoch or more after it, since Ray Train hands reports to Tune late),
    else its last epoch."""
    record = search_dir / trial["name"] / "scheduler_stop.json"
    return json.loads(record.read_text())["epoch"] if record.is_file() else trial["epochs_run"]


# --- a frozen search: features computed once for all trials, actors reused ------------------
def test_frozen_search_computes_each_feature_once_and_reuses_trial_actors(tiny_data, tmp_path, capsys):
    views, train_clips, val_clips = 2, 18, 9
    space = write_space(tmp_path, tiny_data, search={"lr_head": {"loguniform": [1e-3, 1e-2]}},
                        trainer={"finetune_mode": "frozen", "backbone": "vmae", "epochs": 2,
                                 "feature_cache_views": views},
                        budget={"num_samples": 4, "max_concurrent": 2, "seed": 0},
                        scheduler={"type": "none"})
    main(["--space", str(space)])
    search_dir = tmp_path / "out" / "s"
    folders = trial_dirs(search_dir)
    assert len(folders) == 4
    backbone_clips = sum(pd.read_csv(f / "metrics_epoch.csv")["backbone_clips"].sum() for f in folders)
    needed = train_clips * views + val_clips
    assert needed <= backbone_clips <= 1.1 * needed, backbone_clips
    assert list((tmp_path / "out" / "feature_cache").rglob("*.safetensors"))  # beside the search
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert any(n.startswith("feature cache: the backbone ran on") for n in summary["notes"])
    # actors were reused (fewer processes than trials), each trial still wrote its own folder
    pids = {json.loads((f / "trial.json").read_text())["pid"] for f in folders}
    assert len(pids) < 4, pids
    for trial in summary["trials"]:
        config = yaml.safe_load((search_dir / trial["name"] / "config.yaml").read_text())
        assert config["lr_head"] == pytest.approx(trial["params"]["lr_head"])
        assert config["run_name"] == trial["name"] and trial["status"] == "finished"


# --- a trial whose process dies is retried from its last epoch (max_failures) --------------
def test_killed_trial_is_retried_from_its_last_epoch(epoch_data, tmp_path):
    """A one-trial search of 4 epochs (max_failures 1) whose training process (status.json's
    pid) is SIGKILLed, what the OOM killer does, once the trial has written its first epoch:
    Tune restarts it, and it continues after that epoch instead of starting over."""
    epochs = 4
    space = write_space(tmp_path, epoch_data,
                        search={"lr_head": {"loguniform": [1e-3, 2e-3]}}, max_failures=1,
                        trainer={"epochs": epochs, "batch_size": 4},
                        budget={"num_samples": 1, "max_concurrent": 1, "seed": 0}, scheduler={"type": "none"})
    search_dir = tmp_path / "out" / "s"
    proc = start_search(space, tmp_path)
    try:
        _, record, written = running_trial(proc, search_dir, epochs=1)
        os.kill(record["pid"], signal.SIGKILL)
        output = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    [trial] = json.loads((search_dir / "search_summary.json").read_text())["trials"]
    assert trial["status"] == "finished" and trial["epochs_run"] == epochs, trial
    metrics = pd.read_csv(search_dir / trial["name"] / "metrics_epoch.csv")
    assert list(metrics["epoch"]) == list(range(1, epochs + 1))
    # the epoch written before the kill was not trained again: its row (timings included) is
    # the one written then
    pd.testing.assert_frame_equal(metrics.iloc[:len(written)], written)


@pytest.mark.slow(seconds=90)
def test_readme_demo_search(tmp_path):
    """The README's "run it" command, from a folder without the demo data: it generates the
    data, samples with Optuna (TPE after its random start-up trials), lets ASHA stop trials
    early, summarises, retrains the best config and scores it on the test split; its console
    stays short and readable."""
    result = subprocess.run([sys.executable, "-m", "tuning.search", "--space", "demo"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    demo = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    budget, epochs = demo["budget"], demo["trainer"]["epochs"]
    assert budget["num_samples"] > budget["startup_trials"]   # TPE samples at least one trial
    search_dir = tmp_path / "report" / "header_experiments" / "demo"
    summary = json.loads((search_dir / "search_summary.json").read_text())
    assert summary["state"] == "finished" and len(summary["trials"]) == budget["num_samples"]
    assert any(t["status"] == "stopped_early" and t["epochs_run"] < epochs for t in summary["trials"])
    for t in summary["trials"]:  # ASHA's own record says which trials it stopped
        assert (t["status"] == "stopped_early") == (search_dir / t["name"] / "scheduler_stop.json").is_file()
    assert len({json.dumps(t["params"], sort_keys=True) for t in summary["trials"]}) == budget["num_samples"]
    # one actor per slot for the whole search: a stopped trial's ending (its plots) never made
    # Tune throw its actor away for a cold one
    pids = {json.loads((search_dir / t["name"] / "trial.json").read_text())["pid"] for t in summary["trials"]}
    assert len(pids) == budget["max_concurrent"], pids
    # every trial's plots, also those of the trials stopped as the search ended (their actors
    # end right after their last report: the summary draws what they could not)
    for t in summary["trials"]:
        assert sorted(p.name for p in (search_dir / t["name"] / "plots").iterdir()) == \
            ["loss.png", "metrics.png", "pr.png", "roc.png"], t["name"]
    assert summary["best_trial"]["objective"] > 0.8
    assert_study_states(search_dir, summary)
    # a second search warm-started from it: the study starts with the first one's ended trials
    second = subprocess.run([sys.executable, "-m", "tuning.search", "--space", "demo", "--name", "demo2",
                             "--warm_start", str(search_dir), "--num_samples", "1", "--retrain_best", "0",
                             "--set", "epochs=1", "--set", "scheduler.type=none"],   # its one trial: short
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    warm = json.loads((search_dir.parent / "demo2" / "search_summary.json").read_text())["warm_start"]
    assert warm == {"from": str(search_dir), "trials": budget["num_samples"]}
    assert (search_dir / summary["best_trial"]["checkpoint"]).is_file()
    assert "best trial" in result.stdout and summary["best_trial"]["checkpoint_abs"] in result.stdout
    # the best checkpoint, evaluated on its own, reproduces the reported objective
    from headernet_core.evaluation import evaluate
    metrics, _ = evaluate(summary["best_trial"]["checkpoint_abs"], tmp_path / "demo_data" / "splits" / "val.csv")
    assert metrics["val_f1"] == pytest.approx(summary["best_trial"]["objective"], abs=1e-6)

    # TPE sampled from its model once its random start-up trials had ended
    from test_journey import load_study, model_based
    assert model_based(load_study(search_dir), budget["startup_trials"]), "every trial was sampled at random"
    # the retrained best, scored once on the held-out test split
    final = summary["final"]
    assert final["test_clips"] == len(pd.read_csv(tmp_path / "demo_data" / "splits" / "test.csv"))
    assert final["test_f1"] > 0.5 and (search_dir / "final" / "test_metrics.json").is_file()
    # the console: at most 60 lines, one per trial event with the tNNN name and the objective
    console = (result.stdout + result.stderr).splitlines()
    assert len(console) <= 60, "\n".join(console)
    assert sum(" started " in line for line in console) == budget["num_samples"]
    assert any(line.startswith("[") and " t00" in line and "val_f1 " in line for line in console)
    # its shape, pinned: the space's description before the trials and the closing lines after
    # them, numbers, paths, trial names and backbones aside (an edge warning comes and goes
    # with the best trial; the event lines are pinned in test_console.py)
    shape = console_shape(result.stdout)
    blank = len(shape) - 1 - shape[::-1].index("")
    head = shape[:next(i for i, line in enumerate(shape) if line.startswith("search folder:")) + 1]
    tail = [line for line in shape[blank:] if not line.startswith("warning: the best trial's")]
    golden = DEMO_CONSOLE.read_text().split("\n...\n")
    assert "\n".join(head) == golden[0] and "\n".join(tail) + "\n" == golden[1], \
        "\n".join([*head, "...", *tail])


DEMO_CONSOLE = Path(__file__).parent / "data" / "golden" / "demo_console.txt"


def console_shape(text: str) -> list[str]:
    """Console lines with paths, trial names, backbones and numbers replaced by placeholders."""
    shape = []
    for line in text.splitlines():
        line = re.sub(r"(?<![\w.])/\S+", "PATH", line).replace("*best*", "")
        line = re.sub(r"\bt\d{3}(_[^\s:]*)?", "tNNN", line)
        line = re.sub(r"\b(vmae|csn)\b", "BACKBONE", line)
        line = re.sub(r"(?<![A-Za-z_])\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
        shape.append(" ".join(line.split()))
    return shape

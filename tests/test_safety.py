"""Never lose data, never leave a folder in a state that lies: atomic files that honour the umask,
folder locks that a dead owner cannot hold, status.json that shows a dead run as dead, a full
disk that ends a run in one line with its last epoch still resumable, and the warnings about
splits that leak."""
from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from headernet_core import artifacts
from headernet_core.errors import HeaderNetError, run_cli
from headernet_core.locks import FolderLock, Heartbeat, STALE_S
from headernet_core.status import beat, read_status, read_status_record, write_status

REPO = Path(__file__).resolve().parents[1]


# --- atomic files ---------------------------------------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        artifacts.write_json(tmp_path / "a.json", {"x": 1})
        with artifacts.atomic_path(tmp_path / "b.bin", durable=True) as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == mode


def test_no_clobber_write_keeps_an_existing_file(tmp_path):
    target = tmp_path / "train.csv"
    target.write_text("the user's data\n")
    with pytest.raises(FileExistsError):
        with artifacts.atomic_path(target, replace=False) as tmp:
            tmp.write_text("generated\n")
    assert target.read_text() == "the user's data\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.csv"]  # no temp file left


def test_a_failed_write_keeps_the_previous_version_and_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    artifacts.write_json(target, {"epoch": 1})
    with pytest.raises(OSError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_text('{"epo')
            raise OSError(28, "No space left on device")
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_stale_temp_files_are_removed_but_nothing_else(tmp_path):
    stale = [tmp_path / ".last.pt.0a1b2c3d.tmp", tmp_path / ".status.json.k_9zqx1w.tmp"]
    keep = [tmp_path / "last.pt", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in stale + keep:
        path.write_bytes(b"half a file")
    assert sorted(artifacts.remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


# --- locks and liveness ---------------------------------------------------------------------
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_refuses_a_second_owner(tmp_path):
    with FolderLock(tmp_path / "run", "a training run"):
        with pytest.raises(HeaderNetError, match=r"in use by a training run \(pid \d+ on "):
            FolderLock(tmp_path / "run", "a search").acquire()
    assert not (tmp_path / "run" / ".lock").exists()  # released
    FolderLock(tmp_path / "run", "a search").acquire()


def test_a_dead_owners_lock_is_taken_over(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(),
                                              "what": "a training run"}))
    lock = FolderLock(folder, "a training run")
    lock.acquire()
    assert json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_another_hosts_lock_is_stale_only_without_a_heartbeat(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": 1, "host": "gpu-node-elsewhere"}))
    with pytest.raises(HeaderNetError, match="gpu-node-elsewhere"):
        FolderLock(folder, "x").acquire()
    old = time.time() - STALE_S - 60
    os.utime(folder / ".lock", (old, old))
    FolderLock(folder, "x").acquire()


def test_a_held_lock_keeps_its_heartbeat(tmp_path, monkeypatch):
    """`with FolderLock(...)` (a search, a retrain: hours) beats, so that another host never
    takes a live owner's folder for stale; the beating stops with the lock."""
    import headernet_core.locks as locks

    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.05)
    old = time.time() - STALE_S - 60
    with FolderLock(tmp_path, "a search") as lock:
        os.utime(lock.path, (old, old))
        time.sleep(0.4)
        assert time.time() - lock.path.stat().st_mtime < 5
        heartbeat = lock._heartbeat
    assert not heartbeat._thread.is_alive() and not lock.path.exists()


def test_status_shows_a_dead_run_as_dead(tmp_path):
    write_status(tmp_path, "running", 2)
    record = read_status_record(tmp_path)
    assert {"pid", "host", "heartbeat"} <= set(record) and record["pid"] == os.getpid()
    assert read_status(tmp_path) == "running"
    (tmp_path / "status.json").write_text(json.dumps({**record, "pid": dead_pid()}))
    assert read_status(tmp_path) == "dead"
    (tmp_path / "status.json").write_text(json.dumps({**record, "host": "elsewhere",
                                                      "heartbeat": "2020-01-01T00:00:00+00:00"}))
    assert read_status(tmp_path) == "dead"
    (tmp_path / "status.json").write_text(json.dumps({**record, "state": "finished", "pid": dead_pid()}))
    assert read_status(tmp_path) == "finished"  # only a running run can be dead


def test_the_heartbeat_refreshes_only_a_running_run(tmp_path):
    write_status(tmp_path, "running", 1)
    first = read_status_record(tmp_path)["heartbeat"]
    time.sleep(1.1)
    heartbeat = Heartbeat(lambda: beat(tmp_path), interval=0.05).start()
    time.sleep(0.3)
    heartbeat.stop()
    assert read_status_record(tmp_path)["heartbeat"] > first
    write_status(tmp_path, "finished", 1)
    beat(tmp_path)
    assert read_status_record(tmp_path)["state"] == "finished"


def test_a_second_run_on_the_same_folder_is_refused(tiny_config, capsys):
    from headernet_core.trainer import train

    config = tiny_config(epochs=1)
    run_dir = Path(config.output_root) / config.run_name
    with FolderLock(run_dir, "a training run"):
        with pytest.raises(HeaderNetError, match="in use by a training run"):
            train(config, log=lambda _: None)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing else written


def test_an_existing_run_whose_process_died_says_so(tiny_config):
    from headernet_core.trainer import prepare

    config = tiny_config()
    run_dir = Path(config.output_root) / config.run_name
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "epochs_done": 1, "pid": dead_pid(),
                                                     "host": socket.gethostname()}))
    with pytest.raises(HeaderNetError, match="already exists \\(its process died\\)"):
        prepare(config)


def test_a_run_removes_the_temp_files_a_kill_left(tiny_config):
    from headernet_core.trainer import train

    first = train(tiny_config(epochs=1), log=lambda _: None)
    stale = first.run_dir / "checkpoints" / ".last.pt.0badf00d.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = train(tiny_config(epochs=2, resume=True), log=lambda _: None)
    assert result.epochs_done == 2 and not stale.exists()
    record = read_status_record(result.run_dir)
    assert record["state"] == "finished" and record["pid"] == os.getpid() and "heartbeat" in record


def test_resuming_from_a_best_checkpoint_copied_over_last_pt_is_one_line(tiny_config):
    import shutil

    from headernet_core.trainer import prepare, train

    first = train(tiny_config(epochs=1), log=lambda _: None)
    last = first.run_dir / "checkpoints" / "last.pt"
    shutil.copy(first.best_checkpoint, last)
    with pytest.raises(HeaderNetError, match="not a resumable last.pt .no best_epoch, best_metrics"):
        prepare(tiny_config(epochs=2, resume=True))


# --- a disk that fills up mid-run -------------------------------------------------------------
def limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_an_io_error_mid_run_is_one_line_and_the_last_epoch_resumes(tiny_data, tmp_path):
    """A real write error (a file-size limit: last.pt grows a little each epoch, so epoch 2's
    does not fit; --epochs 3 has the same size as 1): exit 2 with one line, status.json failed with the reason, the previous
    last.pt intact, and --resume finishes the run with a consistent best checkpoint."""
    from headernet_core.trainer import main

    flags = ["--train_csv", str(tiny_data["train_csv"]), "--val_csv", str(tiny_data["val_csv"]),
             "--vmae_variant", "tiny", "--num_frames", "4", "--input_size", "32", "--batch_size", "4",
             "--cpu", "--num_workers", "0", "--no-progress", "--no-plots", "--no-tensorboard",
             "--lr_backbone", "1e-3", "--lr_head", "1e-3", "--output_root", str(tmp_path / "runs")]
    main([*flags, "--epochs", "1", "--run_name", "aaaa"])
    one_epoch = (tmp_path / "runs" / "aaaa" / "checkpoints" / "last.pt").stat().st_size
    result = subprocess.run([sys.executable, "-m", "headernet_core.train", *flags, "--epochs", "3",
                             "--run_name", "bbbb"], env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300,
                            preexec_fn=limit_file_size(one_epoch + 100))
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "last.pt: File too large" in errors[0] and "--resume --run_name bbbb" in errors[0], errors[0]
    run_dir = tmp_path / "runs" / "bbbb"
    status = read_status_record(run_dir)
    assert status["state"] == "failed" and "File too large" in status["error"], status
    assert not list(run_dir.rglob("*.tmp"))
    saved = __import__("torch").load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["epoch"] == 1

    main([*flags, "--epochs", "3", "--run_name", "bbbb", "--resume"])
    assert read_status_record(run_dir)["state"] == "finished"
    best = json.loads((run_dir / "best_metrics.json").read_text())
    assert (run_dir / best["checkpoint"]).is_file()
    assert list(pd.read_csv(run_dir / "metrics_epoch.csv")["epoch"]) == [1, 2, 3]


# --- signals -----------------------------------------------------------------------------------
def test_sigterm_ends_a_command_like_ctrl_c(capsys):
    def body() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM was ignored")

    previous = signal.getsignal(signal.SIGTERM)
    # Python's own Ctrl-C handler, as a fresh `python -m` process has it (an in-process search
    # earlier in the session may have left Ray Tune's handler installed).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as exc:
            run_cli(body)
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert exc.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    assert signal.getsignal(signal.SIGTERM) == previous  # restored for whoever called run_cli


# --- splits that leak ----------------------------------------------------------------------------
def test_leaking_splits_are_warned_about(tiny_data, tmp_path, tiny_config):
    from headernet_core.data import read_split, split_warnings
    from headernet_core.trainer import prepare

    train_csv, val_csv = tiny_data["train_csv"], tiny_data["val_csv"]
    train = read_split(train_csv, "train")
    assert split_warnings(train, read_split(val_csv, "val"), train_csv, val_csv) == []
    assert "both --train_csv and --val_csv" in split_warnings(train, train, train_csv, train_csv)[0]

    frame = pd.read_csv(train_csv)
    leaky = tmp_path / "leaky_val.csv"
    pd.concat([pd.read_csv(val_csv), frame.iloc[:3], frame.iloc[:1]]).to_csv(leaky, index=False)
    # paths are relative to the CSV's folder: write the copy beside the clips
    leaky = Path(train_csv).parent / "leaky_val.csv"
    pd.concat([pd.read_csv(val_csv), frame.iloc[:3], frame.iloc[:1]]).to_csv(leaky, index=False)
    try:
        messages = split_warnings(train, read_split(leaky, "val"), train_csv, leaky)
        assert any("3 of the 13 clips" in m for m in messages), messages
        assert any("video_id value(s) are in both" in m for m in messages), messages
        assert any("1 row(s) repeat a clip" in m for m in messages), messages
        with pytest.warns(UserWarning, match="are also in"):
            prepare(tiny_config(val_csv=str(leaky)))
    finally:
        leaky.unlink()


def test_bom_and_crlf_files_are_read(tiny_data, tmp_path):
    from headernet_core.config import load_yaml_mapping
    from headernet_core.data import read_split

    config = tmp_path / "c.yaml"
    config.write_bytes("\ufeffepochs: 3\r\nlr_head: 1.0e-3\r\n".encode("utf-8"))
    assert load_yaml_mapping(config) == {"epochs": 3, "lr_head": 1e-3}
    text = Path(tiny_data["train_csv"]).read_text().replace("\n", "\r\n")
    csv = Path(tiny_data["train_csv"]).parent / "bom_crlf.csv"
    csv.write_bytes(("\ufeff" + text).encode("utf-8"))
    try:
        frame = read_split(csv, "train")
    finally:
        csv.unlink()
    assert list(frame.columns[:2]) == ["path", "label"] and len(frame) == 18
    assert not any(p.endswith("\r") for p in frame["path"])


def test_a_huge_or_deep_yaml_is_one_line_not_a_parse(tmp_path):
    """A 10 MiB+ "config" (a dataset or a log passed by mistake) is refused before it is
    read; a deeply nested one is refused without a RecursionError traceback."""
    from headernet_core.config import MAX_YAML_BYTES, MAX_YAML_DEPTH, load_yaml_mapping

    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as fh:
        fh.truncate(MAX_YAML_BYTES + 1)   # sparse: no 10 MiB written
    with pytest.raises(HeaderNetError, match=r"huge.yaml: 10485761 bytes is not a config file"):
        load_yaml_mapping(huge)
    fine = tmp_path / "fine.yaml"
    fine.write_text("epochs: 3\n" + "#" * 1000 + "\n")
    assert load_yaml_mapping(fine) == {"epochs": 3}
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * (MAX_YAML_DEPTH + 2) + "]" * (MAX_YAML_DEPTH + 2) + "\n")
    with pytest.raises(HeaderNetError, match="nested too deeply"):
        load_yaml_mapping(deep)

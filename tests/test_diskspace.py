"""The search's one warning that its trials will not fit on its storage (tuning/diskspace.py)."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest

from headernet_core.paths import folder_bytes, free_bytes
from tuning import diskspace
from tuning.diskspace import MIN_FREE_BYTES, DiskWatch, shortage

MIB = 1024 ** 2


def trial_folder(root: Path, name: str, size: int, status: str = "TERMINATED") -> SimpleNamespace:
    """A stand-in for a Tune trial whose folder (`path`, on the search's storage; not
    `local_path`, Tune's staging copy on the driver) holds `size` bytes."""
    folder = root / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "best_epoch_1.pt").write_bytes(b"w" * (size - 10))
    (folder / "metrics_epoch.csv").write_bytes(b"c" * 10)
    return SimpleNamespace(trial_id=name, status=status, path=str(folder))


def test_folder_bytes_and_free_bytes(tmp_path, monkeypatch):
    trial_folder(tmp_path, "t001", 5000)
    assert folder_bytes(tmp_path) == 5000 and folder_bytes(tmp_path / "missing") == 0
    # a temp file renamed away between listing and stat (a trial's atomic write) is skipped
    (tmp_path / "t001" / "status.json.tmp").write_bytes(b"x" * 7)
    real_lstat = os.lstat
    def renamed_meanwhile(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise FileNotFoundError(path)
        return real_lstat(path, *args, **kwargs)
    monkeypatch.setattr(os, "lstat", renamed_meanwhile)
    assert folder_bytes(tmp_path) == 5000
    monkeypatch.undo()
    # a folder the search has not created yet: the free space where it will be
    assert 0 < free_bytes(tmp_path / "not" / "yet") == free_bytes(tmp_path)


def test_shortage_projects_the_trials_still_to_run():
    gib = 1024 ** 3
    assert shortage(10 * gib, [], 20) is None                   # nothing measured yet
    assert shortage(10 * gib, [gib // 2, gib // 2], 18) is None  # 9 GiB fits
    said = shortage(10 * gib, [gib, 2 * gib], 8)                 # 12 GiB does not
    assert said == "10.0 GiB free, and the 8 trial(s) still to run need about 12.0 GiB (1.5 GiB per ended trial so far)"
    assert shortage(10 * gib, [20 * gib], 0) is None             # nothing left to run
    assert shortage(MIN_FREE_BYTES - 1, [], 20).startswith("only ")


def test_disk_watch_warns_once_when_the_rest_will_not_fit(tmp_path, monkeypatch):
    free = {"bytes": 50 * MIB}
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: free["bytes"])
    monkeypatch.setattr(diskspace, "MIN_FREE_BYTES", MIB)
    out = io.StringIO()
    watch = DiskWatch(tmp_path, num_samples=10, out=out)
    watch.setup()
    first = trial_folder(tmp_path, "t001", 4 * MIB)
    watch.on_trial_complete(1, [first], first)        # 9 x 4 MiB = 36 MiB of 50: fits
    assert out.getvalue() == ""
    second = trial_folder(tmp_path, "t002", 8 * MIB, status="RUNNING")  # Tune sets ERROR after
    watch.on_trial_error(2, [first, second], second)  # 8 x 6 MiB = 48 MiB: still fits
    assert out.getvalue() == ""
    free["bytes"] = 40 * MIB
    third = trial_folder(tmp_path, "t003", 6 * MIB)
    watch.on_trial_complete(3, [first, second, third], third)  # 7 x 6 MiB = 42 MiB of 40
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the search's storage")
    assert str(tmp_path) in lines[0] and "7 trial(s) still to run need about 42.0 MiB" in lines[0]
    fourth = trial_folder(tmp_path, "t004", 6 * MIB)
    watch.on_trial_complete(4, [first, second, third, fourth], fourth)
    assert len(out.getvalue().splitlines()) == 1      # once per search, not once per trial
    resumed, out = pickle.loads(pickle.dumps(watch)), io.StringIO()
    resumed.out = out                                 # a resumed search, on a new console
    free["bytes"] = 20 * MIB
    fifth = trial_folder(tmp_path, "t005", 6 * MIB)
    resumed.on_trial_complete(5, [first, second, third, fourth, fifth], fifth)
    assert "5 trial(s) still to run need about 30.0 MiB" in out.getvalue() and len(resumed.sizes) == 5


def test_disk_watch_warns_at_the_start_on_an_almost_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: MIN_FREE_BYTES // 2)
    out = io.StringIO()
    DiskWatch(tmp_path, num_samples=4, out=out).setup()
    assert out.getvalue().startswith("warning: the search's storage") and "only 512.0 MiB free" in out.getvalue()


def test_disk_watch_after_a_resume_measures_the_trials_that_ended_before(tmp_path, monkeypatch):
    """Tune pickles its callbacks with the search; a resumed search's watch still counts the
    trials that ended before the interruption."""
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 20 * MIB)
    monkeypatch.setattr(diskspace, "MIN_FREE_BYTES", MIB)
    watch = pickle.loads(pickle.dumps(DiskWatch(tmp_path, num_samples=6, out=None)))
    out = io.StringIO()
    watch.out = out
    earlier = [trial_folder(tmp_path, f"t00{i}", 5 * MIB) for i in (1, 2)]
    now = trial_folder(tmp_path, "t003", 5 * MIB)
    watch.on_trial_complete(1, [*earlier, now], now)  # 3 left x 5 MiB = 15 of 20: fits
    assert out.getvalue() == "" and len(watch.sizes) == 3
    free_now = 10 * MIB
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: free_now)
    last = trial_folder(tmp_path, "t004", 5 * MIB)
    watch.on_trial_complete(2, [*earlier, now, last], last)  # 2 x 5 = 10 of 10: fits exactly
    assert out.getvalue() == ""


@pytest.mark.parametrize("status", ["PENDING", "RUNNING", "PAUSED"])
def test_disk_watch_does_not_measure_trials_still_going(tmp_path, monkeypatch, status):
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 100 * MIB)
    watch = DiskWatch(tmp_path, num_samples=5, out=io.StringIO())
    going = trial_folder(tmp_path, "t002", MIB, status=status)
    ended = trial_folder(tmp_path, "t001", MIB)
    watch.on_trial_complete(1, [ended, going], ended)
    assert set(watch.sizes) == {"t001"}


def test_reserve_is_each_running_trials_next_checkpoint_and_one_more():
    gib = 1024 ** 3
    assert diskspace.reserve_bytes(0, 2) == diskspace.RESERVE_MIN_BYTES
    assert diskspace.reserve_bytes(3 * gib, 2) == 9 * gib     # 2 running x 3 GiB + 3 GiB


def test_disk_watch_stops_the_search_once_under_the_reserve(tmp_path, monkeypatch):
    """Under the reserve at a report: one error line, then Tune's graceful-stop handler, once;
    with no handler installed (Tune not running in the main thread) nothing is stopped."""
    free = {"bytes": 10 * 1024 ** 3}
    monkeypatch.setattr(diskspace, "free_bytes", lambda folder: free["bytes"])
    calls = []
    monkeypatch.setattr(diskspace.signal, "getsignal", lambda signum: lambda *args: calls.append(signum))
    out = io.StringIO()
    watch = DiskWatch(tmp_path, num_samples=4, out=out)
    trial = trial_folder(tmp_path, "t001", 40 * MIB, status="RUNNING")   # its last.pt: ~40 MiB
    other = trial_folder(tmp_path, "t002", 8 * MIB, status="RUNNING")
    watch.on_trial_result(1, [trial, other], trial, {})
    assert calls == [] and out.getvalue() == ""
    free["bytes"] = 300 * MIB      # over the reserve: max(256 MiB, 40 MiB x (2 running + 1))
    watch.on_trial_result(2, [trial, other], other, {})
    assert calls == []
    free["bytes"] = 200 * MIB
    watch.on_trial_result(3, [trial, other], other, {})
    assert calls == [diskspace.signal.SIGUSR1]
    [line] = out.getvalue().splitlines()
    assert line.startswith("error: the search's storage") and "200.0 MiB free, under the 256.0 MiB" in line
    watch.on_trial_result(4, [trial, other], trial, {})
    assert calls == [diskspace.signal.SIGUSR1]    # once
    big = DiskWatch(tmp_path, num_samples=4, out=io.StringIO())   # 200 MiB checkpoints
    large = trial_folder(tmp_path, "t003", 200 * MIB, status="RUNNING")
    free["bytes"] = 500 * MIB      # under 200 MiB x (2 running + 1)
    big.on_trial_result(1, [large, other], large, {})
    assert "under the 600.0 MiB" in big.out.getvalue() and len(calls) == 2
    monkeypatch.setattr(diskspace.signal, "getsignal", lambda signum: diskspace.signal.SIG_DFL)
    quiet = DiskWatch(tmp_path, num_samples=4, out=io.StringIO())
    quiet.on_trial_result(1, [trial], trial, {})
    assert quiet.out.getvalue() == "" and not quiet.stopping


def test_disk_watch_that_cannot_read_the_free_space_neither_warns_nor_stops(tmp_path, monkeypatch):
    """An unreadable storage (a stale NFS handle) must not end the search from a callback."""
    def unreadable(folder):
        raise OSError(116, "Stale file handle")
    monkeypatch.setattr(diskspace, "free_bytes", unreadable)
    calls = []
    monkeypatch.setattr(diskspace.signal, "getsignal", lambda signum: lambda *args: calls.append(signum))
    watch = DiskWatch(tmp_path, num_samples=3, out=io.StringIO())
    watch.setup()
    trial = trial_folder(tmp_path, "t001", MIB)
    watch.on_trial_result(1, [trial], trial, {})
    watch.on_trial_complete(1, [trial], trial)
    assert watch.out.getvalue() == "" and calls == [] and not watch.stopping

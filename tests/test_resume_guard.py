"""Resume reads only Ray Tune state this project signed (tuning/resume_guard.py): no Ray needed
here; tests/test_bad_inputs.py runs the damaged and planted folders through the CLI and
tests/test_search.py resumes real searches whose live files were damaged or planted."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from headernet_core.errors import HeaderNetError
from tuning import resume_guard

STATE = {"tuner.pkl": pickle.dumps({"tuner": 1}),
         "experiment_state-2026-01-01_00-00-00.json": b'{"trial_data": []}',
         "searcher-state-2026-01-01_00-00-00.pkl": pickle.dumps({"searcher": 2})}


def signed_folder(tmp_path):
    folder = tmp_path / "search"
    folder.mkdir()
    for name, data in STATE.items():
        (folder / name).write_bytes(data)
    resume_guard.sign_tuner(folder)
    resume_guard.record(folder, {k: v for k, v in STATE.items() if k != "tuner.pkl"})
    return folder


def test_a_signed_state_verifies_and_is_installed(tmp_path):
    folder = signed_folder(tmp_path)
    assert resume_guard.verify(folder).files == STATE
    # a later snapshot keeps the signed tuner.pkl and replaces the rest; old copies go
    newer = {"experiment_state-2026-01-01_00-00-00.json": b'{"trial_data": [1]}'}
    resume_guard.record(folder, newer)
    assert resume_guard.verify(folder).files == {"tuner.pkl": STATE["tuner.pkl"], **newer}
    assert len([p for p in (folder / ".resume").iterdir() if p.name != "manifest.json"]) == 2


def test_install_replaces_damaged_stale_and_planted_tune_files(tmp_path):
    folder = signed_folder(tmp_path)
    state = resume_guard.verify(folder)
    (folder / "tuner.pkl").write_bytes(b"planted")
    exp = "experiment_state-2026-01-01_00-00-00.json"
    (folder / exp).write_bytes(STATE[exp][:5])                         # truncated by a crash
    (folder / "searcher-state-2099-12-31_00-00-00.pkl").write_bytes(b"planted, newest name")
    (folder / "callback-states-x.pkl").write_bytes(b"planted")
    (folder / "search.json").write_text("{}")                          # not Tune's: untouched
    moved = resume_guard.install(folder, state)
    assert sorted(moved) == sorted(["tuner.pkl", exp, "searcher-state-2099-12-31_00-00-00.pkl",
                                    "callback-states-x.pkl"])
    for name, data in STATE.items():
        assert (folder / name).read_bytes() == data
    assert not (folder / "callback-states-x.pkl").exists()
    assert (folder / ".resume" / "displaced" / "tuner.pkl").read_bytes() == b"planted"
    assert (folder / "search.json").read_text() == "{}"
    assert resume_guard.verify(folder).files == STATE  # the snapshot itself is untouched


@pytest.mark.parametrize("damage, fragment", [
    ("no manifest", "resume state is not signed"),
    ("manifest not json", "manifest.json is damaged"),
    ("manifest edited", "not signed with this account's resume key"),
    ("blob truncated", "is damaged or was changed"),
    ("blob missing", "is missing"),
    ("foreign entry", "unexpected entry"),
    ("blob a fifo", "missing or unreadable"),          # must not block the check
    ("manifest a fifo", "manifest.json is missing"),
])
def test_every_damage_is_one_line_naming_the_file(tmp_path, damage, fragment):
    folder = signed_folder(tmp_path)
    snapshot = folder / ".resume"
    manifest = json.loads((snapshot / "manifest.json").read_text())
    blob = snapshot / manifest["files"]["searcher-state-2026-01-01_00-00-00.pkl"]
    if damage == "no manifest":
        (snapshot / "manifest.json").unlink()
    elif damage == "manifest not json":
        (snapshot / "manifest.json").write_text('{"format": "headernet-re')
    elif damage == "manifest edited":
        manifest["files"]["tuner.pkl"] = manifest["files"]["searcher-state-2026-01-01_00-00-00.pkl"]
        (snapshot / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "blob truncated":
        blob.write_bytes(blob.read_bytes()[:10])
    elif damage == "blob missing":
        blob.unlink()
    elif damage == "blob a fifo":
        blob.unlink()
        os.mkfifo(blob)
    elif damage == "manifest a fifo":
        (snapshot / "manifest.json").unlink()
        os.mkfifo(snapshot / "manifest.json")
    elif damage == "foreign entry":  # even correctly signed, only Tune's own file names restore
        key = resume_guard.load_key(create=False)
        body = {k: v for k, v in manifest.items() if k != "mac"}
        body["files"]["../../etc/cron.d/x"] = manifest["files"]["tuner.pkl"]
        (snapshot / "manifest.json").write_text(json.dumps({**body, "mac": resume_guard._mac(key, body)}))
    with pytest.raises(HeaderNetError, match=fragment) as exc:
        resume_guard.verify(folder)
    assert "\n" not in str(exc.value) and "--name" in str(exc.value)


def test_the_key_is_private_and_outside_the_search(tmp_path, monkeypatch):
    key_file = tmp_path / "config" / "resume.key"
    monkeypatch.setenv(resume_guard.KEY_ENV, str(key_file))
    key = resume_guard.load_key(create=True)
    assert len(key) == 32 and key_file.stat().st_mode & 0o777 == 0o600
    assert resume_guard.load_key(create=False) == key  # stable
    os.chmod(key_file, 0o644)
    with pytest.raises(HeaderNetError, match="chmod 600"):
        resume_guard.load_key(create=False)
    os.chmod(key_file, 0o600)
    folder = signed_folder(tmp_path)
    monkeypatch.setenv(resume_guard.KEY_ENV, str(tmp_path / "other.key"))
    resume_guard.load_key(create=True)  # another account's key cannot vouch for this search
    with pytest.raises(HeaderNetError, match="not signed with this account's resume key"):
        resume_guard.verify(folder)


def test_the_tune_callback_signs_only_after_tune_saved(tmp_path, monkeypatch):
    """ResumeSnapshot reads Tune's staging folder only in the step in which Tune saved its
    state (it called get_state), not on each of the many steps per second between saves."""
    from types import SimpleNamespace

    from tuning.snapshot import ResumeSnapshot

    staging, search = tmp_path / "staging", tmp_path / "search"
    staging.mkdir()
    search.mkdir()
    for name, data in STATE.items():
        if name != "tuner.pkl":
            (staging / name).write_bytes(data)
    trial = SimpleNamespace(local_experiment_path=str(staging), remote_experiment_path=str(search),
                            run_metadata=SimpleNamespace(pickled_error_filename=None))
    signed = []
    monkeypatch.setattr(resume_guard, "record", lambda folder, files: signed.append(sorted(files)))
    callback = ResumeSnapshot()
    callback.on_step_end(1, [trial])
    assert signed == []
    assert callback.get_state() is None   # Tune saved: nothing of the callback's own to keep
    callback.on_step_end(2, [trial])
    callback.on_step_end(3, [trial])
    assert signed == [sorted(n for n in STATE if n != "tuner.pkl")]
    callback.get_state()
    callback.on_step_end(4, [trial])      # saved again, but nothing changed: not signed again
    assert len(signed) == 1

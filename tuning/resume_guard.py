"""Resume only from state this project wrote: Ray Tune's pickles, signed with a key kept outside
the search folder.

`Tuner.restore` unpickles `tuner.pkl`, the searcher state and the trial entries of
`experiment_state-*.json` (cloudpickled blobs) from the search folder. On shared storage anyone
who can write there would run code in the driver at the next `--resume`. So the driver signs
what Tune writes, and a resume restores only what it signed:

- The key: 32 random bytes in `~/.config/headernet-tune/resume.key` (or `$XDG_CONFIG_HOME/...`,
  or the file `$HEADERNET_RESUME_KEY` names), created mode 0600 on first use, never in the search
  folder and never pickled. Resuming needs the same key (the same account, or that file).
- The snapshot: `<search>/.resume/` holds copies of Tune's state files named by their SHA-256
  and `manifest.json` (Tune's file name -> digest, plus an HMAC-SHA256 of the whole). It is
  written right after the Tuner is created (`tuner.pkl`) and after every state save Tune makes
  (`tuning/snapshot.py`, a Tune callback reading Tune's local staging folder: the files there
  are complete, the synced copies in the search folder may lag or be mid-copy).
- On `--resume`, `verify` checks the manifest and every copy against the key before anything
  is written (a missing, truncated, edited or foreign file is one line naming it, in well under
  a second, and nothing is changed); then `install` puts the verified bytes in place of Tune's
  live files and moves every other Tune state file aside, so Tune reads nothing unsigned.

A later state than the last snapshot (a kill between a save and its snapshot) is lost; resume
is then one save older, which Tune handles like any stale snapshot (trials continue from their
own `last.pt`).
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from headernet_core.artifacts import atomic_path, remove_stale_temps, write_json
from headernet_core.errors import fail

from .ray_compat import EXPERIMENT_STATE, TUNE_STATE_FILES, TUNER_PKL

KEY_ENV = "HEADERNET_RESUME_KEY"       # path of the key file (tests, containers, shared setups)
SNAPSHOT_DIR = ".resume"
MANIFEST = "manifest.json"
DISPLACED = "displaced"                 # Tune files found unsigned at the last resume
FORMAT = "headernet-resume-v1"
_DIGEST_RE = re.compile(r"[0-9a-f]{64}")
MAX_STATE_BYTES = 2**30
RECOVER = ("start a new search with another --name, or recover results from the trial folders "
           "(each holds metrics_epoch.csv, best_metrics.json and its checkpoints)")


def is_tune_state(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TUNE_STATE_FILES)


# --- the key ----------------------------------------------------------------------------------
def key_path() -> Path:
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config_home / "headernet-tune" / "resume.key"


def load_key(*, create: bool) -> bytes:
    """The signing key; `create` makes one (0600) when there is none yet."""
    path = key_path()
    if not path.exists() and create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
        except FileExistsError:
            pass  # another search created it a moment ago
        except OSError as exc:
            fail(f"cannot create the resume key {path} ({exc.strerror}); set {KEY_ENV} to a file "
                 f"path this account can write (kept outside the search folder)")
    if not path.is_file():
        fail(f"no resume key at {path}: this search was signed by another account or machine; "
             f"set {KEY_ENV} to the key file used when it started, or {RECOVER}")
    if path.stat().st_mode & 0o077:
        fail(f"{path} can be read or written by other users (mode {path.stat().st_mode & 0o777:o}); "
             f"chmod 600 it: whoever can read it can forge resume state")
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) < 16:
        fail(f"{path} is not a resume key (expected the hex line this command writes); delete it "
             f"to start signing with a new key (searches signed with the old one cannot resume)")
    return key


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes; OSError for anything else (a planted FIFO or a link to a device
    must not hang or flood the check)."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise IsADirectoryError(errno.EINVAL, "not a regular file", str(path))
    if info.st_size > MAX_STATE_BYTES:
        raise OSError(errno.EFBIG, "too large for Ray Tune state", str(path))
    return path.read_bytes()


def _mac(key: bytes, body: dict) -> str:
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def _read_manifest(path: Path) -> tuple[dict, dict[str, str], str]:
    """(the manifest without its MAC, its file entries, the MAC); OSError, ValueError, KeyError,
    TypeError, AttributeError or RecursionError when it is not the JSON this command writes."""
    manifest = json.loads(_read_regular(path))
    body = {k: v for k, v in manifest.items() if k != "mac"}
    return body, dict(body["files"]), str(manifest["mac"])


# --- writing the snapshot ---------------------------------------------------------------------
def sign_tuner(search_dir: Path) -> None:
    """Start the signed snapshot of a new search with its freshly written tuner.pkl."""
    record(search_dir, {TUNER_PKL: (Path(search_dir) / TUNER_PKL).read_bytes()}, fresh=True)


def record(search_dir: Path, files: dict[str, bytes], *, fresh: bool = False) -> None:
    """Sign `files` (Tune state file name -> content) as the search's resume state. tuner.pkl is
    kept from the previous (verified) manifest unless given; `fresh` starts a new manifest."""
    search_dir = Path(search_dir)
    key = load_key(create=True)
    folder = search_dir / SNAPSHOT_DIR
    entries = {} if fresh else {name: digest for name, digest in _verified_entries(folder, key).items()
                                if name == TUNER_PKL}
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        digest = entries[name] = hashlib.sha256(data).hexdigest()
        with contextlib.suppress(OSError):
            if _read_regular(folder / digest) == data:
                continue   # this content is signed already
        with atomic_path(folder / digest, durable=True) as tmp:
            tmp.write_bytes(data)
    body = {"format": FORMAT, "files": entries, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(folder / MANIFEST, {**body, "mac": _mac(key, body)}, durable=True)
    keep = set(entries.values()) | {MANIFEST, DISPLACED}
    for entry in folder.iterdir():
        if entry.name not in keep and _DIGEST_RE.fullmatch(entry.name):
            entry.unlink(missing_ok=True)
    remove_stale_temps(folder)


def _verified_entries(folder: Path, key: bytes) -> dict[str, str]:
    """The manifest's entries if its MAC holds (else {}: a damaged manifest is not extended)."""
    try:
        body, entries, mac = _read_manifest(folder / MANIFEST)
        if hmac.compare_digest(mac, _mac(key, body)):
            return entries
    except (OSError, ValueError, AttributeError, KeyError, TypeError, RecursionError):
        pass
    return {}


# --- resuming ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifiedState:
    """Tune's state files as signed: name -> content."""
    files: dict[str, bytes]


def verify(search_dir: Path) -> VerifiedState:
    """Check the signed snapshot; one `HeaderNetError` line naming the first bad file. Reads only."""
    folder = Path(search_dir) / SNAPSHOT_DIR
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        fail(f"{manifest_path} is missing: this search's resume state is not signed (started by a "
             f"version before signing, or the folder is damaged), so it cannot be resumed safely; "
             f"{RECOVER}")
    key = load_key(create=False)
    try:
        body, entries, mac = _read_manifest(manifest_path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        fail(f"{manifest_path} is damaged (not the JSON this command writes); {RECOVER}")
    if body.get("format") != FORMAT or not hmac.compare_digest(mac, _mac(key, body)):
        fail(f"{manifest_path} is not signed with this account's resume key ({key_path()}): it was "
             f"changed, or written by another user or machine; {RECOVER}")
    files = {}
    for name, digest in entries.items():
        if not is_tune_state(str(name)) or not _DIGEST_RE.fullmatch(str(digest)):
            fail(f"{manifest_path}: unexpected entry {name!r}; {RECOVER}")
        blob = folder / digest
        try:
            data = _read_regular(blob)
        except OSError as exc:
            fail(f"{blob} (the signed copy of {name}) is missing or unreadable ({exc.strerror}); {RECOVER}")
        if hashlib.sha256(data).hexdigest() != digest:
            fail(f"{blob} (the signed copy of {name}, {len(data)} bytes) is damaged or was changed; "
                 f"{RECOVER}")
        files[name] = data
    if TUNER_PKL not in files:
        fail(f"{manifest_path} lists no {TUNER_PKL}; {RECOVER}")
    if not any(fnmatch.fnmatchcase(name, EXPERIMENT_STATE) for name in files):
        fail(f"{search_dir}: the search was stopped before Ray Tune saved its first state, so "
             f"there is nothing to resume; start it again with another --name")
    return VerifiedState(files)


def install(search_dir: Path, state: VerifiedState) -> list[str]:
    """Put the verified files in place of Tune's live ones; every other Tune state file at the
    top of the search folder is moved to `.resume/displaced/`. Returns the names displaced
    or replaced (damaged, stale or planted files)."""
    search_dir = Path(search_dir)
    displaced_dir = search_dir / SNAPSHOT_DIR / DISPLACED
    shutil.rmtree(displaced_dir, ignore_errors=True)  # only the last resume's are kept
    changed = []
    for entry in sorted(search_dir.iterdir()):
        if not is_tune_state(entry.name):
            continue
        signed = state.files.get(entry.name)
        with contextlib.suppress(OSError):
            if signed is not None and _read_regular(entry) == signed:
                continue
        displaced_dir.mkdir(parents=True, exist_ok=True)
        os.replace(entry, displaced_dir / entry.name)
        changed.append(entry.name)
    for name, data in state.files.items():
        if not (search_dir / name).exists():
            with atomic_path(search_dir / name, durable=True) as tmp:
                tmp.write_bytes(data)
    return changed

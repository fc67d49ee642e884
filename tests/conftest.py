"""Shared fixtures: a tiny on-disk dataset in the training CSV format, and tiny run configs."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import yaml

# Tests run on 2 cores next to other processes: one intra-op thread avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The search's resume-signing key (tuning/resume_guard.py) of this test session, never the
# user's own ~/.config one; subprocesses inherit it.
_KEY_DIR = tempfile.mkdtemp(prefix="headernet-test-key-")
atexit.register(shutil.rmtree, _KEY_DIR, ignore_errors=True)
os.environ["HEADERNET_RESUME_KEY"] = os.path.join(_KEY_DIR, "resume.key")
warnings.filterwarnings("ignore", message=".*random weights.*")
warnings.filterwarnings("ignore", message=".*small random model.*")


# pytest-xdist (the README's `-n auto`): the end-to-end runs wait on Ray, process starts and
# each other as much as they compute, so even 2 cores keep 3 workers busy.
XDIST_MIN_WORKERS = 3


@pytest.hookimpl(optionalhook=True)   # plain `pytest -p no:xdist` still runs
def pytest_xdist_auto_num_workers(config):
    return max(XDIST_MIN_WORKERS, os.cpu_count() or 1)


def pytest_configure(config):
    """Hand tests to xdist's workers one at a time (its default sends each worker a quarter of
    its share at once, which put every end-to-end run on one worker)."""
    if hasattr(config.option, "maxschedchunk") and config.option.maxschedchunk is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """The end-to-end runs (`slow`) first, the longest first (`@pytest.mark.slow(seconds=N)`: N
    is its wall time alone), then in file order: spread over pytest-xdist's workers, they start
    together instead of trailing at the end of the run, and the longest does not start last."""
    def order(item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0)
    items.sort(key=order)


def write_clips(folder: Path, n: int, *, seed: int, frames: int = 6, size: int = 32,
                prefix: str = "clip") -> pd.DataFrame:
    """n clips, a third positive; positives carry a bright moving square so a model can learn."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = int(i % 3 == 0)
        clip = rng.integers(0, 80, size=(frames, size, size, 3), dtype=np.uint8)
        if label:
            for t in range(frames):
                x = 2 + 3 * t
                clip[t, 10:16, x:x + 6] = 250
        name = f"{prefix}_{i:03d}_{label}"
        np.save(folder / f"{name}_s.npy", clip)
        rows.append({"path": f"clips/{name}", "label": label, "video_id": f"{prefix}-match{i % 4}",
                     "half": 1 + i % 2, "frame": 100 + i})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_data")
    write_clips(root / "clips", 18, seed=1, prefix="tr").to_csv(root / "train.csv", index=False)
    write_clips(root / "clips", 9, seed=2, prefix="va").to_csv(root / "val.csv", index=False)
    return {"root": root, "train_csv": root / "train.csv", "val_csv": root / "val.csv"}


@pytest.fixture(scope="session")
def epoch_data(tmp_path_factory) -> dict[str, Path]:
    """90 train / 30 val clips: a tiny trial's epoch lasts long enough (~0.35 s) for a test to
    act between two epochs (kill, signal, hold a process)."""
    root = tmp_path_factory.mktemp("epoch_data")
    write_clips(root / "clips", 90, seed=5, prefix="tr").to_csv(root / "train.csv", index=False)
    write_clips(root / "clips", 30, seed=6, prefix="va").to_csv(root / "val.csv", index=False)
    return {"root": root, "train_csv": root / "train.csv", "val_csv": root / "val.csv"}


@pytest.fixture
def tiny_config(tiny_data, tmp_path):
    """A fast CPU run config over `tiny_data`; pass overrides as keyword arguments."""
    from headernet_core.config import TrainConfig

    def make(**overrides) -> TrainConfig:
        values = dict(train_csv=str(tiny_data["train_csv"]), val_csv=str(tiny_data["val_csv"]),
                      backbone="vmae", vmae_variant="tiny", csn_variant="tiny", num_frames=4,
                      input_size=32, batch_size=4, epochs=2, lr_backbone=1e-3, lr_head=1e-3,
                      num_workers=0, cpu=True, progress=False, plots=False, tensorboard=False,
                      output_root=str(tmp_path / "runs"), run_name="run", warmup_epochs=0.5)
        values.update(overrides)
        return TrainConfig.from_dict(values, source="test")
    return make


# Trainer settings of a tiny CPU trial (seconds per epoch): the search tests' common ground.
TINY_TRAINER = {"vmae_variant": "tiny", "csn_variant": "tiny", "num_frames": 4, "input_size": 32,
                "batch_size": 6, "epochs": 2, "cpu": True, "num_workers": 0, "progress": False,
                "plots": False, "tensorboard": False}


def write_space(where: Path, data: dict | None = None, *, search: dict | None = None,
                **sections) -> Path:
    """A space file of tiny trials (both backbones x lr_head, 4 trials, 2 at a time) written to
    `where` (a .yaml path, else `where`/space.yaml), training on `data` (train_csv, val_csv;
    output under `where`/out) when given. A mapping in `sections` updates that section, any
    other value replaces it; a searched key leaves the fixed trainer settings."""
    path = where if where.suffix == ".yaml" else where / "space.yaml"
    trainer = dict(TINY_TRAINER)
    if data is not None:
        trainer.update(train_csv=str(data["train_csv"]), val_csv=str(data["val_csv"]),
                       output_root=str(path.parent / "out"))
    space = {"name": "s", "trainer": trainer,
             "search": search or {"backbone": {"choice": ["vmae", "csn"]},
                                  "lr_head": {"loguniform": [3e-4, 3e-3]}},
             "budget": {"num_samples": 4, "max_concurrent": 2, "seed": 0},
             "resources": {"cpu": 1, "gpu": 0}}
    for key, value in sections.items():
        space[key] = {**space.get(key, {}), **value} if isinstance(value, dict) else value
    for key in space["search"]:
        space["trainer"].pop(key, None)
    path.write_text(yaml.safe_dump(space))
    return path


# --- a running search, watched from a test --------------------------------------------------
def trial_dirs(search_dir: Path) -> list[Path]:
    """A search folder's trial folders (t001_..., in launch order); none before it exists."""
    if not search_dir.is_dir():
        return []
    return sorted(p for p in search_dir.iterdir() if p.is_dir() and p.name.startswith("t0"))


def read_json(path: Path) -> dict:
    """A JSON record a running search may be writing: {} while it is missing or incomplete."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def wait_for(proc: subprocess.Popen, condition: Callable[[], Any], what: str, timeout: float = 300) -> Any:
    """The first truthy value of `condition`, polled while `proc` (started in its own session,
    stdout piped) runs; else its process group is killed and the test fails with `what` and
    the end of its output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    output = proc.communicate(timeout=60)[0] or ""
    raise AssertionError(f"{what} never happened: {output[-3000:]}")

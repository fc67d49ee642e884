"""Bad inputs and damaged states across every CLI, as a tired user at 2 a.m. or someone probing
for path tricks would type them. Each must end with exit code 2, exactly one `error:` line
naming what is wrong, no traceback, nothing written anywhere in the workspace (the working
directory) and every input byte-identical; a search must not have started Ray.

The CLIs run in-process (their `main`, which wraps the body in `run_cli` exactly as
`python -m ...` does; importing torch once instead of per case keeps the table fast), and a
few also as real subprocesses to cover the entry points.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from conftest import write_clips

REPO = Path(__file__).resolve().parents[1]
MARKER = "PLANTED_PICKLE_RAN"   # created in the workspace if a planted pickle is ever loaded


class Planted:
    """Unpickling this creates MARKER in the working directory (what an attacker would do)."""

    def __reduce__(self):
        return (open, (MARKER, "w"))


PLANTED = pickle.dumps(Planted())


# --- the workspace ------------------------------------------------------------------------------
def build_workspace(root: Path) -> None:
    import torch  # noqa: F401  (the checkpoint below)

    from headernet_core import checkpoints
    from headernet_core.backbones import create_backbone
    from headernet_core.config import TrainConfig
    from headernet_core.model import HeaderClassifier
    from tuning import resume_guard

    data = root / "data"
    train = write_clips(data / "clips", 12, seed=1, prefix="tr")
    val = write_clips(data / "clips", 6, seed=2, prefix="va")
    train.to_csv(data / "train.csv", index=False)
    val.to_csv(data / "val.csv", index=False)
    train.assign(video_id=[f"m{i % 6}" for i in range(12)]).to_csv(data / "all.csv", index=False)
    (data / "latin1.csv").write_bytes("path,label\nclips/caf\xe9,1\n".encode("latin-1"))
    (data / "header_only.csv").write_text("path,label\n")
    (root / "afile").write_text("a regular file\n")
    (root / "adir").mkdir()

    cfg = root / "cfg"
    cfg.mkdir()
    (cfg / "latin1.yaml").write_bytes("epochs: 2\nrun_name: caf\xe9\n".encode("latin-1"))
    (cfg / "deep.yaml").write_text("epochs: " + "[" * 5000 + "]" * 5000 + "\n")
    (cfg / "nested.yaml").write_text("mean: " + "[" * 40 + "0.5" + "]" * 40 + "\n")
    (cfg / "list.yaml").write_text("- epochs\n- 2\n")

    torch_ckpt = root / "ckpt"
    backbone, info = create_backbone("csn", "tiny")
    config = TrainConfig(backbone="csn", csn_variant="tiny", num_frames=4, input_size=32)
    model = HeaderClassifier(backbone, 0.0)
    payload = {"state_dict": model.state_dict(), "config": config.to_dict(), "epoch": 1,
               "backbone": {"family": "csn", "name": info.name, "arch": dict(info.arch)}}
    checkpoints.save(torch_ckpt / "model.pt", payload)
    _, vmae_info = create_backbone("vmae", "tiny")
    checkpoints.save(torch_ckpt / "mismatch.pt",
                     {**payload, "backbone": {"family": "csn", "name": "x", "arch": dict(vmae_info.arch)}})

    spaces = root / "spaces"
    spaces.mkdir()
    space = {"name": "s", "trainer": {"train_csv": "data/train.csv", "val_csv": "data/val.csv",
                                      "vmae_variant": "tiny", "num_frames": 4, "input_size": 32,
                                      "epochs": 2, "cpu": True, "output_root": "out"},
             "search": {"lr_head": {"loguniform": [1e-4, 1e-3]}},
             "budget": {"num_samples": 2, "max_concurrent": 1, "seed": 0},
             "resources": {"cpu": 1, "gpu": 0}}
    (spaces / "ok.yaml").write_text(yaml.safe_dump(space))
    (spaces / "latin1.yaml").write_bytes("name: caf\xe9\nsearch: {}\n".encode("latin-1"))
    (spaces / "deep.yaml").write_text("search: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n")

    # Search folders as an interrupted search leaves them, then damaged or planted.
    def started(name: str, signed: dict[str, bytes] | None) -> Path:
        folder = root / "out" / name
        folder.mkdir(parents=True)
        (folder / "search.json").write_text(json.dumps({
            "space_file": str(spaces / "ok.yaml"), "space_yaml": (spaces / "ok.yaml").read_text(),
            "sets": [], "num_samples": None, "max_concurrent": None, "cwd": str(root),
            "args": {"sets": [], "keep_checkpoints": "all", "train_csv": None, "val_csv": None}}))
        (folder / "tuner.pkl").write_bytes(PLANTED)
        if signed is not None:
            resume_guard.record(folder, signed, fresh=True)
        return folder

    state = {"tuner.pkl": pickle.dumps({"a": 1}), "experiment_state-2026.json": b'{"trial_data": []}',
             "searcher-state-2026.pkl": pickle.dumps({"b": 2})}
    started("planted", None)                      # never signed: a planted tuner.pkl
    for name, target in (("trunc_state", "experiment_state-2026.json"),
                         ("trunc_searcher", "searcher-state-2026.pkl"), ("trunc_tuner", "tuner.pkl")):
        folder = started(name, state)
        blob = folder / ".resume" / hashlib.sha256(state[target]).hexdigest()
        blob.write_bytes(blob.read_bytes()[: len(state[target]) // 2])
    folder = started("swapped", state)            # the signed tuner.pkl replaced by a planted one
    (folder / ".resume" / hashlib.sha256(state["tuner.pkl"]).hexdigest()).write_bytes(PLANTED)
    folder = started("forged", state)             # the manifest edited to list a planted file
    manifest = json.loads((folder / ".resume" / "manifest.json").read_text())
    digest = hashlib.sha256(PLANTED).hexdigest()
    (folder / ".resume" / digest).write_bytes(PLANTED)
    manifest["files"]["tuner.pkl"] = digest
    (folder / ".resume" / "manifest.json").write_text(json.dumps(manifest))
    folder = started("no_state", {"tuner.pkl": state["tuner.pkl"]})  # stopped before Tune's first save

    runs = root / "runs"
    (runs / "mine" / "checkpoints").mkdir(parents=True)   # an unfinished run holding an input
    (runs / "mine" / "checkpoints" / "backbone.pth").write_bytes(b"the user's only copy")
    (runs / "done").mkdir(parents=True)
    (root / "datalink").symlink_to("data")   # the clips' folder under another name
    (runs / "done" / "status.json").write_text(json.dumps({"state": "finished", "epochs_done": 1}))
    (runs / "done" / "config.yaml").write_text("epochs: 1\n")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root -> content digest ('dir' for folders)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    old = Path.cwd()
    os.chdir(root)  # the spaces' relative paths resolve here
    try:
        build_workspace(root)
    finally:
        os.chdir(old)
    return root


# --- the table ----------------------------------------------------------------------------------
TRAIN = ["--train_csv", "data/train.csv", "--val_csv", "data/val.csv", "--vmae_variant", "tiny",
         "--csn_variant", "tiny", "--num_frames", "4", "--input_size", "32", "--epochs", "1",
         "--cpu", "--num_workers", "0", "--no-progress", "--output_root", "runs", "--run_name", "r"]
EVAL = ["--checkpoint", "ckpt/model.pt", "--val_csv", "data/val.csv", "--cpu"]
SEARCH = ["--space", "spaces/ok.yaml"]
PREDICT = ["--checkpoint", "ckpt/model.pt", "--clips", "data/val.csv", "--cpu"]


@dataclass
class Case:
    cli: str                  # train | split | evaluate | predict | demo | search
    args: list[str]
    fragment: str             # must appear in the error line
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False  # also run as `python -m ...`


CASES: dict[str, Case] = {
    # --- names that would escape or nest ------------------------------------------------------
    "train run_name escapes": Case("train", [*TRAIN, "--run_name", "../escaped"], "--run_name must be a plain folder name"),
    "train run_name nested": Case("train", [*TRAIN, "--run_name", "a/b"], "--run_name must be a plain folder name"),
    "train run_name dotdot": Case("train", [*TRAIN, "--run_name", ".."], "--run_name must be a plain folder name"),
    "train run_name 300 chars": Case("train", [*TRAIN, "--run_name", "x" * 300], "at most 120 characters"),
    "train run_name absolute": Case("train", [*TRAIN, "--run_name", "/tmp/abs"], "--run_name must be a plain folder name"),
    "search name escapes": Case("search", [*SEARCH, "--name", "../escaped"], "--name must be a plain folder name", subprocess=True),
    "search name dotdot": Case("search", [*SEARCH, "--name", ".."], "--name must be a plain folder name"),
    "search name nested": Case("search", [*SEARCH, "--name", "a/b"], "--name must be a plain folder name"),
    "search name 300 chars": Case("search", [*SEARCH, "--name", "n" * 300], "at most 120 characters"),
    "search name hidden": Case("search", [*SEARCH, "--name", ".hidden"], "--name must be a plain folder name"),
    # --- numbers --------------------------------------------------------------------------------
    "train seed 2**64": Case("train", [*TRAIN, "--seed", str(2**64)], "--seed must be in 0..4294967295", subprocess=True),
    "train seed negative": Case("train", [*TRAIN, "--seed", "-1"], "--seed must be in"),
    "train frames absurd": Case("train", [*TRAIN, "--num_frames", "100000"], "--num_frames must be at most 1024"),
    "train frames beyond clips": Case("train", [*TRAIN, "--num_frames", "200"], "8x the longest clip (6 frames"),
    "train neg_pos_ratio inf": Case("train", [*TRAIN, "--neg_pos_ratio", "inf"], "--neg_pos_ratio must be 'all' or a positive number"),
    "train warmup nan": Case("train", [*TRAIN, "--warmup_epochs", "nan"], "--warmup_epochs must be a finite number"),
    "train lr_head inf": Case("train", [*TRAIN, "--lr_head", "inf"], "--lr_head must be a finite number"),
    "train weight_decay nan": Case("train", [*TRAIN, "--weight_decay", "nan"], "--weight_decay must be a finite number"),
    "train mean nan": Case("train", [*TRAIN, "--mean", "nan", "0.5", "0.5"], "--mean must be finite numbers"),
    "train input_size huge": Case("train", [*TRAIN, "--input_size", "100000"], "--input_size must be in 1..1024"),
    "train csn input_size 1": Case("train", [*TRAIN, "--backbone", "csn", "--input_size", "1"], "too small for --backbone csn"),
    "train num_workers negative": Case("train", [*TRAIN, "--num_workers", "-1"], "--num_workers must be in 0..128"),
    "train epochs zero": Case("train", [*TRAIN, "--epochs", "0"], "--epochs must be a positive integer"),
    "split seed 2**64": Case("split", ["--input_csv", "data/all.csv", "--output_dir", "new", "--seed", str(2**64)], "--seed must be in"),
    "split val_split 1.5": Case("split", ["--input_csv", "data/all.csv", "--output_dir", "new", "--val_split", "1.5"], "--val_split must be between 0 and 1"),
    "evaluate num_workers negative": Case("evaluate", [*EVAL, "--num_workers", "-1"], "--num_workers must be in 0..128"),
    "evaluate batch_size zero": Case("evaluate", [*EVAL, "--batch_size", "0"], "--batch_size must be a positive integer"),
    "predict num_workers negative": Case("predict", [*PREDICT, "--output", "p.csv", "--num_workers", "-1"], "--num_workers must be in 0..128"),
    "predict output over its clips csv": Case("predict", [*PREDICT, "--output", "data/val.csv"], "is an input of this command"),
    "predict output a folder": Case("predict", [*PREDICT, "--output", "adir"], "--output adir is a folder"),
    "predict clips csv not utf-8": Case("predict", ["--checkpoint", "ckpt/model.pt", "--clips", "data/latin1.csv",
                                                     "--cpu", "--output", "p.csv"], "data/latin1.csv: not UTF-8 text"),
    "demo size too small": Case("demo", ["--out", "demo_new", "--size", "8"], "--size must be >= 32", subprocess=True),
    "search trainer nan": Case("search", [*SEARCH, "--set", "warmup_epochs=.nan"], "warmup_epochs"),
    # --- output locations -------------------------------------------------------------------------
    "train output_root is a file": Case("train", [*TRAIN, "--output_root", "afile"], "--output_root"),
    "train output_root below a file": Case("train", [*TRAIN, "--output_root", "afile/runs"], "afile is a file, not a folder"),
    "split output_dir below a file": Case("split", ["--input_csv", "data/all.csv", "--output_dir", "afile/splits"], "afile is a file, not a folder"),
    "evaluate predictions below a file": Case("evaluate", [*EVAL, "--predictions", "afile/p.csv"], "afile is a file, not a folder"),
    "evaluate metrics a folder": Case("evaluate", [*EVAL, "--metrics", "adir"], "--metrics adir is a folder"),
    "demo out is a file": Case("demo", ["--out", "afile"], "exists and is not a folder"),
    "demo out below a file": Case("demo", ["--out", "afile/demo"], "afile is a file, not a folder"),
    "search storage below a file": Case("search", [*SEARCH, "--storage_path", "afile/x"], "afile is a file, not a folder"),
    "search storage is a file": Case("search", [*SEARCH, "--storage_path", "afile"], "afile is a file"),
    # --- inputs are never written -----------------------------------------------------------------
    "split over earlier splits": Case("split", ["--input_csv", "data/all.csv", "--output_dir", "data"], "data/train.csv already exists", subprocess=True),
    "split over its own input": Case("split", ["--input_csv", "data/train.csv", "--output_dir", "data", "--overwrite"], "would overwrite --input_csv"),
    "evaluate predictions over val csv": Case("evaluate", [*EVAL, "--predictions", "data/val.csv"], "is an input of this command"),
    "evaluate metrics over checkpoint": Case("evaluate", [*EVAL, "--metrics", "ckpt/model.pt"], "is an input of this command"),
    "demo out over data": Case("demo", ["--out", "data"], "folder exists and is not empty"),
    "search demo space, mistyped val csv": Case("search", ["--space", "demo", "--set", "train_csv=data/train.csv", "--set", "val_csv=data/my_vall.csv"], "my_vall.csv: val CSV not found"),
    "search demo space, user csvs missing": Case("search", ["--space", "demo", "--set", "train_csv=mine/train.csv", "--set", "val_csv=mine/val.csv"], "mine/train.csv: train CSV not found"),
    "search worker group larger than this machine": Case("search", [*SEARCH, "--set", "resources.workers=2", "--set", f"resources.cpu={os.cpu_count()}"], "per trial does not fit this machine ("),
    "search into a data folder": Case("search", [*SEARCH, "--storage_path", ".", "--name", "data"], "already holds files that are not a search's"),
    "train overwrite would delete an input": Case("train", [*TRAIN, "--run_name", "mine", "--overwrite", "--backbone", "csn", "--backbone_ckpt", "runs/mine/checkpoints/backbone.pth"], "lies inside the run folder"),
    "train run folder is the clip folder": Case("train", [*TRAIN, "--output_root", "data", "--run_name", "clips"], "lies inside the run folder"),
    "train run folder is the clip folder through a link": Case("train", [*TRAIN, "--output_root", "datalink", "--run_name", "clips"], "lies inside the run folder"),
    "train over a finished run": Case("train", [*TRAIN, "--output_root", "runs", "--run_name", "done", "--overwrite"], "finished run and is never overwritten"),
    # --- decoding -----------------------------------------------------------------------------------
    "train config not utf-8": Case("train", [*TRAIN, "--config", "cfg/latin1.yaml"], "cfg/latin1.yaml: not UTF-8 text"),
    "train config deeply nested": Case("train", [*TRAIN, "--config", "cfg/deep.yaml"], "cfg/deep.yaml: nested too deeply"),
    "train config 40 levels": Case("train", [*TRAIN, "--config", "cfg/nested.yaml"], "cfg/nested.yaml: nested too deeply"),
    "train config a list": Case("train", [*TRAIN, "--config", "cfg/list.yaml"], "expected a mapping"),
    "train csv not utf-8": Case("train", [*TRAIN, "--train_csv", "data/latin1.csv"], "data/latin1.csv: not UTF-8 text"),
    "split csv header only": Case("split", ["--input_csv", "data/header_only.csv", "--output_dir", "new"], "has a header but no rows"),
    "search space not utf-8": Case("search", ["--space", "spaces/latin1.yaml"], "spaces/latin1.yaml: not UTF-8 text"),
    "search space deeply nested": Case("search", ["--space", "spaces/deep.yaml"], "spaces/deep.yaml: nested too deeply"),
    # --- damaged checkpoints --------------------------------------------------------------------------
    "evaluate family mismatch": Case("evaluate", ["--checkpoint", "ckpt/mismatch.pt", "--val_csv", "data/val.csv", "--cpu"], "does not match the stored architecture"),
    "evaluate csv as checkpoint": Case("evaluate", ["--checkpoint", "data/train.csv", "--val_csv", "data/val.csv"], "not a loadable checkpoint", subprocess=True),
    # --- damaged or planted search state on --resume --------------------------------------------------
    "resume planted tuner.pkl": Case("search", [*SEARCH, "--name", "planted", "--resume"], "resume state is not signed", subprocess=True),
    "resume truncated experiment state": Case("search", [*SEARCH, "--name", "trunc_state", "--resume"], "signed copy of experiment_state-2026.json"),
    "resume truncated searcher state": Case("search", [*SEARCH, "--name", "trunc_searcher", "--resume"], "signed copy of searcher-state-2026.pkl"),
    "resume truncated tuner.pkl": Case("search", [*SEARCH, "--name", "trunc_tuner", "--resume"], "signed copy of tuner.pkl"),
    "resume swapped signed copy": Case("search", [*SEARCH, "--name", "swapped", "--resume"], "is damaged or was changed"),
    "resume forged manifest": Case("search", [*SEARCH, "--name", "forged", "--resume"], "not signed with this account's resume key"),
    "resume before the first state": Case("search", [*SEARCH, "--name", "no_state", "--resume"], "before Ray Tune saved its first state"),
    "resume without the key": Case("search", [*SEARCH, "--name", "trunc_state", "--resume"], "no resume key at",
                                   env={"HEADERNET_RESUME_KEY": "/nonexistent/headernet.key"}),
    "resume nothing there": Case("search", [*SEARCH, "--name", "never", "--resume"], "nothing to resume"),
    "train resume escapes": Case("train", ["--resume", "--run_name", "../data", "--output_root", "runs"], "--run_name must be a plain folder name"),
    "train resume nothing there": Case("train", [*TRAIN, "--run_name", "never", "--resume"], "nothing to resume"),
}


def run_in_process(case: Case) -> tuple[int, str]:
    """(exit code, stderr) of the CLI's main, as `python -m` runs it."""
    import contextlib
    import io

    from headernet_core import demo_data, evaluation, prediction, split_dataset, trainer
    from headernet_core.errors import run_cli
    from tuning import search

    mains: dict[str, Callable[[list[str]], None]] = {
        "train": trainer.main, "evaluate": evaluation.main, "predict": prediction.main,
        "demo": demo_data.main, "search": search.main,
        "split": lambda argv: run_cli(lambda: split_dataset.main(argv)),
    }
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            mains[case.cli](case.args)
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


MODULES = {"train": "headernet_core.train", "evaluate": "headernet_core.evaluate", "predict": "headernet_core.predict",
           "demo": "headernet_core.demo_data", "search": "tuning.search", "split": "headernet_core.split_dataset"}


def run_subprocess(case: Case, cwd: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **case.env}
    result = subprocess.run([sys.executable, "-m", MODULES[case.cli], *case.args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    return result.returncode, result.stderr


def check(code: int, err: str, case: Case) -> None:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1, err[-2000:]
    assert case.fragment in errors[0], errors[0]
    assert "Traceback" not in err, err[-2000:]


def test_the_table_has_forty_cases_over_every_cli():
    assert len(CASES) >= 40
    assert {case.cli for case in CASES.values()} == set(MODULES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, workspace, monkeypatch):
    import ray

    case = CASES[name]
    monkeypatch.chdir(workspace)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    before = snapshot(workspace)
    code, err = run_in_process(case)
    check(code, err, case)
    assert not ray.is_initialized()
    assert snapshot(workspace) == before  # nothing written, nothing removed, inputs unchanged
    assert not (workspace / MARKER).exists()


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.subprocess])
def test_bad_input_as_a_command(name, workspace):
    case = CASES[name]
    before = snapshot(workspace)
    code, err = run_subprocess(case, workspace)
    check(code, err, case)
    assert snapshot(workspace) == before
    assert not (workspace / MARKER).exists()


@pytest.mark.parametrize("command, bad_flag", [("train", ["--backbone", "resnet"]),
                                               ("evaluate", ["--views", "two"]),
                                               ("predict", ["--checkpoint", "x.pt"])])  # --clips missing
def test_the_commands_read_their_flags_before_importing_torch(command, bad_flag):
    """`python -m headernet_core.train --help` (and evaluate's, predict's) and a bad flag answer
    in a fraction of a second, not after the ~5 s of importing the model code (torch, timm,
    scikit-learn)."""
    probe = ("import runpy, sys\n"
             "try:\n"
             f"    runpy.run_module('headernet_core.{command}', run_name='__main__')\n"
             "except SystemExit as end:\n"
             "    print('exit', end.code, 'torch' in sys.modules)\n")
    for flags, code in ((["--help"], 0), (bad_flag, 2)):
        done = subprocess.run([sys.executable, "-c", probe, *flags], capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert done.stdout.splitlines()[-1] == f"exit {code} False", (done.stdout[-300:], done.stderr)

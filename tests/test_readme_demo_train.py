"""The README's one-run demo, as written there: demo data, a grouped split, then each
`python -m headernet_core.train` command must reach val AUC >= 0.90 within its 5 epochs.

The commands are read from README.md so the README cannot drift from what is tested. To keep
the suite short a run stops at the first epoch that reaches the target (through `on_epoch`,
the same hook Ray Tune uses); the full 5-epoch runs and their wall times are in
docs/performance.md.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import pandas as pd
import pytest

from headernet_core import demo_data, split_dataset
from headernet_core.trainer import RUN_ARTIFACTS, config_for_cli, train

README = Path(__file__).resolve().parents[1] / "README.md"
TARGET_AUC = 0.90


def readme_commands(module: str) -> list[list[str]]:
    """Every `python -m <module> ...` command of the README's code blocks, as argv lists."""
    text = README.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith(f"python -m {module} "):
            commands.append(shlex.split(line)[3:])
    return commands


def test_readme_has_the_demo_commands():
    trains = readme_commands("headernet_core.train")
    assert {args[args.index("--backbone") + 1] for args in trains if "demo_data/splits/train.csv" in args} \
        == {"vmae", "csn"}
    assert readme_commands("headernet_core.demo_data") and readme_commands("headernet_core.split_dataset")


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    """The README's data commands, run in a fresh working directory."""
    workdir = tmp_path_factory.mktemp("readme_demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        for args in readme_commands("headernet_core.demo_data"):
            demo_data.main(args)
        for args in readme_commands("headernet_core.split_dataset"):
            split_dataset.main(args)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["vmae", "csn"])
def test_readme_train_command_learns_the_demo(demo_workdir, monkeypatch, backbone):
    monkeypatch.chdir(demo_workdir)
    args = next(a for a in readme_commands("headernet_core.train")
                if "demo_data/splits/train.csv" in a and a[a.index("--backbone") + 1] == backbone)
    config = config_for_cli(args + ["--no-progress"])
    assert config.epochs == 5
    val = pd.read_csv(config.val_csv)
    assert val.label.nunique() == 2 and len(val) >= 200  # a real split, not a handful of clips

    aucs: list[float] = []

    def on_epoch(report) -> bool:
        aucs.append(report.metrics["val_auc"])
        return report.metrics["val_auc"] >= TARGET_AUC

    result = train(config, on_epoch=on_epoch, log=lambda _: None)
    assert max(aucs) >= TARGET_AUC, f"{backbone}: val AUC per epoch {aucs}"
    assert len(aucs) <= config.epochs

    run = result.run_dir
    for name in RUN_ARTIFACTS:
        assert (run / name).exists(), name
    best = json.loads((run / "best_metrics.json").read_text())
    assert (run / best["checkpoint"]).is_file()
    assert len(pd.read_csv(run / "val_predictions.csv")) == len(val)

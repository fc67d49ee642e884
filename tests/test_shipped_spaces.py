"""Every shipped search space runs: one trial of one epoch with its tiny backbone on the tiny
dataset (the recipe keys it searches, e.g. vmae_full's layer_decay, drop_path, weight_decay and
model_ema, reach a real trainer)."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from headernet_core.backbones import create_backbone

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted(p.stem for p in (REPO / "search_spaces").glob("*.yaml"))
pytestmark = pytest.mark.slow


def tiny_csn_checkpoint(path: Path) -> Path:
    """An mmaction2-style ir-CSN file of the tiny architecture (stands in for IG65M weights)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = create_backbone("csn", "tiny")
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize("space", SPACES)
def test_shipped_space_runs_one_tiny_trial(space, tiny_data, tmp_path):
    sets = {"train_csv": tiny_data["train_csv"], "val_csv": tiny_data["val_csv"],
            "vmae_variant": "tiny", "csn_variant": "tiny", "num_frames": 4, "input_size": 32,
            "batch_size": 4, "grad_accum": 1, "gradient_checkpointing": "false", "epochs": 1,
            "cpu": "true", "num_workers": 0, "progress": "false", "plots": "false",
            "tensorboard": "false", "budget.num_samples": 1, "budget.max_concurrent": 1,
            "resources.cpu": 1, "resources.gpu": 0, "scheduler.type": "none"}
    if space == "csn_ig65m":
        sets["backbone_ckpt"] = tiny_csn_checkpoint(tmp_path / "ircsn_tiny.pth")
    command = [sys.executable, "-m", "tuning.search", "--space", space,
               "--storage_path", str(tmp_path / "searches"),
               *[arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = list((tmp_path / "searches").rglob("metrics_epoch.csv"))
    assert len(metrics) >= 1, result.stdout[-3000:]
